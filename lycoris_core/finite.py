"""Counting NaN/Inf in adapter tensors, and saying so in one line (inspect, loaders, merge, convert)."""

from __future__ import annotations

import numpy
import torch

CHUNK_ELEMENTS = 1 << 20  # elements checked at once, so the check never needs a full-size temporary

# A float is NaN or Inf exactly when all its exponent bits are set: (integer view, exponent mask).
_EXPONENT_BITS = {
    torch.float64: (torch.int64, 0x7FF0000000000000),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
}


def count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN/Inf values in a tensor, checked in chunks (no full-size temporary).

    Done in numpy, single-threaded: torch's isfinite is several times slower (bf16 more so) and its
    intra-op thread pool stalls badly when other processes hold the cores. bf16, which numpy lacks,
    is checked on its exponent bits (a float is NaN/Inf exactly when they are all set).
    """
    if tensor.dtype not in _EXPONENT_BITS:
        return 0
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    int_dtype, mask = _EXPONENT_BITS[tensor.dtype]
    bits = flat.view(int_dtype).numpy()
    values = None if tensor.dtype == torch.bfloat16 else flat.numpy()
    bad = 0
    for i in range(0, bits.size, CHUNK_ELEMENTS):
        if values is not None and numpy.isfinite(values[i : i + CHUNK_ELEMENTS]).all():
            continue  # the common case, at memory speed
        bad += int(numpy.count_nonzero((bits[i : i + CHUNK_ELEMENTS] & mask) == mask))
    return bad


def describe_nonfinite(counts: dict[str, int], limit: int = 5) -> str:
    """'N non-finite values (NaN/Inf) in key (n), ...' for {tensor key: count}."""
    listed = ", ".join(f"{k} ({n})" for k, n in list(counts.items())[:limit])
    more = f" and {len(counts) - limit} more tensors" if len(counts) > limit else ""
    return f"{sum(counts.values())} non-finite values (NaN/Inf) in {listed}{more}"
