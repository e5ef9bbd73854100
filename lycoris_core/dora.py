"""DoRA weight decomposition, as LyCORIS's module forward applies it.

For an adapted weight V = W + s·ΔW (strength not yet applied) and the stored magnitude `dora_scale`:
    W' = V · (m · (dora_scale / (‖V‖ + eps) − 1) + 1)
with ‖V‖ the norm of each output row when `dora_scale` has one value per output feature
(`dora_scale.shape[0] == out`), else of each input column; eps = float32 machine epsilon.
At m = 1 this is V · dora_scale / ‖V‖; at m = 0 it is V (LyCORIS's convention, kept for parity).
"""

from __future__ import annotations

import torch

_EPS = torch.finfo(torch.float32).eps


def on_output_axis(dora_scale: torch.Tensor, weight_shape: tuple) -> bool:
    return dora_scale.shape[0] == weight_shape[0] and dora_scale.numel() == weight_shape[0]


def rescale_factor(adapted: torch.Tensor, dora_scale: torch.Tensor, strength: float) -> torch.Tensor:
    """The multiplier of V (broadcastable to V's shape), computed in fp32."""
    v = adapted.float()
    if on_output_axis(dora_scale, tuple(v.shape)):
        norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(v.shape[0], *[1] * (v.dim() - 1))
    else:
        norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, v.shape[1], *[1] * (v.dim() - 2))
    ratio = dora_scale.float().reshape(norm.shape) / (norm + _EPS)
    return strength * (ratio - 1) + 1
