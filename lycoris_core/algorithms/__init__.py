"""The algorithm registry: one module per algorithm, in the order files are matched against them."""

from __future__ import annotations

from . import diff, loha, lokr, lora
from .base import Algorithm, RowLayout, ShapeError

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (lora.ALGORITHM, loha.ALGORITHM, lokr.ALGORITHM, diff.ALGORITHM)}

# Where ComfyUI's loader computes an algorithm differently from LyCORIS (files its own trainer wrote
# mean what it loads): the variant to read those files with.
COMFYUI_VARIANTS: dict[str, Algorithm] = {"lokr": lokr.COMFYUI_ALGORITHM}

# Parameters any algorithm's module may carry besides its own tensors: alpha, DoRA's magnitude, and
# a difference for the layer's bias (ComfyUI's trainer writes `diff_b` beside LoRA/LoHa/LoKr tensors).
COMMON_SUFFIXES = {"alpha": "alpha", "dora_scale": "dora_scale", "diff_b": "diff_b"}

# Every known key suffix -> (algorithm name or None for common, canonical parameter name).
SUFFIX_INDEX: dict[str, tuple[str | None, str]] = {
    suffix: (algorithm.name, canonical)
    for algorithm in ALGORITHMS.values()
    for suffix, canonical in algorithm.suffixes.items()
}
SUFFIX_INDEX.update({suffix: (None, canonical) for suffix, canonical in COMMON_SUFFIXES.items()})

__all__ = ["ALGORITHMS", "COMFYUI_VARIANTS", "Algorithm", "COMMON_SUFFIXES", "RowLayout", "SUFFIX_INDEX", "ShapeError"]
