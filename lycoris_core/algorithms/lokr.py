"""LoKr: ΔW = kron(w1, w2), shape (a·b, c·d[, k...]) for w1 (a, c) and w2 (b, d[, k...]).

Each factor is stored full (`lokr_w1`, `lokr_w2`) or low-rank (`lokr_w1_a` @ `lokr_w1_b`,
`lokr_w2_a` @ `lokr_w2_b`); `lokr_t2` is a conv Tucker core for w2 (then w2_a is (r, b), w2_b (r, d)).
Rank: w2_b.shape[0] if w2 is decomposed, else w1_b.shape[0] if w1 is, else none: with both factors
full the scale is 1 whatever alpha says (Musubi and LyCORIS then store alpha = network dim).

Nothing here materializes kron at full size: `apply_` adds w1[p,r]·w2[q,s] into a 4-D strided view
of W in one pass, and `bypass_delta` computes w1 · X · w2ᵀ on the input reshaped to (c, d).
"""

from __future__ import annotations

import dataclasses

import torch

from ..lowrank import Dense, Kronecker, Product
from ..rows import Rows
from .base import Algorithm, RowLayout, ShapeError, Shapes, Tensors, apply_by_rows, check_low_rank_pair, require

# fp32 elements staged at once when patching a half-precision weight (4 MB, cache-sized).
STAGE_ELEMENTS = 1 << 20

SUFFIXES = {
    name: name
    for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
}


def _factor_shape(shapes: Shapes, i: int) -> tuple:
    full, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
    has_low_rank = a in shapes or b in shapes
    if full in shapes:
        if has_low_rank:
            raise ShapeError(f"both {full} and {a}/{b} are present")
        return require(shapes, full)
    if not has_low_rank:
        raise ShapeError(f"missing {full} (or {a} and {b})")
    if i == 2 and "lokr_t2" in shapes:
        t, sa, sb = require(shapes, "lokr_t2"), require(shapes, a), require(shapes, b)
        if len(t) < 3 or len(sa) != 2 or len(sb) != 2 or t[0] != sa[0] or t[1] != sb[0]:
            raise ShapeError(f"Tucker core lokr_t2 {list(t)} does not fit {a} {list(sa)} and {b} {list(sb)}")
        return (sa[1], sb[1], *t[2:])
    return check_low_rank_pair(shapes, a, b)


def weight_shape(shapes: Shapes) -> tuple:
    if "lokr_t2" in shapes and "lokr_w2" in shapes:
        raise ShapeError("lokr_t2 needs lokr_w2_a/lokr_w2_b, not lokr_w2")
    w1, w2 = _factor_shape(shapes, 1), _factor_shape(shapes, 2)
    if len(w1) != 2:
        raise ShapeError(f"w1 must be 2-D, got {list(w1)}")
    if len(w2) < 2:
        raise ShapeError(f"w2 must be at least 2-D, got {list(w2)}")
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


def rank(shapes: Shapes) -> int | None:
    if "lokr_w2_b" in shapes:
        return shapes["lokr_w2_b"][0]
    if "lokr_w1_b" in shapes:
        return shapes["lokr_w1_b"][0]
    return None  # both factors full: scale 1 whatever alpha says


def variant(shapes: Shapes) -> str:
    """'full' when w1 and w2 are both full matrices (scale 1), else 'low_rank'."""
    return "full" if rank(shapes) is None else "low_rank"


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Musubi's (= LyCORIS's) split of `dimension` into (m, n), m·n = dimension, m ≤ n.

    A factor that divides the dimension is used as is; otherwise (or for -1) m walks up the
    divisors while m + n does not grow and m ≤ factor.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    cap = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > cap:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def trainable_shapes(out_features: int, in_features: int, rank: int, factor: int = -1) -> dict[str, tuple[int, int]]:
    """Musubi's LoKr factors for a Linear: lokr_w1 (out_l, in_m) always full; w2 (out_k, in_n) full
    iff rank ≥ max(out_k, in_n) / 2, else lokr_w2_a @ lokr_w2_b of this rank."""
    out_l, out_k = factorization(out_features, factor)
    in_m, in_n = factorization(in_features, factor)
    shapes = {"lokr_w1": (out_l, in_m)}
    if rank < max(out_k, in_n) / 2:
        shapes.update(lokr_w2_a=(out_k, rank), lokr_w2_b=(rank, in_n))
    else:
        shapes["lokr_w2"] = (out_k, in_n)
    return shapes


