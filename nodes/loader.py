"""LycorisLoaderModelOnly and LycorisLoader: apply an adapter file to a MODEL (and a CLIP)."""

from __future__ import annotations

import comfy.supported_models
import comfy.utils
from comfy_api.latest import io, ui

from ..lycoris_core.architectures import SUPPORTED, describe_architecture
from ..lycoris_core.errors import AdapterError
from ..lycoris_core.experts import select_expert
from ..lycoris_core.finite import check_strength
from ..lycoris_core.loading import load_report, load_tensors, read_adapter_cached
from ..lycoris_core.naming import is_text_encoder_stem
from .common import (
    CATEGORY,
    adapter_fingerprint,
    adapter_name_input,
    adapter_path,
    load_summary,
    lokr_full_matrix_alpha_input,
    show_text,
    showing_failures,
)
from .patches import apply_plan, delegate_text_encoder, plan_on_model

ARCHITECTURES = ["auto", *(a.id for a in SUPPORTED)]
MODES = ["patch", "bypass"]
STRENGTH = dict(default=1.0, min=-100.0, max=100.0, step=0.01)
MODEL_OUT = "The model with the adapter applied."
REPORT_OUT = "What was applied: format, architecture, counts, unmatched modules."
# The comfy.supported_models class of ComfyUI's model for each architecture (FramePack has none). Releases
# before an architecture's class cannot load its models: a file for it then meets another model.
COMFYUI_MODELS = {
    "wan": "WAN21_T2V", "hunyuan_video": "HunyuanVideo", "hunyuan_video_1_5": "HunyuanVideo15", "flux": "Flux",
    "flux2": "Flux2", "qwen_image": "QwenImage", "z_image": "ZImage",
}


def architecture_input() -> io.Combo.Input:
    return io.Combo.Input(
        "architecture", options=ARCHITECTURES, default="auto",
        tooltip="The model family the file is for. 'auto' reads it from the file's keys and the model's weight "
        "names; an explicit id must agree with the model. A file for another model is an error, never ignored.",
    )


def _shared_inputs() -> list:
    return [
        architecture_input(),
        io.Combo.Input(
            "mode", options=MODES, default="patch",
            tooltip="patch: merge into the weights when ComfyUI loads the model (fastest sampling). bypass: leave the "
            "weights alone and add the adapter in each layer's forward pass, for fp8/quantized or offloaded weights.",
        ),
        lokr_full_matrix_alpha_input(),
    ]


def block_weights_input(applies_to: str = "the adapter", name: str = "block_weights") -> io.String.Input:
    return io.String.Input(
        name, default="", multiline=True, optional=True,
        tooltip=f"Optional per-block strength multipliers for {applies_to} (empty: 1 everywhere). A preset (all, none, attn_only, "
        "ffn_only, first_half, second_half; double_only, single_only where the model has both); or one number per "
        "block in the model's order, comma-separated; or pattern=value entries, one per line or comma-separated, "
        "later ones winning: double_blocks.0-9=0.5, single_blocks=0, attn=1, blocks.10-19.ffn=0. Layers outside the "
        "blocks keep 1. The report lists the multiplier of every block.",
    )


def _comfyui_version() -> str:
    try:
        from comfyui_version import __version__  # a module in ComfyUI's root folder (releases before it have none)
    except ImportError:
        return "unknown"
    return __version__


def plan_for_comfyui(adapter, model, architecture: str, block_weights: str):
    """The plan on `model`. Where it fails and the file (or the asked architecture) is for a model this ComfyUI
    release has no class for, the error says so: that, not the model at hand, is what the user has to change."""
    try:
        return plan_on_model(adapter, model, architecture, block_weights)
    except AdapterError as e:
        wanted = adapter.architecture if architecture == "auto" else architecture
        name = COMFYUI_MODELS.get(wanted)
        if name is None or hasattr(comfy.supported_models, name):
            raise
        raise AdapterError(f"{e}; this ComfyUI ({_comfyui_version()}) has no {describe_architecture(wanted)} model "
                           f"(comfy.supported_models.{name}): a newer ComfyUI is needed") from e


