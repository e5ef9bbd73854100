"""Where each module of an adapter file sits in its architecture, and its name in each layout.

The unit of conversion is a *weight*: one weight of ComfyUI's model for the architecture (fused
q/k/v where ComfyUI fuses them; for FramePack, which ComfyUI core lacks, Musubi's model). A module
covers the whole weight, or one row part of it in a *partition*: Musubi's separate q/k/v of Z-Image
and HunyuanVideo 1.5, or the Diffusers q/k/v (and FLUX single-block MLP input) of FLUX.

A stem is resolved from any key family (`lora_unet_` + flattened path, `<prefix>.` + dotted path,
`lycoris_`, `lora_transformer_`, PEFT `base_model.model.`, bare): without its family prefix it is
matched against every naming the registry (`lycoris_core/architectures.py`) has for a layer, Musubi's,
ComfyUI's and the aliases. Dotted templates are tried first, then the flattened ones: Musubi's own
names and its converter's wrong dotted names (`img_attn_qkv`, `single.transformer.blocks.0.attn.to.q`)
only match flattened. A name that fits two different places is an error, and output names are always
registry templates, formatted: dots are never rebuilt from underscores.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass

from ..lycoris_core.architectures import (
    Architecture,
    Slice,
    flatten,
    get_architecture,
    match_template,
)
from ..lycoris_core.errors import AdapterError
from ..lycoris_core.rows import Rows

# Key-family prefixes, tried before any other split of a stem (longest first where they nest).
FAMILY_PREFIXES = (
    "lora_unet_",
    "lycoris_",
    "lora_transformer_",
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
)

COMFY_PREFIX = "diffusion_model."  # core maps `diffusion_model.<path>` for every weight of every model


@dataclass(frozen=True)
class Partition:
    """One way to split a weight into row parts: the parts' module paths in one naming."""

    naming: str  # "musubi" or "diffusers" (the registry's aliases)
    names: tuple[str, ...]  # dotted module path of each part, in row order
    sizes: tuple[str, ...]  # size rules of `Slice` ("third", "in", "rest")

    def rows(self, weight: str, fused_shape: tuple) -> list[Rows]:
        """The rows of every part in the fused weight `weight` of this shape."""
        return [Slice(weight, i, self.sizes).rows(fused_shape) for i in range(len(self.names))]


@dataclass(frozen=True)
class Site:
    """Where a module acts: a weight (ComfyUI's dotted module path), whole or one part of a partition."""

    weight: str
    partition: Partition | None = None
    part: int | None = None

    @property
    def path(self) -> str:
        """The module path this module has in its own naming."""
        return self.weight if self.partition is None else self.partition.names[self.part]


@dataclass(frozen=True)
class _Form:
    template: str
    kind: str  # "layer", "comfy", "fused", "alias"
    index: int  # into arch.layers or arch.aliases


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


