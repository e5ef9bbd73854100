"""The file model: `read_adapter(path) -> AdapterFile`, a dict of `ModuleAdapter`s.

Reading validates the header and every module's shapes up front, but loads only the alphas: tensors
are read from the file when a module's math needs them, so a 1 GB adapter can be inspected,
converted or merged one module at a time.

Keys are split into a module stem and a parameter suffix by matching the known suffixes of every
algorithm (longest first); the algorithm is detected per module, so a file may mix LoRA, LoHa, LoKr
and full diffs. Keys no algorithm uses are kept in `unknown_keys`, never dropped silently.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .algorithms import ALGORITHMS, COMFYUI_VARIANTS, SUFFIX_INDEX, Algorithm, ShapeError
from .detection import CONVERTED_FROM_KEY, describe_source, detect_file_architecture, uses_comfy_names
from .errors import AdapterError
from .finite import count_nonfinite, describe_nonfinite, nonfinite_in_file
from .module import ALPHA, BIAS, DORA, ModuleAdapter, TensorSource
from .naming import DOTTED_FAMILIES
from .safetensors_io import PICKLE_SUFFIXES, SafetensorsReader, TensorEntry, dtype_name, load_pickle_tensors
from .scales import FULL_MATRIX_RULE, LYCORIS_RULE, PeftConfig, find_peft_config, lycoris_scale

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FLOAT32_MAX = torch.finfo(torch.float32).max
_SUFFIXES_LONGEST_FIRST = sorted(SUFFIX_INDEX, key=len, reverse=True)
_SUFFIX_SEGMENTS = max(suffix.count(".") + 1 for suffix in SUFFIX_INDEX)


@dataclass
class AdapterFile:
    path: str
    format: str
    architecture: str | None
    metadata: dict[str, str]
    modules: dict[str, ModuleAdapter]
    unknown_keys: list[str]
    tensors: dict[str, TensorEntry]  # every tensor in the file, in file order
    size: int
    problems: list[str] = field(default_factory=list)
    load: TensorSource = field(default=None, repr=False)
    # keys -> their NaN/Inf counts, done faster than one load at a time (None: by `load`)
    count_nonfinite: Callable[[list[str]], dict[str, int]] | None = field(default=None, repr=False)
    scale_rule: str = ""  # the scale convention applied, in words
    source: str = ""  # the tool and naming the keys follow, in words

    def nonfinite_counts(self) -> dict[str, int]:
        """Non-finite values per tensor key (reads every tensor once). Alphas are not counted: one the
        scale needs was checked when the file was read, and some writers store an alpha their
        convention ignores (ai-toolkit's full-rank LoKr: 9999999999, inf in fp16)."""
        keys = [module.params[name].name for module in self.modules.values() for name in module.tensor_names]
        if self.count_nonfinite is not None:
            return self.count_nonfinite(keys)
        found = {key: count_nonfinite(self.load(key)) for key in keys}
        return {key: n for key, n in found.items() if n}

    def check_finite(self) -> None:
        """Raise AdapterError listing the tensors that hold NaN/Inf (merging them would ruin a model)."""
        counts = self.nonfinite_counts()
        if counts:
            raise AdapterError(f"{self.path}: {describe_nonfinite(counts)}")


def split_key(key: str) -> tuple[str, str | None, str, str | None] | None:
    """'stem.suffix' -> (stem, algorithm name or None, canonical name, PEFT adapter name or None).

    PEFT's raw state dicts name the adapter inside the suffix: `lora_A.<adapter>.weight`, and after
    tensors kept in a ParameterDict (`hada_w1_a.<adapter>`, `lokr_w1.<adapter>`). None when no known
    suffix ends the key.
    """
    match, stem = None, key
    for _ in range(_SUFFIX_SEGMENTS):  # one segment more each time: the longest suffix that fits wins
        stem, dot, _ = stem.rpartition(".")
        if not (dot and stem):
            break
        found = SUFFIX_INDEX.get(key[len(stem) + 1 :])
        if found is not None:
            match = (stem, *found, None)
    if match is not None:
        return match
    head, _, adapter = key.rpartition(".")
    if adapter == "weight":  # lora_A.<adapter>.weight
        head, _, adapter = head.rpartition(".")
        head += ".weight"
    for suffix in _SUFFIXES_LONGEST_FIRST:
        algorithm, canonical = SUFFIX_INDEX[suffix]
        if algorithm and head.endswith("." + suffix) and adapter.isidentifier():
            return head[: -len(suffix) - 1], algorithm, canonical, adapter
    return None


def detect_format(stems: list[str]) -> str:
    """The key-layout family, by majority over module stems."""
    votes: dict[str, int] = {}
    for stem in stems:
        if stem.startswith("lora_unet_"):
            family = "musubi"
        elif stem.startswith("lycoris_"):
            family = "lycoris"
        elif stem.startswith("base_model.model."):
            family = "peft"
        elif "." in stem:
            family = "diffusers"
        else:
            family = "unknown"
        votes[family] = votes.get(family, 0) + 1
    return max(votes, key=votes.get) if votes else "unknown"


@dataclass
class _Source:
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    load: TensorSource
    load_many: Callable[[list[str]], dict[str, torch.Tensor]]
    count_nonfinite: Callable[[list[str]], dict[str, int]] | None
    size: int


def _open_source(path: str) -> _Source:
    if path.lower().endswith(PICKLE_SUFFIXES):
        tensors = load_pickle_tensors(path)
        entries = {k: TensorEntry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        return _Source(entries, {}, tensors.__getitem__, lambda keys: {k: tensors[k] for k in keys}, None,
                       os.path.getsize(path))
    reader = SafetensorsReader(path)
    header = reader.header
    return _Source(dict(header.tensors), header.metadata, reader.get, reader.get_many,
                   functools.partial(nonfinite_in_file, reader), header.file_size)


@dataclass
class _Grouped:
    """A file's keys sorted into modules: stem -> {canonical name: entry}, and what fits no module."""

    params: dict[str, dict[str, TensorEntry]] = field(default_factory=dict)
    algorithms: dict[str, set[str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    adapter_names: set[str] = field(default_factory=set)


def _group_keys(path: str, entries: Mapping[str, TensorEntry]) -> _Grouped:
    grouped = _Grouped()
    for key, entry in entries.items():
        parts = split_key(key)
        if parts is None:
            grouped.unknown.append(key)
            continue
        stem, algorithm, canonical, adapter_name = parts
        params = grouped.params.setdefault(stem, {})
        if canonical in params:
            raise AdapterError(f"{path}: module {stem}: {canonical} is given twice ({params[canonical].name} and {key})")
        params[canonical] = entry
        if algorithm:
            grouped.algorithms.setdefault(stem, set()).add(algorithm)
        if adapter_name:
            grouped.adapter_names.add(adapter_name)
    if len(grouped.adapter_names) > 1:
        raise AdapterError(
            f"{path}: holds several PEFT adapters ({', '.join(sorted(grouped.adapter_names))}); "
            "save one adapter per file"
        )
    return grouped


def read_adapter(path: str | os.PathLike, lokr_full_matrix_alpha: bool = False) -> AdapterFile:
    """Read and validate an adapter file. Raises AdapterError with the file, module and problem.

    lokr_full_matrix_alpha: apply alpha to LoKr modules whose w1 and w2 are both full, as
    alpha / ss_network_dim (files from trainers that did so). Off by default: scale 1.
    """
    path = os.fspath(path)
    if os.path.isdir(path) or not os.path.exists(path):
        raise AdapterError(f"{path}: " + ("is a directory, not an adapter file" if os.path.isdir(path) else "no such file"))
    source = _open_source(path)
    entries, metadata, load = source.entries, source.metadata, source.load
    if not entries:
        raise AdapterError(f"{path}: file holds no tensors")
    grouped = _group_keys(path, entries)
    rule = _scale_rule(path, metadata, grouped, lokr_full_matrix_alpha)

    algorithms = dict(ALGORITHMS)
    if _from_comfyui_trainer(grouped):
        algorithms.update(COMFYUI_VARIANTS)
    alphas = source.load_many([p[ALPHA].name for p in grouped.params.values() if ALPHA in p and p[ALPHA].numel == 1])
    modules: dict[str, ModuleAdapter] = {}
    problems: list[str] = []
    unknown = list(grouped.unknown)
    for stem, params in grouped.params.items():
        found = grouped.algorithms.get(stem, set())
        if not found:
            unknown.extend(entry.name for entry in params.values())
            problems.append(f"module {stem}: has only {', '.join(sorted(params))}, no adapter weights")
            continue
        if len(found) > 1:
            raise AdapterError(f"{path}: module {stem}: mixes tensors of {' and '.join(sorted(found))}")
        modules[stem] = _build_module(path, stem, algorithms[found.pop()], params, load, rule, alphas)

    if not modules:
        raise AdapterError(
            f"{path}: no LoRA/LoHa/LoKr/diff modules found among {len(entries)} tensors "
            f"(first key: {next(iter(entries))})"
        )
    adapter = AdapterFile(
        path=path,
        format=detect_format(list(modules)),
        architecture=None,
        metadata=metadata,
        modules=modules,
        unknown_keys=unknown,
        tensors=entries,
        size=source.size,
        problems=problems,
        load=load,
        count_nonfinite=source.count_nonfinite,
        scale_rule=rule.describe,
    )
    adapter.architecture = detect_file_architecture(adapter)
    if adapter.format == "diffusers" and uses_comfy_names(list(modules), adapter.architecture):
        adapter.format = "comfyui"
    adapter.format, adapter.source = describe_source(adapter)
    if adapter.format == "peft" and rule.peft is None:
        adapter.scale_rule = "PEFT without its adapter config (none beside the file or in it): alpha = r, scale 1"
    return adapter


def _from_comfyui_trainer(grouped: _Grouped) -> bool:
    """ComfyUI's trainer adapts every bias (`diff_b`) and every 1-D weight (`diff`) beside the layers'
    LoRA/LoHa/LoKr tensors; other writers do not."""
    return any(
        BIAS in params or (set(params) - {ALPHA} == {"diff"} and len(params["diff"].shape) == 1)
        for params in grouped.params.values()
    )


def _network_dim(path: str, metadata: Mapping[str, str]) -> float:
    try:
        dim = float(metadata["ss_network_dim"])
    except (KeyError, ValueError):
        dim = math.nan
    if not (math.isfinite(dim) and dim > 0):
        raise AdapterError(
            f"{path}: applying alpha to full-matrix LoKr needs the network dim, but the file has "
            f"no positive ss_network_dim metadata"
        )
    return dim


@dataclass(frozen=True)
class _ScaleRule:
    """How this file's modules get their scale (see scales.py), and how to say so."""

    describe: str
    full_matrix_dim: float | None = None
    peft: PeftConfig | None = None

    def scale(self, stem: str, algorithm: Algorithm, shapes, alpha: float | None) -> float | None:
        if self.peft is not None and alpha is None:
            return self.peft.scale(_module_path(stem))
        return lycoris_scale(algorithm, shapes, alpha, self.full_matrix_dim)


def _module_path(stem: str) -> str:
    for prefix in DOTTED_FAMILIES:
        if stem.startswith(prefix):
            return stem[len(prefix) :]
    return stem


def _scale_rule(path: str, metadata, grouped: _Grouped, lokr_full_matrix_alpha: bool) -> _ScaleRule:
    if lokr_full_matrix_alpha:
        return _ScaleRule(FULL_MATRIX_RULE, full_matrix_dim=_network_dim(path, metadata))
    has_alpha = any(ALPHA in params for params in grouped.params.values())
    # PEFT never stores alpha in the weights; this pack's conversions always follow LyCORIS's rule
    peft = None if has_alpha or CONVERTED_FROM_KEY in metadata else find_peft_config(path, metadata)
    if peft is not None:
        return _ScaleRule(peft.describe(), peft=peft)
    return _ScaleRule(LYCORIS_RULE)


def _build_module(path, stem, algorithm, params, load, rule: _ScaleRule, alphas: Mapping[str, torch.Tensor]) -> ModuleAdapter:
    for name, entry in params.items():
        allowed = FLOAT_DTYPES + ((torch.int64, torch.int32) if name == ALPHA else ())
        if entry.dtype not in allowed:
            raise AdapterError(
                f"{path}: module {stem}: {name} has dtype {dtype_name(entry.dtype)}, expected a float type"
            )
    alpha = None
    if ALPHA in params:
        entry = params[ALPHA]
        if math.prod(entry.shape) != 1:
            raise AdapterError(f"{path}: module {stem}: alpha must be a single value, got shape {list(entry.shape)}")
        alpha = float(alphas[entry.name].reshape(()).item())
    for name, entry in params.items():
        if name != ALPHA and entry.numel == 0:
            raise AdapterError(f"{path}: module {stem}: {name} {list(entry.shape)} has no elements (rank 0?)")
    shapes = {name: entry.shape for name, entry in params.items()}
    try:
        shape = tuple(algorithm.weight_shape(shapes))
        rank = algorithm.rank(shapes)
    except ShapeError as e:
        listed = ", ".join(f"{n} {list(p.shape)}" for n, p in params.items() if n != ALPHA)
        raise AdapterError(f"{path}: module {stem} ({algorithm.name}): {e} [{listed}]") from None
    scale = rule.scale(stem, algorithm, shapes, alpha)
    if scale is None:
        raise AdapterError(f"{path}: module {stem}: alpha is {alpha}" + (f" with rank {rank}" if rank is not None else ""))
    if not abs(scale) <= FLOAT32_MAX:  # the math runs in fp32
        raise AdapterError(f"{path}: module {stem}: scale {scale:g} (alpha {alpha}) is beyond the float32 range")
    if DORA in params:
        if len(shape) < 2:
            raise AdapterError(f"{path}: module {stem}: dora_scale needs a weight of at least 2 dimensions, not {list(shape)}")
        # One value per output row, laid out along the rows ([out], [out, 1]: as dora.on_output_axis reads
        # it), or else one per input column ([in], [1, in]); a transposed [1, out] is neither.
        stored = tuple(params[DORA].shape)
        n = math.prod(stored)
        per_row = len(stored) >= 1 and stored[0] == shape[0] and n == shape[0]
        if not (per_row or n == shape[1]):
            raise AdapterError(
                f"{path}: module {stem}: dora_scale {list(stored)} is neither one value per output row "
                f"([{shape[0]}] or [{shape[0]}, 1]) nor one per input column ([1, {shape[1]}]) of {list(shape)}"
            )
    if BIAS in params and tuple(params[BIAS].shape) != (shape[0],):
        raise AdapterError(f"{path}: module {stem}: diff_b {list(params[BIAS].shape)} does not match {shape[0]} outputs")
    return ModuleAdapter(stem, algorithm, params, alpha, scale, shape, rank, load)
