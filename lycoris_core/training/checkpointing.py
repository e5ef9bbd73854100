"""Gradient checkpointing that is exact on blocks which add into their inputs in place.

torch.utils.checkpoint gives silently wrong gradients (up to 8 % on ComfyUI's Flux and HunyuanVideo
blocks, which do `x += ...`): it recomputes from the mutated input (keyword inputs go unchecked) and
keeps aliases of saved tensors that the recomputed block mutates again. `checkpointed` runs the block
on copies of its tensor inputs and copies every tensor autograd saves in the recomputation.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import get_device_states, set_device_states


def checkpointed(forward, *args, **kwargs):
    """A block's forward without keeping its activations: they are rebuilt in the backward pass.

    Exact also for blocks that add into their tensors in place (ComfyUI's Flux and HunyuanVideo blocks:
    `x += ...`), where torch.utils.checkpoint gives silently wrong gradients: it recomputes from the
    mutated input (keyword inputs go unchecked) and keeps aliases of saved tensors that the recomputed
    block mutates again. Here the block runs on copies of its tensor inputs, and the recomputation
    copies every tensor autograd saves.
    """
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    keys, count = tuple(kwargs), len(args)

    def run(*values):
        values = [v.clone() if isinstance(v, torch.Tensor) else v for v in values]
        with torch.autograd.graph.saved_tensors_hooks(torch.clone, _unchanged):
            return forward(*values[:count], **dict(zip(keys, values[count:])))

    # The anchor requires grad, so the backward reaches the adapters even when no input needs a gradient.
    return _Recomputed.apply(run, torch.zeros((), requires_grad=True), *args, *kwargs.values())


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _Recomputed(torch.autograd.Function):
    """Forward without a graph; backward recomputes `run` under the forward's RNG and autocast state and
    backpropagates through it (the adapters' gradients accumulate, the inputs' are returned)."""

    @staticmethod
    def forward(ctx, run, anchor, *inputs):
        ctx.run = run
        ctx.slots = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
        # Dicts as they are now: hosts update option dicts for later blocks (ComfyUI's transformer_options).
        ctx.others = [None if isinstance(v, torch.Tensor) else dict(v) if isinstance(v, dict) else v for v in inputs]
        ctx.save_for_backward(*(inputs[i] for i in ctx.slots))  # unchanged: `run` works on copies
        device = inputs[ctx.slots[0]].device.type if ctx.slots else "cpu"
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.cpu_rng = torch.get_rng_state()  # dropout draws are replayed in the recomputation
        ctx.devices, ctx.device_rng = get_device_states(*inputs)
        with torch.no_grad():
            return run(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = list(ctx.others)
        for i, saved in zip(ctx.slots, ctx.saved_tensors):
            inputs[i] = saved.detach().requires_grad_(saved.requires_grad)
        device, enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad(), torch.autocast(device, dtype, enabled):
            torch.set_rng_state(ctx.cpu_rng)
            set_device_states(ctx.devices, ctx.device_rng)
            outputs = ctx.run(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:  # none when module dropout skipped the block's adapters and no input needs a gradient
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, *(v.grad if isinstance(v, torch.Tensor) else None for v in inputs))
