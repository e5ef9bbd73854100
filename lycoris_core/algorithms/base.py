"""The interface every adapter algorithm implements, as a record of pure functions and facts.

An algorithm module (lora, loha, lokr, diff) defines its tensor names, the functions below and the
facts about its layout, and ends with `ALGORITHM = Algorithm(...)`. Everything that loads, merges,
converts or trains adapters goes through this record, so adding an algorithm is one module plus one
line in `algorithms/__init__.py`.

Tensor dicts are keyed by canonical parameter names (`up`, `hada_w1_a`, `lokr_w2`, ...); shapes are
the file's. All math is fp32 (callers pass fp32 tensors); `factor` is strength × scale. Row ranges
are `Rows` of ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..lowrank import Factored
from ..rows import Rows

Shapes = Mapping[str, tuple]
Tensors = Mapping[str, torch.Tensor]

# Chunk size (elements) for row-blocked work: big enough to amortise kernel launches, small enough
# that the temporaries stay in cache and never approach the size of a full weight.
CHUNK_ELEMENTS = 1 << 20


class ShapeError(ValueError):
    """A module's tensors do not fit together; the caller adds the file and module name."""


@dataclass(frozen=True)
class RowLayout:
    """How an algorithm's tensors hold the rows of ΔW: what exact regrouping (cutting a module into
    row parts, stacking parts into one module, reordering rows) may do with them.

    `row_tensors(shapes)`: the tensors whose dim 0 runs along ΔW's rows, each with how many rows of
    ΔW one of its rows makes (1 for LoRA's `up`; `b` for LoKr's `w1`, each row of which spans a block
    of `b` rows of kron(w1, w2)). Cutting those tensors cuts ΔW; everything else is shared by all rows.
    `rank_pairs`: (row factor, rank factor) pairs; stacking modules puts the row factors block-
    diagonally and the rank factors one under the other, so every part keeps its own rank components.
    `cannot_stack`: why several modules cannot be stacked into one exactly, or None when they can.
    `row_tensors` raises ShapeError for a module whose rows cannot be cut at all (Tucker cores).
    """

    row_tensors: Callable[[Shapes], dict[str, int]]
    rank_pairs: tuple[tuple[str, str], ...] = ()
    cannot_stack: str | None = None


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
    # Rows of ΔW (unscaled, fp32): for row-blocked work with bounded temporaries.
    delta_rows: Callable[[Tensors, Rows], torch.Tensor]
    # target += factor * ΔW[rows] in place (target holds those rows), fp32 math with one rounding,
    # without a full-size temporary where the algebra allows.
    apply_: Callable[[torch.Tensor, Tensors, float, Rows], None]
    # factor·ΔW applied to x (last dim = in features) without building ΔW where cheaper; Linear only.
    # The factor goes onto the smallest operand, never as an extra pass over the output.
    bypass_delta: Callable[[torch.Tensor, Tensors, float], torch.Tensor]
    layout: RowLayout
    # The stored forms, when the algorithm has several (LoKr: "full", "low_rank"), and which one a
    # module has (None for algorithms with one form).
    variants: tuple[str, ...] = ()
    variant: Callable[[Shapes], str | None] = lambda shapes: None
    # ΔW (unscaled, 2-D: conv kernels flattened into the columns) in the factored form whose truncated
    # SVD needs no full-size ΔW (`lowrank.py`); None: the algorithm has no structure to use, and
    # `delta_weight` is decomposed as it is.
    factored_delta: Callable[[Tensors], Factored] | None = None


def require(shapes: Shapes, name: str) -> tuple:
    if name not in shapes:
        raise ShapeError(f"missing {name}")
    return tuple(shapes[name])


def check_low_rank_pair(shapes: Shapes, left: str, right: str) -> tuple[int, int]:
    """Shapes of `left @ right` for a LoHa/LoKr factor pair, which LyCORIS always stores 2-D (a
    convolution's kernel is folded into the right factor's columns)."""
    a, b = require(shapes, left), require(shapes, right)
    if len(a) != 2 or len(b) != 2:
        raise ShapeError(f"{left} {list(a)} and {right} {list(b)} must be 2-D")
    return check_matmul(shapes, left, right)


def check_matmul(shapes: Shapes, left: str, right: str) -> tuple[int, int]:
    """Shapes of `left @ right` (2-D factors, conv factors flattened); returns (rows, cols)."""
    a, b = require(shapes, left), require(shapes, right)
    if len(a) < 2 or len(b) < 2:
        raise ShapeError(f"{left} {list(a)} and {right} {list(b)} must be at least 2-D")
    inner_a = a[1] * math.prod(a[2:])
    if inner_a != b[0]:
        raise ShapeError(f"rank mismatch: {left} {list(a)} @ {right} {list(b)}")
    return a[0], b[1] * math.prod(b[2:])


def rows_per_chunk(row_elements: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, row_elements))


def apply_by_rows(target: torch.Tensor, factor: float, rows: Rows, delta_rows: Callable[[Rows], torch.Tensor]) -> None:
    """target (= `rows` of W) += factor * ΔW[rows], one block of rows at a time (fp32 math, one
    cast per block)."""
    flat = target.view(rows.size, -1)
    step = rows_per_chunk(flat.shape[1])
    for first in range(rows.start, rows.stop, step):
        block = Rows(first, min(rows.stop, first + step))
        flat[block.start - rows.start : block.stop - rows.start].add_(
            delta_rows(block).reshape(block.size, -1), alpha=factor
        )
