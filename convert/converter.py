"""Convert an adapter file between the Musubi, Diffusers and ComfyUI layouts, exactly and streamed.

Layouts:
- `musubi`: `lora_unet_` + Musubi's module path with `.` -> `_` (what Musubi Tuner trains and loads);
- `diffusers`: `<prefix>.` + Musubi's dotted module path, as Musubi's `convert_lora.py --target other`
  writes it (LoRA as `lora_A`/`lora_B` with alpha folded in, √(alpha/r) into each, no alpha key;
  LoHa/LoKr tensors unchanged plus `.alpha`), but with the registry's dotted names for every
  architecture where Musubi's converter guesses them from underscores;
- `comfyui`: `diffusion_model.` + ComfyUI's module path: what ComfyUI core's own LoraLoader maps
  completely. Where ComfyUI fuses q/k/v, LoRA/LoHa parts are fused exactly; LoKr parts keep the
  names core maps onto slices, or are refused where core has none (HunyuanVideo 1.5).

The plan comes first: every module is resolved to its weight (`names.py`) and every output tensor's
name, dtype and shape is decided, so a file that cannot be converted exactly costs nothing and
writes nothing. Then the output is streamed: each output tensor is built from the input tensors it
needs, checked for NaN/Inf on the way, written, and dropped; the file appears only when complete.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..lycoris_core.adapter_file import AdapterFile, read_adapter
from ..lycoris_core.algorithms import ShapeError
from ..lycoris_core.architectures import ARCHITECTURES, SUPPORTED, describe_architecture, get_architecture
from ..lycoris_core.detection import CONVERTED_FROM_KEY
from ..lycoris_core.errors import AdapterError
from ..lycoris_core.finite import count_nonfinite, describe_nonfinite
from ..lycoris_core.module import ALPHA, BIAS, DORA, ModuleAdapter
from ..lycoris_core.naming import COMFY_PREFIX, MUSUBI_PREFIX, AmbiguousName, Naming, Partition, flatten, naming_for
from ..lycoris_core.rows import Rows
from ..lycoris_core.safetensors_io import (
    SafetensorsWriter,
    TensorEntry,
    append_records,
    check_output_path,
    describe_stale,
    dtype_name,
    stale_temp_files,
)
from ..lycoris_core.scales import PEFT_METADATA_KEY, lycoris_scale
from .regroup import Inexact, ModuleSpec, Source, TensorSpec, alpha_spec, fuse, reorder, split

TARGETS = ("musubi", "diffusers", "comfyui")
DIFFUSERS_PREFIXES = ("diffusion_model", "transformer")  # the two Musubi reads back; others are allowed

# Key suffix of a canonical parameter, per target; anything not listed keeps its canonical name
# (hada_*, lokr_*, diff, diff_b, alpha, dora_scale are spelled the same in every layout).
_KOHYA_LORA = {("lora", "up"): "lora_up.weight", ("lora", "down"): "lora_down.weight", ("lora", "mid"): "lora_mid.weight"}
SUFFIXES = {
    "musubi": _KOHYA_LORA,
    "comfyui": _KOHYA_LORA,
    "diffusers": {("lora", "up"): "lora_B.weight", ("lora", "down"): "lora_A.weight", ("lora", "mid"): "lora_mid.weight"},
}


@dataclass
class OutputModule:
    stem: str
    spec: ModuleSpec
    sources: tuple[str, ...]  # the input stems it comes from
    how: str  # "renamed", "fused" or "split"


@dataclass
class ConversionPlan:
    adapter: AdapterFile
    target: str
    architecture: str
    prefix: str | None
    modules: list[OutputModule]
    tensors: list[tuple[str, TensorSpec]]  # output key -> spec, in write order
    metadata: dict[str, str]
    loader: _CheckedLoader
    counts: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    @property
    def layout(self) -> list[TensorEntry]:
        return [TensorEntry(key, spec.dtype, spec.shape) for key, spec in self.tensors]


@dataclass
class ConversionResult:
    input: str
    output: str
    target: str
    source_format: str
    architecture: str
    modules_in: int
    modules_out: int
    tensors: int
    bytes_written: int
    counts: Counter
    notes: list[str]
    stale: list[str] = field(default_factory=list)  # temporary files beside the output that killed runs left

    def summary(self) -> str:
        done = ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items()) if n)
        lines = [
            f"wrote {self.output}: {self.target} layout, {self.modules_out} modules from {self.modules_in} "
            f"({self.source_format} layout, {describe_architecture(self.architecture)})" + (f"; {done}" if done else "")
        ]
        lines += [f"  note: {note}" for note in self.notes]
        lines += describe_stale(self.stale)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Public API


def convert_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    to: str,
    prefix: str | None = None,
    arch: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionResult:
    """Convert the adapter file `input` to the `to` layout ("musubi", "diffusers", "comfyui") at `output`.

    `prefix`: key prefix of the diffusers layout (default `diffusion_model`). `arch`: architecture id
    (default: detected from the file). Raises AdapterError (nothing written) for an existing output
    without `overwrite`, an unknown architecture, modules that match no layer, NaN/Inf values, or a
    module the target layout cannot hold exactly.
    """
    input, output = os.fspath(input), os.fspath(output)
    check_output_path(output, overwrite)
    if os.path.exists(output) and os.path.exists(input) and os.path.samefile(input, output):
        raise AdapterError(f"{output}: output would replace the input it is read from")
    stale = stale_temp_files(output)
    adapter = read_adapter(input)
    plan = plan_conversion(adapter, to, prefix=prefix, arch=arch)
    result = write_plan(plan, output, overwrite=overwrite, progress=progress)
    result.stale = stale
    return result


def plan_conversion(adapter: AdapterFile, to: str, prefix: str | None = None, arch: str | None = None) -> ConversionPlan:
    """Decide every output tensor (name, dtype, shape, how to build it) without writing anything."""
    target = _check_target(to)
    prefix = _check_prefix(target, prefix)
    arch_id = _architecture(adapter, arch)
    if adapter.unknown_keys:
        raise AdapterError(
            f"{adapter.path}: {len(adapter.unknown_keys)} keys belong to no adapter module and would be lost: "
            + _listing(adapter.unknown_keys)
        )
    naming = naming_for(arch_id)
    loader = _CheckedLoader(adapter.load)
    source = Source(loader, list(adapter.tensors))
    groups = _group_by_weight(adapter, naming)

    builder = _Builder(adapter, naming, source, target, prefix)
    for group in groups:
        builder.add(group)
    if builder.refused:
        raise AdapterError(f"{adapter.path}: {builder.refusal_message()}")

    tensors: list[tuple[str, TensorSpec]] = []
    for module in builder.modules:
        for name, spec in module.spec.params.items():
            suffix = SUFFIXES[target].get((module.spec.algorithm, name), name)
            tensors.append((f"{module.stem}.{suffix}", spec))
    # Follow the input's order, so the input is read front to back.
    order = sorted(range(len(tensors)), key=lambda i: (tensors[i][1].order, i))
    tensors = [tensors[i] for i in order]

    notes = list(builder.notes)
    if target == "comfyui":
        notes += list(get_architecture(arch_id).notes)
    return ConversionPlan(
        adapter=adapter,
        target=target,
        architecture=arch_id,
        prefix=prefix,
        modules=builder.modules,
        tensors=tensors,
        metadata=_metadata(adapter, target, arch_id, prefix),
        loader=loader,
        counts=builder.counts,
        notes=notes,
    )


def write_plan(plan: ConversionPlan, output: str | os.PathLike, overwrite: bool = False, progress: bool = False) -> ConversionResult:
    """Stream the planned tensors into `output` (atomic: nothing appears unless every tensor was fine)."""
    output = os.fspath(output)
    layout = plan.layout
    sizes = [entry.nbytes for entry in layout]
    bar = _progress_bar(sum(sizes), progress)
    try:
        with SafetensorsWriter(output, layout, plan.metadata, overwrite) as writer:
            for (key, spec), size in zip(plan.tensors, sizes):
                tensor = spec.make()
                if not plan.loader.nonfinite:  # after the first bad input tensor only the count goes on
                    _check_output(plan, key, tensor)
                    writer.write(key, tensor)
                del tensor  # keep at most one output tensor alive
                bar.update(size)
            plan.loader.check_rest(plan.adapter)
            if plan.loader.nonfinite:
                raise AdapterError(f"{plan.adapter.path}: {plan.loader.describe_nonfinite()}; nothing written")
    finally:
        bar.close()
    return ConversionResult(
        input=plan.adapter.path,
        output=output,
        target=plan.target,
        source_format=plan.adapter.format,
        architecture=plan.architecture,
        modules_in=len(plan.adapter.modules),
        modules_out=len(plan.modules),
        tensors=len(layout),
        bytes_written=sum(sizes),
        counts=plan.counts,
        notes=plan.notes,
    )


# ---------------------------------------------------------------------------------------------
# Checks


def _check_output(plan: ConversionPlan, key: str, tensor: torch.Tensor) -> None:
    """A tensor computed from finite inputs must be finite: folding a scale into a factor can take it
    beyond its dtype's range (fp16 above 65504)."""
    bad = count_nonfinite(tensor)
    if bad:
        raise AdapterError(
            f"{plan.adapter.path}: converting gives {bad} non-finite values (NaN/Inf) in {key} "
            f"({dtype_name(tensor.dtype)}): its values exceed the dtype's range once the scale is folded in; nothing written"
        )


