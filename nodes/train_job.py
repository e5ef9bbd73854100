"""LycorisTrainJob: the `train` command (train_job.py) started from ComfyUI as a child job, on a dataset folder that
Save LyCORIS Dataset wrote: one process, or `torchrun` with several (one per GPU; on the CPU, gloo).

The node only translates: its inputs become the command's options (`--set FIELD=VALUE`), the command's progress becomes
ComfyUI's progress bar and the text on the node, ComfyUI's Cancel becomes a stop (the command ends after the step in
progress and keeps a checkpoint), and the command's one-line error becomes the node's error. Starting and following the
job is lycoris_core/training/launch.py.

`execute` is a coroutine: ComfyUI's executor awaits it as a task, so while the job trains the executor's event loop is
free (nodes of the same prompt that do not need the adapter run meanwhile) and this process does no work of its own
(the server answers at once: the training is in other processes). ComfyUI still runs one prompt at a time: prompts
queued behind this one start when the job ends.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..lycoris_core.errors import AdapterError
from ..lycoris_core.training.config import split_patterns
from ..lycoris_core.training.launch import PROGRESS_FILE, Outcome, job_command, option_lines, option_text, pack_installed, run_job
from ..lycoris_core.training.options import job_options
from .common import ADAPTER_FOLDER, ADVANCED, show_text, showing_failures
from .dataset import DATASET_FOLDER, dataset_path, datasets_folder
from .denoiser import WEIGHT_DTYPES
from .outputs import MODEL_FOLDER, listed_name, numbered_output, output_loras_folder
from .training import CATEGORY, LycorisTrain, loss_image

CHECKPOINT_FOLDER = "lycoris_checkpoints"  # inside ComfyUI's output folder, not a models folder: no loader lists them
# LycorisTrain's inputs that the job takes too (same names, defaults and tooltips); `steps` is max_steps.
TRAINING_INPUTS = ("algorithm", "rank", "alpha", "factor", "steps", "learning_rate", "optimizer", "batch_size", "seed",
                   "warmup_steps", "gradient_checkpointing", "architecture", "rank_dropout", "module_dropout", "include",
                   "exclude")
OPTION_NAMES = {"steps": "max_steps"}  # input name -> training option name, where they differ


def training_assignments(values: dict, options: str) -> list[str]:
    """FIELD=VALUE for every training widget (architecture only when not `auto`), then the `options` lines, which
    override them."""
    assignments = []
    for name, value in values.items():
        if name == "architecture" and value == "auto":
            continue  # the command reads it from the model file
        if name in ("include", "exclude"):
            value = split_patterns(value)  # as Train LyCORIS reads them
        assignments.append(f"{OPTION_NAMES.get(name, name)}={option_text(value)}")
    return assignments + option_lines(options)


# ---------------------------------------------------------------------------------------------
# Where things are


def comfyui_root() -> str:
    """The folder ComfyUI runs from (its comfy/ and nodes.py), for the child's COMFYUI_PATH."""
    return os.path.dirname(os.path.abspath(folder_paths.__file__))


def _inside(root: str, text: str, what: str, where: str) -> str:
    path = os.path.abspath(text if os.path.isabs(text) else os.path.join(root, text))
    if "\0" in text or os.path.commonpath([root, path]) != root or path == root:
        raise AdapterError(f"{what} {text!r} must be inside output/{where}")
    return path


def dataset_folder(text: str) -> str:
    """The dataset: a name inside output/datasets, or the path Save LyCORIS Dataset returns."""
    text = text.strip()
    path = _inside(datasets_folder(), text, "dataset", DATASET_FOLDER) if os.path.isabs(text) else dataset_path(text)
    if not os.path.isfile(os.path.join(path, "dataset.json")):
        raise AdapterError(f"dataset {text!r}: no dataset saved there (output/{DATASET_FOLDER} holds what Save LyCORIS "
                           "Dataset writes)")
    return path


def checkpoints_folder() -> str:
    return os.path.abspath(os.path.join(folder_paths.get_output_directory(), CHECKPOINT_FOLDER))


def checkpoint_dir_for(out: str) -> str:
    """output/lycoris_checkpoints/<the output's name inside output/loras, without .safetensors>."""
    return os.path.join(checkpoints_folder(), os.path.splitext(listed_name(out))[0])


