"""Gradient checkpointing that is exact on blocks which add into their inputs in place.

torch.utils.checkpoint gives silently wrong gradients (up to 8 % on ComfyUI's Flux and HunyuanVideo
blocks, which do `x += ...`): it recomputes from the mutated input (keyword inputs go unchecked) and
keeps aliases of saved tensors that the recomputed block mutates again. `checkpointed_forward` runs the block
on copies of its tensor inputs and copies every tensor autograd saves in the recomputation.

The trainable tensors the block uses (`params`) are inputs of the checkpointed step, and their gradients
come back through it like the activations' do: each parameter then receives its gradient once per
backward pass, summed over every block and forward pass it took part in, as without checkpointing. (A
recomputation that put gradients into the parameters itself would hand them over once per block call,
which data-parallel training (DDP) cannot count: it would average the first and miss the rest.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import get_device_states, set_device_states


def checkpointed_forward(forward, params: Callable[[], list[torch.Tensor]]):
    """A block's `forward` without keeping its activations: they are rebuilt in the backward pass. `params()` lists
    the tensors needing gradients that the block uses (its own and its adapters'), asked at each call."""

    def run(*args, **kwargs):
        return _checkpoint(forward, tuple(params()), args, kwargs)

    return run


def _checkpoint(forward, params: tuple[torch.Tensor, ...], args: tuple, kwargs: dict):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    keys, count = tuple(kwargs), len(args)

    def run(*values):
        values = [v.clone() if isinstance(v, torch.Tensor) else v for v in values]
        with torch.autograd.graph.saved_tensors_hooks(torch.clone, _unchanged):
            return forward(*values[:count], **dict(zip(keys, values[count:])))

    # The anchor requires grad, so the backward reaches the block even when nothing else it takes needs a gradient.
    return _Recomputed.apply(run, len(params), torch.zeros((), requires_grad=True), *params, *args, *kwargs.values())


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _Recomputed(torch.autograd.Function):
    """Forward without a graph; backward recomputes `run` under the forward's RNG and autocast state and takes the
    gradients of the inputs and of `params` from the recomputation."""

    @staticmethod
    def forward(ctx, run, count, anchor, *params_and_inputs):
        params, inputs = params_and_inputs[:count], params_and_inputs[count:]
        ctx.run = run
        ctx.params = params  # leaf tensors of the model and its adapters: kept alive by them anyway
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
        needing = [i for i in ctx.slots if inputs[i].requires_grad]
        wanted = [*ctx.params, *(inputs[i] for i in needing)]
        found = [None] * len(wanted)
        if pairs and wanted:  # none when module dropout skipped the block's adapters and no input needs a gradient
            found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
        input_grads = [None] * len(inputs)
        for i, grad in zip(needing, found[len(ctx.params):]):
            input_grads[i] = grad
        return (None, None, None, *found[: len(ctx.params)], *input_grads)
