"""Full difference: ΔW is stored as is (`diff`): any weight, Linear, Conv or a norm's 1-D weight."""

from __future__ import annotations

import torch

from ..rows import Rows
from .base import Algorithm, RowLayout, ShapeError, Shapes, Tensors, require

SUFFIXES = {"diff": "diff"}


def weight_shape(shapes: Shapes) -> tuple:
    shape = require(shapes, "diff")
    if not shape:
        raise ShapeError("diff is a single number: a weight has at least one dimension")
    return shape


def rank(shapes: Shapes) -> None:
    return None


def delta_weight(t: Tensors) -> torch.Tensor:
    return t["diff"]


def delta_rows(t: Tensors, rows: Rows) -> torch.Tensor:
    return rows.of(t["diff"])


def apply_(weight: torch.Tensor, t: Tensors, factor: float, rows: Rows) -> None:
    weight.add_(rows.of(t["diff"]).reshape(weight.shape), alpha=factor)


def bypass_delta(x: torch.Tensor, t: Tensors, factor: float = 1.0) -> torch.Tensor:
    y = x @ t["diff"].reshape(t["diff"].shape[0], -1).T
    return y if factor == 1.0 else y.mul_(factor)


ALGORITHM = Algorithm(
    name="diff",
    suffixes=SUFFIXES,
    weight_shape=weight_shape,
    rank=rank,
    delta_weight=delta_weight,
    delta_rows=delta_rows,
    apply_=apply_,
    bypass_delta=bypass_delta,
    layout=RowLayout(row_tensors=lambda shapes: {"diff": 1}),
)
