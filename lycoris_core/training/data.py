"""Training samples from what ComfyUI's nodes hand over: lists of LATENT batches and CONDITIONING lists."""

from __future__ import annotations

import torch

from ..errors import AdapterError


def _clone_tensors(value):
    """A copy of a conditioning structure whose tensors are ordinary tensors. ComfyUI makes them in inference
    mode, and autograd cannot save an inference tensor for the backward pass: none may reach an adapted layer."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tensors(v) for v in value)
    return value


def training_data(latents: list[dict], positive: list[list]) -> tuple[torch.Tensor, list, list[int]]:
    """(latents (N, …), captions, caption index of each latent) from the node's list inputs.

    Like ComfyUI's TrainLoraNode: every LATENT batch item is one sample; conditionings are one caption for
    all samples, or exactly one per sample (lists from the dataset nodes).
    """
    samples = [item for latent in latents for item in latent["samples"].unbind(0)]
    if not samples:
        raise AdapterError("no training latents: the LATENT input is empty")
    shapes = sorted({tuple(s.shape) for s in samples})
    if len(shapes) > 1:
        raise AdapterError(f"training latents differ in size ({', '.join(map(str, shapes[:4]))}); "
                           "LycorisTrain needs one size: resize or crop the images to one resolution")
    captions = [entry for conditioning in positive for entry in conditioning]
    if len(captions) == 1:
        caption_of = [0] * len(samples)
    elif len(captions) == len(samples):
        caption_of = list(range(len(samples)))
    else:
        raise AdapterError(f"{len(captions)} conditionings for {len(samples)} latents: "
                           "give one for all, or one per latent")
    return torch.stack(samples).float(), _clone_tensors(captions), caption_of
