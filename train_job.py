"""The `train` command: a LoHa/LoKr trained on a dataset folder (Save LyCORIS Dataset) for a diffusion-model
file that ComfyUI, used as a library, loads: its model classes, detection, fp8/quantized weights and
`model_sampling`. One process, or several under `torchrun` (data-parallel, lycoris_core/training/distributed.py).

    comfyui-lycoris train --model wan.safetensors --dataset data/ --out my_lokr.safetensors \\
        [--config train.toml] [--set rank=8 --set max_steps=500 ...] [--batch-size 4]
    torchrun --nproc_per_node 4 -m comfyui_lycoris train ...      (the same job on 4 GPUs)

Everything a run writes is written by rank 0, atomically: the adapter (a Musubi Tuner file) when the run is
complete, checkpoints (`checkpoint_every` steps, and when stopped), the loss chart (PNG). A checkpoint holds
the job's state, not a process's: N processes' checkpoint resumes on M (`--resume`).

For a program that starts this as a child process (a ComfyUI node), `--progress-file FILE` gets one JSON
object per line, written by rank 0 and flushed as it happens (`event` says which):

    {"event": "start", "step": 0, "steps": 1000, "processes": 2, "samples": 48, "resumed_from": null, ...}
    {"event": "step", "step": 1, "steps": 1000, "loss": 0.1234, "learning_rate": 0.0001, "elapsed": 2.1}
    {"event": "checkpoint", "step": 100, "path": ".../checkpoint-0000100.safetensors"}
    {"event": "done", "step": 1000, "out": "...", "plot": "...", "losses": [...]}
    {"event": "stopped", "step": 412, "checkpoint": "..."}          (SIGINT / SIGTERM: stops after the step)
    {"event": "error", "message": "..."}

The exit code is 0 when the adapter was written, 130 / 143 when stopped by SIGINT / SIGTERM (a checkpoint
kept), otherwise non-zero with one line on stderr that says what failed (and which rank, when one died).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from .lycoris_core.architectures import ARCHITECTURES
from .lycoris_core.detection import detect_model_architecture
from .lycoris_core.errors import AdapterError
from .lycoris_core.safetensors_io import atomic_output, check_output_path
from .lycoris_core.training.dataset import Dataset
from .lycoris_core.training.distributed import Ranks
from .lycoris_core.training.inject import inject_adapters
from .lycoris_core.training.loop import read_checkpoint, train
from .lycoris_core.training.musubi_file import save_musubi
from .lycoris_core.training.objective import batch_plan, denoising_loss
from .lycoris_core.training.options import job_options
from .lycoris_core.training.plot import loss_chart

COMMAND = "comfyui-lycoris train"


@dataclass
class TrainJob:
    model: str
    dataset: str
    out: str
    config: str | None = None
    assignments: list[str] = field(default_factory=list)
    batch_size: int | None = None
    comfyui: str | None = None
    device: str = "auto"
    weight_dtype: str = "default"
    checkpoint_dir: str | None = None
    resume: str | None = None  # a checkpoint file, or "latest" (the newest in checkpoint_dir)
    progress_file: str | None = None
    overwrite: bool = False
    quiet: bool = False

    @property
    def checkpoints(self) -> str:
        return self.checkpoint_dir or os.path.splitext(self.out)[0] + "_checkpoints"

    @property
    def plot(self) -> str:
        return os.path.splitext(self.out)[0] + "_loss.png"


class Quiet(Exception):
    """This rank failed, and another rank says why: exit with `code`, print nothing."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def run_train(job: TrainJob) -> int:
    """Run the job in this process (one of several under torchrun); the exit code. AdapterError: the one line to show."""
    ranks = Ranks.start(job.device)
    try:
        return _run(job, ranks)
    except Quiet as e:
        return e.code
    finally:
        ranks.close()


def _run(job: TrainJob, ranks: Ranks) -> int:
    progress = Progress(job.progress_file if ranks.main else None)
    try:
        return _train(job, ranks, progress)
    except AdapterError as e:
        progress.event("error", message=str(e))
        raise
    finally:
        progress.close()


