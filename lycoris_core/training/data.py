"""Training samples: one latent per sample and its caption, whether from ComfyUI's node inputs (lists of LATENT
batches and CONDITIONING lists) or from a dataset folder (`dataset.py`), behind one small interface.

A caption is one ComfyUI conditioning entry, `[cross_attn tensor, {extra fields}]` (pooled_output,
attention_mask, guidance, reference_latents, ...). Samples share a caption by index, so one caption for
a thousand samples is held once.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError


class Samples:
    """What the training objective reads: `len()` samples, each a latent without a batch dimension
    (`latent(i)`, its shape without reading it: `latent_shape(i)`) and the index of its caption
    (`caption_of(i)`); `caption(c)` is caption c's conditioning entry, with ordinary tensors."""

    def __len__(self) -> int:
        raise NotImplementedError

    def latent(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, index: int) -> tuple[int, ...]:
        raise NotImplementedError

    def caption_of(self, index: int) -> int:
        raise NotImplementedError

    def caption(self, index: int) -> list:
        raise NotImplementedError

    @property
    def captions(self) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        """E.g. '12 samples in 2 sizes (16×1×8×8: 8, 16×1×8×12: 4), 12 captions'."""
        sizes: dict[tuple[int, ...], int] = {}
        for i in range(len(self)):
            shape = self.latent_shape(i)
            sizes[shape] = sizes.get(shape, 0) + 1
        listed = ", ".join(f"{'×'.join(map(str, s))}: {n}" for s, n in sorted(sizes.items()))
        kinds = "1 size" if len(sizes) == 1 else f"{len(sizes)} sizes"
        return f"{len(self)} samples in {kinds} ({listed}), {self.captions} caption{'s' * (self.captions != 1)}"


class MemorySamples(Samples):
    def __init__(self, latents: list[torch.Tensor], captions: list, caption_of: list[int]):
        self._latents, self._captions, self._caption_of = latents, captions, caption_of

    def __len__(self) -> int:
        return len(self._latents)

    def latent(self, index: int) -> torch.Tensor:
        return self._latents[index]

    def latent_shape(self, index: int) -> tuple[int, ...]:
        return tuple(self._latents[index].shape)

    def caption_of(self, index: int) -> int:
        return self._caption_of[index]

    def caption(self, index: int) -> list:
        return self._captions[index]

    @property
    def captions(self) -> int:
        return len(self._captions)


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


def training_data(latents: list[dict], positive: list[list]) -> MemorySamples:
    """The samples of the nodes' list inputs, copied out of inference mode.

    Like ComfyUI's TrainLoraNode: every LATENT batch item is one sample (batches of different sizes, as
    ComfyUI's Resolution Bucket node makes them, are fine); the conditioning entries, in order, are one caption
    for all samples or exactly one per sample (lists from the dataset nodes).
    """
    samples = [item.clone() for latent in latents for item in latent["samples"].unbind(0)]
    if not samples:
        raise AdapterError("no training latents: the LATENT input is empty")
    kinds = sorted({(s.dim(), s.shape[0]) for s in samples})
    if len(kinds) > 1:
        raise AdapterError(f"training latents differ in channels or dimensions ({', '.join(f'{c} channels, {d} dims' for d, c in kinds)}): "
                           "they must come from one VAE")
    captions = [entry for conditioning in positive for entry in conditioning]
    if len(captions) == 1:
        caption_of = [0] * len(samples)
    elif len(captions) == len(samples):
        caption_of = list(range(len(samples)))
    else:
        raise AdapterError(f"{len(captions)} conditionings for {len(samples)} latents: "
                           "give one for all, or one per latent")
    return MemorySamples(samples, _clone_tensors(captions), caption_of)
