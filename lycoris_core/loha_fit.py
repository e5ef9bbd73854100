"""A LoHa fitted to a matrix: ΔW ≈ (A1·B1) ⊙ (A2·B2), both halves of rank r.

Start: the truncated SVD written as LoHa, (U√Σ)(√ΣVᵀ) ⊙ 1, which is exactly the best rank-r
approximation (Eckart–Young; for a large ΔW the randomized one of `lowrank.py`, with its measured
error). A LoHa of rank r can express more than that (its ΔW has rank up to r²), but its best fit has
no closed form, so it is approached by alternating least squares: with the other three factors fixed,
ΔW ≈ (A1·B1) ⊙ W2 is linear in A1, and each row of A1 is the solution of an r × r least-squares problem
(row p: min ‖ΔW[p] − a·(B1 ⊙ W2[p])‖, whose normal matrix is B1·diag(W2[p]²)·B1ᵀ); B1 is the same problem
on the transposes, and the second half likewise.

Unregularised, those steps drift towards halves far larger than ΔW that cancel in their product (on the
Musubi fixtures, |W1|⊙|W2| thousands of times ‖ΔW‖): exact in float64, ruined by a bfloat16 cast. So
each normal matrix gets a small ridge (RIDGE × its mean diagonal), which keeps the factors near ΔW's
size at about the same error. The error is then not strictly monotone, so the best iterate is kept,
judged by its error as stored (its factors rounded to the output dtype), and the SVD start is written
where no sweep beats it: the result is never worse than the SVD's.

For the sweeps to use every component of the second half, it starts as all ones split over r slightly
different components (a fixed seed: the result is reproducible). One sweep costs O(m·n·r²), about as
much as a few products of ΔW with an r²-column matrix; memory stays at a block of rows of ΔW's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .lowrank import Choice, Dense, frobenius_squared, lora_factors

BLOCK_ELEMENTS = 1 << 22  # elements of ΔW's size worked on at once
MIN_GAIN = 1e-3  # sweeps stop once one lowers the error by less than this fraction of it
RIDGE = 1e-3  # added to each row's normal matrix, times its mean diagonal
SEED = 0


@dataclass
class LohaFit:
    w1_a: torch.Tensor  # (m, r)
    w1_b: torch.Tensor  # (r, n)
    w2_a: torch.Tensor  # (m, r)
    w2_b: torch.Tensor  # (r, n)
    error: float  # ‖ΔW − (w1_a w1_b) ⊙ (w2_a w2_b)‖_F / ‖ΔW‖_F (before the cast to the output dtype)
    svd_error: float  # the same for the SVD start (the best rank-r approximation)
    sweeps: int  # sweeps of alternating least squares run (error == svd_error: none beat the SVD start, written)


def fit_loha(form: Dense, start: Choice, sweeps: int, dtype: torch.dtype = torch.float32) -> LohaFit:
    """The LoHa of rank `start.rank` fitted to ΔW (`form.matrix`, 2-D, float32 or float64) by up to
    `sweeps` sweeps of alternating least squares from the truncated SVD `start` (`lowrank.choose_rank`:
    its rank, error and sketch width), to be stored in `dtype` (module docstring)."""
    delta, rank = form.matrix, start.rank
    norm = math.sqrt(frobenius_squared(form))
    w1_a, w1_b = lora_factors(form, rank, start.width)
    svd_error = start.error
    ones_a, ones_b = torch.zeros_like(w1_a), torch.zeros_like(w1_b)
    ones_a[:, 0], ones_b[0] = 1, 1
    best = (w1_a, w1_b, ones_a, ones_b)
    if sweeps < 1 or svd_error == 0 or norm == 0:
        return LohaFit(*best, error=svd_error, svd_error=svd_error, sweeps=0)

    def stored_error(factors) -> float:
        return _error(delta, *(f.to(dtype).double() for f in factors)) / norm

    best_stored = stored_error(best)
    generator = torch.Generator().manual_seed(SEED)
    noise = torch.randn(rank, delta.shape[1], generator=generator, dtype=torch.float64)
    a1, b1, a2, b2 = w1_a, w1_b, torch.ones_like(w1_a), (1 + 1e-3 * noise) / rank
    error, done = _error(delta, a1, b1, a2, b2) / norm, 0
    while done < sweeps:
        done += 1
        a1 = _solve_rows(delta, b1, a2, b2)
        b1 = _solve_rows(delta.T, a1.T, b2.T, a2.T).T
        a2 = _solve_rows(delta, b2, a1, b1)
        b2 = _solve_rows(delta.T, a2.T, b1.T, a1.T).T
        previous, error = error, _error(delta, a1, b1, a2, b2) / norm
        candidate = _balanced(a1, b1, a2, b2)
        stored = stored_error(candidate)
        if stored < best_stored:
            best, best_stored = candidate, stored
        if not error < previous * (1 - MIN_GAIN):
            break
    return LohaFit(*best, error=_error(delta, *best) / norm, svd_error=svd_error, sweeps=done)


def _row_blocks(rows: int, columns: int):
    step = max(1, BLOCK_ELEMENTS // max(1, columns))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _solve_rows(delta: torch.Tensor, b: torch.Tensor, other_a: torch.Tensor, other_b: torch.Tensor) -> torch.Tensor:
    """argmin over A of ‖ΔW − (A·b) ⊙ (other_a·other_b)‖²_F plus the ridge, row by row (the rows of A are
    independent)."""
    rank, columns = b.shape
    pairs = (b[:, None, :] * b[None, :, :]).reshape(rank * rank, columns).T  # column s: b[:, s] ⊗ b[:, s]
    solved = []
    for start, stop in _row_blocks(delta.shape[0], columns):
        other = other_a[start:stop] @ other_b
        normal = ((other * other) @ pairs).reshape(-1, rank, rank)  # row p: b·diag(other[p]²)·bᵀ
        ridge = RIDGE * normal.diagonal(dim1=1, dim2=2).mean(dim=1)
        normal = normal + ridge[:, None, None] * torch.eye(rank, dtype=normal.dtype)
        right = (delta[start:stop] * other) @ b.T
        solution = torch.linalg.lstsq(normal, right.unsqueeze(-1)).solution
        solved.append(solution.squeeze(-1))
    return torch.cat(solved)


def _error(delta: torch.Tensor, a1, b1, a2, b2) -> float:
    """‖ΔW − (a1·b1) ⊙ (a2·b2)‖_F, a block of rows at a time."""
    total = 0.0
    for start, stop in _row_blocks(delta.shape[0], delta.shape[1]):
        fitted = (a1[start:stop] @ b1) * (a2[start:stop] @ b2)
        total += float((delta[start:stop] - fitted).square().sum())
    return math.sqrt(total)


def _balanced(a1, b1, a2, b2) -> tuple[torch.Tensor, ...]:
    """The same (a1·b1) ⊙ (a2·b2) with every rank component's two vectors of equal norm and both halves
    of equal size, so that no factor overflows a half-precision type before another."""
    factors = []
    for a, b in ((a1, b1), (a2, b2)):
        a_norms, b_norms = a.norm(dim=0), b.norm(dim=1)
        ratio = torch.where((a_norms > 0) & (b_norms > 0), (b_norms / a_norms).sqrt(), torch.ones_like(a_norms))
        factors.append((a * ratio, b / ratio[:, None]))
    (a1, b1), (a2, b2) = factors
    size1, size2 = float(a1.norm() * b1.norm()), float(a2.norm() * b2.norm())
    if size1 > 0 and size2 > 0:
        c = (size2 / size1) ** 0.25  # half 1 ×c², half 2 ÷c²: their product is unchanged
        a1, b1, a2, b2 = a1 * c, b1 * c, a2 / c, b2 / c
    return a1, b1, a2, b2
