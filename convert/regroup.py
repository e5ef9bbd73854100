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

Which tensors hold which rows is each algorithm's own fact (`Algorithm.layout`); nothing here names
an algorithm.

Nothing is read here at planning time except the row factors of a module about to be split (to see
the block structure); every output tensor is described by a `TensorSpec` whose `make()` builds it
when the writer gets to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..lycoris_core.algorithms import ShapeError
from ..lycoris_core.module import ALPHA, BIAS, DORA, ModuleAdapter
from ..lycoris_core.rows import Rows


class Inexact(Exception):
    """A regrouping that cannot be done exactly; the message says why (the caller adds the modules)."""


@dataclass
class TensorSpec:
    dtype: torch.dtype
    shape: tuple
    make: Callable[[], torch.Tensor]
    order: int  # position in the input file of the first tensor it reads (output follows input order)
    value: float | None = None  # an alpha's number, known without reading it again


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
        value = module.alpha if name == ALPHA else None
        return TensorSpec(entry.dtype, tuple(entry.shape), lambda: self.load(entry.name), self.position[entry.name], value)

    def module(self, module: ModuleAdapter) -> ModuleSpec:
        return ModuleSpec(module.algorithm, self.specs(module))

    def specs(self, module: ModuleAdapter) -> dict[str, TensorSpec]:
        """Every tensor of the module, but an alpha its scale ignores that is no number (ai-toolkit's
        full-rank LoKr store 9999999999, inf in fp16): without it the scale is the same, and no
        reader meets an infinite alpha."""
        unused = module.alpha is not None and not math.isfinite(module.alpha)
        return {name: self.spec(module, name) for name in module.params if not (unused and name == ALPHA)}


def _row_tensors(module: ModuleAdapter) -> dict[str, int]:
    """Every tensor of `module` whose dim 0 runs along ΔW's rows, with the ΔW rows per tensor row;
    raises Inexact when the module's rows cannot be regrouped."""
    layout = module.math.layout
    shapes = {name: entry.shape for name, entry in module.params.items()}
    try:
        rows = layout.row_tensors(shapes)
    except ShapeError as e:
        raise Inexact(f"module {module.stem}: {e}") from None
    for a, b in layout.rank_pairs:
        if len(shapes[a]) != 2 or len(shapes[b]) != 2:
            raise Inexact(f"module {module.stem} is not a Linear adapter (its factors are not 2-D)")
    if BIAS in shapes:
        rows[BIAS] = 1
    if DORA in shapes:
        if not (shapes[DORA][0] == module.shape[0] and math.prod(shapes[DORA]) == module.shape[0]):
            raise Inexact(f"module {module.stem}: DoRA with a per-input-column magnitude spans every row")
        rows[DORA] = 1
    return rows


def alpha_spec(value: float, dtype: torch.dtype, order: int) -> TensorSpec:
    """A new alpha in the old alpha's dtype when that holds it exactly (an int64 or bf16 alpha may not)."""
    for candidate in (dtype, torch.float32, torch.float64):
        if candidate.is_floating_point and torch.tensor(value, dtype=candidate).item() == value:
            dtype = candidate
            break
    else:
        dtype = torch.float64
    return TensorSpec(dtype, (), lambda: torch.tensor(value, dtype=dtype), order, value)


def _common_dtype(specs: list[TensorSpec]) -> torch.dtype:
    dtype = specs[0].dtype
    for spec in specs[1:]:
        dtype = torch.promote_types(dtype, spec.dtype)
    return dtype


# ---------------------------------------------------------------------------------------------
# Fuse


def _check_fusable(parts: list[ModuleAdapter | None]) -> list[ModuleAdapter]:
    """The parts present, after checking that one stacked module can hold them exactly."""
    present = [p for p in parts if p is not None]
    algorithms = sorted({p.algorithm for p in present})
    if len(algorithms) > 1:
        raise Inexact(f"the parts mix {' and '.join(algorithms)}")
    refusal = present[0].math.layout.cannot_stack
    if refusal:
        raise Inexact(refusal)
    rows = [_row_tensors(p) for p in present]
    if len({frozenset(r) for r in rows}) > 1:
        raise Inexact("the parts carry different tensors: " + ", ".join(f"{p.stem}: {', '.join(sorted(p.params))}" for p in present))
    if len({p.shape[1:] for p in present}) > 1:
        raise Inexact("the parts have different input sizes: " + ", ".join(f"{p.stem} {list(p.shape)}" for p in present))
    if len({p.scale for p in present}) > 1:
        raise Inexact(
            "their scales differ (" + ", ".join(f"{p.stem}: {p.scale:g}" for p in present)
            + ") and a fused module has one scale"
        )
    if any(p.has_dora for p in present) and not all(p is not None and p.has_dora for p in parts):
        raise Inexact("only some parts carry DoRA magnitudes (a missing one cannot be made up)")
    return present


