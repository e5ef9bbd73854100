"""LycorisTrain, LycorisSave, LycorisApply: train a LoHa/LoKr inside ComfyUI, save it as Musubi Tuner (or
Diffusers) would, or apply it to a model without saving.

The training node only translates: the layers, names and math are the core's (`inject_adapters`), the loop
and the denoising objective are the core's (`train`, `objective.denoising_loss`), ComfyUI's side of a step is
`denoiser.ComfyDenoiser` (shared with the `train` command). What it adds is a deep copy of the model to train
on, made the way ComfyUI's own TrainLoraNode makes it (the input model is never touched).
"""

from __future__ import annotations

import copy
import inspect
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..convert import convert_file
from ..convert.converter import DIFFUSERS_PREFIXES
from ..lycoris_core.architectures import SUPPORTED, describe_architecture
from ..lycoris_core.detection import detect_model_architecture
from ..lycoris_core.errors import AdapterError
from ..lycoris_core.finite import check_strength
from ..lycoris_core.loading import load_report, load_tensors
from ..lycoris_core.training import AdapterSet, TrainingConfig, inject_adapters, save_musubi, train
from ..lycoris_core.training.config import ALGORITHMS, SAVE_DTYPES, UNSUPPORTED_OPTIMIZERS, split_patterns
from ..lycoris_core.training.data import Samples, training_data
from ..lycoris_core.training.objective import batch_plan, denoising_loss
from ..lycoris_core.training.plot import loss_chart_pixels
from .common import ADVANCED, FIXED_SEED, load_summary, show_text, showing_failures
from .denoiser import ComfyDenoiser, in_place_hint
from .outputs import listed_name, numbered_output
from .patches import apply_plan, plan_on_model

CATEGORY = "training/lycoris"
ADAPTER = io.Custom("LYCORIS_ADAPTER")
ARCHITECTURES = ["auto", *(a.id for a in SUPPORTED)]
OPTIMIZERS = ["AdamW", *sorted(
    name for name, cls in vars(torch.optim).items()
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    and name not in (*UNSUPPORTED_OPTIMIZERS, "AdamW")
)]
CHART_SIZE = (640, 400)


@dataclass(frozen=True)
class TrainedAdapter:
    """What a LYCORIS_ADAPTER socket carries: the trained adapters (frozen, on the CPU, off any model) and
    the run's record. Nodes downstream read it and never change it (ComfyUI may reuse a cached output)."""

    adapters: AdapterSet
    steps: int
    losses: tuple[float, ...]

    @property
    def config(self) -> TrainingConfig:
        return self.adapters.config


# ---------------------------------------------------------------------------------------------
# LycorisTrain


def training_copy(model):
    """A deep copy of the ModelPatcher to train on (the input model is never touched), rebuilt the way
    ComfyUI's TrainLoraNode does it; also makes its weights ordinary (non-inference) tensors."""
    if "force_deepcopy" not in inspect.signature(model.clone).parameters:
        return _copied_model(model)
    if getattr(model, "cached_patcher_init", None) is None:
        raise AdapterError("this MODEL cannot be copied for training (its loader did not record how to rebuild it); "
                           "load it with ComfyUI's Load Diffusion Model / Load Checkpoint node")
    return model.clone(force_deepcopy=True)


def _copied_model(model):
    """The training copy where ComfyUI's ModelPatcher cannot rebuild its model (0.3.64: no clone(force_deepcopy),
    no cached_patcher_init; its TrainLoraNode trains on the shared model): a clone holding a deep copy of the
    torch model. Every model is unloaded first, so the copy takes the base weights, not weights some loaded
    clone has patched in place; copied outside inference mode, they are ordinary tensors."""
    comfy.model_management.unload_all_models()
    copied = model.clone()
    with torch.inference_mode(False):
        copied.model = copy.deepcopy(model.model)
    copied.backup, copied.object_patches_backup = {}, {}  # clone() shares these with the input model
    return copied


