"""The load plan: which weight of a model each adapter module changes, decided before anything is.

Matching runs forward: every weight name of the model is expanded into the names the same layer
has in the other namings of its architecture (Musubi/original, ComfyUI, Diffusers; fused q/k/v as
row slices), each flattened ('.' -> '_'). An adapter stem, flattened the same way, matches when a
suffix of it (after a key-family prefix such as `lora_unet_` or `diffusion_model.`) is one of those
names. Dots are never rebuilt from underscores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .adapter_file import AdapterFile, ModuleAdapter
from .architectures import (
    ARCHITECTURES,
    Architecture,
    Slice,
    describe_architecture,
    detect_model_architecture,
    explained_count,
    flatten,
    get_architecture,
    match_template,
    module_path,
)
from .errors import AdapterError
from .rows import Rows


@dataclass(frozen=True)
class Target:
    key: str  # the model's weight key, exactly as the model names it
    rows: Rows | None  # the rows of a fused weight the module lands on, or None: the whole weight
    # The module's ΔW rows that land on this weight, when one fused module (a ComfyUI-layout qkv)
    # spans several split weights of the model; None: all of them
    source_rows: Rows | None = None

    def where(self) -> str:
        return self.key + (f" rows {self.rows}" if self.rows else "")


@dataclass
class Patch:
    stem: str
    module: ModuleAdapter
    target: Target
    bias_key: str | None = None  # where a diff module's bias difference goes


@dataclass
class LoadPlan:
    adapter: AdapterFile
    architecture: str | None
    model_architecture: str | None
    patches: list[Patch]
    unmatched: dict[str, str] = field(default_factory=dict)  # stem -> why

    @property
    def modules_applied(self) -> int:
        """Modules of the file that were planned (a fused module on split weights counts once)."""
        return len({patch.stem for patch in self.patches})

    def by_key(self) -> dict[str, list[Patch]]:
        grouped: dict[str, list[Patch]] = {}
        for patch in self.patches:
            grouped.setdefault(patch.target.key, []).append(patch)
        return grouped

    def summary(self) -> str:
        algorithms: dict[str, int] = {}
        for patch in {p.stem: p for p in self.patches}.values():
            algorithms[patch.module.algorithm] = algorithms.get(patch.module.algorithm, 0) + 1
        counts = ", ".join(f"{n} {a}" for a, n in sorted(algorithms.items()))
        fused = sum(p.target.rows is not None for p in self.patches)
        split = len({p.stem for p in self.patches if p.target.source_rows is not None})
        text = (
            f"{self.modules_applied}/{len(self.adapter.modules)} modules matched ({counts}) on "
            f"{describe_architecture(self.architecture)}"
        )
        if fused:
            text += f", {fused} into slices of fused weights"
        if split:
            text += f", {split} fused modules split over separate weights"
        if self.unmatched:
            text += f"; {len(self.unmatched)} unmatched"
        return text


class _Ambiguous:
    """Marks a flattened name two different weights answer to."""

    def __init__(self, *targets: Target):
        self.targets = targets


@dataclass(frozen=True)
class _Split:
    """A fused weight's name (e.g. ComfyUI's `attention.qkv`) in a model that stores it split: the
    parts, in row order, each with the rows of a fused module's ΔW it takes."""

    name: str
    parts: tuple[Target, ...]


