"""LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b), the Hadamard product of two low-rank matrices.

hada_w1_a (out, r), hada_w1_b (r, in[*k]); the same for w2. With conv Tucker cores `hada_t1`/`hada_t2`
(r, r, kh, kw) the `_a` factors are (r, out) and each half is einsum(t, w_b, w_a).
Rank = hada_w1_b.shape[0].

The factored form: (w1a w1b) ⊙ (w2a w2b) = U V with U (out, r1·r2) the row-wise products of w1a and
w2a and V (r1·r2, in) the column-wise products of w1b and w2b. Bypass and training use it when a
rank-r1·r2 product is cheaper than building ΔW.
"""

from __future__ import annotations

import torch

from ..lowrank import Product
from ..rows import Rows
from .base import Algorithm, RowLayout, ShapeError, Shapes, Tensors, apply_by_rows, check_low_rank_pair, require

SUFFIXES = {name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}


def _half_shape(shapes: Shapes, i: int) -> tuple:
    a, b = f"hada_w{i}_a", f"hada_w{i}_b"
    t = f"hada_t{i}"
    if t in shapes:
        ts, sa, sb = require(shapes, t), require(shapes, a), require(shapes, b)
        if len(ts) < 3 or len(sa) != 2 or len(sb) != 2 or ts[0] != sa[0] or ts[1] != sb[0]:
            raise ShapeError(f"Tucker core {t} {list(ts)} does not fit {a} {list(sa)} and {b} {list(sb)}")
        return (sa[1], sb[1], *ts[2:])
    rows, cols = check_low_rank_pair(shapes, a, b)
    return (rows, cols)


def weight_shape(shapes: Shapes) -> tuple:
    if ("hada_t1" in shapes) != ("hada_t2" in shapes):
        raise ShapeError("hada_t1 and hada_t2 must both be present or both absent")
    first, second = _half_shape(shapes, 1), _half_shape(shapes, 2)
    if first != second:
        raise ShapeError(f"the two halves differ in shape: {list(first)} vs {list(second)}")
    return first


def rank(shapes: Shapes) -> int:
    return shapes["hada_w1_b"][0]


def trainable_shapes(out_features: int, in_features: int, rank: int) -> dict[str, tuple[int, int]]:
    """The factors of a Linear LoHa of this rank, as Musubi Tuner and LyCORIS create them."""
    return {
        "hada_w1_a": (out_features, rank),
        "hada_w1_b": (rank, in_features),
        "hada_w2_a": (out_features, rank),
        "hada_w2_b": (rank, in_features),
    }


def factored(w1a, w1b, w2a, w2b, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with factor·ΔW = U V (module docstring); the factor goes onto U's smaller operand."""
    out_features, in_features = w1a.shape[0], w1b.shape[1]
    w2a = w2a if factor == 1.0 else w2a * factor
    u = (w1a[:, :, None] * w2a[:, None, :]).reshape(out_features, -1)
    v = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, in_features)
    return u, v


def _half_factors(t: Tensors, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (out, r), b (r, in·k)) with half i = a @ b, conv kernels in b's columns (a Tucker core goes into b)."""
    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    core = t.get(f"hada_t{i}")
    if core is not None:  # a is (r, out) here
        return a.T, torch.einsum("i j ..., j r -> i r ...", core, b).reshape(core.shape[0], -1)
    return a, b.reshape(b.shape[0], -1)


def factored_delta(t: Tensors) -> Product:
    """ΔW = U V with inner dimension r1·r2: the Khatri-Rao products of the halves' factors."""
    (w1a, w1b), (w2a, w2b) = _half_factors(t, 1), _half_factors(t, 2)
    return Product(*factored(w1a, w1b, w2a, w2b))


def _half_rows(t: Tensors, i: int, rows: Rows) -> torch.Tensor:
    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    core = t.get(f"hada_t{i}")
    if core is not None:
        return torch.einsum("i j ..., j r, i p -> p r ...", core, b, a[:, rows.start : rows.stop])
    return rows.of(a) @ b


def delta_rows(t: Tensors, rows: Rows) -> torch.Tensor:
    return _half_rows(t, 1, rows).mul_(_half_rows(t, 2, rows))


def delta_weight(t: Tensors) -> torch.Tensor:
    shape = weight_shape({k: tuple(v.shape) for k, v in t.items()})
    return delta_rows(t, Rows(0, shape[0])).reshape(shape)


def apply_(weight: torch.Tensor, t: Tensors, factor: float, rows: Rows) -> None:
    apply_by_rows(weight, factor, rows, lambda block: delta_rows(t, block))


def bypass_delta(x: torch.Tensor, t: Tensors, factor: float = 1.0) -> torch.Tensor:
    if "hada_t1" in t or t["hada_w1_b"].dim() != 2:
        raise ShapeError("bypass of a convolution LoHa is not supported; use patch mode")
    w1a, w1b, w2a, w2b = t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"]
    out_features, in_features = w1a.shape[0], w1b.shape[1]
    r1, r2 = w1b.shape[0], w2b.shape[0]
    tokens = x.numel() // in_features
    factored_cost = r1 * r2 * (tokens + 1) * (in_features + out_features)
    built_cost = (r1 + r2 + 1 + tokens) * out_features * in_features
    if factored_cost < built_cost:
        u, v = factored(w1a, w1b, w2a, w2b, factor)
        return (x @ v.T) @ u.T
    delta = delta_rows(t, Rows(0, out_features))
    return x @ (delta if factor == 1.0 else delta.mul_(factor)).T


def _row_tensors(shapes: Shapes) -> dict[str, int]:
    if "hada_t1" in shapes:
        raise ShapeError("Tucker cores (hada_t1/hada_t2) mix every row with every rank component")
    return {"hada_w1_a": 1, "hada_w2_a": 1}


ALGORITHM = Algorithm(
    name="loha",
    suffixes=SUFFIXES,
    weight_shape=weight_shape,
    rank=rank,
    delta_weight=delta_weight,
    delta_rows=delta_rows,
    apply_=apply_,
    bypass_delta=bypass_delta,
    layout=RowLayout(row_tensors=_row_tensors, rank_pairs=(("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b"))),
    factored_delta=factored_delta,
)