def _check_target(to: str) -> str:
    if to not in TARGETS:
        raise AdapterError(f"unknown target layout {to!r} (choose one of: {', '.join(TARGETS)})")
    return to


def _check_prefix(target: str, prefix: str | None) -> str | None:
    if target != "diffusers":
        if prefix is not None:
            raise AdapterError(f"--prefix only applies to the diffusers layout (the {target} layout has fixed names)")
        return None
    prefix = DIFFUSERS_PREFIXES[0] if prefix is None else prefix.rstrip(".")
    if not prefix or any(c.isspace() for c in prefix) or prefix.startswith("."):
        raise AdapterError(f"invalid key prefix {prefix!r}")
    return prefix


def _architecture(adapter: AdapterFile, arch: str | None) -> str:
    if arch not in (None, "", "auto"):
        return get_architecture(arch).id
    found = adapter.architecture
    if found is None:
        raise AdapterError(
            f"{adapter.path}: cannot tell the architecture from its module names; pass --arch "
            f"(one of: {', '.join(a.id for a in SUPPORTED)})"
        )
    if ARCHITECTURES[found].refused:
        raise AdapterError(f"{adapter.path}: {ARCHITECTURES[found].refused}")
    return found


def _listing(items, limit: int = 6) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------
# Grouping modules by the weight they adapt


