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


@dataclass(frozen=True)
class Target:
    key: str  # the model's weight key, exactly as the model names it
    rows: tuple[int, int] | None  # (offset, size) along dim 0 of a fused weight, or the whole weight


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

    def by_key(self) -> dict[str, list[Patch]]:
        grouped: dict[str, list[Patch]] = {}
        for patch in self.patches:
            grouped.setdefault(patch.target.key, []).append(patch)
        return grouped

    def summary(self) -> str:
        algorithms: dict[str, int] = {}
        for patch in self.patches:
            algorithms[patch.module.algorithm_name] = algorithms.get(patch.module.algorithm_name, 0) + 1
        counts = ", ".join(f"{n} {a}" for a, n in sorted(algorithms.items()))
        fused = sum(p.target.rows is not None for p in self.patches)
        text = (
            f"{len(self.patches)}/{len(self.adapter.modules)} modules matched ({counts}) on "
            f"{describe_architecture(self.architecture)}"
        )
        if fused:
            text += f", {fused} into slices of fused weights"
        if self.unmatched:
            text += f"; {len(self.unmatched)} unmatched"
        return text


class _Ambiguous:
    """Marks a flattened name two different weights answer to."""

    def __init__(self, *targets: Target):
        self.targets = targets


def _weight_keys(weight_shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """Adaptable weights: `.weight` tensors of Linear/Conv layers."""
    return {k: tuple(s) for k, s in weight_shapes.items() if k.endswith(".weight") and len(s) >= 2}


def _names_of(path: str, shape: tuple, arch: Architecture | None) -> dict[str, tuple[int, int] | None]:
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


def build_name_index(weight_shapes: Mapping[str, tuple], arch: Architecture | None) -> dict[str, object]:
    """Flattened name -> Target (or _Ambiguous), for every adaptable weight of a model."""
    index: dict[str, object] = {}
    for key, shape in _weight_keys(weight_shapes).items():
        for name, rows in _names_of(module_path(key), shape, arch).items():
            flat, target = flatten(name), Target(key, rows)
            existing = index.get(flat)
            if existing is None or existing == target:
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
        shape = tuple(weight_shapes[found.key])
        if found.rows is not None:
            shape = (found.rows[1], *shape[1:])
        if not module.fits(shape):
            where = found.key + (f" rows {found.rows[0]}:{found.rows[0] + found.rows[1]}" if found.rows else "")
            misfits.append(f"module {stem} ({module.algorithm_name}) produces {list(module.shape)} but {where} is {list(shape)}")
            continue
        bias_key = None
        if module.has_bias_delta:
            candidate = found.key[: -len("weight")] + "bias"
            if candidate not in weight_shapes:
                misfits.append(f"module {stem} carries a bias difference but the model has no {candidate}")
                continue
            bias_key = candidate
        patches.append(Patch(stem, module, found, bias_key))

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
