"""The denoising objective every trainer here uses (the ComfyUI node and the train command), and the batches
it is fed: ComfyUI TrainSampler's loss, made independent of how a batch is split between processes.

Each sample of a batch is noised at sigma = percent_to_sigma(u), u ~ U(0, 1), and the loss is the mean over
the batch of each sample's MSE between the model's denoised (x0) prediction and the clean latent. Its noise
and u come from a generator seeded by (seed, batch number, place in the batch), so a sample draws the same
noise whichever process computes it, and every sample is a forward pass of its own: N processes that each
take a share of the batch train as one process that takes all of it, up to rounding. (A forward pass over
several samples rounds differently from one per sample, and Adam turns such differences in near-zero
gradients into visible ones; with one caption per sample, as datasets usually have, samples could not share
a forward pass anyway.)

The model side is a `denoiser` (ComfyUI's, in nodes/denoiser.py): `latent_in(x)` (the model's latent
scaling), `model_sampling` (`percent_to_sigma`, `noise_scaling`), `device`, and a call
`denoiser(xt, sigma, caption_entry, x0) -> denoised`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .data import Samples
from .loop import batch_schedule


@dataclass(frozen=True)
class Batch:
    step: int  # the loop's batch counter (every micro-batch counts); seeds the noise
    indices: tuple[int, ...]  # the samples this process computes
    positions: tuple[int, ...]  # their places in the whole batch
    size: int  # samples in the whole batch: the loss is a mean over all of them


def shard(size: int, rank: int, world: int) -> range:
    """The places of a batch of `size` that process `rank` of `world` computes: contiguous, sizes differ by at most one."""
    return range(rank * size // world, (rank + 1) * size // world)


def batch_plan(samples: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Callable[[int], Batch]:
    """step -> this process's share of batch `step`: epochs in a seeded random order (the loop's schedule),
    `batch_size` samples per batch in all, split between the `world` processes."""
    schedule = batch_schedule(samples, batch_size, seed)

    def batch(step: int) -> Batch:
        _, indices = schedule(step)
        places = shard(len(indices), rank, world)
        return Batch(step, tuple(indices[p] for p in places), tuple(places), len(indices))

    return batch


def noise_seed(seed: int, step: int, position: int) -> int:
    """The seed of one sample's noise: a hash, so that no two (step, place) pairs share one."""
    digest = hashlib.blake2b(f"{seed}/{step}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def denoising_loss(samples: Samples, denoiser, seed: int) -> Callable[[Batch], torch.Tensor]:
    """loss_fn(batch) for the core loop: the sum over this process's samples of their MSE, divided by the
    whole batch's size (the processes' losses add up to the batch's mean)."""
    sampling = denoiser.model_sampling

    def loss_fn(batch: Batch) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=denoiser.device)
        for index, position in zip(batch.indices, batch.positions):
            x0 = denoiser.latent_in(samples.latent(index)[None].to(denoiser.device, torch.float32))
            generator = torch.Generator().manual_seed(noise_seed(seed, batch.step, position))
            percent = float(torch.rand((), generator=generator))
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
            sigma = torch.tensor([sampling.percent_to_sigma(percent)], dtype=torch.float32, device=x0.device)
            xt = sampling.noise_scaling(sigma, noise, x0, False)
            target = sampling.noise_scaling(torch.zeros_like(sigma), torch.zeros_like(noise), x0, False)
            denoised = denoiser(xt, sigma, samples.caption(samples.caption_of(index)), x0)
            total = total + (denoised.float() - target.float()).square().mean()
        return total / batch.size

    return loss_fn
