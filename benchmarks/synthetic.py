"""Synthetic adapters and models of real shapes (random values; only sizes and dtypes matter here).

Shapes follow the models users run: FLUX (3072×3072) and Wan 2.1 14B (dim 5120, FFN 13824, 40
blocks). LoKr factor shapes follow Musubi's factorization, so the benchmarked modules are
the ones Musubi writes: `lokr_w1` (out_l, in_m) full, `lokr_w2` (out_k, in_n) full or low-rank.
"""

from __future__ import annotations

import os

import torch

from ..lycoris_core.algorithms import ALGORITHMS
from ..lycoris_core.algorithms.lokr import factorization
from ..lycoris_core.module import BoundModule, ModuleAdapter
from ..lycoris_core.safetensors_io import SafetensorsWriter, TensorEntry, save_tensors
from ..lycoris_core.scales import lycoris_scale

# name -> (out, in) of a Linear weight
SHAPES = {
    "flux_3072x3072": (3072, 3072),
    "wan14b_attn_5120x5120": (5120, 5120),
    "wan14b_ffn_13824x5120": (13824, 5120),
}

WAN14B_DIM, WAN14B_FFN, WAN14B_BLOCKS = 5120, 13824, 40


def wan_block_layers(dim: int = WAN14B_DIM, ffn: int = WAN14B_FFN) -> list[tuple[str, tuple[int, int]]]:
    """The adapted Linears of one Wan block (Musubi/ComfyUI names, without `blocks.N.`), with shapes."""
    attention = [(f"{kind}.{p}", (dim, dim)) for kind in ("self_attn", "cross_attn") for p in "qkvo"]
    return attention + [("ffn.0", (ffn, dim)), ("ffn.2", (dim, ffn))]


def lokr_tensors(shape: tuple[int, int], rank: int, full_w2: bool | None = None, generator=None) -> dict[str, torch.Tensor]:
    """LoKr factors (fp32, canonical names) for an (out, in) weight. `full_w2=None` follows Musubi's rule."""
    (out_l, out_k), (in_m, in_n) = factorization(shape[0]), factorization(shape[1])
    if full_w2 is None:
        full_w2 = rank >= max(out_k, in_n) / 2
    g = dict(generator=generator)
    tensors = {"lokr_w1": torch.randn(out_l, in_m, **g) * 0.1}
    if full_w2:
        tensors["lokr_w2"] = torch.randn(out_k, in_n, **g) * 0.01
    else:
        tensors["lokr_w2_a"] = torch.randn(out_k, rank, **g) * 0.1
        tensors["lokr_w2_b"] = torch.randn(rank, in_n, **g) * 0.01
    return tensors


def loha_tensors(shape: tuple[int, int], rank: int, generator=None) -> dict[str, torch.Tensor]:
    g = dict(generator=generator)
    out, in_ = shape
    return {
        "hada_w1_a": torch.randn(out, rank, **g) * 0.1,
        "hada_w1_b": torch.randn(rank, in_, **g) * 0.1,
        "hada_w2_a": torch.randn(out, rank, **g) * 0.1,
        "hada_w2_b": torch.randn(rank, in_, **g) * 0.1,
    }


def module(algorithm: str, tensors: dict[str, torch.Tensor], alpha: float | None, stem: str = "bench",
           dtype: torch.dtype = torch.float32) -> BoundModule:
    """The module `read_adapter` would make of these tensors, bound to them (in `dtype`)."""
    math = ALGORITHMS[algorithm]
    params = {name: TensorEntry(f"{stem}.{name}", t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    shapes = {name: entry.shape for name, entry in params.items()}
    record = ModuleAdapter(stem, math, params, alpha, lycoris_scale(math, shapes, alpha),
                           tuple(math.weight_shape(shapes)), math.rank(shapes))
    return BoundModule(record, tensors, dtype=dtype)


def fill(shape: tuple[int, ...], dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """A tensor of pseudo-random values, made cheaply by tiling one random block (all pages touched)."""
    block = torch.randn(1 << 16, device=device).mul_(0.02).to(dtype)
    numel = 1
    for d in shape:
        numel *= d
    out = torch.empty(numel, dtype=dtype, device=device)
    whole = numel // block.numel() * block.numel()
    out[:whole].view(-1, block.numel()).copy_(block.expand(whole // block.numel(), -1))
    out[whole:] = block[: numel - whole]
    return out.view(shape)


def _wan_adapter(blocks: int, rank: int, dim: int, ffn: int, module_tensors, dtype, seed: int) -> dict[str, torch.Tensor]:
    """A Musubi-format file's tensors for `blocks` Wan blocks, `module_tensors(shape, rank, generator)` per layer."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for n in range(blocks):
        for layer, shape in wan_block_layers(dim, ffn):
            stem = f"lora_unet_blocks_{n}_{layer.replace('.', '_')}"
            for name, t in module_tensors(shape, rank, generator=generator).items():
                tensors[f"{stem}.{name}"] = t.to(dtype)
            tensors[f"{stem}.alpha"] = torch.tensor(float(rank) / 2)
    return tensors


def wan_lokr_adapter(blocks: int, rank: int, dim: int = WAN14B_DIM, ffn: int = WAN14B_FFN,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """A Musubi-format LoKr file for `blocks` Wan blocks (Musubi's full/low-rank rule)."""
    return _wan_adapter(blocks, rank, dim, ffn, lokr_tensors, torch.float32, seed)


def wan_loha_adapter(blocks: int, rank: int, dim: int = WAN14B_DIM, ffn: int = WAN14B_FFN,
                     dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    return _wan_adapter(blocks, rank, dim, ffn, loha_tensors, dtype, seed)


def musubi_metadata(algorithm: str, rank: int) -> dict[str, str]:
    return {
        "ss_network_module": f"networks.{algorithm}",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank / 2),
        "ss_base_model_version": "wan",
    }


def write_adapter(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    save_tensors(path, tensors, metadata)
    return os.path.getsize(path)


def wan_base_layout(blocks: int, dtype: torch.dtype, dim: int = WAN14B_DIM, ffn: int = WAN14B_FFN) -> list[TensorEntry]:
    """Weights (and the small norms/biases around them) of a Wan-shaped diffusion-model file."""
    layout = []
    for n in range(blocks):
        for layer, shape in wan_block_layers(dim, ffn):
            layout.append(TensorEntry(f"blocks.{n}.{layer}.weight", dtype, shape))
            layout.append(TensorEntry(f"blocks.{n}.{layer}.bias", dtype, (shape[0],)))
        layout.append(TensorEntry(f"blocks.{n}.norm3.weight", dtype, (dim,)))
    return layout


def write_wan_base(path: str, blocks: int, dtype: torch.dtype, dim: int = WAN14B_DIM,
                   ffn: int = WAN14B_FFN) -> list[TensorEntry]:
    """Write a Wan-shaped base file one tensor at a time (memory stays at one tensor)."""
    layout = wan_base_layout(blocks, dtype, dim, ffn)
    with SafetensorsWriter(path, layout, {"format": "pt"}) as writer:
        for entry in layout:
            writer.write(entry.name, fill(entry.shape, dtype))
    return layout


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n