class ArchitectureNames:
    """The naming knowledge of one architecture, for resolving stems and naming weights."""

    def __init__(self, arch: Architecture):
        self.arch = arch
        forms: list[_Form] = []
        for i, (musubi, comfy) in enumerate(arch.layers):
            forms.append(_Form(musubi, "layer", i))
            if isinstance(comfy, Slice):
                forms.append(_Form(comfy.fused, "fused", i))
            elif comfy != musubi:
                forms.append(_Form(comfy, "comfy", i))
        forms += [_Form(alias, "alias", j) for j, (alias, _) in enumerate(arch.aliases)]
        self.forms = forms
        self._layer_forms = [f for f in forms if f.kind != "alias"]

    # ------------------------------------------------------------------------------------------
    # Resolving

    def resolve(self, stem: str) -> Site | None:
        """The site of a module stem, or None if no naming of this architecture has it.

        Raises AdapterError when the stem fits two different places.
        """
        for rest in _candidate_paths(stem):
            sites = self._match(rest, self.forms, flat=False) or self._match(flatten(rest), self.forms, flat=True)
            if len(sites) > 1:
                raise AdapterError(
                    f"module {stem}: its name fits several layers of {self.arch.title} ("
                    + ", ".join(sorted(s.path for s in sites))
                    + "): its underscores could be either path; a file with dotted names is needed"
                )
            if sites:
                return sites.pop()
        return None

    def _match(self, path: str, forms: list[_Form], flat: bool) -> set[Site]:
        found = set()
        for form in forms:
            groups = match_template(form.template, path, flat=flat)
            if groups is not None:
                site = self._site_of(form, groups)
                if site is not None:
                    found.add(site)
        return found

    def _site_of(self, form: _Form, groups: dict[str, str]) -> Site | None:
        if form.kind == "alias":
            target = self.arch.aliases[form.index][1]
            if not isinstance(target, Slice):
                sites = self._match(target.format(**groups), self._layer_forms, flat=False)
                return sites.pop() if len(sites) == 1 else None
            whole = self._match(target.fused.format(**groups), self._layer_forms, flat=False)
            if len(whole) != 1:
                return None
            site = whole.pop()
            if site.partition is not None:
                return None
            return Site(site.weight, self._alias_partition(target, groups), target.index)
        comfy = self.arch.layers[form.index][1]
        if isinstance(comfy, Slice):
            weight = comfy.fused.format(**groups)
            if form.kind == "fused":
                return Site(weight)
            return Site(weight, self.musubi_partition(weight), comfy.index)
        return Site(comfy.format(**groups))

    def _alias_partition(self, target: Slice, groups: dict[str, str]) -> Partition:
        names: dict[int, str] = {}
        for alias, other in self.arch.aliases:
            if isinstance(other, Slice) and (other.fused, other.sizes) == (target.fused, target.sizes):
                names[other.index] = alias.format(**{k: groups[k] for k in _fields(alias)})
        return Partition("diffusers", tuple(names[i] for i in range(len(target.sizes))), target.sizes)

    # ------------------------------------------------------------------------------------------
    # Naming

    def musubi_partition(self, weight: str) -> Partition | None:
        """Musubi's split of a fused ComfyUI weight into separate layers, or None if Musubi keeps it whole."""
        names: dict[int, str] = {}
        sizes = None
        for musubi, comfy in self.arch.layers:
            if isinstance(comfy, Slice):
                groups = match_template(comfy.fused, weight)
                if groups is not None:
                    names[comfy.index] = musubi.format(**groups)
                    sizes = comfy.sizes
        if sizes is None:
            return None
        return Partition("musubi", tuple(names[i] for i in range(len(sizes))), sizes)

    def musubi_path(self, weight: str) -> str:
        """Musubi's module path of a weight it keeps whole."""
        for musubi, comfy in self.arch.layers:
            if isinstance(comfy, str):
                groups = match_template(comfy, weight)
                if groups is not None:
                    return musubi.format(**groups)
        raise AdapterError(f"{weight}: no Musubi layer of {self.arch.title} has this ComfyUI name")  # registry bug

    def comfy_slice_prefix(self, partition: Partition) -> str | None:
        """The key prefix under which ComfyUI core maps these parts onto slices, or None if it maps none."""
        return dict(self.arch.comfyui_slice_names).get(partition.naming)


@functools.cache
def names_for(arch_id: str) -> ArchitectureNames:
    return ArchitectureNames(get_architecture(arch_id))


def _candidate_paths(stem: str):
    """The module paths a stem may stand for: without its family prefix, or without leading dotted segments."""
    known = False
    for prefix in FAMILY_PREFIXES:
        if stem.startswith(prefix) and len(stem) > len(prefix):
            known = True
            yield stem[len(prefix) :]
    parts = stem.split(".")
    for k in range(1, len(parts)):  # a user-chosen prefix (Musubi's --diffusers_prefix), any depth
        yield ".".join(parts[k:])
    if not known:
        yield stem  # bare module paths (ComfyUI maps them for Qwen-Image, Z-Image and FLUX)
