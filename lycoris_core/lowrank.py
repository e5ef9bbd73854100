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

All math is float64 (a Dense matrix may be stored in float32: it is read in float64 blocks). The best
rank-r approximation (Eckart–Young) keeps the r largest singular values; its relative Frobenius error
is √(Σ_{i>r} σ_i²) / √(Σ σ_i²).

A large Dense matrix (a weight difference of a full-size model) is decomposed by a randomized
truncated SVD instead (`Sketch`, Halko, Martinsson & Tropp, "Finding structure with randomness",
2011: a Gaussian sketch of a few more columns than the rank, sharpened by subspace iterations, then
the exact SVD of the matrix projected on it), read a block of rows at a time: for a 13824×5120 weight
at rank 32 it takes a second where the full SVD takes a minute, and no more memory than the matrix.
Its factors are the projection of ΔW on the sketch's span, so their error is measured, not estimated
(‖ΔW‖² splits exactly into what the span misses, measured directly, and the dropped singular values);
it is at least the optimal error, and equal to it where ΔW's rank is within the sketch. `choose_rank`
decides which route a form takes and says which (`Choice.width`), so that the factors computed later
come from the same decomposition as the error reported.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (U (m, q), σ (q,) descending, Vᴴ (q, n))
BLOCK_ELEMENTS = 1 << 20  # a Dense matrix is read this many elements at a time (8 MB of float64)
OVERSAMPLING = 10  # sketch columns beyond the rank asked for
POWER_ITERATIONS = 4  # subspace iterations: they sharpen the sketch where the singular values decay slowly
FIRST_WIDTH = 32  # for an error bound: the first sketch's width, doubled until the bound is met
SKETCH_FRACTION = 0.2  # a sketch wider than this fraction of min(m, n) costs about the full SVD: that is taken
SKETCH_SEED = 0  # a fixed seed: the same matrix gives the same factors every time