def factors(t: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w2) as full (small) matrices."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        # contiguous: torch.kron rejects the strided result of einsum
        w2 = torch.einsum("i j ..., i p, j r -> p r ...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]).contiguous()
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    return w1, w2


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2) with w1's entries scaling whole kernels of a conv w2 (w1 gets trailing unit dims)."""
    if w2.dim() > 2:
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
    return torch.kron(w1, w2)


def delta_weight(t: Tensors) -> torch.Tensor:
    w1, w2 = factors(t)
    return _kron(w1, w2)


def delta_rows(t: Tensors, rows: Rows) -> torch.Tensor:
    """Rows of kron(w1, w2): kron of the w1 rows they fall in, then trimmed."""
    w1, w2 = factors(t)
    b = w2.shape[0]
    first, last = rows.start // b, -(-rows.stop // b)
    return _kron(w1[first:last], w2)[rows.start - first * b : rows.stop - first * b]


def _strided_(rows: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, factor: float, p0: int, p1: int) -> None:
    """rows (= W[p0·b : p1·b], contiguous) += factor · kron(w1[p0:p1], w2), as
    W[p·b+q, r·d+s, k] += factor · w1[p,r] · w2[q,s,k] broadcast over a strided view: one kernel,
    no temporary."""
    (_, c), (b, d) = w1.shape, w2.shape[:2]
    view = rows.view(p1 - p0, b, c, d, -1)
    view.addcmul_(w1[p0:p1].view(p1 - p0, 1, c, 1, 1), w2.reshape(1, b, 1, d, -1), value=factor)


