"""Bypass: adapters applied in the forward pass of Linear layers, the weights left untouched.

For weights that cannot or should not be rewritten (fp8 / quantized, offloaded): every adapted layer
gets one torch forward hook that adds m·s·ΔW·x to the layer's output, or to its output features
[offset, offset + size) when the target is a row slice of a fused weight (split q/k/v on a fused qkv).
The math is the module's own (`BoundModule.bypass_forward`: LoKr never builds ΔW, LoHa uses its
factored form when that is cheaper), in fp32, cast once to the output dtype.

Hooks (not a replaced `forward`) so that several sets, e.g. chained loaders, can be attached to the
same layer and removed in any order, and so that they add to whatever the layer computes: its stored
weight (patched, quantized) or another tool's replaced `forward` (ComfyUI core's bypass loader).

A set's hooks on a model are shared by their owners: a host attaches and detaches them on behalf of
an owner (ComfyUI: each model patcher that injects them; chained loaders hand the same set on to
every clone), and they stay while one owner still holds them. So one owner detaching, e.g. a
patcher leaving the model, never takes them from another, and an owner that never attached them
detaches nothing.

DoRA needs the layer's weight once for its magnitude rescale (`BoundModule.dora_rescale`); it is
taken at the first forward, from the base weight. With several adapters on one DoRA layer, patch
mode is exact and bypass rescales only by the base weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import dora
from .errors import AdapterError
from .module import BoundModule, ModuleAdapter
from .rows import Rows

WeightOf = Callable[[torch.nn.Module], torch.Tensor]


def plain_weight(layer: torch.nn.Module) -> torch.Tensor:
    return layer.weight


@dataclass
class _Entry:
    module: ModuleAdapter
    stored: dict[str, torch.Tensor]  # its tensors as the file stores them; fp32 copies per device on use
    strength: float
    rows: Rows | None  # the layer's output features it adds to, or all of them
    add_bias: bool  # the module carries a bias difference (diff_b)
    source_rows: Rows | None = None  # the rows of the module's output this layer takes (fused module, split layers)
    _bound: dict = field(default_factory=dict, repr=False)  # device -> the module in fp32 there
    _rescale: torch.Tensor | None = field(default=None, repr=False)

    def on(self, device: torch.device) -> BoundModule:
        bound = self._bound.get(device)
        if bound is None:
            bound = self._bound[device] = BoundModule(self.module, self.stored, device)
        return bound

    def rescale(self, layer: torch.nn.Module, weight_of: WeightOf, device: torch.device) -> torch.Tensor:
        if self._rescale is None:
            weight = weight_of(layer).detach()
            if self.rows is not None:
                weight = self.rows.of(weight)
            self._rescale = self.on(weight.device).dora_rescale(weight.float(), self.strength)
        return self._rescale.to(device)

    def forget(self) -> None:
        self._bound.clear()
        self._rescale = None


def _layer_bias(layer: torch.nn.Module, rows: Rows, device) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    if bias is None:
        return None
    return rows.of(bias.detach()).to(device=device, dtype=torch.float32)


def _apply(entry: _Entry, layer: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, weight_of: WeightOf) -> torch.Tensor:
    """The layer's output with one adapter added (fp32 math, one cast back)."""
    width = out.shape[-1]
    target = entry.rows or Rows(0, width)
    offset, size = target.start, target.size
    module = entry.on(x.device)
    xf = x.float()
    rows = out.narrow(-1, offset, size).float()
    if not module.record.has_dora:
        delta = module.bypass_delta(xf, entry.strength)
        if entry.source_rows is not None:
            delta = delta.narrow(-1, entry.source_rows.start, entry.source_rows.size)
        new = rows + delta
    else:
        rescale = entry.rescale(layer, weight_of, x.device)
        bias = _layer_bias(layer, target, x.device)
        if dora.on_output_axis(module.tensors["dora_scale"], module.shape):
            new = module.bypass_forward(xf, lambda _: rows, entry.strength, bias=bias, rescale=rescale)
        else:
            # Per-input magnitude: the layer at input c⊙x. Its base part is W·(c⊙x) + b = out + W·(c⊙x − x),
            # which keeps what earlier adapters added to `out`.
            def base(scaled: torch.Tensor) -> torch.Tensor:
                extra = layer.forward((scaled - xf).to(x.dtype)).narrow(-1, offset, size).float()
                return rows + (extra if bias is None else extra - bias)

            new = module.bypass_forward(xf, base, entry.strength, rescale=rescale)
    if entry.add_bias:
        bias_delta = module.delta_bias()
        if entry.source_rows is not None:
            bias_delta = entry.source_rows.of(bias_delta)
        new = new + entry.strength * bias_delta
    new = new.to(out.dtype)
    if size == width:
        return new
    # Out of place (no in-place writes into a tensor autograd or inference mode may own).
    return torch.cat([out.narrow(-1, 0, offset), new, out.narrow(-1, offset + size, width - offset - size)], dim=-1)


