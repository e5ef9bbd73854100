"""Exact regrouping of adapter modules across the row parts of a fused weight.

ComfyUI fuses some projections that Musubi (or Diffusers) keeps separate, e.g. Z-Image's
`attention.qkv` = rows of `to_q`, `to_k`, `to_v`. Converting between those layouts means stacking
several modules into one (fuse) or cutting one into several (split), and both must leave every row of
s·ΔW exactly as it was:

- LoRA / LoHa (ΔW rows built from `a @ b` products): fusing stacks the row factors `a` block-
  diagonally and the rank factors `b` one under the other, so part i's rows only see its own rank
  components; the fused rank is the sum of the ranks, and alpha becomes scale × fused rank, which is
  only possible when the parts share one scale. Splitting cuts the rows of `a` and copies `b`; when `a`
  is block-diagonal in equal rank blocks (a fused file, e.g. from Musubi's own ComfyUI converters) the
  blocks are taken back out, so fuse then split gives back the original tensors.
- diff: rows are stacked or cut as they are.
- LoKr: kron(w1, w2) cannot be stacked exactly, so LoKr is never fused; it is split only when every
  part starts and ends on a row block of w2 (then each part is kron(rows of w1, w2)).

Nothing is read here at planning time except the row factors of a module about to be split (to see
the block structure); every output tensor is described by a `TensorSpec` whose `make()` builds it
when the writer gets to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..lycoris_core.adapter_file import ModuleAdapter


class Inexact(Exception):
    """A regrouping that cannot be done exactly; the message says why (the caller adds the modules)."""


@dataclass
class TensorSpec:
    dtype: torch.dtype
    shape: tuple
    make: Callable[[], torch.Tensor]
    order: int  # position in the input file of the first tensor it reads (output follows input order)


@dataclass
class ModuleSpec:
    algorithm: str
    params: dict[str, TensorSpec]  # canonical parameter name (alpha included) -> tensor

    @property
    def order(self) -> int:
        return min(spec.order for spec in self.params.values())


class Source:
    """The input file's tensors as specs: lazy loading through one loader, in file order."""

    def __init__(self, load: Callable[[str], torch.Tensor], keys: list[str]):
        self.load = load
        self.position = {key: i for i, key in enumerate(keys)}

    def spec(self, module: ModuleAdapter, name: str) -> TensorSpec:
        entry = module.params[name]
        return TensorSpec(entry.dtype, tuple(entry.shape), lambda: self.load(entry.name), self.position[entry.name])

    def module(self, module: ModuleAdapter) -> ModuleSpec:
        return ModuleSpec(module.algorithm_name, {name: self.spec(module, name) for name in module.params})


@dataclass(frozen=True)
class Stacking:
    """How an algorithm's tensors line up with ΔW's rows."""

    pairs: tuple[tuple[str, str], ...] = ()  # (row factor (out, r), rank factor (r, in)); pairs[0] sets the rank
    rows: tuple[str, ...] = ()  # tensors whose dim 0 is ΔW's rows (diff and its bias)


STACKINGS = {
    "lora": Stacking(pairs=(("up", "down"),)),
    "loha": Stacking(pairs=(("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b"))),
    "diff": Stacking(rows=("diff", "diff_b")),
}
COMMON = ("alpha", "dora_scale")


def _check_stackable(module: ModuleAdapter) -> Stacking:
    stacking = STACKINGS.get(module.algorithm_name)
    if stacking is None:
        raise Inexact("LoKr (a Kronecker product) cannot be stacked exactly")
    known = {name for pair in stacking.pairs for name in pair} | set(stacking.rows) | set(COMMON)
    extra = sorted(set(module.params) - known)
    if extra:
        raise Inexact(f"module {module.stem} has {', '.join(extra)} (Tucker cores cannot be regrouped)")
    for a, b in stacking.pairs:
        if len(module.params[a].shape) != 2 or len(module.params[b].shape) != 2:
            raise Inexact(f"module {module.stem} is not a Linear adapter (its factors are not 2-D)")
    return stacking


def _check_dora(module: ModuleAdapter) -> None:
    if module.has_dora:
        shape = tuple(module.params["dora_scale"].shape)
        if not (shape[0] == module.shape[0] and math.prod(shape) == module.shape[0]):
            raise Inexact(f"module {module.stem}: DoRA with a per-input-column magnitude spans every row")


