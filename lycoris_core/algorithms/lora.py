"""LoRA (and LoCon): ΔW = up @ down, optionally through a conv Tucker core `mid`.

up (out, r[,1,1]), down (r, in[, kh, kw]); with `mid` (r, r, kh, kw): down/up are 1x1 and
ΔW = einsum(mid, up, down). Rank = down.shape[0].
"""

from __future__ import annotations

import torch

from ..lowrank import Product
from ..rows import Rows
from .base import Algorithm, RowLayout, ShapeError, Shapes, Tensors, apply_by_rows, check_matmul, require

SUFFIXES = {}
for _up, _down in (
    ("lora_up.weight", "lora_down.weight"),  # kohya / Musubi / LyCORIS
    ("lora_B.weight", "lora_A.weight"),  # PEFT, Musubi "other", ComfyUI trainer
    ("lora.up.weight", "lora.down.weight"),  # diffusers LoRAAttnProcessor
    ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight"),  # old diffusers
):
    SUFFIXES[_up] = "up"
    SUFFIXES[_down] = "down"
SUFFIXES["lora_mid.weight"] = "mid"


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def weight_shape(shapes: Shapes) -> tuple:
    up, down = require(shapes, "up"), require(shapes, "down")
    if "mid" in shapes:
        mid = require(shapes, "mid")
        if len(up) < 2 or len(down) < 2:
            raise ShapeError(f"up {list(up)} and down {list(down)} must be at least 2-D")
        if len(mid) < 3 or mid[0] != up[1] or mid[1] != down[0]:
            raise ShapeError(f"Tucker core mid {list(mid)} does not fit up {list(up)} and down {list(down)}")
        return (up[0], down[1], *mid[2:])
    check_matmul(shapes, "up", "down")
    return (up[0], down[1], *down[2:])


def rank(shapes: Shapes) -> int:
    return shapes["down"][0]


def delta_rows(t: Tensors, rows: Rows) -> torch.Tensor:
    up, down = rows.of(_flat(t["up"])), t["down"]
    if "mid" in t:
        return torch.einsum("m n ..., i m, n j -> i j ...", t["mid"], up, _flat(down))
    return up @ _flat(down)


def delta_weight(t: Tensors) -> torch.Tensor:
    shape = weight_shape({k: tuple(v.shape) for k, v in t.items()})
    return delta_rows(t, Rows(0, shape[0])).reshape(shape)


def apply_(weight: torch.Tensor, t: Tensors, factor: float, rows: Rows) -> None:
    if weight.dtype == torch.float32 and "mid" not in t:
        # One fused kernel, no temporary the size of W.
        weight.view(rows.size, -1).addmm_(rows.of(_flat(t["up"])), _flat(t["down"]), alpha=factor)
        return
    apply_by_rows(weight, factor, rows, lambda block: delta_rows(t, block))


def bypass_delta(x: torch.Tensor, t: Tensors, factor: float = 1.0) -> torch.Tensor:
    if "mid" in t or t["down"].dim() != 2:
        raise ShapeError("bypass of a convolution LoRA is not supported; use patch mode")
    down = t["down"] if factor == 1.0 else t["down"] * factor
    return (x @ down.T) @ _flat(t["up"]).T


def factored_delta(t: Tensors) -> Product:
    """up · down, conv kernels in down's columns; a Tucker core goes into down (inner dimension = rank)."""
    up, down = _flat(t["up"]), _flat(t["down"])
    if "mid" in t:
        down = torch.einsum("m n ..., n j -> m j ...", t["mid"], down).reshape(up.shape[1], -1)
    return Product(up, down)


def _row_tensors(shapes: Shapes) -> dict[str, int]:
    if "mid" in shapes:
        raise ShapeError("a Tucker core (lora_mid) mixes every row with every rank component")
    return {"up": 1}


ALGORITHM = Algorithm(
    name="lora",
    suffixes=SUFFIXES,
    weight_shape=weight_shape,
    rank=rank,
    delta_weight=delta_weight,
    delta_rows=delta_rows,
    apply_=apply_,
    bypass_delta=bypass_delta,
    layout=RowLayout(row_tensors=_row_tensors, rank_pairs=(("up", "down"),)),
    factored_delta=factored_delta,
)