def fuse(parts: list[ModuleAdapter | None], sizes: list[int], source: Source) -> ModuleSpec:
    """One module whose ΔW rows are the parts' ΔW rows in order (a missing part adds zero rows)."""
    present = _check_fusable(parts)
    first = present[0]
    layout = first.math.layout
    row_tensors = _row_tensors(first)
    order = min(source.spec(p, n).order for p in present for n in p.params)
    params: dict[str, TensorSpec] = {}

    def stacked(name: str, build, shape: tuple) -> None:
        specs = [source.spec(p, name) if p is not None else None for p in parts]
        dtype = _common_dtype([s for s in specs if s is not None])
        params[name] = TensorSpec(dtype, shape, lambda: build([s.make().to(dtype) if s else None for s in specs], dtype), order)

    rank = None
    for a, b in layout.rank_pairs:
        ranks = [p.params[b].shape[0] if p is not None else 0 for p in parts]
        rank = rank if rank is not None else sum(ranks)

        def block_diag(tensors, dtype, sizes=sizes):
            return torch.block_diag(*[t if t is not None else torch.zeros(size, 0, dtype=dtype) for t, size in zip(tensors, sizes)])

        def cat(tensors, dtype):
            return torch.cat([t for t in tensors if t is not None], dim=0)

        stacked(a, block_diag, (sum(sizes), sum(ranks)))
        stacked(b, cat, (sum(ranks), *first.params[b].shape[1:]))
    paired = {a for a, _ in layout.rank_pairs}
    for name in row_tensors:
        if name in paired:
            continue
        tail = tuple(first.params[name].shape[1:])

        def rows(tensors, dtype, tail=tail):
            return torch.cat([t if t is not None else torch.zeros(size, *tail, dtype=dtype) for t, size in zip(tensors, sizes)])

        stacked(name, rows, (sum(sizes), *tail))

    scale = first.scale
    alphas = [p for p in present if p.alpha is not None]
    if rank is None:  # no rank to put a scale on (full differences)
        if scale != 1.0:
            raise Inexact(f"full-weight differences with scale {scale:g} cannot be fused")
    elif alphas:
        # scale × fused rank, from one part's own numbers: for equal ranks this is (parts × alpha).
        # (Parts whose scale comes from elsewhere, a PEFT config, get theirs from the converter.)
        one = alphas[0]
        params[ALPHA] = alpha_spec(one.alpha * (rank / one.rank), one.params[ALPHA].dtype, order)
    return ModuleSpec(first.algorithm, params)


# ---------------------------------------------------------------------------------------------
# Split


def split(module: ModuleAdapter, rows: list[Rows], source: Source) -> list[ModuleSpec]:
    """One module per row range of `module`'s ΔW, together exactly `module`."""
    row_tensors = _row_tensors(module)
    for name, unit in row_tensors.items():
        if any(r.start % unit or r.stop % unit for r in rows):
            raise Inexact(
                f"its {name} comes in blocks of {unit} rows of ΔW, which do not line up with the "
                f"parts' rows {[str(r) for r in rows]}"
            )
    layout = module.math.layout
    blocks = _rank_blocks(module, layout.rank_pairs, rows, source)
    out = []
    for i, part in enumerate(rows):
        params = source.specs(module)
        for name, unit in row_tensors.items():
            params[name] = _cut(params[name], Rows(part.start // unit, part.stop // unit))
        if blocks:
            for a, b in layout.rank_pairs:
                cols = blocks[a][i]
                params[a] = _cut(source.spec(module, a), part, cols)
                params[b] = _cut(source.spec(module, b), cols)
        if ALPHA in module.params and blocks:
            # the part keeps its share of the rank: alpha shrinks with it so alpha/rank stays
            alpha = source.spec(module, ALPHA)
            share = blocks[layout.rank_pairs[0][0]][i].size / module.rank
            params[ALPHA] = alpha_spec(module.alpha * share, alpha.dtype, alpha.order)
        out.append(ModuleSpec(module.algorithm, params))
    return out


def _cut(spec: TensorSpec, rows: Rows, cols: Rows | None = None) -> TensorSpec:
    """Some rows (and columns, if given) of a tensor."""
    shape = (rows.size, *spec.shape[1:]) if cols is None else (rows.size, cols.size, *spec.shape[2:])

    def make():
        t = rows.of(spec.make())
        return t if cols is None else t[:, cols.start : cols.stop]

    return TensorSpec(spec.dtype, shape, make, spec.order)


def _rank_blocks(module, rank_pairs, rows: list[Rows], source) -> dict[str, list[Rows]] | None:
    """Per row factor, the rank columns of each part, if every row factor is block-diagonal in equal
    blocks (part i's rows zero outside block i); else None (every part keeps all)."""
    n = len(rows)
    blocks = {}
    for a, _ in rank_pairs:
        rank = module.params[a].shape[1]
        if rank == 0 or rank % n:
            return None
        width = rank // n
        factor = source.load(module.params[a].name)
        for i, part in enumerate(rows):
            block = part.of(factor)
            outside = torch.cat([block[:, : i * width], block[:, (i + 1) * width :]], dim=1)
            if outside.numel() and bool(outside.ne(0).any()):
                return None
        blocks[a] = [Rows(i * width, (i + 1) * width) for i in range(n)]
    return blocks or None


# ---------------------------------------------------------------------------------------------
# Reorder


def reorder(module: ModuleAdapter, order: list[Rows], source: Source) -> ModuleSpec:
    """The module with its ΔW rows in another order: output rows are `order`'s rows of `module`, one
    after the other (e.g. the two halves swapped). Exact for every algorithm whose row tensors can be
    cut there; the rank and alpha stay as they are."""
    row_tensors = _row_tensors(module)
    params = source.specs(module)
    for name, unit in row_tensors.items():
        if any(r.start % unit or r.stop % unit for r in order):
            raise Inexact(f"its {name} comes in blocks of {unit} rows of ΔW, which do not line up with {[str(r) for r in order]}")
        spec = params[name]
        pieces = [_cut(spec, Rows(r.start // unit, r.stop // unit)) for r in order]
        params[name] = TensorSpec(spec.dtype, spec.shape, lambda pieces=pieces: torch.cat([p.make() for p in pieces]), spec.order)
    return ModuleSpec(module.algorithm, params)
