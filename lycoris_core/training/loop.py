"""The training loop: optimizer, learning-rate schedule, gradient accumulation and clipping,
progress, cancellation, and checkpoints that resume bit for bit.

`train(adapters, loss_fn, data, config)` knows nothing about models: `loss_fn(batch)` runs the
adapted model and returns a scalar loss; `data` is a sequence of batches (visited in a seeded
random order per epoch) or a function `step -> batch`. Everything random that the run draws comes
from the global torch RNG seeded with `config.seed` (dropout, the caller's noise) or from the
batch-order generator; both are stored in the checkpoints, with the optimizer state and the
loss history, so a resumed run continues the same curve.

Checkpoints are safetensors files (no pickle): the adapter and optimizer tensors, the RNG states as
uint8 tensors, and the rest as JSON under the `comfyui_lycoris.checkpoint` metadata key.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import AdapterError
from ..safetensors_io import SafetensorsReader, save_tensors
from .config import ADAPTER_OPTIONS, STRUCTURAL_OPTIONS, TrainingConfig
from .inject import AdapterSet

CHECKPOINT_KEY = "comfyui_lycoris.checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class TrainProgress:
    step: int  # optimizer steps done
    total: int
    loss: float  # this step's loss (mean over its accumulated batches)
    learning_rate: float
    elapsed: float  # seconds in this call of train()
    checkpoint: str | None = None  # the checkpoint written after this step, if one was


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including those before a resume)
    losses: list[float]  # one per optimizer step, from step 1
    cancelled: bool = False
    checkpoints: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    resumed_from: str | None = None


def learning_rate_at(config: TrainingConfig, step: int) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / (config.warmup_steps + 1)
    if config.lr_scheduler == "constant":
        return config.learning_rate
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.lr_scheduler == "linear":
        return config.learning_rate * (1.0 - progress)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def make_optimizer(config: TrainingConfig, params) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, config.optimizer)
    try:
        return cls(params, lr=config.learning_rate, **config.optimizer_args)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"optimizer {config.optimizer}({config.optimizer_args}): {e}") from None


class _Batches:
    """The batch stream: a shuffled walk over a sequence (new order each epoch) or step -> batch."""

    def __init__(self, data: Sequence | Callable[[int], Any], seed: int, shuffle: bool):
        self.function = data if callable(data) and not isinstance(data, Sequence) else None
        self.data = None if self.function else data
        if self.data is not None and len(self.data) == 0:
            raise AdapterError("no training data: the batch sequence is empty")
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.count = 0  # batches drawn so far
        self.order: torch.Tensor | None = None
        self.position = 0

    def next(self):
        if self.function is not None:
            batch = self.function(self.count)
        else:
            if self.order is None or self.position >= len(self.order):
                n = len(self.data)
                self.order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
                self.position = 0
            batch = self.data[int(self.order[self.position])]
            self.position += 1
        self.count += 1
        return batch

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors = {"data.generator": self.generator.get_state()}
        if self.order is not None:
            tensors["data.order"] = self.order.clone()
        return {"count": self.count, "position": self.position}, tensors

    def load(self, info: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.count, self.position = int(info["count"]), int(info["position"])
        self.generator.set_state(tensors["data.generator"])
        self.order = tensors.get("data.order")


def train(
    adapters: AdapterSet,
    loss_fn: Callable[[Any], torch.Tensor],
    data: Sequence | Callable[[int], Any],
    config: TrainingConfig | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    job: dict | None = None,
) -> TrainResult:
    """Train `adapters` until `config.max_steps` optimizer steps are done or `should_stop()`.

    `config` defaults to the one the adapters were made with. `progress` is called after every
    optimizer step. With `checkpoint_dir`, a checkpoint is written every `config.checkpoint_every`
    steps and when stopped early; `resume_from` continues from one (same structural options). `job`
    (JSON values) is stored in the checkpoints as it is, for the caller: what else a resume must agree on.
    Seeds the global torch RNG (or restores it from the checkpoint).
    """
    config = _checked_config(config or adapters.config, adapters)
    params = [p for p in adapters.parameters() if p.requires_grad]
    if not params:
        raise AdapterError("nothing to train: the adapter set has no trainable parameters")
    optimizer = make_optimizer(config, params)
    batches = _Batches(data, config.seed, config.shuffle)
    losses: list[float] = []
    step = 0
    if resume_from is not None:
        step, losses = load_checkpoint(resume_from, adapters, optimizer, batches, config)
    else:
        torch.manual_seed(config.seed)  # also seeds every CUDA device
    result = TrainResult(step, losses, resumed_from=os.fspath(resume_from) if resume_from else None)
    adapters.train()
    start = time.perf_counter()
    try:
        while step < config.max_steps:
            if should_stop is not None and should_stop():
                result.cancelled = True
                break
            lr = learning_rate_at(config, step)
            losses.append(_optimizer_step(optimizer, params, loss_fn, batches, config, lr, step))
            step += 1
            result.steps = step
            saved = None
            if checkpoint_dir is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                saved = save_checkpoint(checkpoint_dir, step, adapters, optimizer, batches, losses, config, job)
                result.checkpoints.append(saved)
            if progress is not None:
                progress(TrainProgress(step, config.max_steps, losses[-1], lr, time.perf_counter() - start, saved))
        if result.cancelled and checkpoint_dir is not None and step > 0:
            result.checkpoints.append(save_checkpoint(checkpoint_dir, step, adapters, optimizer, batches, losses, config, job))
    finally:
        adapters.eval()
        result.elapsed = time.perf_counter() - start
    return result


def _checked_config(config: TrainingConfig, adapters: AdapterSet) -> TrainingConfig:
    config = config.validate()
    for option in ADAPTER_OPTIONS:  # the adapters were built with these
        if getattr(config, option) != getattr(adapters.config, option):
            raise AdapterError(
                f"training option {option}={getattr(config, option)!r} differs from the adapters' "
                f"({getattr(adapters.config, option)!r}); inject the adapters with this config"
            )
    return config


def _optimizer_step(optimizer, params, loss_fn, batches, config: TrainingConfig, lr: float, step: int) -> float:
    """One optimizer step over `gradient_accumulation_steps` batches at learning rate `lr`; its mean loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    accumulation = config.gradient_accumulation_steps
    total = 0.0
    for _ in range(accumulation):
        loss = loss_fn(batches.next())
        value = float(loss.detach())
        if not math.isfinite(value):
            raise AdapterError(f"training diverged: the loss is {value} at step {step + 1} (lower the learning rate)")
        (loss / accumulation).backward()
        total += value
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / accumulation


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_path(checkpoint_dir: str | os.PathLike, step: int) -> str:
    return os.path.join(os.fspath(checkpoint_dir), f"checkpoint-{step:07d}.safetensors")


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    step: int,
    adapters: AdapterSet,
    optimizer: torch.optim.Optimizer,
    batches: _Batches,
    losses: list[float],
    config: TrainingConfig,
    job: dict | None = None,
) -> str:
    """Write checkpoint-<step>.safetensors atomically (replacing one of the same step)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in adapters.state_dict().items():
        tensors[f"adapter.{name}"] = value.detach().cpu().contiguous()
    state = optimizer.state_dict()
    other_state: dict[str, dict] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                other_state.setdefault(str(index), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    data_info, data_tensors = batches.state()
    tensors.update(data_tensors)
    info = {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "losses": losses,
        "config": config.to_dict(),
        "param_names": [name for name, p in adapters.named_parameters() if p.requires_grad],
        "optimizer": {"param_groups": state["param_groups"], "state": other_state},
        "data": data_info,
        "job": job or {},
    }
    path = checkpoint_path(checkpoint_dir, step)
    save_tensors(path, tensors, {CHECKPOINT_KEY: json.dumps(info)}, overwrite=True)
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(info, tensors) of a checkpoint; AdapterError if it is not one."""
    path = os.fspath(path)
    with SafetensorsReader(path) as reader:
        raw = reader.header.metadata.get(CHECKPOINT_KEY)
        if raw is None:
            raise AdapterError(f"{path}: not a comfyui-lycoris training checkpoint (no {CHECKPOINT_KEY} metadata)")
        info = json.loads(raw)
        if info.get("version") != CHECKPOINT_VERSION:
            raise AdapterError(f"{path}: checkpoint version {info.get('version')} is not {CHECKPOINT_VERSION}")
        tensors = {name: reader.get(name) for name in reader.header.tensors}
    return info, tensors


