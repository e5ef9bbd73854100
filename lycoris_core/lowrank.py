"""Truncated SVDs of a weight difference given in factored form, without building it where the form
is already low-rank.

A module's ΔW (flattened to 2-D: rows = output features, columns = everything else) comes as one of:
- `Dense(matrix)`: no structure to use; `torch.linalg.svd` of the matrix.
- `Product(left, right)`: ΔW = left·right with inner dimension k (LoRA's up·down, LoHa's
  Khatri-Rao factors). With k below both sides, QR of left and of rightᵀ leaves a k×k core whose SVD
  gives ΔW's: exact, O((m+n)·k²), ΔW never built. Otherwise ΔW is no bigger than the factors and is
  built.
- `Kronecker(first, second)`: ΔW = first ⊗ second (LoKr), each a Dense or a Product. The SVD of A⊗B
  is (U_A⊗U_B)(Σ_A⊗Σ_B)(V_A⊗V_B)ᵀ: the singular values are the products σ_i(A)·σ_j(B), and the
  singular vectors of the top products are Kronecker products of the factors' vectors.

All math is float64 (callers pass float64 tensors). The best rank-r approximation (Eckart–Young) keeps
the r largest singular values; its relative Frobenius error is √(Σ_{i>r} σ_i²) / √(Σ σ_i²).
"""

from __future__ import annotations

import functools

import torch

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (U (m, q), σ (q,) descending, Vᴴ (q, n))


class Dense:
    """ΔW as a matrix."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    def scaled(self, factor: float) -> Dense:
        return Dense(self.matrix * factor)

    @functools.cached_property
    def svd(self) -> SVD:
        return torch.linalg.svd(self.matrix, full_matrices=False)

    def singular_values(self) -> torch.Tensor:
        if "svd" in self.__dict__:
            return self.svd[1]
        return torch.linalg.svdvals(self.matrix)

    def truncated(self, rank: int) -> SVD:
        u, s, vh = self.svd
        return u[:, :rank], s[:rank], vh[:rank]


class Product:
    """ΔW = left (m, k) · right (k, n)."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor):
        if left.shape[1] != right.shape[0]:
            raise ValueError(f"factors {list(left.shape)} and {list(right.shape)} do not multiply")
        self.left, self.right = left, right

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def inner(self) -> int:
        return self.left.shape[1]

    @property
    def max_rank(self) -> int:
        return min(*self.shape, self.inner)

    @property
    def builds_delta(self) -> bool:
        """Whether ΔW is no bigger than the factors, so that QR would gain nothing."""
        return self.inner >= min(self.shape)

    def scaled(self, factor: float) -> Product:
        return Product(self.left * factor, self.right)

    @functools.cached_property
    def _dense(self) -> Dense:
        return Dense(self.left @ self.right)

    @functools.cached_property
    def _factored(self):
        """left = Q_l R_l, rightᵀ = Q_r R_r  =>  ΔW = Q_l (R_l R_rᵀ) Q_rᵀ: the k×k core's SVD is ΔW's.
        The Q's stay as Householder reflectors (geqrf), applied only to the singular vectors asked for."""
        left_qr, right_qr = torch.geqrf(self.left), torch.geqrf(self.right.T)
        k = self.inner
        core = left_qr[0][:k].triu() @ right_qr[0][:k].triu().T
        return left_qr, right_qr, torch.linalg.svd(core)

    @property
    def svd(self) -> SVD:
        return self.truncated(self.max_rank)

    def singular_values(self) -> torch.Tensor:
        if self.builds_delta:
            return self._dense.singular_values()
        if "_factored" in self.__dict__:
            return self._factored[2][1]
        # the values alone need only the triangular factors
        r_left = torch.linalg.qr(self.left, mode="r").R
        r_right = torch.linalg.qr(self.right.T, mode="r").R
        return torch.linalg.svdvals(r_left @ r_right.T)

    def truncated(self, rank: int) -> SVD:
        if self.builds_delta:
            return self._dense.truncated(rank)
        (left_q, left_tau), (right_q, right_tau), (u, s, vh) = self._factored
        return _times_q(left_q, left_tau, u[:, :rank]), s[:rank], _times_q(right_q, right_tau, vh[:rank].T).T


def _times_q(reflectors: torch.Tensor, tau: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Q[:, :k] · x for the Q of a geqrf, without forming Q: O(m·k·columns)."""
    padded = x.new_zeros(reflectors.shape[0], x.shape[1])
    padded[: x.shape[0]] = x
    return torch.ormqr(reflectors, tau, padded)


class Kronecker:
    """ΔW = first ⊗ second (rows of `first` are blocks of rows of ΔW)."""

    def __init__(self, first: Dense | Product, second: Dense | Product):
        self.first, self.second = first, second

    @property
    def shape(self) -> tuple[int, int]:
        (a, c), (b, d) = self.first.shape, self.second.shape
        return (a * b, c * d)

    @property
    def max_rank(self) -> int:
        return self.first.max_rank * self.second.max_rank

    def scaled(self, factor: float) -> Kronecker:
        return Kronecker(self.first.scaled(factor), self.second)

    def _products(self) -> torch.Tensor:
        """σ_i(first)·σ_j(second) for every pair, at index i·len(σ(second)) + j."""
        return torch.outer(self.first.singular_values(), self.second.singular_values()).reshape(-1)

    def singular_values(self) -> torch.Tensor:
        return self._products().sort(descending=True).values

    def truncated(self, rank: int) -> SVD:
        u_a, s_a, vh_a = self.first.svd
        u_b, s_b, vh_b = self.second.svd
        products = torch.outer(s_a, s_b).reshape(-1)
        top = products.argsort(descending=True, stable=True)[:rank]
        i, j = top // len(s_b), top % len(s_b)
        # column r is kron(u_a[:, i_r], u_b[:, j_r]); row r of Vᴴ is kron(vh_a[i_r], vh_b[j_r])
        u = (u_a[:, i][:, None, :] * u_b[:, j][None, :, :]).reshape(-1, len(top))
        vh = (vh_a[i][:, :, None] * vh_b[j][:, None, :]).reshape(len(top), -1)
        return u, products[top], vh


Factored = Dense | Product | Kronecker


def relative_errors(singular_values: torch.Tensor) -> torch.Tensor:
    """‖ΔW − ΔW_r‖_F / ‖ΔW‖_F of the best rank-r approximation, for r = 0 … len(σ) (0 for ΔW = 0).

    The tails are summed from the smallest value up, so a tiny error is not lost to cancellation."""
    squares = singular_values.double().square()
    tails = torch.cat([squares.flip(0).cumsum(0).flip(0), squares.new_zeros(1)])
    total = tails[0]
    if not total > 0:
        return torch.zeros_like(tails)
    return (tails / total).sqrt()


def rank_for_error(singular_values: torch.Tensor, max_error: float) -> int:
    """The smallest rank (at least 1) whose relative Frobenius error is at most `max_error`."""
    errors = relative_errors(singular_values)
    meets = (errors[1:] <= max_error).nonzero()
    return int(meets[0]) + 1 if len(meets) else len(singular_values)


def lora_factors(form: Factored, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (m, rank), down (rank, n)) with up·down the best rank-`rank` approximation of ΔW, each
    singular value split as √σ into both (balanced factors: neither overflows a half-precision type
    before the other)."""
    u, s, vh = form.truncated(rank)
    root = s.sqrt()
    return u * root, root[:, None] * vh


def error_at(singular_values: torch.Tensor, rank: int) -> float:
    """The relative Frobenius error of the best rank-`rank` approximation."""
    return float(relative_errors(singular_values)[rank])
