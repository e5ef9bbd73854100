"""Tensors parked on disk between computing them and writing them into a file.

A safetensors header lists every tensor's shape before the first tensor's bytes, but some outputs
(an adapter extracted from two models, an average of checkpoints) only know their shapes once each
module has been computed, and computing twice would double the slowest part (the SVDs). So each
module's tensors are computed once, appended to a spool, and read back one at a time while the real
output is written: memory stays at a module, and the disk holds the output twice for a while.

The spool lives beside the output under the output's temporary-file name (`.OUT.<pid>.<random>.tmp`),
so one that a killed run leaves behind is named by the next run, like any other temporary file.
"""

from __future__ import annotations

import os
import tempfile

import torch

from .errors import AdapterError
from .safetensors_io import TEMP_SUFFIX, TensorEntry


class TensorSpool:
    """Append tensors under a key, read them back by key; the file is removed on close.

        with TensorSpool(output) as spool:
            entry = spool.put("a.lora_up.weight", up)
            up = spool.get("a.lora_up.weight")
    """

    def __init__(self, beside: str | os.PathLike):
        path = os.path.abspath(os.fspath(beside))
        folder = os.path.dirname(path)
        try:
            fd, self.path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=folder)
        except OSError as e:
            raise AdapterError(f"{path}: cannot create a temporary file in {folder} ({e.strerror or e})") from None
        self._file = os.fdopen(fd, "w+b")
        self._end = 0
        self._where: dict[str, tuple[TensorEntry, int]] = {}  # key -> (entry, byte offset)

    def put(self, key: str, tensor: torch.Tensor) -> TensorEntry:
        """Store `tensor` (any shape, CPU) under `key`; returns its entry (name, dtype, shape)."""
        if key in self._where:
            raise ValueError(f"{key} is already in the spool")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        entry = TensorEntry(key, tensor.dtype, tuple(tensor.shape))
        try:
            self._file.seek(self._end)
            self._file.write(memoryview(data.numpy()))
        except OSError as e:
            raise AdapterError(f"{self.path}: cannot write ({e.strerror or e})") from None
        self._where[key] = (entry, self._end)
        self._end += entry.nbytes
        return entry

    def get(self, key: str) -> torch.Tensor:
        entry, offset = self._where[key]
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes:
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            self._file.flush()
            self._file.seek(offset)
            if self._file.readinto(buffer) != entry.nbytes:
                raise AdapterError(f"{self.path}: the temporary file ended early (was it changed?)")
        return tensor

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def close(self) -> None:
        self._file.close()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> TensorSpool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