def load_checkpoint(
    path: str | os.PathLike,
    adapters: AdapterSet,
    optimizer: torch.optim.Optimizer,
    batches: _Batches,
    config: TrainingConfig,
) -> tuple[int, list[float]]:
    """Restore adapters, optimizer, RNG and batch order; returns (step, losses)."""
    path = os.fspath(path)
    info, tensors = read_checkpoint(path)
    saved = TrainingConfig.from_dict(info["config"])
    for option in STRUCTURAL_OPTIONS:
        if getattr(saved, option) != getattr(config, option):
            raise AdapterError(
                f"{path}: checkpoint was trained with {option}={getattr(saved, option)!r}, "
                f"this run has {getattr(config, option)!r}"
            )
    names = [name for name, p in adapters.named_parameters() if p.requires_grad]
    if names != info["param_names"]:
        missing = sorted(set(info["param_names"]) ^ set(names))[:3]
        raise AdapterError(f"{path}: checkpoint is for other layers than this model's ({', '.join(missing)} …)")
    adapter_state = {k[len("adapter.") :]: v for k, v in tensors.items() if k.startswith("adapter.")}
    try:
        adapters.load_state_dict(adapter_state)
    except RuntimeError as e:
        raise AdapterError(f"{path}: checkpoint does not fit the adapters ({str(e).splitlines()[0]})") from None

    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entries in info["optimizer"]["state"].items():
        state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": info["optimizer"]["param_groups"]})

    torch.set_rng_state(tensors["rng.cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    batches.load(info["data"], tensors)
    return int(info["step"]), [float(v) for v in info["losses"]]


def batch_schedule(samples: int, batch_size: int, seed: int):
    """step -> (step, sample indices): epochs in seeded random order, `batch_size` samples per step."""
    batch_size = min(batch_size, samples)

    @functools.lru_cache(maxsize=4)
    def order(epoch: int) -> list[int]:
        return torch.randperm(samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()

    def batch(step: int) -> tuple[int, list[int]]:
        positions = range(step * batch_size, (step + 1) * batch_size)
        return step, [order(p // samples)[p % samples] for p in positions]

    return batch