def _weight_keys(weight_shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """Adaptable weights: `.weight` tensors of Linear/Conv layers."""
    return {k: tuple(s) for k, s in weight_shapes.items() if k.endswith(".weight") and len(s) >= 2}


def _names_of(path: str, shape: tuple, arch: Architecture | None) -> dict[str, Rows | None]:
    """Every module path (any naming) that denotes this model weight, with its row slice if any."""
    names: dict[str, tuple[int, int] | None] = {path: None}
    if arch is None:
        return names
    for musubi, comfy in arch.layers:
        groups = match_template(musubi, path)
        if groups is not None:
            if isinstance(comfy, str):
                names.setdefault(comfy.format(**groups), None)
            continue
        if isinstance(comfy, str):
            groups = match_template(comfy, path)
            if groups is not None:
                names.setdefault(musubi.format(**groups), None)
        else:
            groups = match_template(comfy.fused, path)
            if groups is not None:
                names.setdefault(musubi.format(**groups), comfy.rows(shape))
    for alias, target in arch.aliases:
        if isinstance(target, Slice):
            groups = match_template(target.fused, path)
            if groups is not None:
                names.setdefault(alias.format(**groups), target.rows(shape))
        else:
            groups = match_template(target, path)
            if groups is not None:
                names.setdefault(alias.format(**groups), None)
    return names


def _split_weights(weights: Mapping[str, tuple], arch: Architecture) -> dict[str, _Split]:
    """Fused names whose parts the model has as separate weights (all parts, consistent shapes)."""
    groups: dict[str, dict[int, tuple[str, tuple, Slice]]] = {}
    for key, shape in weights.items():
        path = module_path(key)
        for musubi, comfy in arch.layers:
            if isinstance(comfy, Slice):
                found = match_template(musubi, path)
                if found is not None:
                    groups.setdefault(comfy.fused.format(**found), {})[comfy.index] = (key, shape, comfy)
    splits = {}
    for name, parts in groups.items():
        count = len(next(iter(parts.values()))[2].sizes)
        if sorted(parts) != list(range(count)) or len({shape[1:] for _, shape, _ in parts.values()}) != 1:
            continue  # a part missing, or parts of different widths: not the pieces of one fused weight
        fused_shape = (sum(shape[0] for _, shape, _ in parts.values()), *parts[0][1][1:])
        targets, offset = [], 0
        for i in range(count):
            key, shape, _ = parts[i]
            targets.append(Target(key, None, Rows(offset, offset + shape[0])))
            offset += shape[0]
        if any(_rows_in(parts[i][2], fused_shape) != t.source_rows for i, t in enumerate(targets)):
            continue  # sizes the architecture's fused weight would not have (e.g. unequal q/k/v)
        splits[name] = _Split(name, tuple(targets))
    return splits


def _rows_in(part: Slice, fused_shape: tuple) -> Rows | None:
    try:
        return part.rows(fused_shape)
    except AdapterError:
        return None


def build_name_index(weight_shapes: Mapping[str, tuple], arch: Architecture | None) -> dict[str, object]:
    """Flattened name -> Target (or _Ambiguous, or _Split), for every adaptable weight of a model."""
    index: dict[str, object] = {}
    weights = _weight_keys(weight_shapes)
    if arch is not None:
        # Registered first: a name the model really has (a fused weight) replaces its split form.
        index.update({flatten(name): split for name, split in _split_weights(weights, arch).items()})
    for key, shape in weights.items():
        for name, rows in _names_of(module_path(key), shape, arch).items():
            flat, target = flatten(name), Target(key, rows)
            existing = index.get(flat)
            if existing is None or existing == target or isinstance(existing, _Split):
                index[flat] = target
            elif isinstance(existing, _Ambiguous):
                existing.targets += (target,)
            else:
                index[flat] = _Ambiguous(existing, target)
    return index


def match_stem(stem: str, index: Mapping[str, object]) -> object | None:
    """The index entry whose name is the longest suffix of the flattened stem (after a prefix)."""
    flat = flatten(stem)
    starts = [0] + [i + 1 for i, c in enumerate(flat) if c == "_"]
    for start in starts:
        found = index.get(flat[start:])
        if found is not None:
            return found
    return None


def resolve_architecture(adapter: AdapterFile, weight_names, architecture: str = "auto") -> tuple[str | None, str | None]:
    """(architecture to map with, the model's detected architecture); raises on a mismatch."""
    model_arch = detect_model_architecture(weight_names)
    if architecture != "auto":
        chosen = get_architecture(architecture).id
        if model_arch and model_arch != chosen:
            raise AdapterError(
                f"{adapter.path}: architecture {describe_architecture(chosen)} was asked for, but the model is "
                f"{describe_architecture(model_arch)}"
            )
        return chosen, model_arch
    file_arch = adapter.architecture
    if file_arch and ARCHITECTURES[file_arch].refused:
        raise AdapterError(f"{adapter.path}: {ARCHITECTURES[file_arch].refused}")
    if file_arch and model_arch and file_arch != model_arch:
        stems = list(adapter.modules)
        # Some namings are shared (FLUX.1 and HunyuanVideo in ComfyUI naming): the model decides
        # when its architecture names the file's modules as well as the file's own guess does.
        if explained_count(model_arch, stems) < explained_count(file_arch, stems):
            raise AdapterError(
                f"{adapter.path} is an adapter for {describe_architecture(file_arch)}, but the model is "
                f"{describe_architecture(model_arch)}"
            )
    return model_arch or file_arch, model_arch


def make_plan(adapter: AdapterFile, weight_shapes: Mapping[str, tuple], architecture: str = "auto") -> LoadPlan:
    """Map every module of `adapter` onto the model whose weights have these names and shapes.

    Raises AdapterError (nothing applied yet) for another architecture's file, a module whose shape
    does not fit its target, or a file of which no module matches. Modules with no counterpart in
    the model are listed in `unmatched`.
    """
    chosen, model_arch = resolve_architecture(adapter, weight_shapes.keys(), architecture)
    index = build_name_index(weight_shapes, ARCHITECTURES.get(chosen) if chosen else None)
    patches: list[Patch] = []
    unmatched: dict[str, str] = {}
    misfits: list[str] = []
    for stem, module in adapter.modules.items():
        found = match_stem(stem, index)
        if found is None:
            unmatched[stem] = "no weight of the model has this name"
            continue
        if isinstance(found, _Ambiguous):
            unmatched[stem] = "ambiguous: " + ", ".join(t.key for t in found.targets)
            continue
        if isinstance(found, _Split):
            targets = found.parts
            first = tuple(weight_shapes[targets[0].key])
            shape = (sum(t.source_rows.size for t in targets), *first[1:])
            where = f"{found.name} (split as {', '.join(t.key for t in targets)})"
            if module.has_dora:
                # Its magnitude is defined on the whole fused weight, which this model never holds.
                unmatched[stem] = f"DoRA module on the fused {found.name}, which this model stores split"
                continue
        else:
            targets = (found,)
            shape = tuple(weight_shapes[found.key])
            if found.rows is not None:
                shape = (found.rows.size, *shape[1:])
            where = found.where()
        if not module.fits(shape):
            misfits.append(f"module {stem} ({module.algorithm}) produces {list(module.shape)} but {where} is {list(shape)}")
            continue
        planned = []
        for target in targets:
            bias_key = None
            if module.has_bias_delta:
                bias_key = target.key[: -len("weight")] + "bias"
                if bias_key not in weight_shapes:
                    misfits.append(f"module {stem} carries a bias difference but the model has no {bias_key}")
                    break
            planned.append(Patch(stem, module, target, bias_key))
        else:
            patches.extend(planned)

    if misfits:
        more = f" (and {len(misfits) - 1} more)" if len(misfits) > 1 else ""
        raise AdapterError(f"{adapter.path}: shape mismatch: {misfits[0]}{more}")
    if not patches:
        example = next(iter(adapter.modules))
        raise AdapterError(
            f"{adapter.path}: none of its {len(adapter.modules)} modules matches a weight of the model "
            f"({describe_architecture(chosen)}), e.g. {example}"
        )
    return LoadPlan(adapter, chosen, model_arch, patches, unmatched)
