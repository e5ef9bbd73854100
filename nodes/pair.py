"""LycorisLoaderWan22Pair: Wan 2.2's high-noise and low-noise expert models, each with its own adapter file."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io, ui

from ..lycoris_core.errors import AdapterError
from ..lycoris_core.experts import SEGMENTS, WORDS, experts_in, named_expert
from ..lycoris_core.loading import read_adapter_cached
from .common import ADAPTER_FOLDER, CATEGORY, adapter_fingerprint, adapter_path, load_summary, show_text, showing_failures
from .loader import STRENGTH, _load, _shared_inputs, block_weights_input

NONE = "None"  # no file: the model goes on as it came
EXPERTS = ("high_noise", "low_noise")  # in the order they sample


def _file_input(expert: str) -> io.Combo.Input:
    return io.Combo.Input(
        f"lora_{expert}", options=[NONE, *folder_paths.get_filename_list(ADAPTER_FOLDER)], default=NONE,
        tooltip=f"The adapter for the {WORDS[expert]} model (LoHa, LoKr or LoRA, any layout the loader reads), or None. "
        "Musubi Tuner's one adapter trained on both experts (--dit_high_noise) goes in both slots; a file holding "
        f"both experts (ai-toolkit, transformer_1/transformer_2 keys) gives this model its {SEGMENTS[expert]} part.",
    )


def _notes(expert: str, name: str, lokr_full_matrix_alpha: bool) -> list[str]:
    """Report lines on what the expert took from the file, and on a file whose name says the other expert."""
    lines = []
    found = experts_in(read_adapter_cached(adapter_path(name), lokr_full_matrix_alpha=lokr_full_matrix_alpha))
    if found:
        other = next(e for e in EXPERTS if e != expert)
        lines.append(f"expert        {SEGMENTS[expert]} ({WORDS[expert]}) of a file holding both experts; its "
                     f"{len(found.get(other, []))} {SEGMENTS[other]} modules are for the {WORDS[other]} model")
    elif named_expert(name) not in (None, expert):
        lines.append(f"warning       the file's name says {WORDS[named_expert(name)]}, but it went onto the {WORDS[expert]} model")
    return lines


def _load_expert(expert, model, name, strength, architecture, mode, lokr_full_matrix_alpha, block_weights):
    """(model, report) for one expert: `name` loaded as LycorisLoaderModelOnly loads it, or the model as it came."""
    if name == NONE:
        return model, f"lora_{expert}  None: the {WORDS[expert]} model goes on unchanged"
    try:
        model, _, report = _load(model, None, name, strength, 0.0, architecture, mode, lokr_full_matrix_alpha,
                                 block_weights, expert=expert)
        notes = _notes(expert, name, lokr_full_matrix_alpha)
    except AdapterError as e:
        raise AdapterError(f"lora_{expert}: {e}") from e
    return model, "\n".join([*report.splitlines()[:1], *notes, *report.splitlines()[1:]])


class LycorisLoaderWan22Pair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisLoaderWan22Pair",
            display_name="Load LyCORIS Wan2.2 Pair",  # with "Wan 2.2" it is cut off in the node library
            category=CATEGORY,
            description="Applies one adapter file to each of Wan 2.2's two expert models (high noise, low noise), each "
            "with its own strength and block weights: a file only ever reaches its own model.",
            inputs=[
                io.Model.Input("model_high_noise", tooltip="The high-noise expert (the sampler of the first steps)."),
                io.Model.Input("model_low_noise", tooltip="The low-noise expert (the sampler of the last steps)."),
                _file_input("high_noise"),
                io.Float.Input("strength_high_noise", **STRENGTH, tooltip="How strongly to apply lora_high_noise."),
                _file_input("low_noise"),
                io.Float.Input("strength_low_noise", **STRENGTH, tooltip="How strongly to apply lora_low_noise."),
                *_shared_inputs(),
                block_weights_input("lora_high_noise", name="block_weights_high_noise"),
                block_weights_input("lora_low_noise", name="block_weights_low_noise"),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL_HIGH_NOISE", tooltip="The high-noise model with lora_high_noise."),
                io.Model.Output(display_name="MODEL_LOW_NOISE", tooltip="The low-noise model with lora_low_noise."),
                io.String.Output(display_name="report", tooltip="What was applied to each model, the high-noise one first."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model_high_noise, model_low_noise, lora_high_noise, strength_high_noise, lora_low_noise,
                strength_low_noise, architecture="auto", mode="patch", lokr_full_matrix_alpha=False,
                block_weights_high_noise="", block_weights_low_noise="") -> io.NodeOutput:
        given = {
            "high_noise": (model_high_noise, lora_high_noise, strength_high_noise, block_weights_high_noise),
            "low_noise": (model_low_noise, lora_low_noise, strength_low_noise, block_weights_low_noise),
        }
        models, reports, summaries = [], [], []
        with showing_failures(cls):
            for expert in EXPERTS:
                model, name, strength, block_weights = given[expert]
                model, report = _load_expert(expert, model, name, strength, architecture, mode, lokr_full_matrix_alpha,
                                             block_weights)
                models.append(model)
                reports.append(f"{WORDS[expert]} model\n{report}")
                summaries.append(f"{WORDS[expert]}: " + (load_summary(report) if name != NONE else "no file"))
        report = "\n\n".join(reports)
        show_text(cls, "\n".join(summaries))
        return io.NodeOutput(*models, report, ui=ui.PreviewText(report))

    @classmethod
    def fingerprint_inputs(cls, lora_high_noise=None, lora_low_noise=None, **kwargs):
        return "|".join(adapter_fingerprint(name if name != NONE else None) for name in (lora_high_noise, lora_low_noise))
