"""`Rows`: a range of rows along dim 0 of a weight (or of a module's ΔW), the one row type of the pack.

Fused weights (ComfyUI's q/k/v in one `qkv`), modules that cover part of a weight, and row blocks
worked on one at a time all speak in `Rows`; only the ComfyUI boundary turns them into its
`(dim, offset, size)` form.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Rows(NamedTuple):
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of `tensor` (a view)."""
        return tensor.narrow(0, self.start, self.size)

    def shifted(self, offset: int) -> Rows:
        return Rows(self.start + offset, self.stop + offset)

    def overlap(self, other: Rows) -> Rows | None:
        start, stop = max(self.start, other.start), min(self.stop, other.stop)
        return Rows(start, stop) if start < stop else None

    def __str__(self) -> str:
        return f"{self.start}:{self.stop}"