def resume_arguments(text: str) -> list[str]:
    """`--resume` and `--checkpoint-dir` for `resume_from`: a checkpoint file, or a folder (its newest checkpoint),
    inside output/lycoris_checkpoints; the resumed job writes its checkpoints next to it."""
    path = _inside(checkpoints_folder(), text.strip(), "resume_from", CHECKPOINT_FOLDER)
    if os.path.isdir(path):
        return ["--resume", "latest", "--checkpoint-dir", path]
    if not os.path.isfile(path):
        raise AdapterError(f"resume_from {text.strip()!r}: no such checkpoint in output/{CHECKPOINT_FOLDER}")
    return ["--resume", path, "--checkpoint-dir", os.path.dirname(path)]


# ---------------------------------------------------------------------------------------------
# The node


def _forget_lora_list() -> None:
    """ComfyUI caches folder listings and notices a new file by its folder's mtime, which a file system may keep
    for a second or more: drop the cached list so the loaders list the new adapter now."""
    folder_paths.filename_list_cache.pop(ADAPTER_FOLDER, None)


class LycorisTrainJob(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        training = {i.id: i for i in LycorisTrain.define_schema().inputs}
        return io.Schema(
            node_id="LycorisTrainJob",
            display_name="Train LyCORIS (job)",
            category=CATEGORY,
            description="Trains a LoHa or LoKr on a dataset saved with Save LyCORIS Dataset, outside this process: the "
            "comfyui-lycoris train command, on several GPUs when processes > 1 (torchrun, DistributedDataParallel). "
            "Progress shows here; Cancel stops it after the step in progress and keeps a checkpoint. The adapter is "
            "written into output/loras, which the LoRA loaders list.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list(MODEL_FOLDER),
                               tooltip="The diffusion model to train on (models/diffusion_models), as Load Diffusion "
                               "Model loads it."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="The dtype the base model's weights are loaded in (fp8 saves memory), as Load "
                               "Diffusion Model's weight_dtype."),
                io.String.Input("dataset", default="lycoris_dataset",
                                tooltip="The dataset: its name in output/datasets, or connect Save LyCORIS Dataset's "
                                "path output."),
                io.Int.Input("processes", default=1, min=1, max=1024,
                             tooltip="Training processes, one per GPU (torchrun when above 1; on the CPU, processes "
                             "that share the cores). The batch must hold at least one sample per process."),
                *(training[name] for name in TRAINING_INPUTS),
                io.String.Input("filename_prefix", default="lycoris/trained",
                                tooltip="File name inside output/loras (subfolders allowed); a counter is appended: "
                                "<prefix>_00001_.safetensors."),
                io.Int.Input("checkpoint_every", default=0, min=0, max=1000000, **ADVANCED,
                             tooltip="Write a resumable checkpoint every N steps into output/lycoris_checkpoints "
                             "(0: only when cancelled)."),
                io.String.Input("options", default="", multiline=True, **ADVANCED,
                                tooltip="More training options, one FIELD=VALUE per line, after (and over) the inputs "
                                "above, e.g. lr_scheduler=\"cosine\", save_dtype=\"bfloat16\", "
                                "optimizer_args={weight_decay = 0.01}."),
                io.String.Input("resume_from", default="", **ADVANCED,
                                tooltip="Continue a cancelled job: its checkpoint file or folder in "
                                "output/lycoris_checkpoints (the node shows it when cancelled). Empty: a new job."),
            ],
            outputs=[
                io.String.Output(display_name="lora_name", tooltip="The trained file as the LoRA loaders list it "
                                 "(in output/loras)."),
                io.Image.Output(display_name="loss", tooltip="The loss per step (log scale)."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    async def execute(cls, unet_name, weight_dtype, dataset, processes, algorithm, rank, alpha, factor, steps,
                      learning_rate, optimizer, batch_size, seed, warmup_steps, gradient_checkpointing, architecture,
                      rank_dropout, module_dropout, include, exclude, filename_prefix="lycoris/trained",
                      checkpoint_every=0, options="", resume_from="") -> io.NodeOutput:
        values = dict(algorithm=algorithm, rank=rank, alpha=alpha, factor=factor, steps=steps, learning_rate=learning_rate,
                      optimizer=optimizer, batch_size=batch_size, seed=seed, warmup_steps=warmup_steps,
                      gradient_checkpointing=gradient_checkpointing, architecture=architecture, rank_dropout=rank_dropout,
                      module_dropout=module_dropout, include=include, exclude=exclude, checkpoint_every=checkpoint_every)
        start = time.perf_counter()
        with showing_failures(cls):
            assignments = training_assignments(values, options)
            config, batch = job_options(None, assignments)  # a bad option fails here, before anything starts
            if (batch or 1) < processes:
                raise AdapterError(f"{processes} processes need a batch of at least {processes} samples (batch size {batch or 1})")
            model = folder_paths.get_full_path_or_raise(MODEL_FOLDER, unet_name)
            data = dataset_folder(dataset)
            device = cls._device(processes)
            out = numbered_output(filename_prefix)
            resume = resume_arguments(resume_from) if resume_from.strip() else ["--checkpoint-dir", checkpoint_dir_for(out)]
            args = ["--model", model, "--dataset", data, "--out", out, "--weight-dtype", weight_dtype, "--device", device,
                    "--quiet", *resume]
            for assignment in assignments:
                args += ["--set", assignment]
            outcome = await cls._run(processes, args, config.max_steps)
            done = outcome.last("done") if outcome.code == 0 else None
            cancelled = outcome.stopped and done is None  # a job that ended anyway has its file: kept
            if not cancelled and outcome.code != 0:
                raise AdapterError(outcome.error())
            if not cancelled and done is None:
                raise AdapterError(f"the train command ended without saying what it wrote ({out} expected)")
        if cancelled:
            stopped = outcome.last("stopped") or {}
            where = stopped.get("checkpoint")
            kept = (f"; checkpoint output/{os.path.relpath(where, folder_paths.get_output_directory())} "
                    f"(resume_from continues it)") if where else "; nothing was saved"
            show_text(cls, f"cancelled at step {stopped.get('step', 0)} of {config.max_steps}{kept}")
            comfy.model_management.throw_exception_if_processing_interrupted()  # consumes the interrupt, as nodes do
            raise comfy.model_management.InterruptProcessingException()
        _forget_lora_list()
        name = listed_name(out)
        losses = done["losses"]
        image = loss_image(losses)
        lines = [f"trained {done['step']} steps on {processes} process{'es' * (processes > 1)} in {time.perf_counter() - start:.1f} s"]
        if losses:
            first, last = losses[:10], losses[-10:]
            lines.append(f"loss {statistics.fmean(first):.4g} (first {len(first)}) -> {statistics.fmean(last):.4g} (last {len(last)})")
        lines.append(f"saved {name} in output/loras")
        show_text(cls, "\n".join(lines))
        return io.NodeOutput(name, image, ui=ui.PreviewImage(image, cls=cls))

    @classmethod
    def _device(cls, processes: int) -> str:
        """The job's device: ComfyUI's (a GPU per process), else the CPU. ComfyUI's models leave the GPU first."""
        if comfy.model_management.get_torch_device().type != "cuda":
            return "cpu"
        if processes > torch.cuda.device_count():
            raise AdapterError(f"{processes} processes need {processes} GPUs; torch sees {torch.cuda.device_count()}")
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        return "cuda"

    @classmethod
    async def _run(cls, processes: int, args: list[str], steps: int) -> Outcome:
        bar = comfy.utils.ProgressBar(steps)
        env = dict(os.environ, COMFYUI_PATH=comfyui_root(), PYTHONUNBUFFERED="1")
        what = f"{processes} process{'es' * (processes > 1)}"
        show_text(cls, f"starting the job ({what})")

        def on_event(event: dict) -> None:
            if event["event"] == "start":
                bar.update_absolute(event["step"], steps)
                show_text(cls, f"training on {what}: {event.get('adapters', '')}\nstep {event['step']}/{steps}")
            elif event["event"] == "step":
                bar.update_absolute(event["step"], steps)
                show_text(cls, f"step {event['step']}/{steps}  loss {event['loss']:.4g}  ({what})")

        output_loras_folder()  # output/loras exists and is listed before the file appears in it
        with tempfile.TemporaryDirectory(prefix="lycoris_train_job_") as work:
            command = job_command(processes, [*args, "--progress-file", os.path.join(work, PROGRESS_FILE)], pack_installed())
            return await run_job(command, env, work, on_event, comfy.model_management.processing_interrupted)