@dataclass
class _Group:
    weight: str
    whole: ModuleAdapter | None = None
    # For a whole module whose rows come in another order than ComfyUI's: the module's rows in
    # ComfyUI's order.
    order: list[Rows] | None = None
    partition: Partition | None = None
    parts: dict[int, ModuleAdapter] = field(default_factory=dict)

    @property
    def modules(self) -> list[ModuleAdapter]:
        return [self.whole] if self.whole is not None else [self.parts[i] for i in sorted(self.parts)]


def _group_by_weight(adapter: AdapterFile, naming: Naming) -> list[_Group]:
    groups: dict[str, _Group] = {}
    unresolved = []
    for stem, module in adapter.modules.items():
        try:
            place = naming.place_of_stem(stem)
        except AmbiguousName as e:
            raise AdapterError(f"{adapter.path}: {e}") from None
        if place is None:
            unresolved.append(stem)
            continue
        group = groups.setdefault(place.weight, _Group(place.weight))
        partition = naming.partition(place.weight, place.naming) if place.part is not None else None
        clash = _clash(group, partition, place.part)
        if clash is not None:
            path = partition.names[place.part] if partition else place.weight
            raise AdapterError(
                f"{adapter.path}: modules {clash.stem} and {stem} both adapt {path} "
                f"({describe_architecture(naming.arch.id)} weight {place.weight}); keep one"
            )
        if partition is None:
            group.whole = module
            if place.rows is not None:  # rows in another order: ComfyUI's rows, where each comes from
                pieces = sorted(place.rows.pieces(module.shape))
                group.order = [source for _, source in pieces]
        else:
            group.partition = partition
            group.parts[place.part] = module
    if unresolved:
        raise AdapterError(
            f"{adapter.path}: {len(unresolved)} modules match no layer of {describe_architecture(naming.arch.id)}: "
            + _listing(unresolved)
            + " (wrong --arch, or layers this pack does not know)"
        )
    return list(groups.values())