def _alpha_spec(value: float, dtype: torch.dtype, order: int) -> TensorSpec:
    """A new alpha in the old alpha's dtype when that holds it exactly (an int64 or bf16 alpha may not)."""
    for candidate in (dtype, torch.float32, torch.float64):
        if candidate.is_floating_point and torch.tensor(value, dtype=candidate).item() == value:
            dtype = candidate
            break
    else:
        dtype = torch.float64
    return TensorSpec(dtype, (), lambda: torch.tensor(value, dtype=dtype), order)


def _common_dtype(specs: list[TensorSpec]) -> torch.dtype:
    dtype = specs[0].dtype
    for spec in specs[1:]:
        dtype = torch.promote_types(dtype, spec.dtype)
    return dtype


# ---------------------------------------------------------------------------------------------
# Fuse


def fuse(parts: list[ModuleAdapter | None], sizes: list[int], source: Source) -> ModuleSpec:
    """One module whose ΔW rows are the parts' ΔW rows in order (a missing part adds zero rows)."""
    present = [p for p in parts if p is not None]
    algorithms = sorted({p.algorithm_name for p in present})
    if len(algorithms) > 1:
        raise Inexact(f"the parts mix {' and '.join(algorithms)}")
    stacking = _check_stackable(present[0])
    for p in present[1:]:
        _check_stackable(p)
    if len({p.shape[1:] for p in present}) > 1:
        raise Inexact("the parts have different input sizes: " + ", ".join(f"{p.stem} {list(p.shape)}" for p in present))
    scales = {p.scale for p in present}
    if len(scales) > 1:
        raise Inexact(
            "their scales differ (" + ", ".join(f"{p.stem}: {p.scale:g}" for p in present)
            + ") and a fused module has one scale"
        )
    with_dora = [p for p in present if p.has_dora]
    if with_dora and len(with_dora) != len(parts):
        raise Inexact("only some parts carry DoRA magnitudes (a missing one cannot be made up)")
    for p in with_dora:
        _check_dora(p)

    in_shape = present[0].shape[1:]
    order = min(source.spec(p, n).order for p in present for n in p.params)
    params: dict[str, TensorSpec] = {}

    def stacked(name: str, build, shape: tuple) -> None:
        specs = [source.spec(p, name) if p is not None else None for p in parts]
        dtype = _common_dtype([s for s in specs if s is not None])
        params[name] = TensorSpec(dtype, shape, lambda: build([s.make().to(dtype) if s else None for s in specs], dtype), order)

    rank = None
    for a, b in stacking.pairs:
        ranks = [p.params[b].shape[0] if p is not None else 0 for p in parts]
        rank = rank if rank is not None else sum(ranks)

        def block_diag(tensors, dtype, sizes=sizes):
            return torch.block_diag(*[t if t is not None else torch.zeros(size, 0, dtype=dtype) for t, size in zip(tensors, sizes)])

        def cat(tensors, dtype):
            return torch.cat([t for t in tensors if t is not None], dim=0)

        stacked(a, block_diag, (sum(sizes), sum(ranks)))
        stacked(b, cat, (sum(ranks), *in_shape))
    for name in stacking.rows:
        if not any(p is not None and name in p.params for p in parts):
            continue
        if not all(p is None or name in p.params for p in parts):
            raise Inexact(f"only some parts carry {name}")
        tail = tuple(present[0].params[name].shape[1:])

        def rows(tensors, dtype, tail=tail):
            return torch.cat([t if t is not None else torch.zeros(size, *tail, dtype=dtype) for t, size in zip(tensors, sizes)])

        stacked(name, rows, (sum(sizes), *tail))
    if with_dora:
        tail = tuple(present[0].params["dora_scale"].shape[1:])
        stacked("dora_scale", lambda ts, dtype: torch.cat(ts), (sum(sizes), *tail))

    scale = scales.pop()
    alphas = [p for p in present if p.alpha is not None]
    if rank is None:  # diff: no rank to put a scale on
        if scale != 1.0:
            raise Inexact(f"full-weight differences with scale {scale:g} cannot be fused")
    elif alphas or scale != 1.0:
        # scale × fused rank, from one part's own numbers: for equal ranks this is (parts × alpha).
        first = alphas[0]
        value = first.alpha * (rank / first.rank)
        params["alpha"] = _alpha_spec(value, first.params["alpha"].dtype, order)
    return ModuleSpec(algorithms[0], params)