def _train(job: TrainJob, ranks: Ranks, progress: Progress) -> int:
    setup = _agreed(job, ranks, lambda: _setup(job, ranks))
    config, batch_size, dataset, patcher, denoiser, resume, saved = setup
    from .nodes.denoiser import in_place_hint  # ComfyUI is importable now
    checkpoints = job.checkpoints if ranks.main else None
    adapters = None
    state = {"step": saved.get("step", 0)}
    try:
        with denoiser.loaded():
            _agreed(job, ranks, lambda: _check_fit(dataset, denoiser, job))
            adapters = inject_adapters(patcher.model.diffusion_model, config)
            loss_fn = ranks.data_parallel(adapters, denoising_loss(dataset, denoiser, config.seed))
            batches = batch_plan(len(dataset), batch_size, config.seed, ranks.rank, ranks.world)
            progress.event("start", step=state["step"], steps=config.max_steps, processes=ranks.world, samples=len(dataset),
                           batch_size=batch_size, resumed_from=resume, adapters=adapters.summary(), dataset=dataset.describe())
            bar = _bar(job, ranks, config, state["step"])

            def report(p) -> None:
                state["step"] = p.step
                progress.event("step", step=p.step, steps=p.total, loss=p.loss, learning_rate=p.learning_rate,
                               elapsed=round(p.elapsed, 3))
                if bar is not None:
                    bar.set_postfix(loss=f"{p.loss:.4g}", refresh=False)
                    bar.update(p.step - bar.n)
                if p.checkpoint:
                    progress.event("checkpoint", step=p.step, path=os.path.abspath(p.checkpoint))

            with _stop_on_signals(ranks) as stop:
                try:
                    result = train(adapters, loss_fn, batches, config, progress=report, should_stop=lambda: ranks.any(stop.signal is not None),
                                   checkpoint_dir=checkpoints, resume_from=resume,
                                   job={"batch_size": batch_size, "samples": len(dataset), "processes": ranks.world})
                except AdapterError:
                    if not ranks.main:  # every rank has it (the loss each one checks is the whole batch's): one says it
                        raise Quiet(2) from None
                    raise
                except RuntimeError as e:
                    hint = in_place_hint(e, config)  # every rank's model does it
                    if hint is not None and not ranks.main:
                        raise Quiet(2) from None
                    if hint is not None:
                        raise hint from None
                    if not ranks.distributed:
                        raise
                    _lost(job, ranks, f"during step {state['step'] + 1} of {config.max_steps}", e)
                finally:
                    if bar is not None:
                        bar.close()
    finally:
        if adapters is not None:
            adapters.remove()
        dataset.close()
    if not ranks.main:
        return 128 + stop.signal if result.cancelled else 0
    _plot(job, result.losses)
    if result.cancelled:
        where = os.path.abspath(result.checkpoints[-1]) if result.checkpoints else None
        progress.event("stopped", step=result.steps, checkpoint=where)
        print(f"{COMMAND}: stopped at step {result.steps} of {config.max_steps}"
              + (f"; checkpoint {where} (--resume continues from it)" if where else "; nothing was saved"), file=sys.stderr)
        return 128 + stop.signal
    save_musubi(job.out, adapters, steps=result.steps, overwrite=job.overwrite)
    progress.event("done", step=result.steps, out=os.path.abspath(job.out), plot=os.path.abspath(job.plot), losses=result.losses)
    first, last = result.losses[:10], result.losses[-10:]
    done = result.steps - saved.get("step", 0)
    print(f"trained {done} steps" + (f" after the {saved['step']} of {resume}" if resume else "")
          + f" ({ranks.world} process{'es' * (ranks.world > 1)}, batch {batch_size}) in {result.elapsed:.1f} s")
    if result.losses:
        print(f"loss {sum(first) / len(first):.4g} (first {len(first)} steps) -> {sum(last) / len(last):.4g} (last {len(last)})")
        print(f"loss chart {job.plot}")
    print(f"saved {job.out}")
    return 0


def _agreed(job: TrainJob, ranks: Ranks, work):
    """`work()` on every rank, then agree: if it failed on some rank, the first of them says why and all stop."""
    error, value = None, None
    try:
        value = work()
    except AdapterError as e:
        error = e
    try:
        failed = ranks.failed(error is not None)
    except RuntimeError as e:  # a rank ended (an error of its own, a signal): it said why, if it could
        _lost(job, ranks, "before training", e)
    if not failed:
        return value
    if ranks.rank == failed[0]:
        raise (AdapterError(f"rank {ranks.rank} of {ranks.world}: {error}") if ranks.distributed else error) from None
    raise Quiet(2)