def _clash(group: _Group, partition: Partition | None, part: int | None) -> ModuleAdapter | None:
    if group.whole is not None:
        return group.whole
    if group.parts and (partition is None or partition != group.partition):
        return next(iter(group.parts.values()))
    return group.parts.get(part) if partition is not None else None


# ---------------------------------------------------------------------------------------------
# Deciding the output modules


class _Builder:
    def __init__(self, adapter: AdapterFile, naming: Naming, source: Source, target: str, prefix: str | None):
        self.adapter, self.naming, self.source, self.target, self.prefix = adapter, naming, source, target, prefix
        self.modules: list[OutputModule] = []
        self.refused: list[tuple[list[str], str, str]] = []  # (stems, weight, reason)
        self.counts: Counter = Counter()
        self.notes: list[str] = []

    # -- naming

    def _stem(self, path: str) -> str:
        if self.target == "musubi":
            return MUSUBI_PREFIX + flatten(path)
        if self.target == "diffusers":
            return f"{self.prefix}.{path}"
        return COMFY_PREFIX + path

    # -- one weight

    def add(self, group: _Group) -> None:
        unheld = [m for m in group.modules if not self._holds(m)]
        if unheld:
            self._refuse(group, f"the {self.target} layout holds no full differences (diff, diff_b) of weights or biases, "
                                "which Musubi Tuner cannot load")
            return
        if self.target == "comfyui":
            self._add_comfy(group)
        else:
            self._add_musubi(group)

    def _holds(self, module: ModuleAdapter) -> bool:
        return self.target != "musubi" or (module.algorithm != "diff" and not module.has_bias_delta)

    def _whole(self, group: _Group) -> ModuleSpec:
        """The group's whole module, its rows put in ComfyUI's order where they came in another."""
        if group.order is None:
            return self.source.module(group.whole)
        return reorder(group.whole, group.order, self.source)

    def _add_comfy(self, group: _Group) -> None:
        if group.whole is not None:
            try:
                self._emit(self._stem(group.weight), self._whole(group), [group.whole], "renamed")
            except Inexact as why:
                self._refuse(group, f"its rows come in another order than ComfyUI's {{weights}}, and {why}")
            return
        try:
            self._emit(self._stem(group.weight), self._fuse(group), group.modules, "fused")
            return
        except Inexact as why:
            reason = str(why)
        prefix = self.naming.comfy_slice_prefix(group.partition)
        if prefix is None:
            self._refuse(group, "ComfyUI core fuses them into {weights} and maps no name onto their row slices, and " + reason)
            return
        for i, module in sorted(group.parts.items()):
            self._emit(prefix + group.partition.names[i], self.source.module(module), [module], "kept as slices")
        note = (
            f"{group.modules[0].algorithm} parts of fused weights keep their own names, which ComfyUI core's LoraLoader "
            "maps onto row slices; core's bypass loaders drop sliced targets, so use the plain LoraLoader (or LycorisLoader)"
        )
        if note not in self.notes:
            self.notes.append(note)

    def _add_musubi(self, group: _Group) -> None:
        names = self.naming.musubi_names(group.weight)
        if isinstance(names, str):  # Musubi keeps this weight whole
            stem = self._stem(names)
            if group.whole is not None:
                try:
                    self._emit(stem, self._whole(group), [group.whole], "renamed")
                except Inexact as why:
                    self._refuse(group, f"its rows come in another order than Musubi's {{weights}}, and {why}")
                return
            try:
                self._emit(stem, self._fuse(group), group.modules, "fused")
            except Inexact as why:
                self._refuse(group, f"Musubi's model has one weight for them ({names}), and {why}")
            return
        if group.whole is not None:  # a fused ComfyUI-layout module, Musubi has the parts
            module = group.whole
            try:
                if group.order is not None:
                    raise Inexact("its rows come in another order")
                specs = split(module, names.rows(module.shape), self.source)
            except (Inexact, AdapterError) as why:
                self._refuse(group, f"Musubi splits {{weights}} into {', '.join(names.names)}, and {why}")
                return
            for name, spec in zip(names.names, specs):
                self._emit(self._stem(name), spec, [module], "split")
            return
        if group.partition.names != names.names:  # parts in another naming: same rows, Musubi's names
            if group.partition.sizes != names.sizes:
                self._refuse(group, f"they split {{weights}} differently from Musubi ({', '.join(names.names)})")
                return
        for i, module in sorted(group.parts.items()):
            self._emit(self._stem(names.names[i]), self.source.module(module), [module], "renamed")

    def _fuse(self, group: _Group) -> ModuleSpec:
        sizes = _part_sizes(group.partition, group.parts)
        parts = [group.parts.get(i) for i in range(len(group.partition.names))]
        return fuse(parts, sizes, self.source)

    # -- one output module

    def _emit(self, stem: str, spec: ModuleSpec, sources: list[ModuleAdapter], how: str) -> None:
        spec = self._with_scale(spec, sources[0])
        if spec.algorithm == "lora":
            spec = self._lora_alpha(spec)
        self.modules.append(OutputModule(stem, spec, tuple(m.stem for m in sources), how))
        self.counts[how] += 1

    def _with_scale(self, spec: ModuleSpec, source: ModuleAdapter) -> ModuleSpec:
        """`spec` giving its source's scale under LyCORIS's rule, which every output layout follows:
        as it is when it already does; else with alpha = scale × rank (a scale from a PEFT config), or,
        where the rule has no rank to divide by (LoKr with both factors full), the scale folded into
        the factor that holds ΔW's rows."""
        shapes = {name: tensor.shape for name, tensor in spec.params.items()}
        alpha = spec.params[ALPHA].value if ALPHA in spec.params else None
        if lycoris_scale(source.math, shapes, alpha) == source.scale:
            return spec
        params = dict(spec.params)
        order = min(t.order for t in params.values())
        rank = source.math.rank(shapes)
        if rank is not None:
            params[ALPHA] = alpha_spec(source.scale * rank, params[ALPHA].dtype if ALPHA in params else torch.float32, order)
        else:
            params.pop(ALPHA, None)
            # Any one factor of ΔW takes a scalar (w1 ⊗ w2 is linear in each); the one holding its rows
            # where the layout says which, so a later split of the rows still sees every row scaled.
            try:
                name = next(iter(source.math.layout.row_tensors(shapes)))
            except ShapeError:
                name = next(n for n in params if n not in (DORA, BIAS))
            factor = params[name]
            params[name] = TensorSpec(factor.dtype, factor.shape,
                                      lambda f=factor: (f.make().double() * source.scale).to(f.dtype), factor.order)
        self.counts["scales written as LyCORIS alphas"] += 1
        return ModuleSpec(spec.algorithm, params)

    def _lora_alpha(self, spec: ModuleSpec) -> ModuleSpec:
        """Diffusers: fold alpha into lora_A/lora_B as Musubi does. Musubi: no alpha means scale 1 -> alpha = rank."""
        params = dict(spec.params)
        rank = params["down"].shape[0]
        if self.target == "diffusers" and "alpha" in params:
            alpha = params.pop("alpha")
            for name in ("up", "down"):
                t = params[name]
                # Musubi's arithmetic: weight * sqrt(alpha_tensor / rank), in the alpha tensor's dtype; a
                # negative alpha (it flips ΔW) has no real root: its sign goes to up, √|alpha / rank| to both.
                params[name] = TensorSpec(t.dtype, t.shape, lambda t=t, up=name == "up": _folded(t.make(), alpha.make() / rank, up),
                                          t.order)
            self.counts["LoRA alphas folded"] += 1
        elif self.target == "musubi" and "alpha" not in params:
            order = min(p.order for p in params.values())
            params["alpha"] = alpha_spec(float(rank), torch.float32, order)
            self.counts["LoRA alphas set to rank"] += 1
        return ModuleSpec(spec.algorithm, params)

    def _refuse(self, group: _Group, reason: str) -> None:
        """Remember a weight the target cannot hold exactly (`{weights}` in `reason` names it)."""
        self.refused.append(([m.stem for m in group.modules], group.weight, reason))

    def refusal_message(self) -> str:
        """One line for every refused weight, grouped under the first reason given."""
        stems = [s for refused in self.refused for s in refused[0]]
        weights = [refused[1] for refused in self.refused if refused[2] == self.refused[0][2]]
        # `replace`, not `format`: the reason quotes stems, which may hold braces of their own
        reason = self.refused[0][2].replace("{weights}", _listing(weights, 3))
        hint = "; this pack's LycorisLoader loads its musubi or diffusers layout" if self.target == "comfyui" else ""
        return (
            f"cannot write the {self.target} layout exactly for {len(stems)} modules ({_listing(stems)}): "
            f"{reason}; nothing written{hint}"
        )


