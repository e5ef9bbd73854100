"""The nearest Kronecker product of a matrix (Van Loan–Pitsianis), and LoKr's w2 at a lower rank.

ΔW (a·b rows, c·d columns) ≈ w1 ⊗ w2 with w1 (a, c), w2 (b, d): entry [p·b + q, r·d + s] of the
Kronecker product is w1[p, r]·w2[q, s]. Rearranging ΔW into R with R[(p, r), (q, s)] = ΔW[p·b + q, r·d + s]
turns w1 ⊗ w2 into the rank-1 matrix vec(w1)·vec(w2)ᵀ, and keeps every entry (‖R‖_F = ‖ΔW‖_F). So the
best Kronecker product is the best rank-1 approximation of R: its top singular triplet (σ₁, u, v),
split as w1 = √σ₁·u and w2 = √σ₁·v (balanced), with error ‖ΔW − w1 ⊗ w2‖²_F = Σ_{i≥2} σ_i(R)²
(Eckart–Young).

With w1 fixed, the best w2 of rank r is w2's own truncated SVD: the residual R − vec(w1)·vec(x)ᵀ splits
into a part orthogonal to vec(w1), which x cannot change, and ‖w1‖·‖w2 − x‖. The two errors are
orthogonal, so ‖ΔW − w1 ⊗ w2_r‖²_F = Σ_{i≥2} σ_i(R)² + ‖w1‖²_F · Σ_{j>r} σ_j(w2)², with ‖w1‖²_F = σ₁.

Only R's top singular pair is needed. R is never copied whole for a large ΔW: its rows are made from
blocks of ΔW's rows (`Rearranged`), and the pair comes from the same randomized truncated SVD as a large
LoRA's (`lowrank.choose_rank`), whose residual is measured; a small R gets the full SVD. ΔW may be
stored in float32; the math is float64.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .lowrank import Dense, choose_rank, frobenius_squared, lora_factors

# Rows of R are made by a strided copy of ΔW's rows, which is slow in small pieces: blocks of R are bigger
# than a plain matrix's (32 MB in float64), twice as fast on a 13824×5120 layer for 24 MB more.
BLOCK_ELEMENTS = 1 << 22


@dataclass
class KroneckerFit:
    w1: torch.Tensor  # (a, c)
    w2: torch.Tensor  # (b, d)
    total: float  # ‖ΔW‖²_F
    kronecker_residual: float  # ‖ΔW − w1 ⊗ w2‖²_F
    w2_singular_values: torch.Tensor  # descending

    @property
    def w2_max_rank(self) -> int:
        return min(self.w2.shape)

    def error(self, w2_rank: int | None = None) -> float:
        """‖ΔW − w1 ⊗ w2_r‖_F / ‖ΔW‖_F with w2 truncated to `w2_rank` (None: w2 as it is)."""
        if not self.total > 0:
            return 0.0
        truncated = 0.0
        if w2_rank is not None:
            tail = self.w2_singular_values[w2_rank:].square().sum()
            truncated = float(self.w1.square().sum() * tail)
        return math.sqrt(max(0.0, self.kronecker_residual + truncated) / self.total)

    def w2_rank_for_error(self, max_error: float) -> int:
        """The smallest w2 rank (at least 1) within `max_error`, or w2's full rank when none is (the
        Kronecker product's own error may already exceed it)."""
        for rank in range(1, self.w2_max_rank + 1):
            if self.error(rank) <= max_error:
                return rank
        return self.w2_max_rank

    def w2_factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w2_a (b, rank), w2_b (rank, d)): the best rank-`rank` w2, each singular value split as √σ."""
        return lora_factors(Dense(self.w2), rank)


def rearranged(delta: torch.Tensor, rows: tuple[int, int], columns: tuple[int, int]) -> torch.Tensor:
    """R with R[(p, r), (q, s)] = ΔW[p·b + q, r·d + s], for rows = (a, b) and columns = (c, d)."""
    (a, b), (c, d) = rows, columns
    return delta.reshape(a, b, c, d).permute(0, 2, 1, 3).reshape(a * c, b * d)


class Rearranged(Dense):
    """R of ΔW as a Dense form: a block of R's rows (all r for some p) is made from ΔW's rows p·b … p·b + b−1;
    the whole R (`matrix`) is built only for the full SVD of a small one."""

    def __init__(self, delta: torch.Tensor, rows: tuple[int, int], columns: tuple[int, int]):
        self.delta, self.rows, self.columns = delta, rows, columns
        self._sketches = {}

    @property
    def shape(self) -> tuple[int, int]:
        (a, b), (c, d) = self.rows, self.columns
        return (a * c, b * d)

    @functools.cached_property
    def matrix(self) -> torch.Tensor:
        return rearranged(self.delta.double(), self.rows, self.columns)

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.delta.dtype

    def blocks(self, dtype: torch.dtype = torch.float64):
        """As Dense.blocks: rows of R in one reused buffer."""
        (a, b), (c, d) = self.rows, self.columns
        step = max(1, BLOCK_ELEMENTS // (b * c * d))  # groups p at a time
        buffer = torch.empty(min(step, a) * c, b * d, dtype=dtype)
        for p in range(0, a, step):
            end = min(a, p + step)
            part = self.delta[p * b : end * b].reshape(end - p, b, c, d).permute(0, 2, 1, 3)
            block = buffer[: (end - p) * c]
            block.view(end - p, c, b, d).copy_(part)
            yield p * c, end * c, block


def nearest_kronecker(delta: torch.Tensor, rows: tuple[int, int], columns: tuple[int, int]) -> KroneckerFit:
    """The w1 (a, c), w2 (b, d) whose Kronecker product is nearest to ΔW (a·b, c·d) in Frobenius norm
    (module docstring): R's top singular pair, with R's residual measured."""
    (a, b), (c, d) = rows, columns
    if tuple(delta.shape) != (a * b, c * d):
        raise ValueError(f"a matrix of shape {list(delta.shape)} is not ({a}·{b}) × ({c}·{d})")
    r = Rearranged(delta, rows, columns)
    total = frobenius_squared(r)
    choice = choose_rank(r, rank=1)
    u, s, vh = r.truncated(1, choice.width)
    sigma = float(s[0]) if len(s) else 0.0
    if not total > 0 or sigma == 0:
        zero1, zero2 = torch.zeros(a, c, dtype=torch.float64), torch.zeros(b, d, dtype=torch.float64)
        return KroneckerFit(zero1, zero2, total, total, torch.zeros(min(b, d), dtype=torch.float64))
    root = math.sqrt(sigma)
    w1, w2 = (u[:, 0] * root).reshape(a, c), (vh[0] * root).reshape(b, d)
    residual = choice.error**2 * total
    return KroneckerFit(w1=w1, w2=w2, total=total, kronecker_residual=residual, w2_singular_values=torch.linalg.svdvals(w2))