def run_training(model, samples: Samples, config: TrainingConfig, batch_size: int, progress=None, should_stop=None):
    """Train adapters on a copy of `model`; (TrainedAdapter, core TrainResult). The copy is dropped."""
    mp = training_copy(model)
    adapters = inject_adapters(mp.model.diffusion_model, config)
    denoiser = ComfyDenoiser(mp)
    try:
        adapters.to(denoiser.device)
        with denoiser.loaded():
            loss_fn = denoising_loss(samples, denoiser, config.seed)
            batches = batch_plan(len(samples), batch_size, config.seed)
            result = train(adapters, loss_fn, batches, config, progress=progress, should_stop=should_stop)
    except RuntimeError as e:
        hint = in_place_hint(e, config)
        if hint is None:
            raise
        raise hint from None
    finally:
        adapters.remove()
    adapters.requires_grad_(False).to("cpu")
    return TrainedAdapter(adapters, result.steps, tuple(result.losses)), result


def loss_image(losses) -> torch.Tensor:
    """The loss chart as a ComfyUI IMAGE: float [1, H, W, 3] in 0..1."""
    width, height = CHART_SIZE
    pixels = loss_chart_pixels({"loss": list(losses)}, width, height)
    return torch.frombuffer(pixels, dtype=torch.uint8).reshape(1, height, width, 3).float() / 255.0


class LycorisTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisTrain",
            display_name="Train LyCORIS",
            category=CATEGORY,
            description="Trains a LoHa or LoKr on latents and their conditioning, on the layers Musubi Tuner trains "
            "and under its names, so the result saves as the file Musubi would write. The input model is not changed.",
            is_input_list=True,  # the dataset nodes send lists of latents and conditionings, as to TrainLoraNode
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to train on (left unchanged: training runs on "
                               "a copy)."),
                io.Latent.Input("latents", tooltip="The training images/videos as latents; every batch item is one "
                                "sample (sizes may differ, e.g. Resolution Bucket's batches)."),
                io.Conditioning.Input("positive", tooltip="Their captions: one conditioning for all latents, or one "
                                      "per latent (in order)."),
                io.Combo.Input("algorithm", options=list(ALGORITHMS), default="lokr",
                               tooltip="lokr: Musubi networks.lokr (Kronecker product). loha: Musubi networks.loha "
                               "(Hadamard product of two low-rank pairs)."),
                io.Int.Input("rank", default=16, min=1, max=1024,
                             tooltip="Musubi network_dim. LoKr: rank of the second factor (stored full, scale 1, when "
                             "rank ≥ half its size)."),
                io.Float.Input("alpha", default=1.0, min=0.0, max=10000.0, step=0.01,
                               tooltip="Musubi network_alpha: scale = alpha / rank (0 means alpha = rank)."),
                io.Int.Input("factor", default=-1, min=-1, max=4096,
                             tooltip="LoKr only: the Kronecker factor (-1 = as balanced as possible; 0 is invalid)."),
                io.Int.Input("steps", default=100, min=1, max=1000000, tooltip="Optimizer steps to train."),
                io.Float.Input("learning_rate", default=0.0005, min=0.0000001, max=1.0, step=0.0000001,
                               tooltip="Learning rate after the warmup (constant)."),
                io.Combo.Input("optimizer", options=OPTIMIZERS, default="AdamW",
                               tooltip="A torch.optim optimizer, with its default settings."),
                io.Int.Input("batch_size", default=1, min=1, max=10000,
                             tooltip="Samples per step (at most the number of latents)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, **FIXED_SEED,
                             tooltip="Seeds the adapter's initialisation, the sample order, the noise and the dropout."),
                io.Int.Input("warmup_steps", default=0, min=0, max=1000000,
                             tooltip="Steps of linear learning-rate warmup from 0."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute each block in the backward pass: much less memory, about 30% "
                                 "slower. Flux needs it on."),
                io.Combo.Input("architecture", options=ARCHITECTURES, default="auto",
                               tooltip="The model family: picks the blocks and layers Musubi trains, its default "
                               "excludes and the names in the file. 'auto' reads it from the model."),
                io.Float.Input("rank_dropout", default=0.0, min=0.0, max=0.99, step=0.01, **ADVANCED,
                               tooltip="Probability of dropping each output row of the change per step (Musubi "
                               "rank_dropout)."),
                io.Float.Input("module_dropout", default=0.0, min=0.0, max=0.99, step=0.01, **ADVANCED,
                               tooltip="Probability of skipping a whole adapted layer per step (Musubi module_dropout)."),
                io.String.Input("include", default="", multiline=True, **ADVANCED,
                                tooltip="Regexes (one per line or comma-separated) fullmatched on Musubi module paths, "
                                "e.g. blocks\\.0\\..*: re-admit layers an exclude removed (they never narrow the set)."),
                io.String.Input("exclude", default="", multiline=True, **ADVANCED,
                                tooltip="Regexes (one per line or comma-separated) fullmatched on Musubi module paths, "
                                "added to the architecture's default excludes, e.g. .*cross_attn.*"),
            ],
            outputs=[
                ADAPTER.Output(display_name="adapter", tooltip="The trained adapter: save it with Save LyCORIS, or "
                               "try it with Apply LyCORIS."),
                io.Image.Output(display_name="loss", tooltip="The loss per step (log scale)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latents, positive, algorithm, rank, alpha, factor, steps, learning_rate, optimizer,
                batch_size, seed, warmup_steps, gradient_checkpointing, architecture, rank_dropout, module_dropout,
                include, exclude) -> io.NodeOutput:
        # is_input_list: every input arrives as a list; latents and positive are the data, the rest one value each.
        (model, algorithm, rank, alpha, factor, steps, learning_rate, optimizer, batch_size, seed, warmup_steps,
         gradient_checkpointing, architecture, rank_dropout, module_dropout, include, exclude) = (
            v[0] for v in (model, algorithm, rank, alpha, factor, steps, learning_rate, optimizer, batch_size, seed,
                           warmup_steps, gradient_checkpointing, architecture, rank_dropout, module_dropout, include,
                           exclude))
        with showing_failures(cls):
            if architecture == "auto":
                architecture = detect_model_architecture(model.model_state_dict().keys())
                if architecture is None:
                    raise AdapterError("cannot tell this model's architecture from its weight names; choose one of "
                                       + ", ".join(ARCHITECTURES[1:]))
            config = TrainingConfig(
                algorithm=algorithm, rank=rank, alpha=alpha, factor=factor, rank_dropout=rank_dropout,
                module_dropout=module_dropout, architecture=architecture, include=split_patterns(include),
                exclude=split_patterns(exclude), optimizer=optimizer, learning_rate=learning_rate,
                warmup_steps=warmup_steps, max_steps=steps, gradient_checkpointing=gradient_checkpointing, seed=seed,
            ).validate()
            trained = cls._train(model, latents, positive, config, batch_size)
            image = loss_image(trained.losses)
        return io.NodeOutput(trained, image, ui=ui.PreviewImage(image, cls=cls))

    @classmethod
    def _train(cls, model, latents, positive, config: TrainingConfig, batch_size: int) -> TrainedAdapter:
        """Run the core's training with ComfyUI's progress bar and Cancel; the node shows the summary."""
        bar = comfy.utils.ProgressBar(config.max_steps)

        def progress(p) -> None:
            bar.update_absolute(p.step, p.total)
            show_text(cls, f"step {p.step}/{p.total}  loss {p.loss:.4g}")

        start = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            samples = training_data(latents, positive)
            trained, result = run_training(model, samples, config, batch_size, progress,
                                           comfy.model_management.processing_interrupted)
        if result.cancelled:  # ComfyUI's Cancel: stop the prompt, as every node does on an interrupt
            comfy.model_management.interrupt_current_processing(False)
            raise comfy.model_management.InterruptProcessingException()
        losses = trained.losses
        show_text(cls, "\n".join([
            f"trained {trained.steps} steps in {time.perf_counter() - start:.1f} s",
            f"on {describe_architecture(config.architecture)}", trained.adapters.summary(),
            f"loss {statistics.fmean(losses[:10]):.4g} (first 10 steps)", f"-> {statistics.fmean(losses[-10:]):.4g} (last 10)"]))
        return trained


# ---------------------------------------------------------------------------------------------
# LycorisSave

FORMATS = ["musubi", "diffusers"]


def save_adapter(trained: TrainedAdapter, path: str, file_format: str, prefix: str, save_dtype: str) -> str:
    """Write `trained` at `path` (never replacing a file) as Musubi writes it, or as the converter's
    Diffusers layout of that Musubi file. Returns a one-line description."""
    dtype = SAVE_DTYPES[save_dtype]
    if file_format == "musubi":
        save_musubi(path, trained.adapters, steps=trained.steps, dtype=dtype)
        return f"Musubi layout, {save_dtype}"
    title = os.path.splitext(os.path.basename(path))[0]
    with tempfile.TemporaryDirectory() as folder:  # the Musubi file the Diffusers copy is converted from
        musubi = os.path.join(folder, f"{title}.safetensors")
        save_musubi(musubi, trained.adapters, steps=trained.steps, dtype=dtype)
        convert_file(musubi, path, "diffusers", prefix=prefix, arch=trained.config.architecture)
    return f"Diffusers layout ({prefix}.), {save_dtype}"


class LycorisSave(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisSave",
            display_name="Save LyCORIS",
            category=CATEGORY,
            description="Saves a trained adapter into output/loras (listed by the LoRA loaders) as Musubi Tuner writes "
            "it (keys, alphas, ss_* metadata), or in the Diffusers layout. Never replaces a file.",
            inputs=[
                ADAPTER.Input("adapter", tooltip="The adapter from Train LyCORIS."),
                io.String.Input("filename_prefix", default="lycoris/ComfyUI_lycoris",
                                tooltip="File name inside output/loras (subfolders allowed); a counter is appended: "
                                "<prefix>_00001_.safetensors."),
                io.Combo.Input("format", options=FORMATS, default="musubi",
                               tooltip="musubi: lora_unet_ keys, what Musubi Tuner and this pack's loaders read. "
                               "diffusers: <prefix>.<module path> keys (Musubi's convert_lora.py --target other)."),
                io.Combo.Input("prefix", options=list(DIFFUSERS_PREFIXES), default=DIFFUSERS_PREFIXES[0],
                               tooltip="Key prefix of the diffusers format (ignored for musubi)."),
                io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="float32",
                               tooltip="dtype of every tensor in the file (Musubi --save_precision)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The file written (absolute path).")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, adapter, filename_prefix="lycoris/ComfyUI_lycoris", format="musubi",
                prefix=DIFFUSERS_PREFIXES[0], save_dtype="float32") -> io.NodeOutput:
        with showing_failures(cls):
            path = numbered_output(filename_prefix)
            what = save_adapter(adapter, path, format, prefix, save_dtype)
        modules = len(adapter.adapters.adapters)
        text = f"saved {listed_name(path)} in output/loras: {what}, {modules} modules, {adapter.steps} steps"
        show_text(cls, f"saved {listed_name(path)}\nin output/loras, {what}\n{modules} modules, {adapter.steps} steps")
        return io.NodeOutput(path, ui=ui.PreviewText(text))


# ---------------------------------------------------------------------------------------------
# LycorisApply


class LycorisApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisApply",
            display_name="Apply LyCORIS (trained)",
            category=CATEGORY,
            description="Applies a trained adapter to a model without saving it, exactly as loading the saved file "
            "would, to preview it.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the adapter to (the one it was "
                               "trained on)."),
                ADAPTER.Input("adapter", tooltip="The adapter from Train LyCORIS."),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly to apply the adapter: W + strength·scale·ΔW. Negative values "
                               "subtract it."),
                io.Combo.Input("mode", options=["patch", "bypass"], default="patch",
                               tooltip="patch: merge into the weights when ComfyUI loads the model. bypass: add the "
                               "adapter in each layer's forward pass, weights untouched."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the adapter applied."),
                io.String.Output(display_name="report", tooltip="What was applied."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, adapter, strength=1.0, mode="patch") -> io.NodeOutput:
        with showing_failures(cls):
            strength = check_strength(strength, "the trained adapter")
            snapshot = adapter.adapters.to_adapter_file(name=f"trained adapter ({adapter.steps} steps)")
            plan = plan_on_model(snapshot, model, adapter.config.architecture or "auto")
            notes = ["strength 0: the adapter was checked against the model, nothing was applied"]
            if strength != 0:
                model, notes = apply_plan(model, plan, load_tensors(plan), strength, mode)
        report = load_report(plan, strength, mode, notes=notes)
        show_text(cls, load_summary(report))
        return io.NodeOutput(model, report, ui=ui.PreviewText(report))