def _part_sizes(partition: Partition, parts: dict[int, ModuleAdapter]) -> list[int]:
    """Rows of every part of a fused weight (missing parts too), from the parts present."""
    present = list(parts.values())
    flat = [m for m in present if len(m.shape) < 2]
    if flat:
        raise Inexact(f"{flat[0].stem} changes a 1-D weight {list(flat[0].shape)}, not rows of a fused layer")
    in_features = present[0].shape[1]
    thirds = {parts[i].shape[0] for i in parts if partition.sizes[i] == "third"}
    if len(thirds) > 1:
        raise Inexact("the q/k/v parts have different sizes: " + ", ".join(f"{m.stem} {list(m.shape)}" for m in present))
    sizes = []
    for i, rule in enumerate(partition.sizes):
        if i in parts:
            size = parts[i].shape[0]
            if rule == "in" and size != in_features:
                raise Inexact(f"{parts[i].stem} has {size} rows, expected {in_features}")
        elif rule == "third" and thirds:
            size = next(iter(thirds))
        elif rule == "in":
            size = in_features
        else:
            raise Inexact(f"the size of the missing part {partition.names[i]} is unknown")
        sizes.append(size)
    return sizes


# ---------------------------------------------------------------------------------------------
# Metadata, NaN/Inf, progress