def apply_(weight: torch.Tensor, t: Tensors, factor: float, rows: Rows) -> None:
    w1, w2 = factors(t)
    b = w2.shape[0]
    full = {"lokr_w1": w1, "lokr_w2": w2}

    def by_rows(target: torch.Tensor, part: Rows) -> None:
        apply_by_rows(target, factor, part, lambda block: delta_rows(full, block))

    first, last = -(-rows.start // b), rows.stop // b  # the whole groups of b rows (one row of w1 each)
    if not weight.is_contiguous() or first >= last:
        by_rows(weight, rows)
        return
    if rows.start < first * b:  # a partial group at the top
        by_rows(weight[: first * b - rows.start], Rows(rows.start, first * b))
    if last * b < rows.stop:  # and at the bottom
        by_rows(weight[last * b - rows.start :], Rows(last * b, rows.stop))
    middle = weight[first * b - rows.start : last * b - rows.start]
    if middle.dtype in (torch.float32, torch.float64):
        _strided_(middle, w1, w2, factor, first, last)
        return
    # Half precision: an in-place op with fp32 operands makes torch allocate full-size fp32 copies
    # (and runs slowly), so stage a few groups at a time in fp32: one cast each way.
    step = max(1, STAGE_ELEMENTS // (b * middle[0].numel()))
    for p0 in range(first, last, step):
        p1 = min(last, p0 + step)
        block = middle[(p0 - first) * b : (p1 - first) * b]
        work = block.float()
        _strided_(work, w1, w2, factor, p0, p1)
        block.copy_(work)


def bypass_delta(x: torch.Tensor, t: Tensors, factor: float = 1.0) -> torch.Tensor:
    w1, w2 = factors(t)
    if factor != 1.0:
        w1 = w1 * factor
    if w2.dim() != 2:
        raise ShapeError("bypass of a convolution LoKr is not supported; use patch mode")
    (a, c), (b, d) = w1.shape, w2.shape
    lead = x.shape[:-1]
    xs = x.reshape(-1, c, d)
    # ΔW·vec(X) = vec(w1 · X · w2ᵀ); pick the cheaper association.
    if a * d * (c + b) <= c * b * (d + a):
        y = (w1 @ xs) @ w2.T
    else:
        y = w1 @ (xs @ w2.T)
    return y.reshape(*lead, a * b)


def _factor_form(t: Tensors, i: int) -> Dense | Product:
    """Factor i as a matrix (conv kernels in the columns): low-rank where it is stored so."""
    full = t.get(f"lokr_w{i}")
    if full is not None:
        return Dense(full.reshape(full.shape[0], -1))
    if i == 2 and "lokr_t2" in t:
        w2 = factors(t)[1]
        return Dense(w2.reshape(w2.shape[0], -1))
    a, b = t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"]
    return Product(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def factored_delta(t: Tensors) -> Kronecker:
    """kron(w1, w2) with ΔW flattened to (a·b, c·d·k): w1's entries scale whole kernels of w2, so the
    flattened ΔW is kron(w1, w2 flattened to (b, d·k))."""
    return Kronecker(_factor_form(t, 1), _factor_form(t, 2))


def _row_tensors(shapes: Shapes) -> dict[str, int]:
    """w1's rows, each a block of b = w2.shape[0] rows of ΔW."""
    w2_rows = shapes["lokr_w2"][0] if "lokr_w2" in shapes else shapes["lokr_w2_a"][0]
    if "lokr_t2" in shapes:
        w2_rows = shapes["lokr_w2_a"][1]
    return {("lokr_w1" if "lokr_w1" in shapes else "lokr_w1_a"): w2_rows}


ALGORITHM = Algorithm(
    name="lokr",
    suffixes=SUFFIXES,
    weight_shape=weight_shape,
    rank=rank,
    delta_weight=delta_weight,
    delta_rows=delta_rows,
    apply_=apply_,
    bypass_delta=bypass_delta,
    layout=RowLayout(row_tensors=_row_tensors, cannot_stack="LoKr (a Kronecker product) cannot be stacked exactly"),
    variants=("full", "low_rank"),
    variant=variant,
    factored_delta=factored_delta,
)


# ComfyUI's loader (comfy/weight_adapter/lokr.py, 0.28) gives w1 unit dims only for a 4-D (Conv2d)
# w2; for Conv1d/Conv3d factors it takes torch.kron of the 2-D w1 as torch broadcasts it and reshapes
# the result to the weight. Files from ComfyUI's own trainer are read the way ComfyUI loads them.


def _comfy_kron(t: Tensors) -> torch.Tensor:
    w1, w2 = factors(t)
    if w2.dim() in (2, 4):
        return _kron(w1, w2)
    return torch.kron(w1, w2).reshape(weight_shape({"lokr_w1": w1.shape, "lokr_w2": w2.shape}))


def _comfy_delta_rows(t: Tensors, rows: Rows) -> torch.Tensor:
    return rows.of(_comfy_kron(t))


def _comfy_apply_(weight: torch.Tensor, t: Tensors, factor: float, rows: Rows) -> None:
    if factors(t)[1].dim() in (2, 4):
        apply_(weight, t, factor, rows)
    else:
        apply_by_rows(weight, factor, rows, lambda block: _comfy_delta_rows(t, block))


def _comfy_factored_delta(t: Tensors) -> Kronecker | Dense:
    if factors(t)[1].dim() in (2, 4):
        return factored_delta(t)
    delta = _comfy_kron(t)  # no Kronecker structure left once reshaped: decomposed as it is
    return Dense(delta.reshape(delta.shape[0], -1))


def _comfy_row_tensors(shapes: Shapes) -> dict[str, int]:
    if len(weight_shape(shapes)) not in (2, 4):
        raise ShapeError("in ComfyUI's arrangement a Conv1d/Conv3d LoKr's rows are not blocks of w1's rows")
    return _row_tensors(shapes)


COMFYUI_ALGORITHM = dataclasses.replace(
    ALGORITHM,
    delta_weight=_comfy_kron,
    delta_rows=_comfy_delta_rows,
    apply_=_comfy_apply_,
    layout=RowLayout(row_tensors=_comfy_row_tensors, cannot_stack=ALGORITHM.layout.cannot_stack),
    factored_delta=_comfy_factored_delta,
)
