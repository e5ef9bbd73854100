"""The interface every adapter algorithm implements, as a record of pure functions.

An algorithm module (lora, loha, lokr, diff) defines its tensor names and the functions below and
ends with `ALGORITHM = Algorithm(...)`. Everything that loads, merges, converts or trains adapters goes
through this record, so adding an algorithm is one module plus one line in `algorithms/__init__.py`.

Tensor dicts are keyed by canonical parameter names (`up`, `hada_w1_a`, `lokr_w2`, ...); shapes are
the file's. All math is fp32 (callers pass fp32 tensors); `factor` is strength × scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

Shapes = Mapping[str, tuple]
Tensors = Mapping[str, torch.Tensor]

# Chunk size (elements) for row-blocked work: big enough to amortise kernel launches, small enough
# that the temporaries stay in cache and never approach the size of a full weight.
CHUNK_ELEMENTS = 1 << 20


class ShapeError(ValueError):
    """A module's tensors do not fit together; the caller adds the file and module name."""


@dataclass(frozen=True)
class Algorithm:
    name: str
    # Every spelling of a parameter's key suffix in files -> canonical name.
    suffixes: Mapping[str, str]
    # Validates shapes and returns the full weight shape (out, in, *kernel). Raises ShapeError.
    weight_shape: Callable[[Shapes], tuple]
    # The rank the scale divides by, or None when there is none (full matrices, diff).
    rank: Callable[[Shapes], int | None]
    # ΔW (unscaled, fp32), shape weight_shape.
    delta_weight: Callable[[Tensors], torch.Tensor]
    # Rows [start, stop) of ΔW (unscaled, fp32): for row-blocked work with bounded temporaries.
    delta_rows: Callable[[Tensors, int, int], torch.Tensor]
    # target += factor * ΔW[start:stop] in place (target holds those rows; stop None = all rows),
    # fp32 math with one rounding, without a full-size temporary where the algebra allows.
    apply_: Callable[[torch.Tensor, Tensors, float, int, int | None], None]
    # factor·ΔW applied to x (last dim = in features) without building ΔW where cheaper; Linear only.
    # The factor goes onto the smallest operand, never as an extra pass over the output.
    bypass_delta: Callable[[torch.Tensor, Tensors, float], torch.Tensor]
    # The canonical names required for the module to be complete, as alternatives per slot.
    required: tuple[tuple[str, ...], ...]
    # A bias difference, for algorithms that store one (only `diff`): its parameter and getter.
    bias_param: str | None = None
    delta_bias: Callable[[Tensors], torch.Tensor | None] = lambda tensors: None


def require(shapes: Shapes, name: str) -> tuple:
    if name not in shapes:
        raise ShapeError(f"missing {name}")
    return tuple(shapes[name])


def check_matmul(shapes: Shapes, left: str, right: str) -> tuple[int, int]:
    """Shapes of `left @ right` (2-D factors, conv factors flattened); returns (rows, cols)."""
    a, b = require(shapes, left), require(shapes, right)
    if len(a) < 2 or len(b) < 2:
        raise ShapeError(f"{left} {list(a)} and {right} {list(b)} must be at least 2-D")
    inner_a = a[1] * _prod(a[2:])
    if inner_a != b[0]:
        raise ShapeError(f"rank mismatch: {left} {list(a)} @ {right} {list(b)}")
    return a[0], b[1] * _prod(b[2:])


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def rows_per_chunk(row_elements: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, row_elements))


def apply_by_rows(
    target: torch.Tensor, factor: float, start: int, stop: int, delta_rows: Callable[[int, int], torch.Tensor]
) -> None:
    """target (= rows start..stop of W) += factor * ΔW[start:stop], one block of rows at a time
    (fp32 math, one cast per block)."""
    flat = target.view(stop - start, -1)
    step = rows_per_chunk(flat.shape[1])
    for first in range(start, stop, step):
        last = min(stop, first + step)
        flat[first - start : last - start].add_(delta_rows(first, last).reshape(last - first, -1), alpha=factor)
