"""Which architecture an adapter file or a model is for.

A file: the architectures whose names (in any naming) explain the most of its module stems are the
candidates; shapes rule out what they contradict (FLUX.1's MLP is 4× wide, FLUX.2's 6×); then the
metadata's word (Musubi's and ai-toolkit's `ss_base_model_version`, the `modelspec.architecture` of
Musubi, kohya and SimpleTuner) decides among them. Without one, names that several architectures
share are read as one naming of one architecture (a file is written in one naming), the way their
key family suggests, then as the architecture they cover best:

- `lora_unet_` keys are Musubi's own names (FramePack's are HunyuanVideo's Diffusers names), and so
  are dotted names that only fit once flattened (Musubi's converter rebuilds dots from underscores
  and gets some wrong); other key families are trainers on Diffusers' model classes, so Diffusers
  names win;
- an architecture with a list of blocks the file never touches is less likely: trainers that target
  layers by kind reach every list (HunyuanVideo's single blocks and token refiner, which FLUX.1
  and HunyuanVideo 1.5 lack).
Names that still fit several equally give None: the model the file is loaded onto decides.

A model: regexes over its weight names (`Architecture.model_signature`).
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Mapping

from .architectures import ARCHITECTURES, COMFYUI, DIFFUSERS, MUSUBI, SUPPORTED, Architecture
from .naming import FLAT_FAMILIES, MUSUBI_PREFIX, AmbiguousName, Place, module_path, naming_for


def architecture_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The architecture a file's metadata names, if it names one."""
    version = metadata.get("ss_base_model_version", "").strip().lower()
    for arch in ARCHITECTURES.values():
        if version and version in arch.musubi_versions:
            return arch.id
    spec = metadata.get("modelspec.architecture", "").strip().lower()
    starts = [(len(s), arch.id) for arch in ARCHITECTURES.values() for s in arch.modelspec if spec.startswith(s)]
    return max(starts)[1] if starts else None


def _places(arch_id: str, stems) -> dict[str, Place | None]:
    return _places_of(arch_id, tuple(stems))


@functools.lru_cache(maxsize=16)  # detection, source and format words ask again for the same file's stems
def _places_of(arch_id: str, stems: tuple[str, ...]) -> dict[str, Place | None]:
    naming = naming_for(arch_id)
    found = {}
    for stem in stems:
        try:
            found[stem] = naming.place_of_stem(stem)
        except AmbiguousName:
            found[stem] = Place(stem)  # fits the architecture's names, just not one place
    return found


def explained_count(arch_id: str, stems) -> int:
    """How many module stems (any key family) name a layer of this architecture."""
    if ARCHITECTURES[arch_id].refused:
        return 0
    return sum(place is not None for place in _places(arch_id, stems).values())


def _mlp_ratio(module_shapes: Mapping[str, tuple]) -> float | None:
    """out/in of a FLUX double-block MLP input layer (4 in FLUX.1, 6 in FLUX.2), if adapted."""
    for stem, place in _places("flux", module_shapes).items():
        shape = module_shapes[stem]
        if place and place.rows is None and re.fullmatch(r"double_blocks\.\d+\.img_mlp\.0", place.weight) and len(shape) >= 2:
            return shape[0] / shape[1] if shape[1] else None
    return None


def _blocks_missed(arch: Architecture, places: dict[str, Place | None]) -> int:
    """How many of the architecture's lists of blocks the file never touches."""
    heads = [block + "." for block in arch.blocks]
    touched = {head for place in places.values() if place for head in heads if place.weight.startswith(head)}
    return len(heads) - len(touched)


def _prefer(candidates: list[str], score) -> list[str]:
    scores = {a: score(a) for a in candidates}
    best = max(scores.values())
    return [a for a in candidates if scores[a] == best]


def _only_flattened(stem: str) -> bool:
    """A dotted stem that no architecture's names fit until it is flattened."""
    if stem.startswith(FLAT_FAMILIES):
        return False
    fits = False
    for arch in SUPPORTED:
        naming = naming_for(arch.id)
        try:
            if naming.place_of_stem(stem, flatten_dotted=False) is not None:
                return False
            fits = fits or naming.place_of_stem(stem) is not None
        except AmbiguousName:
            return False
    return fits


def detect_adapter_architecture(module_shapes: Mapping[str, tuple], metadata: Mapping[str, str]) -> str | None:
    """The architecture of an adapter from its module stems and shapes, with metadata as the hint
    among the candidates the names allow (module docstring)."""
    hint = architecture_from_metadata(metadata)
    stems = list(module_shapes)
    places = {arch.id: _places(arch.id, stems) for arch in SUPPORTED}
    scores = {a: sum(p is not None for p in found.values()) for a, found in places.items()}
    ratio = _mlp_ratio(module_shapes)
    if ratio is not None:
        scores["flux2" if ratio < 5 else "flux"] = 0
    best = max(scores.values())
    if best == 0:
        return hint  # an architecture this pack refuses is only named when no supported one fits the keys
    candidates = [a for a, s in scores.items() if s == best]
    if hint in candidates:
        return hint
    musubi_written = sum(stem.startswith(MUSUBI_PREFIX) for stem in stems) * 2 > len(stems) or any(
        _only_flattened(stem) for stem in stems
    )

    def naming_counts(arch_id: str) -> Counter:
        return Counter(naming for place in places[arch_id].values() if place is not None for naming in place.namings)

    def by_family(arch_id: str) -> int:
        """Stems the architecture explains through the naming the key family suggests."""
        if musubi_written:
            return naming_counts(arch_id)[MUSUBI]
        return sum(1 for place in places[arch_id].values() if place is not None and place.namings - {MUSUBI})

    candidates = _prefer(candidates, lambda a: max(naming_counts(a).values(), default=0))  # one naming explains most
    candidates = _prefer(candidates, by_family)
    candidates = _prefer(candidates, lambda a: -_blocks_missed(ARCHITECTURES[a], places[a]))
    return candidates[0] if len(candidates) == 1 else None


