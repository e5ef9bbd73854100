"""The file model: `read_adapter(path) -> AdapterFile`, a dict of `ModuleAdapter`s.

Reading validates the header and every module's shapes up front, but loads only the alphas: tensors
are read from the file when a module's math needs them, so a 1 GB adapter can be inspected,
converted or merged one module at a time.

Keys are split into a module stem and a parameter suffix by matching the known suffixes of every
algorithm (longest first); the algorithm is detected per module, so a file may mix LoRA, LoHa, LoKr
and full diffs. Keys no algorithm uses are kept in `unknown_keys`, never dropped silently.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from . import dora
from .algorithms import ALGORITHMS, SUFFIX_INDEX, Algorithm, ShapeError
from .architectures import detect_file_architecture, refine_format
from .errors import AdapterError
from .finite import count_nonfinite, describe_nonfinite
from .safetensors_io import PICKLE_SUFFIXES, SafetensorsReader, TensorEntry, dtype_name, load_pickle_tensors

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SUFFIXES_LONGEST_FIRST = sorted(SUFFIX_INDEX, key=len, reverse=True)

TensorLoader = Callable[[str], torch.Tensor]


@dataclass
class ModuleAdapter:
    """One adapted module: its tensors (by canonical name), alpha and the math on them."""

    stem: str
    algorithm: Algorithm
    params: dict[str, TensorEntry]  # canonical name -> the file's key, dtype and shape
    alpha: float | None
    load: TensorLoader = field(repr=False)  # file key -> tensor
    # When set, LoKr modules with both factors full use alpha / this instead of scale 1 (SPEC §2 override).
    full_matrix_dim: float | None = None

    def __post_init__(self) -> None:
        shapes = {name: entry.shape for name, entry in self.params.items()}
        self.shape: tuple = tuple(self.algorithm.weight_shape(shapes))
        self.rank: int | None = self.algorithm.rank(shapes)

    @property
    def algorithm_name(self) -> str:
        return self.algorithm.name

    @property
    def scale(self) -> float:
        if self.alpha is None:
            return 1.0
        if self.rank is None:
            # Full matrices (LoKr with w1 and w2 full, diffs) have no rank to divide by.
            return self.alpha / self.full_matrix_dim if self.full_matrix_dim else 1.0
        return self.alpha / self.rank

    @property
    def has_dora(self) -> bool:
        return "dora_scale" in self.params

    @property
    def has_bias_delta(self) -> bool:
        return self.algorithm.bias_param is not None and self.algorithm.bias_param in self.params

    @property
    def keys(self) -> list[str]:
        return [entry.name for entry in self.params.values()]

    def tensors(self, device: torch.device | str | None = None, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """The module's tensors, converted once to `dtype` (fp32 for all math) on `device`."""
        return {
            name: self.load(entry.name).to(device=device, dtype=dtype)
            for name, entry in self.params.items()
            if name != "alpha"
        }

    def loaded(self, device: torch.device | str | None = None, dtype=torch.float32) -> "ModuleAdapter":
        """A copy holding its tensors in memory (for repeated use, e.g. bypass hooks)."""
        cache = {self.params[name].name: t for name, t in self.tensors(device, dtype).items()}
        return ModuleAdapter(self.stem, self.algorithm, self.params, self.alpha, cache.__getitem__, self.full_matrix_dim)

    def delta_weight(self, dtype=torch.float32, tensors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """s·ΔW at strength 1, shape `self.shape`, computed in fp32 and cast once to `dtype`."""
        t = tensors if tensors is not None else self.tensors()
        return (self.algorithm.delta_weight(t).reshape(self.shape) * self.scale).to(dtype)

    def delta_bias(self, tensors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        t = tensors if tensors is not None else self.tensors()
        bias = self.algorithm.delta_bias(t)
        return None if bias is None else bias * self.scale

    def apply_(
        self,
        weight: torch.Tensor,
        strength: float = 1.0,
        tensors: Mapping[str, torch.Tensor] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> None:
        """In place: weight = weight + m·s·ΔW (with DoRA, as LyCORIS's forward). fp32 math, one cast.

        `weight` is the whole target (which may itself be a row slice of a fused weight), or with
        `rows=(start, stop)` just rows start..stop of it, for callers that work in row blocks.
        """
        t = tensors if tensors is not None else self.tensors(device=weight.device)
        if rows is None:
            self._check_target(tuple(weight.shape))
            target, start, stop = weight.view(self.shape), 0, self.shape[0]
        else:
            start, stop = rows
            if not (0 <= start < stop <= self.shape[0]) or weight.shape[0] != stop - start:
                raise AdapterError(f"module {self.stem}: rows {start}:{stop} do not fit a block of {weight.shape[0]} rows")
            target = weight.view(stop - start, *self.shape[1:])
        whole = (start, stop) == (0, self.shape[0])
        if not self.has_dora:
            self.algorithm.apply_(target, t, strength * self.scale, start, stop)
            return
        dora_scale = t["dora_scale"]
        if dora.on_output_axis(dora_scale, self.shape):
            dora_scale = dora_scale.reshape(-1)[start:stop].reshape(stop - start, *[1] * (len(self.shape) - 1))
        elif not whole:
            raise AdapterError(f"module {self.stem}: DoRA with per-input-column magnitude needs the whole weight at once")
        work = target if target.dtype == torch.float32 else target.float()
        self.algorithm.apply_(work, t, self.scale, start, stop)
        work.mul_(dora.rescale_factor(work, dora_scale, strength))
        if work is not target:
            target.copy_(work)

    def bypass_delta(self, x: torch.Tensor, strength: float = 1.0, tensors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """m·s·ΔW·x for a Linear target, without building ΔW where that is cheaper (DoRA not included)."""
        t = tensors if tensors is not None else self.tensors(device=x.device, dtype=x.dtype)
        return self.algorithm.bypass_delta(x, t, strength * self.scale)

    def dora_rescale(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """DoRA's multiplier of W + s·ΔW for this weight (one value per row or per column).

        Needs the full weight once; bypass callers compute it when the hook is set up.
        """
        self._check_target(tuple(weight.shape))
        t = self.tensors(device=weight.device)
        adapted = weight.detach().float().reshape(self.shape).clone()
        self.algorithm.apply_(adapted, t, self.scale, 0, self.shape[0])
        return dora.rescale_factor(adapted, t["dora_scale"], strength)

    def bypass_forward(
        self,
        x: torch.Tensor,
        base_forward: Callable[[torch.Tensor], torch.Tensor],
        strength: float = 1.0,
        bias: torch.Tensor | None = None,
        rescale: torch.Tensor | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The adapted Linear's output from the base layer's forward, without changing its weight.

        DoRA modules need `rescale` (from `dora_rescale`) and the layer's `bias`, since DoRA scales
        W·x but not the bias.
        """
        if not self.has_dora:
            return base_forward(x) + self.bypass_delta(x, strength, tensors)
        if rescale is None:
            raise AdapterError(f"module {self.stem}: DoRA in bypass mode needs the rescale from dora_rescale()")
        factor = rescale.to(x.dtype)
        if factor.shape[0] == self.shape[0] and factor.numel() == self.shape[0]:  # per output row
            y = base_forward(x)
            if bias is not None:
                y = y - bias
            y = (y + self.bypass_delta(x, 1.0, tensors)) * factor.reshape(-1)
            return y if bias is None else y + bias
        scaled = x * factor.reshape(-1)  # per input column: (W + sΔW)·(c ⊙ x)
        return base_forward(scaled) + self.bypass_delta(scaled, 1.0, tensors)

    def _check_target(self, shape: tuple) -> None:
        if shape != self.shape and not (
            shape[:1] == self.shape[:1] and math.prod(shape) == math.prod(self.shape)
        ):
            raise AdapterError(
                f"module {self.stem}: {self.algorithm.name} produces shape {list(self.shape)} "
                f"but the target weight has shape {list(shape)}"
            )

    def fits(self, shape: tuple) -> bool:
        try:
            self._check_target(tuple(shape))
        except AdapterError:
            return False
        return True


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
    load: TensorLoader = field(default=None, repr=False)

    def nonfinite_counts(self) -> dict[str, int]:
        """Non-finite values per tensor key (reads every tensor once, one at a time)."""
        counts = {}
        for module in self.modules.values():
            for key in module.keys:
                bad = count_nonfinite(self.load(key))
                if bad:
                    counts[key] = bad
        return counts

    def check_finite(self) -> None:
        """Raise AdapterError listing the tensors that hold NaN/Inf (merging them would ruin a model)."""
        counts = self.nonfinite_counts()
        if counts:
            raise AdapterError(f"{self.path}: {describe_nonfinite(counts)}")


def split_key(key: str) -> tuple[str, str | None, str] | None:
    """'stem.suffix' -> (stem, algorithm name or None, canonical name); None if no suffix is known."""
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            algorithm, canonical = SUFFIX_INDEX[suffix]
            return key[: -len(suffix) - 1], algorithm, canonical
    return None


def detect_format(stems: list[str]) -> str:
    """The key-layout family of SPEC §3, by majority over module stems."""
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


def _open_source(path: str) -> tuple[dict[str, TensorEntry], dict[str, str], TensorLoader, int]:
    if path.lower().endswith(PICKLE_SUFFIXES):
        tensors = load_pickle_tensors(path)
        entries = {k: TensorEntry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        return entries, {}, tensors.__getitem__, os.path.getsize(path)
    reader = SafetensorsReader(path)
    header = reader.header
    return dict(header.tensors), header.metadata, reader.get, header.file_size


def read_adapter(path: str | os.PathLike, lokr_full_matrix_alpha: bool = False) -> AdapterFile:
    """Read and validate an adapter file. Raises AdapterError with the file, module and problem.

    lokr_full_matrix_alpha: apply alpha to LoKr modules whose w1 and w2 are both full, as
    alpha / ss_network_dim (files from trainers that did so; SPEC §2). Off by default: scale 1.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdapterError(f"{path}: " + ("is a directory, not an adapter file" if os.path.isdir(path) else "no such file"))
    entries, metadata, load, size = _open_source(path)
    if not entries:
        raise AdapterError(f"{path}: file holds no tensors")

    grouped: dict[str, dict[str, TensorEntry]] = {}
    algorithms_of: dict[str, set[str]] = {}
    unknown: list[str] = []
    for key, entry in entries.items():
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        stem, algorithm, canonical = parts
        if canonical in grouped.setdefault(stem, {}):
            raise AdapterError(
                f"{path}: module {stem}: {canonical} is given twice "
                f"({grouped[stem][canonical].name} and {key})"
            )
        grouped[stem][canonical] = entry
        if algorithm:
            algorithms_of.setdefault(stem, set()).add(algorithm)

    full_matrix_dim = None
    if lokr_full_matrix_alpha:
        try:
            full_matrix_dim = float(metadata["ss_network_dim"])
        except (KeyError, ValueError):
            raise AdapterError(
                f"{path}: applying alpha to full-matrix LoKr needs the network dim, but the file has "
                f"no numeric ss_network_dim metadata"
            ) from None

    modules: dict[str, ModuleAdapter] = {}
    problems: list[str] = []
    for stem, params in grouped.items():
        found = algorithms_of.get(stem, set())
        if not found:
            unknown.extend(entry.name for entry in params.values())
            problems.append(f"module {stem}: has only {', '.join(sorted(params))}, no adapter weights")
            continue
        if len(found) > 1:
            raise AdapterError(f"{path}: module {stem}: mixes tensors of {' and '.join(sorted(found))}")
        algorithm = ALGORITHMS[found.pop()]
        modules[stem] = _build_module(path, stem, algorithm, params, load, full_matrix_dim)

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
        size=size,
        problems=problems,
        load=load,
    )
    adapter.architecture = detect_file_architecture(adapter)
    adapter.format = refine_format(adapter.format, adapter.modules, adapter.architecture)
    return adapter


def _build_module(path, stem, algorithm, params, load, full_matrix_dim) -> ModuleAdapter:
    for name, entry in params.items():
        allowed = FLOAT_DTYPES + ((torch.int64, torch.int32) if name == "alpha" else ())
        if entry.dtype not in allowed:
            raise AdapterError(
                f"{path}: module {stem}: {name} has dtype {dtype_name(entry.dtype)}, expected a float type"
            )
    alpha = None
    if "alpha" in params:
        entry = params["alpha"]
        if math.prod(entry.shape) != 1:
            raise AdapterError(f"{path}: module {stem}: alpha must be a single value, got shape {list(entry.shape)}")
        alpha = float(load(entry.name).reshape(()).item())
        if not math.isfinite(alpha):
            raise AdapterError(f"{path}: module {stem}: alpha is {alpha}")
    try:
        module = ModuleAdapter(stem, algorithm, params, alpha, load, full_matrix_dim)
    except ShapeError as e:
        shapes = ", ".join(f"{n} {list(p.shape)}" for n, p in params.items() if n != "alpha")
        raise AdapterError(f"{path}: module {stem} ({algorithm.name}): {e} [{shapes}]") from None
    if "dora_scale" in params:
        n = math.prod(params["dora_scale"].shape)
        if n not in (module.shape[0], module.shape[1]):
            raise AdapterError(
                f"{path}: module {stem}: dora_scale {list(params['dora_scale'].shape)} fits neither the "
                f"output ({module.shape[0]}) nor the input ({module.shape[1]}) features"
            )
    if "diff_b" in params and tuple(params["diff_b"].shape) != (module.shape[0],):
        raise AdapterError(
            f"{path}: module {stem}: diff_b {list(params['diff_b'].shape)} does not match {module.shape[0]} outputs"
        )
    return module