# ---------------------------------------------------------------------------------------------
# Split


def split(module: ModuleAdapter, rows: list[tuple[int, int]], source: Source) -> list[ModuleSpec]:
    """One module per row range (offset, size) of `module`'s ΔW, together exactly `module`."""
    if module.algorithm_name == "lokr":
        return _split_kron(module, rows, source)
    stacking = _check_stackable(module)
    _check_dora(module)
    blocks = _rank_blocks(module, stacking, rows, source)
    out = []
    for i, (offset, size) in enumerate(rows):
        params: dict[str, TensorSpec] = {}
        for a, b in stacking.pairs:
            cols = blocks[a][i] if blocks else None
            params[a] = _cut(source.spec(module, a), offset, size, cols)
            params[b] = source.spec(module, b) if cols is None else _cut(source.spec(module, b), *cols)
        for name in (*stacking.rows, "dora_scale"):
            if name in module.params:
                params[name] = _cut(source.spec(module, name), offset, size)
        if "alpha" in module.params:
            alpha = source.spec(module, "alpha")
            if blocks:
                # the part keeps its share of the rank: alpha shrinks with it so alpha/rank stays
                share = blocks[stacking.pairs[0][0]][i][1] / module.rank
                params["alpha"] = _alpha_spec(module.alpha * share, alpha.dtype, alpha.order)
            else:
                params["alpha"] = alpha
        out.append(ModuleSpec(module.algorithm_name, params))
    return out


def _cut(spec: TensorSpec, offset: int, size: int, cols: tuple[int, int] | None = None) -> TensorSpec:
    """Rows offset..offset+size (and columns, if given) of a tensor."""
    shape = (size, *spec.shape[1:]) if cols is None else (size, cols[1], *spec.shape[2:])

    def make():
        t = spec.make()[offset : offset + size]
        return t if cols is None else t[:, cols[0] : cols[0] + cols[1]]

    return TensorSpec(spec.dtype, shape, make, spec.order)


def _rank_blocks(module, stacking, rows, source) -> dict[str, list[tuple[int, int]]] | None:
    """Per row factor, the rank columns (start, count) of each part, if every row factor is block-
    diagonal in equal blocks (part i's rows zero outside block i); else None (every part keeps all)."""
    n = len(rows)
    blocks = {}
    for a, _ in stacking.pairs:
        rank = module.params[a].shape[1]
        if rank == 0 or rank % n:
            return None
        width = rank // n
        factor = source.load(module.params[a].name)
        for i, (offset, size) in enumerate(rows):
            part = factor[offset : offset + size]
            outside = torch.cat([part[:, : i * width], part[:, (i + 1) * width :]], dim=1)
            if outside.numel() and bool(outside.ne(0).any()):
                return None
        blocks[a] = [(i * width, width) for i in range(n)]
    return blocks


def _split_kron(module: ModuleAdapter, rows: list[tuple[int, int]], source: Source) -> list[ModuleSpec]:
    params = module.params
    w2_rows = (params["lokr_w2"] if "lokr_w2" in params else params["lokr_w2_a"]).shape[0]
    if any(offset % w2_rows or size % w2_rows for offset, size in rows):
        raise Inexact(
            f"its Kronecker product comes in blocks of {w2_rows} rows, which do not line up with the "
            f"parts' rows {[list(r) for r in rows]}"
        )
    _check_dora(module)
    w1 = "lokr_w1" if "lokr_w1" in params else "lokr_w1_a"
    out = []
    for offset, size in rows:
        parts = {name: source.spec(module, name) for name in params}
        parts[w1] = _cut(parts[w1], offset // w2_rows, size // w2_rows)
        if "dora_scale" in parts:
            parts["dora_scale"] = _cut(parts["dora_scale"], offset, size)
        out.append(ModuleSpec("lokr", parts))
    return out
