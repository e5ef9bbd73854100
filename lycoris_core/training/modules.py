"""Trainable LoKr and LoHa layers: Musubi Tuner's shapes, initialisation, scale and dropout, with a
forward that never holds a full-size ΔW for the backward pass.

A layer computes only the *change* of a Linear's output, `s·ΔW·x`; `inject.py` adds it to the
frozen Linear's own output. The math of ΔW is the core's (`algorithms/lokr.py`, `algorithms/loha.py`),
so what is trained is exactly what the loader and the merge apply.

- LoKr: `ΔW·x = vec(w1 · X · w2ᵀ)` on the input reshaped to (in_m, in_n), the core's bypass: kron is
  never built, and autograd keeps only x and a (tokens, out_l, in_n) intermediate.
- LoHa: either the factored rank-r² form `(x·Vᵀ)·Uᵀ` (U, V the row/column-wise products of the
  factors) when that is cheaper, or `_HadaLinear`, which builds ΔW a block of rows at a time in the
  forward and again in the backward, saving only x and the four factors.

`mode="materialize"` is the reference a Musubi-style layer runs (build s·ΔW, then F.linear, which
keeps ΔW for the backward); the benchmarks compare the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..algorithms import ALGORITHMS
from ..algorithms import loha as loha_algorithm
from ..algorithms import lokr as lokr_algorithm

MODES = ("bypass", "materialize")


class TrainableAdapter(nn.Module):
    """s·ΔW·x for one Linear (or a row slice of one). Parameters are named as in the file."""

    algorithm = ""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        alpha: float,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        multiplier: float = 1.0,
        mode: str = "bypass",
        full_matrix: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.out_features, self.in_features, self.rank = out_features, in_features, rank
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.multiplier = multiplier
        self.mode = mode
        self.full_matrix = full_matrix
        alpha = float(alpha) if alpha else float(rank)  # Musubi: alpha 0/None means alpha = rank
        if full_matrix:
            alpha = float(rank)  # Musubi stores alpha = network_dim; the scale is 1
        self.scale = 1.0 if full_matrix else alpha / rank
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))

    def factors(self) -> dict[str, torch.Tensor]:
        """Canonical parameter name -> tensor (the core's algorithm functions take this dict)."""
        return {name: p for name, p in self.named_parameters(recurse=False)}

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s·ΔW (fp32, no dropout): what a merge at strength 1 adds. For checks, not training."""
        tensors = {k: v.float() for k, v in self.factors().items()}
        delta = ALGORITHMS[self.algorithm].delta_weight(tensors)
        return delta.reshape(self.out_features, self.in_features) * self.scale

    # Whether a layer that module dropout skips still returns a zero that depends on its parameters. Data-parallel
    # training (DDP) needs a gradient for every parameter at every step from every process; a skipped layer's is
    # then zero, which is what DDP averages in for a layer skipped on one process anyway.
    dropped_in_graph = False

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """multiplier·s·ΔW·x in the parameters' dtype; None when module dropout skips the layer."""
        if self.training and self.module_dropout and torch.rand(1) < self.module_dropout:
            if not self.dropped_in_graph:
                return None
            zero = sum(p.reshape(-1)[:1].sum() for p in self.parameters()) * 0.0
            return x.new_zeros((*x.shape[:-1], self.out_features), dtype=self.param_dtype) + zero
        dtype = self.param_dtype
        y = self._delta(x if x.dtype == dtype else x.to(dtype))
        if self.training and self.rank_dropout:
            # Musubi: mask output rows of ΔW (= output features of ΔW·x), rescale by 1/(1-p).
            keep = torch.rand(self.out_features, device=y.device) > self.rank_dropout
            y = y * (keep.to(y.dtype) / (1.0 - self.rank_dropout))
        return y * self.multiplier if self.multiplier != 1.0 else y

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in self.factors().items())
        return f"{self.algorithm} {self.out_features}x{self.in_features} rank={self.rank} scale={self.scale:g} [{shapes}]"


class TrainableLoKr(TrainableAdapter):
    """Musubi `networks.lokr`: lokr_w1 (out_l, in_m) full; w2 (out_k, in_n) low-rank or full."""

    algorithm = "lokr"

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, factor: int = -1, **options):
        shapes = lokr_algorithm.trainable_shapes(out_features, in_features, rank, factor)
        super().__init__(out_features, in_features, rank, alpha, full_matrix="lokr_w2" in shapes, **options)
        self.shapes, self.factor = shapes, factor
        for name, shape in self.shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Musubi's init: w1 and w2_a kaiming-uniform(a=√5), w2 / w2_b zero, so ΔW = 0."""
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.full_matrix:
            nn.init.zeros_(self.lokr_w2)
        else:
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            nn.init.zeros_(self.lokr_w2_b)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        t = self.factors()
        if self.scale != 1.0:
            t["lokr_w1"] = t["lokr_w1"] * self.scale  # scale the smallest tensor, not the output
        if self.mode == "materialize":
            return F.linear(x, lokr_algorithm.delta_weight(t))
        return lokr_algorithm.bypass_delta(x, t)