def _setup(job: TrainJob, ranks: Ranks):
    """Everything checked before the model trains: options, dataset, outputs, the model, a checkpoint to resume."""
    config, batch_size = job_options(job.config, job.assignments)
    batch_size = job.batch_size or batch_size or 1
    dataset = Dataset.open(job.dataset)
    if batch_size < ranks.world or len(dataset) < ranks.world:
        raise AdapterError(f"{ranks.world} processes need a batch of at least {ranks.world} samples "
                           f"(batch size {batch_size}, {len(dataset)} samples in {job.dataset})")
    check_output_path(job.out, job.overwrite)
    resume, saved = _resume(job, batch_size, len(dataset))
    host_comfyui(job.comfyui, ranks.device)
    from .nodes.denoiser import ComfyDenoiser, load_model_file

    patcher = load_model_file(job.model, job.weight_dtype)
    if config.architecture is None:
        architecture = detect_model_architecture(patcher.model_state_dict().keys())
        if architecture is None:
            raise AdapterError(f"{job.model}: cannot tell the architecture from its weight names; "
                               f"--set architecture=… (one of {', '.join(ARCHITECTURES)})")
        config = config.replace(architecture=architecture).validate()
    return config, batch_size, dataset, patcher, ComfyDenoiser(patcher), resume, saved


def _resume(job: TrainJob, batch_size: int, samples: int) -> tuple[str | None, dict]:
    """(checkpoint to resume from, its record) or (None, {}); the job must agree with the checkpoint's."""
    if job.resume is None:
        return None, {}
    path = job.resume
    if path == "latest":
        found = sorted(n for n in os.listdir(job.checkpoints) if n.startswith("checkpoint-") and n.endswith(".safetensors")) \
            if os.path.isdir(job.checkpoints) else []
        if not found:
            raise AdapterError(f"--resume: no checkpoint in {job.checkpoints}")
        path = os.path.join(job.checkpoints, found[-1])
    info, _ = read_checkpoint(path)
    saved = info.get("job", {})
    for name, value in (("batch_size", batch_size), ("samples", samples)):
        if name in saved and saved[name] != value:
            what = {"batch_size": "global batch size", "samples": "dataset samples"}[name]
            raise AdapterError(f"{path}: checkpoint was trained with {what} {saved[name]}, this run has {value}")
    return path, {"step": int(info["step"]), **saved}