class _Hook:
    def __init__(self, entries: list[_Entry], weight_of: WeightOf):
        self.entries = entries
        self.weight_of = weight_of

    def __call__(self, layer, args, kwargs, output):
        x = args[0] if args else kwargs["input"]
        for entry in self.entries:
            output = _apply(entry, layer, x, output, self.weight_of)
        return output


class BypassSet:
    """Adapters for some Linear layers of a model, applied in their forward pass while attached."""

    def __init__(self) -> None:
        self.layers: dict[str, list[_Entry]] = {}  # layer path (dotted, from the root) -> its adapters
        self._handles: dict[int, list] = {}  # id(root) -> hook handles
        self._owners: dict[int, set[int]] = {}  # id(root) -> ids of the owners holding its hooks

    def add(
        self,
        layer: str,
        module: ModuleAdapter,
        tensors: dict[str, torch.Tensor],
        strength: float = 1.0,
        rows: Rows | None = None,
        source_rows: Rows | None = None,
    ) -> None:
        """Adapt layer `layer` (a dotted path) by `module`, whose tensors (as stored) are `tensors`.

        `rows`: the layer's output features it adds to (a slice of a fused layer); `source_rows`:
        the module's output features it adds (one part of a fused module on split layers)."""
        if len(module.shape) != 2:
            raise AdapterError(
                f"module {module.stem}: bypass mode handles Linear layers only, but it targets a weight of shape "
                f"{list(module.shape)}; use patch mode"
            )
        if module.has_dora and source_rows is not None:
            raise AdapterError(f"module {module.stem}: a DoRA module cannot be split over separate layers")
        entry = _Entry(module, dict(tensors), float(strength), rows, module.has_bias_delta, source_rows)
        self.layers.setdefault(layer, []).append(entry)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.layers.values())

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, root: torch.nn.Module, weight_of: WeightOf = plain_weight, owner: object = None) -> None:
        """Hook every adapted layer of `root` for `owner` (None: the caller). The hooks go on once per root;
        another owner attaching shares them, the same owner attaching again changes nothing."""
        owners = self._owners.get(id(root))
        if owners is not None:
            owners.add(id(owner))
            return
        handles = []
        try:
            for path, entries in self.layers.items():
                try:
                    layer = root.get_submodule(path)
                except AttributeError:
                    raise AdapterError(f"bypass: the model has no layer {path}") from None
                handles.append(layer.register_forward_hook(_Hook(entries, weight_of), with_kwargs=True))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        self._handles[id(root)] = handles
        self._owners[id(root)] = {id(owner)}

    def detach(self, root: torch.nn.Module | None = None, owner: object = None) -> None:
        """`owner` (None: the caller) lets go of the hooks on `root` (or on every root); they come off a
        root when no owner holds them any more. An owner that holds none detaches nothing."""
        for key in [id(root)] if root is not None else list(self._handles):
            owners = self._owners.get(key)
            if owners is None:
                continue
            owners.discard(id(owner))
            if owners:
                continue
            del self._owners[key]
            for handle in self._handles.pop(key):
                handle.remove()
        if not self._handles:
            for entries in self.layers.values():
                for entry in entries:
                    entry.forget()  # device copies and the DoRA rescale are rebuilt on the next attach
