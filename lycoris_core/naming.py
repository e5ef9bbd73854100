"""The one reader of the architecture records: where a name (an adapter's module stem, a model's weight
key) sits in ComfyUI's model, and what a ComfyUI weight is called in the other namings.

Every name resolves to a `Place`: ComfyUI's whole weight plus the rows the name stands for (all of
them, one part of a fused weight, or the two halves swapped). Loader, merge, convert and training
all resolve names here, with one policy for adapter stems:

- key-family prefixes (`lora_unet_`, `lycoris_`, ... of flattened paths; `diffusion_model.`,
  `transformer.`, `base_model.model.`, or any user-chosen dotted prefix) come off first;
- dotted paths are matched as they are, against every naming's templates; only when no dotted
  reading matches are they flattened (Musubi's converter writes some dotted names wrongly, e.g.
  `img_attn_qkv`); flattened paths are matched against flattened templates, and dots are never
  rebuilt from underscores;
- a name that fits two different places is ambiguous, never guessed;
- a dotted name no template knows is taken as ComfyUI's own module path.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass

from .architectures import ARCHITECTURES, COMFYUI, DIFFUSERS, MUSUBI, PLACEHOLDERS, Architecture, Name, Part, SwapHalves
from .errors import AdapterError

# Key-family prefixes of adapter stems. Flattened families hold module paths with '.' -> '_'.
FLAT_FAMILIES = ("lora_unet_", "lycoris_", "lora_transformer_")
DOTTED_FAMILIES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
# Stems of text-encoder modules (kohya/Musubi `lora_te*_`, Diffusers `text_encoder.`): not the diffusion model's.
TEXT_ENCODER_FAMILIES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.", "text_encoders.")
# Containers of weight keys in model files and state dicts ("model.model.": ComfyUI's ModelSave for
# HunyuanVideo (1.5)).
MODEL_PREFIXES = ("model.diffusion_model.", "model.model.", "diffusion_model.", "model.")
# What each naming writes in front of a module path.
MUSUBI_PREFIX = FLAT_FAMILIES[0]
COMFY_PREFIX = "diffusion_model."  # ComfyUI core maps `diffusion_model.<path>` for every weight of every model

_FORMATTER = string.Formatter()


def flatten(path: str) -> str:
    return path.replace(".", "_")


@functools.cache
def template_regex(template: str, flat: bool = False) -> re.Pattern:
    """A template as a full-match regex; `flat` matches the underscored form ('.' -> '_')."""
    pattern = ""
    for literal, name, _, _ in _FORMATTER.parse(template):
        pattern += re.escape(flatten(literal) if flat else literal)
        if name is not None:
            pattern += f"(?P<{name}>{PLACEHOLDERS[name]})"
    return re.compile(pattern)


def match_template(template: str, path: str, flat: bool = False) -> dict[str, str] | None:
    found = template_regex(template, flat).fullmatch(path)
    return found.groupdict() if found else None


def fill(template: str, groups: dict[str, str]) -> str:
    return template.format(**{k: v for k, v in groups.items() if "{" + k + "}" in template})


# The parameter names of a module's weight: `.weight`, or `.scale` for the RMSNorms of the original
# FLUX / HunyuanVideo checkpoints (and of ComfyUI releases before it renamed them on load).
WEIGHT_PARAMS = (".weight", ".scale")


def module_path(key: str) -> str:
    """A model weight key without its container prefix and parameter suffix."""
    for prefix in MODEL_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key.rsplit(".", 1)[0] if key.endswith((*WEIGHT_PARAMS, ".bias")) else key


def is_text_encoder_stem(stem: str) -> bool:
    """A module for a text encoder, not for the diffusion model (this pack patches diffusion models)."""
    return stem.startswith(TEXT_ENCODER_FAMILIES)


def stem_paths(stem: str, flatten_dotted: bool = True, max_segments: int | None = None) -> Iterator[tuple[str, bool]]:
    """The module paths an adapter stem may stand for, in the order they are tried: (path, flattened).
    `flatten_dotted=False` leaves out the flattened readings of dotted stems. `max_segments`: dotted
    readings of more segments than any name being matched has are left out (a hostile stem of
    thousands of segments must not cost thousands of paths)."""
    for prefix in FLAT_FAMILIES:
        if stem.startswith(prefix) and len(stem) > len(prefix):
            yield stem[len(prefix) :], True
            return
    parts = stem.split(".")
    first = 0 if max_segments is None else max(0, len(parts) - max_segments)
    dotted = [".".join(parts[k:]) for k in range(first, len(parts))]  # the stem, then without leading segments
    for path in dotted:
        yield path, False
    if flatten_dotted:
        for path in dotted:
            yield flatten(path), True


@dataclass(frozen=True)
class Place:
    """Where a name sits: ComfyUI's whole weight, the rows of it the name stands for (None: all of
    them, in order), and the namings that call it so (none: a path no record knows, ComfyUI's own)."""

    weight: str
    rows: Part | SwapHalves | None = None
    namings: frozenset[str] = frozenset()

    @property
    def part(self) -> int | None:
        return self.rows.index if isinstance(self.rows, Part) else None

    @property
    def naming(self) -> str | None:
        """One naming of the name (Musubi's first), or None for a path no record knows."""
        return next((n for n in (MUSUBI, DIFFUSERS, COMFYUI) if n in self.namings), None)


@dataclass(frozen=True)
class Partition:
    """A fused ComfyUI weight as one naming splits it: its parts' module paths, in row order."""

    naming: str
    names: tuple[str, ...]
    sizes: tuple[str, ...]

    def rows(self, fused_shape: tuple) -> list:
        return Part(0, self.sizes).all_rows(fused_shape)


class AmbiguousName(AdapterError):
    """A name that fits several places (its underscores could be either path)."""


class Naming:
    """The names of one architecture (or of none: then every name is ComfyUI's own), compiled once."""

    def __init__(self, arch: Architecture | None):
        self.arch = arch
        names = list(arch.names) if arch else []
        comfy = dict.fromkeys(name.weight for name in names) if arch and arch.comfyui_model else {}
        self.names: list[Name] = names + [Name(COMFYUI, weight, weight) for weight in comfy]
        # Templates by their shape (digit runs as '#', placeholders filled with what they can hold): a
        # path only matches templates of its own shape, so each is tried against those alone.
        self._by_shape: dict[tuple[str, bool], list[int]] = {}
        for i, name in enumerate(self.names):
            for flat in (False, True):
                for shape in _template_shapes(name.template, flat):
                    self._by_shape.setdefault((shape, flat), []).append(i)
        # A path of more segments cannot match any template, dotted or flattened: each of its dots
        # stands for a dot or an underscore of the template (placeholders hold neither).
        self.max_segments = max((n.template.count(".") + n.template.count("_") + 1 for n in self.names), default=1)

    # -- resolving -------------------------------------------------------------------------------

    def places(self, path: str, flat: bool = False) -> list[Place]:
        """Every place a (dotted or flattened) path names, one per distinct place."""
        found: dict[tuple, set[str]] = {}
        for i in self._by_shape.get((_DIGIT_RUNS.sub("#", path), flat), ()):
            name = self.names[i]
            groups = match_template(name.template, path, flat)
            if groups is not None:
                found.setdefault((fill(name.weight, groups), name.rows), set()).add(name.naming)
        return [Place(weight, rows, frozenset(namings)) for (weight, rows), namings in found.items()]

    def place(self, path: str) -> Place:
        """The place of a dotted module path (a model's weight), or the path itself as ComfyUI's."""
        places = self.places(path)
        if len(places) > 1:
            raise AmbiguousName(f"{path}: names several layers ({', '.join(sorted(p.weight for p in places))})")
        return places[0] if places else Place(path)

    def place_of_stem(self, stem: str, flatten_dotted: bool = True) -> Place | None:
        """The place of an adapter's module stem (module policy), or None when no naming of the
        architecture has it. Raises AmbiguousName when it fits several."""
        for path, flat in stem_paths(stem, flatten_dotted, self.max_segments):
            places = self.places(path, flat)
            if len(places) > 1:
                raise AmbiguousName(
                    f"module {stem}: its name fits several layers of {self.title} ("
                    + ", ".join(sorted(p.weight for p in places))
                    + "): its underscores could be either path; a file with dotted names is needed"
                )
            if places:
                return places[0]
        return None

    @property
    def title(self) -> str:
        return self.arch.title if self.arch else "the model"

    # -- naming weights ----------------------------------------------------------------------------

    def partition(self, weight: str, naming: str) -> Partition | None:
        """How `naming` splits ComfyUI's weight `weight` into parts, or None if it keeps it whole."""
        parts: dict[int, str] = {}
        sizes = None
        for name in self.names:
            if name.naming == naming and isinstance(name.rows, Part):
                groups = match_template(name.weight, weight)
                if groups is not None:
                    parts[name.rows.index] = fill(name.template, groups)
                    sizes = name.rows.sizes
        if sizes is None or sorted(parts) != list(range(len(sizes))):
            return None
        return Partition(naming, tuple(parts[i] for i in range(len(sizes))), sizes)

    def whole_name(self, weight: str, naming: str) -> str | None:
        """`naming`'s module path for ComfyUI's weight `weight` when it keeps it whole (rows in order)."""
        for name in self.names:
            if name.naming == naming and name.rows is None:
                groups = match_template(name.weight, weight)
                if groups is not None:
                    return fill(name.template, groups)
        return None

    def musubi_names(self, weight: str) -> Partition | str:
        """Musubi's name for ComfyUI's weight: its partition into parts, or one path (the weight's own
        path when Musubi has no name for it)."""
        return self.partition(weight, MUSUBI) or self.whole_name(weight, MUSUBI) or weight

    def comfy_slice_prefix(self, partition: Partition) -> str | None:
        """The key prefix under which ComfyUI core maps these parts onto slices, or None if it maps none."""
        return dict(self.arch.comfyui_slice_names).get(partition.naming) if self.arch else None


_DIGIT_RUNS = re.compile(r"\d+")
# What each placeholder can hold, as a shape: digit runs ('#'), or one of a few words.
_PLACEHOLDER_SHAPES = {"n": ("#",), "s": ("img", "txt")}
assert set(_PLACEHOLDER_SHAPES) == set(PLACEHOLDERS), "every placeholder needs its shapes"


def _template_shapes(template: str, flat: bool) -> list[str]:
    """The shapes of the paths a template matches (see Naming): one per choice of its word placeholders."""
    shapes, after_field = [""], False
    for literal, field, _, _ in _FORMATTER.parse(template):
        literal = flatten(literal) if flat else literal
        if (after_field and literal[:1].isdigit()) or (field is not None and literal[-1:].isdigit()):
            raise ValueError(f"template {template!r}: a digit next to a placeholder makes one digit run with it")
        after_field = field is not None
        options = [_DIGIT_RUNS.sub("#", literal) + choice for choice in (_PLACEHOLDER_SHAPES[field] if field else ("",))]
        shapes = [shape + option for shape in shapes for option in options]
    return shapes


@functools.cache
def naming_for(arch_id: str | None) -> Naming:
    return Naming(ARCHITECTURES[arch_id] if arch_id else None)