def _check_fit(dataset: Dataset, denoiser, job: TrainJob) -> None:
    """One sample of each latent size through the model, before any step: a dataset made for another model (other
    latent channels, other text encoder) fails here, with the sample named, not in the middle of training."""
    first_of: dict[tuple, int] = {}
    for i in range(len(dataset)):
        first_of.setdefault(dataset.latent_shape(i), i)
    for shape, i in first_of.items():
        caption = dataset.caption_of(i)
        sigma = torch.tensor([denoiser.model_sampling.percent_to_sigma(0.5)], device=denoiser.device)
        what = f"sample {i} (latent {list(shape)}, caption {caption} {list(dataset.caption_shape(caption) or [])})"
        try:
            with torch.no_grad():
                x0 = denoiser.latent_in(dataset.latent(i)[None].to(denoiser.device, torch.float32))
                out = denoiser(x0, sigma, dataset.caption(caption), x0)
        except (RuntimeError, ValueError, IndexError, KeyError, TypeError) as e:
            raise AdapterError(f"dataset {dataset.folder}: {what} does not fit the model {job.model} "
                               f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
        if tuple(out.shape) != tuple(x0.shape):
            raise AdapterError(f"dataset {dataset.folder}: the model {job.model} turns {what} into {list(out.shape[1:])}")


def _lost(job: TrainJob, ranks: Ranks, when: str, error: Exception):
    """A collective operation failed: say which rank ended, once (the lowest rank still running says it)."""
    gone = ranks.gone()
    alive = [r for r in range(ranks.world) if r not in gone]
    if gone and alive and ranks.rank != alive[0]:
        raise Quiet(1)
    found = sorted(n for n in os.listdir(job.checkpoints) if n.startswith("checkpoint-")) if os.path.isdir(job.checkpoints) else []
    kept = f"last checkpoint {os.path.join(job.checkpoints, found[-1])}" if found else "no checkpoint was written"
    if gone:
        who = " and ".join(ranks.name(r) for r in gone)
        raise AdapterError(f"{who} ended {when}; the job stopped, {job.out} was not written, {kept}")
    raise AdapterError(f"{ranks.name()} lost contact with the other ranks {when} "
                       f"({(str(error).splitlines() or [type(error).__name__])[0]}); {job.out} was not written, {kept}")


def _plot(job: TrainJob, losses: list[float]) -> None:
    if losses:
        with atomic_output(job.plot, overwrite=True) as temp:
            loss_chart(temp, {"loss": losses})


def _bar(job: TrainJob, ranks: Ranks, config, step: int):
    if job.quiet or not ranks.main:
        return None
    from tqdm import tqdm

    return tqdm(total=config.max_steps, initial=step, desc="train", unit="step", file=sys.stderr)


class Progress:
    """The JSON-lines progress file (rank 0 only; appended to, so a resumed run continues it)."""

    def __init__(self, path: str | None):
        self.file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 (closed by close())

    def event(self, kind: str, **fields) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class _Stop:
    signal: int | None = None


@contextlib.contextmanager
def _stop_on_signals(ranks: Ranks):
    """SIGINT and SIGTERM (Ctrl-C, kill, torchrun passing either on) stop the run after the step in progress, with a
    checkpoint; a second one stops at once."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame) -> None:
        if stop.signal is not None:
            raise KeyboardInterrupt
        stop.signal = signum
        if ranks.main and signum == signal.SIGINT:  # someone at the terminal (SIGTERM comes from programs)
            print(f"\n{COMMAND}: stopping after this step (again to stop at once)", file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# ComfyUI as a library


class _ComfyUIModules(importlib.abc.MetaPathFinder):
    """Imports ComfyUI's own top-level modules (comfy, comfy_extras, folder_paths, nodes, utils, ...) from its
    folder, ahead of anything else, as they resolve when ComfyUI's main.py runs from there; every other name
    goes to the usual finders, so nothing else in that folder can shadow an installed module."""

    def __init__(self, root: str):
        self.root = root
        self.names = {os.path.splitext(n)[0] for n in os.listdir(root)
                      if (n.endswith(".py") or os.path.isdir(os.path.join(root, n))) and os.path.splitext(n)[0].isidentifier()}

    def find_spec(self, fullname, path=None, target=None):
        if path is not None or fullname not in self.names:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [self.root])


def host_comfyui(path: str | None, device: torch.device) -> None:
    """Make ComfyUI importable from `path` (else COMFYUI_PATH, else where it already is) and set it up for
    `device`, before anything imports its model management. ComfyUI is imported by name here only: this is the
    command's way in; everything that uses ComfyUI is in nodes/."""
    root = path or os.environ.get("COMFYUI_PATH")
    if root:
        root = os.path.abspath(root)
        if not (os.path.isfile(os.path.join(root, "comfy", "model_patcher.py")) and os.path.isfile(os.path.join(root, "nodes.py"))):
            raise AdapterError(f"{root}: not a ComfyUI folder (no comfy/model_patcher.py and nodes.py)")
        loaded = sys.modules.get("comfy")
        if loaded is not None:
            places = [os.path.abspath(p) for p in getattr(loaded, "__path__", [])]
            if os.path.join(root, "comfy") not in places:
                raise AdapterError(f"another ComfyUI is already imported in this process ({', '.join(places)}), not {root}")
        elif not any(isinstance(f, _ComfyUIModules) and f.root == root for f in sys.meta_path):
            sys.meta_path.insert(0, _ComfyUIModules(root))
    elif importlib.util.find_spec("comfy") is None:
        raise AdapterError("ComfyUI not found: pass --comfyui PATH (the ComfyUI folder) or set COMFYUI_PATH")
    try:
        cli_args = importlib.import_module("comfy.cli_args")
    except ImportError as e:
        raise AdapterError(f"ComfyUI cannot be imported with {sys.executable} ({e}); use the Python that runs ComfyUI") from None
    if "comfy.model_management" not in sys.modules:  # it picks its device once, when imported
        cli_args.args.cpu = device.type == "cpu"