class Dense:
    """ΔW as a matrix (float64, or float32 for a large one: read in float64 blocks of rows)."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix
        self._sketches: dict[int, Sketch] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    def scaled(self, factor: float) -> Dense:
        return Dense(self.matrix * factor)

    def blocks(self, dtype: torch.dtype = torch.float64) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(first row, end row, a copy of the rows in `dtype`), a block of about BLOCK_ELEMENTS at a time.
        The copy is one buffer, reused for every block (it is the caller's until the next one): a new
        block each time would leave the allocator holding freed ones, hundreds of MB on a large matrix."""
        step = max(1, BLOCK_ELEMENTS // max(1, self.shape[1]))
        buffer = torch.empty(min(step, self.shape[0]), self.shape[1], dtype=dtype)
        for start in range(0, self.shape[0], step):
            stop = min(self.shape[0], start + step)
            yield start, stop, buffer[: stop - start].copy_(self.matrix[start:stop])

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @functools.cached_property
    def svd(self) -> SVD:
        return torch.linalg.svd(self.matrix.double(), full_matrices=False)

    def singular_values(self) -> torch.Tensor:
        if "svd" in self.__dict__:
            return self.svd[1]
        return torch.linalg.svdvals(self.matrix.double())

    def sketch(self, width: int) -> Sketch:
        if width not in self._sketches:
            self._sketches = {width: sketched_svd(self, width)}  # the last one only: they are as big as the rows
        return self._sketches[width]

    def truncated(self, rank: int, width: int | None = None) -> SVD:
        u, s, vh = self.svd if width is None else self.sketch(width).svd
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


def lora_factors(form: Factored, rank: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (m, rank), down (rank, n)) with up·down the best rank-`rank` approximation of ΔW (of the
    sketch of `width` where `choose_rank` chose one), each singular value split as √σ into both
    (balanced factors: neither overflows a half-precision type before the other)."""
    u, s, vh = form.truncated(rank, width) if width is not None else form.truncated(rank)
    root = s.sqrt()
    return u * root, root[:, None] * vh


def error_at(singular_values: torch.Tensor, rank: int) -> float:
    """The relative Frobenius error of the best rank-`rank` approximation."""
    return float(relative_errors(singular_values)[rank])


# ---------------------------------------------------------------------------------------------
# Large matrices: a randomized truncated SVD, a block of rows at a time


@dataclass
class Sketch:
    """A truncated SVD from a sketch of `width` columns: U (m, width) orthonormal, σ, Vᴴ (width, n)."""

    svd: SVD
    rest: float  # ‖ΔW − U·Uᵀ·ΔW‖²_F: what the sketch's span misses, measured
    total: float  # ‖ΔW‖²_F

    def errors(self) -> torch.Tensor:
        """The relative Frobenius error of the rank-r factors U_r·σ_r·Vᴴ_r, r = 0 … width: the span's miss
        plus the singular values dropped, summed from the smallest up."""
        squares = self.svd[1].square()
        tails = torch.cat([squares.flip(0).cumsum(0).flip(0), squares.new_zeros(1)]) + self.rest
        if not self.total > 0:
            return torch.zeros_like(tails)
        return (tails / self.total).clamp(max=1.0).sqrt()


def sketched_svd(matrix: Dense, width: int) -> Sketch:
    """Halko–Martinsson–Tropp: Q spans ΔW·Ω (Ω Gaussian, n × width), refined by POWER_ITERATIONS rounds
    of Q ← orth(ΔW·orth(ΔWᵀ·Q)); then ΔW ≈ Q·(QᵀΔW) and the SVD of the small QᵀΔW gives ΔW's.
    `matrix` is read through `blocks()` only: 2·POWER_ITERATIONS + 3 passes over its rows. The passes
    that only find the span run in the dtype ΔW is stored in (float32 for a large one: twice as fast, and
    the span comes out as good); QᵀΔW and what the span misses are float64, so the error is exact for the
    factors made of them."""
    m, n = matrix.shape
    work = matrix.stored_dtype if matrix.stored_dtype in (torch.float32, torch.float64) else torch.float64
    generator = torch.Generator().manual_seed(SKETCH_SEED)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float64).to(work)
    q = _orthonormal(_times(matrix, omega, work))
    for _ in range(POWER_ITERATIONS):
        q = _orthonormal(_times(matrix, _orthonormal(_transposed_times(matrix, q, work)), work))
    q = _orthonormal(q.double())
    projected = _transposed_times(matrix, q, torch.float64).T  # (width, n) = Qᵀ·ΔW
    rest = total = 0.0
    for start, stop, block in matrix.blocks():
        flat = block.reshape(-1)
        total += float(torch.dot(flat, flat))
        block.addmm_(q[start:stop], projected, alpha=-1)  # the block's rows of ΔW − Q·QᵀΔW
        rest += float(torch.dot(flat, flat))
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    return Sketch((q @ u, s, vh), rest, total)


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


def _times(matrix: Dense, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ΔW·x, in `dtype`."""
    x = x.to(dtype)
    out = x.new_empty(matrix.shape[0], x.shape[1])
    for start, stop, block in matrix.blocks(dtype):
        torch.matmul(block, x, out=out[start:stop])
    return out


def _transposed_times(matrix: Dense, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ΔWᵀ·y, in `dtype`."""
    y = y.to(dtype)
    out = y.new_zeros(matrix.shape[1], y.shape[1])
    for start, stop, block in matrix.blocks(dtype):
        out.addmm_(block.T, y[start:stop])
    return out


@dataclass(frozen=True)
class Choice:
    """A module's rank, the relative error of its factors there, and the sketch width they come from
    (None: the exact spectrum)."""

    rank: int
    error: float
    width: int | None = None


def _sketchable(form: Factored, width: int) -> bool:
    return isinstance(form, Dense) and width <= SKETCH_FRACTION * form.max_rank


def choose_rank(form: Factored, rank: int | None = None, max_error: float | None = None) -> Choice:
    """The rank of `form` (exactly one of `rank`, capped at the form's own, and `max_error`, the smallest
    rank whose relative error is within it) and the error there. A large Dense matrix is sketched
    (module docstring): at `rank` + OVERSAMPLING columns, or for an error bound at FIRST_WIDTH columns,
    doubled until some rank within the sketch meets the bound; the exact spectrum once the width would
    no longer be small."""
    if rank is not None:
        width = rank + OVERSAMPLING
        if _sketchable(form, width):
            return Choice(rank, float(form.sketch(width).errors()[rank]), width)
        values = form.singular_values()
        rank = min(rank, len(values))
        return Choice(rank, error_at(values, rank))
    width = FIRST_WIDTH
    while _sketchable(form, width):
        errors = form.sketch(width).errors()
        meets = (errors[1:] <= max_error).nonzero()
        if len(meets):
            found = int(meets[0]) + 1
            return Choice(found, float(errors[found]), width)
        width *= 2
    values = form.singular_values()
    found = rank_for_error(values, max_error)
    return Choice(found, error_at(values, found))


def frobenius_squared(form: Factored) -> float:
    """‖ΔW‖²_F of a form (a Dense one read a block at a time)."""
    if isinstance(form, Dense):
        return math.fsum(float(torch.dot(block.reshape(-1), block.reshape(-1))) for _, _, block in form.blocks())
    if isinstance(form, Kronecker):
        return frobenius_squared(form.first) * frobenius_squared(form.second)
    return float(form.singular_values().square().sum())
