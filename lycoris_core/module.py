"""One adapted module: `ModuleAdapter`, the frozen record of what a file says about it, and
`BoundModule`, the same module holding its tensors in fp32, where all the math runs.

The record knows its tensors by name, dtype and shape and where to read them (`bind()` reads them);
it never holds them. A bound module is made once per use (a merge of one weight, a ComfyUI patch,
a bypass hook on one device) and never reads the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from . import dora
from .algorithms import Algorithm
from .errors import AdapterError
from .rows import Rows
from .safetensors_io import TensorEntry

TensorSource = Callable[[str], torch.Tensor]  # file key -> tensor as stored

# Canonical names that are not the algorithm's own weight tensors.
ALPHA, DORA, BIAS = "alpha", "dora_scale", "diff_b"


def _no_source(key: str) -> torch.Tensor:
    raise AdapterError(f"{key}: this module record has no file to read its tensors from")


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: params is a dict
class ModuleAdapter:
    """What a file says about one module: its tensors (canonical name -> key, dtype, shape), alpha,
    and the scale its writer's convention gives it. `shape` is the weight it changes, (out, in, *k)."""

    stem: str
    math: Algorithm = field(repr=False)
    params: Mapping[str, TensorEntry]
    alpha: float | None
    scale: float
    shape: tuple
    rank: int | None
    source: TensorSource = field(default=_no_source, repr=False, compare=False)

    @property
    def algorithm(self) -> str:
        """`lora`, `loha`, `lokr` or `diff`."""
        return self.math.name

    @property
    def variant(self) -> str | None:
        """The algorithm's word for its stored form (LoKr: `full` or `low_rank`), or None."""
        return self.math.variant({name: entry.shape for name, entry in self.params.items()})

    @property
    def has_dora(self) -> bool:
        return DORA in self.params

    @property
    def has_bias_delta(self) -> bool:
        return BIAS in self.params

    @property
    def keys(self) -> list[str]:
        return [entry.name for entry in self.params.values()]

    @property
    def tensor_names(self) -> list[str]:
        """Canonical names of the tensors the math needs (everything but alpha)."""
        return [name for name in self.params if name != ALPHA]

    def read(self) -> dict[str, torch.Tensor]:
        """The module's tensors as stored (dtype kept, CPU), by canonical name."""
        return {name: self.source(self.params[name].name) for name in self.tensor_names}

    def bind(self, device: torch.device | str | None = None) -> BoundModule:
        """The module with its tensors read from the file, in fp32 on `device`."""
        return BoundModule(self, self.read(), device)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s·ΔW at strength 1, shape `self.shape`, computed in fp32 and cast once to `dtype`."""
        return self.bind().delta_weight(dtype)

    def fits(self, shape: tuple) -> bool:
        """Whether this module's ΔW can be added to a weight of `shape` (same rows, same size)."""
        shape = tuple(shape)
        return shape == self.shape or (
            len(shape) >= 1 and shape[:1] == self.shape[:1] and math.prod(shape) == math.prod(self.shape)
        )

    def check_fits(self, shape: tuple) -> None:
        if not self.fits(shape):
            raise AdapterError(
                f"module {self.stem}: {self.algorithm} produces shape {list(self.shape)} "
                f"but the target weight has shape {list(shape)}"
            )


class BoundModule:
    """A module with its tensors in fp32 (on one device): the math of applying it.

    `dtype` is fp32 everywhere in the pack; the benchmarks also time the math in half precision.
    """

    def __init__(self, record: ModuleAdapter, tensors: Mapping[str, torch.Tensor], device=None, dtype=torch.float32):
        self.record = record
        self.tensors = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}

    def to(self, device: torch.device | str) -> BoundModule:
        return BoundModule(self.record, self.tensors, device)

    @property
    def shape(self) -> tuple:
        return self.record.shape

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s·ΔW at strength 1, computed in fp32 and cast once to `dtype`."""
        record = self.record
        return (record.math.delta_weight(self.tensors).reshape(record.shape) * record.scale).to(dtype)

    def delta_bias(self) -> torch.Tensor | None:
        """The bias difference at strength 1 (writers store it unscaled: alpha never applies to it)."""
        return self.tensors.get(BIAS)

    def apply_(self, weight: torch.Tensor, strength: float = 1.0, rows: Rows | None = None) -> None:
        """In place: weight += m·s·ΔW (with DoRA, as LyCORIS's forward). fp32 math, one cast.

        `weight` is the whole target, or with `rows` just those rows of ΔW, for callers that work
        in row blocks or on the part of a fused module that lands on one weight.
        """
        record = self.record
        if rows is None:
            record.check_fits(tuple(weight.shape))
            rows = Rows(0, record.shape[0])
        elif not (0 <= rows.start < rows.stop <= record.shape[0]) or weight.shape[0] != rows.size:
            raise AdapterError(f"module {record.stem}: rows {rows} do not fit a block of {weight.shape[0]} rows")
        target = weight.view(rows.size, *record.shape[1:])
        if not record.has_dora:
            record.math.apply_(target, self.tensors, strength * record.scale, rows)
            return
        dora_scale = self.tensors[DORA]
        if dora.on_output_axis(dora_scale, record.shape):
            dora_scale = rows.of(dora_scale.reshape(-1)).reshape(rows.size, *[1] * (len(record.shape) - 1))
        elif rows != Rows(0, record.shape[0]):
            raise AdapterError(f"module {record.stem}: DoRA with per-input-column magnitude needs the whole weight at once")
        work = target if target.dtype == torch.float32 else target.float()
        record.math.apply_(work, self.tensors, record.scale, rows)
        work.mul_(dora.rescale_factor(work, dora_scale, strength))
        if work is not target:
            target.copy_(work)

    def bypass_delta(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """m·s·ΔW·x for a Linear target, without building ΔW where that is cheaper (DoRA not included)."""
        return self.record.math.bypass_delta(x, self.tensors, strength * self.record.scale)

    def dora_rescale(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """DoRA's multiplier of W + s·ΔW for this weight (one value per row or per column).

        Needs the full weight once; bypass callers compute it when the hook is set up.
        """
        record = self.record
        record.check_fits(tuple(weight.shape))
        adapted = weight.detach().float().reshape(record.shape).clone()
        record.math.apply_(adapted, self.tensors, record.scale, Rows(0, record.shape[0]))
        return dora.rescale_factor(adapted, self.tensors[DORA], strength)

    def bypass_forward(
        self,
        x: torch.Tensor,
        base_forward: Callable[[torch.Tensor], torch.Tensor],
        strength: float = 1.0,
        bias: torch.Tensor | None = None,
        rescale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The adapted Linear's output from the base layer's forward, without changing its weight.

        DoRA modules need `rescale` (from `dora_rescale`) and the layer's `bias`, since DoRA scales
        W·x but not the bias.
        """
        record = self.record
        if not record.has_dora:
            return base_forward(x) + self.bypass_delta(x, strength)
        if rescale is None:
            raise AdapterError(f"module {record.stem}: DoRA in bypass mode needs the rescale from dora_rescale()")
        factor = rescale.to(x.dtype)
        if factor.shape[0] == record.shape[0] and factor.numel() == record.shape[0]:  # per output row
            y = base_forward(x)
            if bias is not None:
                y = y - bias
            y = (y + self.bypass_delta(x, 1.0)) * factor.reshape(-1)
            return y if bias is None else y + bias
        scaled = x * factor.reshape(-1)  # per input column: (W + sΔW)·(c ⊙ x)
        return base_forward(scaled) + self.bypass_delta(scaled, 1.0)