def detect_file_architecture(adapter) -> str | None:
    return detect_adapter_architecture({stem: m.shape for stem, m in adapter.modules.items()}, adapter.metadata)


def detect_model_architecture(weight_names) -> str | None:
    """The architecture of a model (base file or ComfyUI model) from its weight names."""
    paths = {module_path(k) for k in weight_names}
    for arch in SUPPORTED:
        for group in arch.model_signature:
            if all(any(re.search(sig, p) for p in paths) for sig in group):
                return arch.id
    return None


def uses_comfy_names(stems, arch_id: str | None) -> bool:
    """Whether dotted stems use ComfyUI's own names where they differ from Musubi's (and never Musubi's)."""
    if arch_id not in ARCHITECTURES or any(stem.startswith(FLAT_FAMILIES) for stem in stems):
        return False
    places = [place for place in _places(arch_id, stems).values() if place is not None]
    comfy_only = any(place.namings == {COMFYUI} for place in places)
    musubi_only = any(MUSUBI in place.namings and COMFYUI not in place.namings for place in places)
    return comfy_only and not musubi_only


# ---------------------------------------------------------------------------------------------
# Who wrote a file


def describe_source(adapter) -> tuple[str, str]:
    """(format, source): the key-layout family (`musubi`, `diffusers`, `lycoris`, `comfyui`, `peft`,
    `unknown`) and, in words, the tool and naming the file's keys follow."""
    modules = list(adapter.modules.values())
    stems = [m.stem for m in modules]
    fmt = adapter.format
    naming = _naming_words(stems, adapter.architecture)
    converted_to = _conversion_target(adapter.metadata)
    if converted_to is not None:
        if fmt in DOTTED_LAYOUTS and converted_to in DOTTED_LAYOUTS:  # keys alike where both name a weight alike
            fmt = converted_to
        return fmt, f"comfyui-lycoris conversion ({fmt} layout, {naming})"
    if fmt == "musubi":
        return fmt, f"Musubi Tuner / kohya (lora_unet_ + {naming})"
    if fmt == "lycoris":
        return fmt, f"SimpleTuner / LyCORIS (lycoris_ + {naming})"
    if any(m.algorithm == "diff" and len(m.shape) == 1 or m.has_bias_delta for m in modules):
        return "comfyui", f"ComfyUI trainer (diffusion_model. + {naming}, .diff/.diff_b on norms and biases)"
    if any(m.algorithm == "lokr" and m.alpha is not None and not m.alpha < 1e9 for m in modules):
        return fmt, f"ai-toolkit LoKr ({naming}, full-rank alpha 9999999999 meaning scale 1)"
    if all(m.alpha is None for m in modules) and (fmt == "peft" or adapter.metadata.get("format") == "pt"):
        return "peft", f"PEFT ({naming}, alpha in the adapter config, not in the file)"
    if any(key.startswith("ss_") for key in adapter.metadata):
        return fmt, f"Musubi Tuner, Diffusers layout (convert_lora.py --target other, {naming})"
    return fmt, f"{fmt} keys, {naming}"


DOTTED_LAYOUTS = ("diffusers", "comfyui")
CONVERTED_FROM_KEY = "comfyui_lycoris.converted_from"  # the records `convert` appends to a file's metadata


def _conversion_target(metadata) -> str | None:
    """The layout this pack's last conversion of the file wrote, from its record; None if it has none."""
    if CONVERTED_FROM_KEY not in metadata:
        return None
    try:
        records = json.loads(metadata[CONVERTED_FROM_KEY])
    except (ValueError, RecursionError):
        return ""
    last = records[-1] if isinstance(records, list) and records else None
    target = last.get("target") if isinstance(last, dict) else None
    return target if isinstance(target, str) else ""


def _naming_words(stems, arch_id: str | None) -> str:
    if arch_id not in ARCHITECTURES:
        return "module names of no known architecture"
    places = [p for p in _places(arch_id, stems).values() if p is not None]
    counts = Counter(n for p in places for n in p.namings)
    if not counts:
        return f"names {ARCHITECTURES[arch_id].title} does not have"
    words = {COMFYUI: "ComfyUI", MUSUBI: "original", DIFFUSERS: "Diffusers"}
    best = max(counts.values())
    return " = ".join(words[n] for n in (COMFYUI, MUSUBI, DIFFUSERS) if counts[n] == best) + " names"
