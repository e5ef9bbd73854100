"""A model file's weight read a block of rows at a time, in float64 (fp8 dequantized with its per-tensor scale).

Commands that go through a full-size model one weight at a time and compute on it (extract, to-lora of
DoRA modules) read rows with positioned reads into memory of their own, rather than mapping the whole
tensor: nothing of the file stays resident, so what they hold is what they compute.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Iterator

import torch

from .errors import AdapterError
from .merge import FP8_DTYPES, _quant_scale
from .safetensors_io import SafetensorsReader, dtype_name

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BLOCK_ELEMENTS = 1 << 20  # elements read at once: 8 MB in float64


class WeightRows:
    """One weight of a model file (`key`), its rows `first` … `first + rows − 1` (all of them by default:
    a fused weight's part is a range), read in float64 blocks."""

    def __init__(self, reader: SafetensorsReader, key: str, first: int = 0, rows: int | None = None):
        entry = reader.header.tensors[key]
        if entry.dtype not in FLOAT_DTYPES + FP8_DTYPES:
            raise AdapterError(f"{reader.path}: {key} has dtype {dtype_name(entry.dtype)}, not a float or fp8 type")
        self.reader, self.key, self.entry = reader, key, entry
        self.first = first
        self.shape = (entry.shape[0] - first if rows is None else rows, *entry.shape[1:])
        self.scale = _quant_scale(key, reader.header.tensors, reader) if entry.dtype in FP8_DTYPES else None

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, the rows in float64), about BLOCK_ELEMENTS at a time, read into one buffer reused for
        every block (the caller's until the next one): new buffers each time would leave the allocator
        holding freed ones, hundreds of MB over a large weight."""
        entry = self.entry
        row_elements = math.prod(self.shape[1:])
        step = max(1, BLOCK_ELEMENTS // max(1, row_elements))
        rows = min(step, self.shape[0])
        raw = torch.empty(rows * row_elements, dtype=entry.dtype)
        values = torch.empty(rows, *self.shape[1:], dtype=torch.float64)
        row_bytes = row_elements * raw.element_size()
        for start in range(0, self.shape[0], step):
            stop = min(self.shape[0], start + step)
            count = (stop - start) * row_elements
            if count:
                # positioned reads into the buffer: nothing of the file is mapped
                self.reader._read_into(memoryview(raw[:count].view(torch.uint8).numpy()),
                                       self.reader.header.offsets[self.key] + (self.first + start) * row_bytes)
            block = values[: stop - start]
            block.reshape(-1).copy_(raw[:count])
            if self.scale is not None:
                block.mul_(self.scale.double())
            yield start, stop, block


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


def return_freed_memory() -> None:
    """Give the C heap's freed blocks back to the system (glibc's malloc_trim), between the weights of a
    streamed command: glibc keeps freed blocks below its mapping threshold (up to 32 MB) for reuse, and
    over the layers of a full-size model they add up to a few hundred MB held while the next layer's
    matrix is built. Nothing happens where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