class _HadaWeight(torch.autograd.Function):
    """s·(w1a@w1b)⊙(w2a@w2b), recomputing the two products in the backward (Musubi's HadaWeight)."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        t = grad * (w2a @ w2b)
        g1a, g1b = t @ w1b.T, w1a.T @ t
        t = grad * (w1a @ w1b)
        return g1a, g1b, t @ w2b.T, w2a.T @ t, None


# Rows of ΔW built at once by _HadaLinear: 4M elements (16 MB fp32) per temporary.
HADA_BLOCK_ELEMENTS = 1 << 22


class _HadaLinear(torch.autograd.Function):
    """x·(s·(w1a@w1b)⊙(w2a@w2b))ᵀ without keeping ΔW: it is built a block of rows at a time in
    the forward and rebuilt the same way in the backward. Saved for backward: x and the factors."""

    @staticmethod
    def forward(ctx, x, w1a, w1b, w2a, w2b, scale: float):
        ctx.save_for_backward(x, w1a, w1b, w2a, w2b)
        ctx.scale = scale
        out_features, in_features = w1a.shape[0], w1b.shape[1]
        x2 = x.reshape(-1, in_features)
        step = max(1, HADA_BLOCK_ELEMENTS // in_features)
        if step >= out_features:
            y = x2 @ ((w1a @ w1b).mul_(w2a @ w2b).mul_(scale)).T
            return y.reshape(*x.shape[:-1], out_features)
        y = x2.new_empty(x2.shape[0], out_features)
        for s in range(0, out_features, step):
            e = min(out_features, s + step)
            y[:, s:e] = x2 @ (w1a[s:e] @ w1b).mul_(w2a[s:e] @ w2b).mul_(scale).T
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad):
        x, w1a, w1b, w2a, w2b = ctx.saved_tensors
        scale = ctx.scale
        out_features, in_features = w1a.shape[0], w1b.shape[1]
        x2 = x.reshape(-1, in_features)
        g2 = grad.reshape(-1, out_features)
        need_x = ctx.needs_input_grad[0]
        gx = torch.zeros_like(x2) if need_x else None
        g1a, g2a = torch.empty_like(w1a), torch.empty_like(w2a)
        g1b, g2b = torch.zeros_like(w1b), torch.zeros_like(w2b)
        step = max(1, HADA_BLOCK_ELEMENTS // in_features)
        for s in range(0, out_features, step):
            e = min(out_features, s + step)
            h1, h2 = w1a[s:e] @ w1b, w2a[s:e] @ w2b
            g_block = g2[:, s:e]
            if need_x:
                gx.addmm_(g_block, h1 * h2, alpha=scale)
            g_delta = (g_block.T @ x2).mul_(scale)  # dL/dΔW for these rows
            t = g_delta * h2
            g1a[s:e] = t @ w1b.T
            g1b.addmm_(w1a[s:e].T, t)
            t = g_delta.mul_(h1)
            g2a[s:e] = t @ w2b.T
            g2b.addmm_(w2a[s:e].T, t)
        return (gx.reshape(x.shape) if need_x else None), g1a, g1b, g2a, g2b, None


class TrainableLoHa(TrainableAdapter):
    """Musubi `networks.loha`: hada_w1_a (out, r), hada_w1_b (r, in), the same for w2."""

    algorithm = "loha"
    # "auto" picks the cheaper of "factored" (rank-r² form) and "rebuild" (_HadaLinear) per call.
    path = "auto"

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, factor: int = -1, **options):
        # `factor` is LoKr's; LoHa's factors have no split to choose.
        super().__init__(out_features, in_features, rank, alpha, **options)
        self.shapes = loha_algorithm.trainable_shapes(out_features, in_features, rank)
        for name, shape in self.shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Musubi's init: w1_a N(0, 0.1), w1_b and w2_b N(0, 1), w2_a zero, so ΔW = 0."""
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def factored_is_cheaper(self, tokens: int) -> bool:
        """The rank-r² form when it takes fewer flops (forward + backward, roughly) than building
        ΔW, and its U and V (kept for the backward) are smaller than ΔW."""
        r2 = self.rank * self.rank
        n, m = self.out_features, self.in_features
        if r2 * (n + m) >= n * m:
            return False
        return 3 * tokens * r2 * (n + m) < 3 * tokens * n * m + 8 * self.rank * n * m

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        w1a, w1b, w2a, w2b = self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b
        if self.mode == "materialize":
            return F.linear(x, _HadaWeight.apply(w1a, w1b, w2a, w2b, self.scale))
        path = self.path
        if path == "auto":
            path = "factored" if self.factored_is_cheaper(x.numel() // self.in_features) else "rebuild"
        if path == "factored":
            u, v = loha_algorithm.factored(w1a, w1b, w2a, w2b, self.scale)
            return (x @ v.T) @ u.T
        return _HadaLinear.apply(x, w1a, w1b, w2a, w2b, self.scale)


def make_adapter(
    algorithm: str,
    out_features: int,
    in_features: int,
    rank: int,
    alpha: float,
    factor: int = -1,
    **options,
) -> TrainableAdapter:
    """A freshly initialised trainable adapter (ΔW = 0) on CPU in fp32."""
    if algorithm not in TRAINABLE:
        raise ValueError(f"unknown algorithm {algorithm!r} ({' or '.join(TRAINABLE)})")
    return TRAINABLE[algorithm](out_features, in_features, rank, alpha, factor=factor, **options)


# The trainable form of each algorithm training supports.
TRAINABLE: dict[str, type[TrainableAdapter]] = {"lokr": TrainableLoKr, "loha": TrainableLoHa}