def _metadata(adapter: AdapterFile, target: str, arch_id: str, prefix: str | None) -> dict[str, str]:
    """The input's metadata, plus a record of this conversion appended to `comfyui_lycoris.converted_from`."""
    metadata = dict(adapter.metadata)
    record = {
        "source": os.path.basename(adapter.path),
        "source_format": adapter.format,
        "target": target,
        "architecture": arch_id,
    }
    # The output carries its scales as LyCORIS alphas (or folded in): a PEFT config left in it would be
    # applied a second time by a reader of a file without alphas. It moves into the record.
    if PEFT_METADATA_KEY in metadata:
        record["source_peft_config"] = metadata.pop(PEFT_METADATA_KEY)
    if prefix is not None:
        record["prefix"] = prefix
    append_records(metadata, CONVERTED_FROM_KEY, [record])
    return metadata


def _folded(weight: torch.Tensor, ratio: torch.Tensor, carries_sign: bool) -> torch.Tensor:
    folded = weight * ratio.abs().sqrt()
    return folded * ratio.sign() if carries_sign else folded


class _CheckedLoader:
    """The input's tensor loader, counting NaN/Inf of every tensor the first time it is read."""

    def __init__(self, load):
        self._load = load
        self.seen: set[str] = set()
        self.nonfinite: dict[str, int] = {}

    def __call__(self, key: str) -> torch.Tensor:
        tensor = self._load(key)
        if key not in self.seen:
            self.seen.add(key)
            bad = count_nonfinite(tensor)
            if bad:
                self.nonfinite[key] = bad
        return tensor

    def check_rest(self, adapter: AdapterFile) -> None:
        """Count the tensors no output tensor read (none, normally), so the report is complete."""
        if self.nonfinite:
            for key in adapter.tensors:
                if key not in self.seen:
                    self(key)

    def describe_nonfinite(self) -> str:
        return describe_nonfinite(self.nonfinite)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=None if enabled else True, leave=False)