def _load(model, clip, lora_name, strength_model, strength_clip, architecture, mode, lokr_full_matrix_alpha, block_weights,
          expert=None):
    """(model, clip, report): plan against the model's weight names, then patch or hook. Raises on any problem.
    `expert`: the Wan 2.2 expert the model is ("high_noise", "low_noise"), which takes its part of a file holding both."""
    path = adapter_path(lora_name)
    strength_model = check_strength(strength_model, path)  # the API takes any number, NaN included
    strength_clip = check_strength(strength_clip, path)
    adapter = select_expert(read_adapter_cached(path, lokr_full_matrix_alpha=lokr_full_matrix_alpha), expert)
    plan = plan_for_comfyui(adapter, model, architecture, block_weights or "")
    notes, delegated = [], {}
    if clip is not None and strength_clip != 0:
        clip, delegated = delegate_text_encoder(clip, plan, strength_clip)
        if delegated:
            notes.append(f"text encoder strength {strength_clip:g}; its modules are always patched (not bypassed)")
    left = [s for s in plan.unmatched if s not in delegated and is_text_encoder_stem(s)]
    if left:
        hint = ("connect a CLIP to LycorisLoader to apply them" if clip is None
                else "strength_clip is 0" if strength_clip == 0 else "ComfyUI's CLIP key map does not know them")
        notes.append(f"{len(left)} unmatched modules are for a text encoder: {hint}")
    if strength_model == 0:
        notes.append("strength 0: the file was checked against the model, nothing was applied")
        return model, clip, load_report(plan, strength_model, mode, delegated, notes)
    bar = comfy.utils.ProgressBar(len(plan.patches))
    tensors = load_tensors(plan, progress=lambda done, total: bar.update_absolute(done, total))
    model, applied_notes = apply_plan(model, plan, tensors, strength_model, mode)
    return model, clip, load_report(plan, strength_model, mode, delegated, notes + applied_notes)


class LycorisLoaderModelOnly(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisLoaderModelOnly",
            display_name="Load LyCORIS Model Only",
            category=CATEGORY,
            description="Applies a LoHa, LoKr or LoRA file (Musubi Tuner, Diffusers, LyCORIS or ComfyUI layout) to a "
            "diffusion model, split q/k/v onto fused weights included. Chain several to stack them.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the adapter to."),
                adapter_name_input(),
                io.Float.Input("strength_model", **STRENGTH, tooltip="How strongly to apply the adapter: "
                               "W + strength·scale·ΔW. Negative values subtract it."),
                *_shared_inputs(),
                block_weights_input(),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip=MODEL_OUT),
                io.String.Output(display_name="report", tooltip=REPORT_OUT),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model, architecture="auto", mode="patch",
                lokr_full_matrix_alpha=False, block_weights="") -> io.NodeOutput:
        with showing_failures(cls):
            model, _, report = _load(model, None, lora_name, strength_model, 0.0, architecture, mode, lokr_full_matrix_alpha,
                                     block_weights)
        show_text(cls, load_summary(report))
        return io.NodeOutput(model, report, ui=ui.PreviewText(report))

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **kwargs):
        return adapter_fingerprint(lora_name)


class LycorisLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisLoader",
            display_name="Load LyCORIS + CLIP",
            category=CATEGORY,
            description="Applies a LoHa, LoKr or LoRA file to a diffusion model and, for the file's text-encoder "
            "modules (kohya lora_te* keys), to the CLIP through ComfyUI's own LoRA loader.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the adapter to."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: the text encoder, for files that also carry text-encoder modules."),
                adapter_name_input(),
                io.Float.Input("strength_model", **STRENGTH,
                               tooltip="How strongly to apply the adapter to the diffusion model. Negative values subtract it."),
                io.Float.Input("strength_clip", **STRENGTH,
                               tooltip="How strongly to apply the file's text-encoder modules to the CLIP."),
                *_shared_inputs(),
                block_weights_input(),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip=MODEL_OUT),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP, with the file's text-encoder modules if it has any."),
                io.String.Output(display_name="report", tooltip=REPORT_OUT),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, clip=None, architecture="auto", mode="patch",
                lokr_full_matrix_alpha=False, block_weights="") -> io.NodeOutput:
        with showing_failures(cls):
            model, clip, report = _load(model, clip, lora_name, strength_model, strength_clip, architecture, mode,
                                        lokr_full_matrix_alpha, block_weights)
        show_text(cls, load_summary(report))
        return io.NodeOutput(model, clip, report, ui=ui.PreviewText(report))

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **kwargs):
        return adapter_fingerprint(lora_name)
