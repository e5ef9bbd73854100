"""Full difference: ΔW is stored as is (`diff`), with an optional bias difference (`diff_b`)."""

from __future__ import annotations

import torch

from .base import Algorithm, Shapes, Tensors, require

SUFFIXES = {"diff": "diff", "diff_b": "diff_b"}


def weight_shape(shapes: Shapes) -> tuple:
    return require(shapes, "diff")


def rank(shapes: Shapes) -> None:
    return None


def delta_weight(t: Tensors) -> torch.Tensor:
    return t["diff"]


def delta_rows(t: Tensors, start: int, stop: int) -> torch.Tensor:
    return t["diff"][start:stop]


def delta_bias(t: Tensors) -> torch.Tensor | None:
    return t.get("diff_b")


def apply_(weight: torch.Tensor, t: Tensors, factor: float, start: int = 0, stop: int | None = None) -> None:
    weight.add_(t["diff"][start:stop].reshape(weight.shape), alpha=factor)


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
    required=(("diff",),),
    bias_param="diff_b",
    delta_bias=delta_bias,
)
