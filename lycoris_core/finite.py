"""Counting NaN/Inf in adapter tensors, and saying so in one line (inspect, loaders, merge, convert)."""

from __future__ import annotations

import math
import struct

import numpy
import torch

from .errors import AdapterError
from .safetensors_io import TensorEntry

FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # adapter math runs in fp32
CHUNK_ELEMENTS = 1 << 20  # elements checked at once, so the check never needs a full-size temporary

# A value is unusable when its magnitude's bits exceed those of the largest usable value (floats of one
# sign order like their bit patterns; NaN and Inf, all-ones exponents, exceed every finite value). The
# largest usable float64 is float32's largest: the adapter math runs in float32, where more is Inf.
# dtype -> (integer view, magnitude mask, bits of the largest usable magnitude)
_LIMIT_BITS = {
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, struct.unpack("<q", struct.pack("<d", FLOAT32_MAX))[0]),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F7FFFFF),
    torch.float16: (torch.int16, 0x7FFF, 0x7BFF),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F7F),
}


def _usable(values: numpy.ndarray) -> bool:
    """Every value finite (float64: within float32's range): the fast check, at memory speed."""
    if values.dtype == numpy.float64:
        return bool((numpy.abs(values) <= FLOAT32_MAX).all())
    return bool(numpy.isfinite(values).all())


def _count_bits(bits: numpy.ndarray, mask: int, limit: int) -> int:
    return int(numpy.count_nonzero((bits & mask) > limit))


def count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN/Inf values in a tensor (in float64 also values beyond float32's range, which are Inf to the
    float32 math), checked in chunks (no full-size temporary).

    Done in numpy, single-threaded: torch's isfinite is several times slower (bf16 more so) and its
    intra-op thread pool stalls badly when other processes hold the cores. bf16, which numpy lacks,
    is checked on its bits.
    """
    if tensor.dtype not in _LIMIT_BITS:
        return 0
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    int_dtype, mask, limit = _LIMIT_BITS[tensor.dtype]
    bits = flat.view(int_dtype).numpy()
    values = None if tensor.dtype == torch.bfloat16 else flat.numpy()
    bad = 0
    for i in range(0, bits.size, CHUNK_ELEMENTS):
        if values is not None and _usable(values[i : i + CHUNK_ELEMENTS]):
            continue  # the common case
        bad += _count_bits(bits[i : i + CHUNK_ELEMENTS], mask, limit)
    return bad


RUN_BYTES = 64 << 20  # adjacent tensors read and checked together, at most
GAP_BYTES = 4096  # a tensor not asked about (an alpha) this small is read through rather than ending a run


def nonfinite_in_file(reader, names) -> dict[str, int]:
    """NaN/Inf per tensor (of `names`, in file order) of a safetensors file.

    Writers store tensors of one dtype next to each other, so a file of 10⁵ tiny tensors is read and
    checked as a few long runs of bytes: the cost is the data's, not a read and a check per tensor.
    """
    wanted = set(names)
    counts: dict[str, int] = {}
    run: list[TensorEntry] = []
    run_start = run_end = 0
    for entry in reader.header.tensors.values():  # in file order
        offset = reader.header.offsets[entry.name]
        asked = entry.name in wanted
        if entry.dtype not in _LIMIT_BITS or entry.numel == 0 or (not asked and entry.nbytes > GAP_BYTES):
            if asked or entry.nbytes:  # an empty tensor ends no run
                counts.update(_run_counts(reader, run, run_start, run_end, wanted))
                run = []
            continue
        if asked and entry.nbytes >= RUN_BYTES:  # big enough to be checked on its own
            counts.update(_run_counts(reader, run, run_start, run_end, wanted))
            run = []
            bad = count_nonfinite(reader.get(entry.name))
            if bad:
                counts[entry.name] = bad
            continue
        if run and (entry.dtype != run[0].dtype or offset != run_end or run_end - run_start + entry.nbytes > RUN_BYTES):
            counts.update(_run_counts(reader, run, run_start, run_end, wanted))
            run = []
        if not run:
            run_start = offset
        run.append(entry)
        run_end = offset + entry.nbytes
    counts.update(_run_counts(reader, run, run_start, run_end, wanted))
    return counts


def _run_counts(reader, run: list[TensorEntry], start: int, end: int, wanted: set[str]) -> dict[str, int]:
    if not any(entry.name in wanted for entry in run):
        return {}
    int_dtype, mask, limit = _LIMIT_BITS[run[0].dtype]
    bits = torch.frombuffer(reader.read_bytes(start, end - start), dtype=int_dtype).numpy()
    bad = numpy.flatnonzero((bits & mask) > limit)
    if not bad.size:
        return {}
    first_elements = numpy.cumsum([0] + [entry.numel for entry in run[:-1]])
    per_tensor = numpy.bincount(numpy.searchsorted(first_elements, bad, side="right") - 1, minlength=len(run))
    return {entry.name: int(n) for entry, n in zip(run, per_tensor) if n and entry.name in wanted}


def describe_nonfinite(counts: dict[str, int], limit: int = 5) -> str:
    """'N non-finite values (NaN/Inf) in key (n), ...' for {tensor key: count}."""
    listed = ", ".join(f"{k} ({n})" for k, n in list(counts.items())[:limit])
    more = f" and {len(counts) - limit} more tensors" if len(counts) > limit else ""
    return f"{sum(counts.values())} non-finite values (NaN/Inf, or float64 beyond float32's range) in {listed}{more}"


def check_strength(strength: float, where: str) -> float:
    """A strength the fp32 math can use: finite and within the float32 range (else AdapterError)."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise AdapterError(f"{where}: strength {strength!r} is not a number") from None
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise AdapterError(f"{where}: strength {strength} is not a finite number within the float32 range")
    return value
