"""LycorisConvert: rewrite an adapter file in the Musubi, Diffusers or ComfyUI key layout (the core
converter, as `comfyui-lycoris convert` runs it), into ComfyUI's output/loras folder."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from ..convert import TARGETS, convert_file
from ..convert.converter import DIFFUSERS_PREFIXES
from ..lycoris_core.architectures import SUPPORTED
from .common import CATEGORY, adapter_fingerprint, adapter_name_input, adapter_path, show_text, showing_failures
from .outputs import listed_name, named_output

ARCHITECTURES = ["auto", *(a.id for a in SUPPORTED)]
LAYOUTS = ["comfyui", *(t for t in TARGETS if t != "comfyui")]  # ComfyUI's own loader layout first


def convert_summary(result) -> str:
    """What the node shows: the file written and the counts (the whole summary is the ui text)."""
    lines = [f"wrote {listed_name(result.output)}", f"in output/loras, {result.target} layout",
             f"{result.modules_out} modules from {result.modules_in} ({result.source_format} layout)"]
    return "\n".join(lines + [f"note: {note}" for note in result.notes])


class LycorisConvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisConvert",
            display_name="Convert LyCORIS File",
            category=CATEGORY,
            description="Rewrites a LoHa, LoKr or LoRA file in another key layout, exactly (same numbers, new names), "
            "into ComfyUI's output/loras folder, which the LoRA loaders list. Same result as "
            "`comfyui-lycoris convert`.",
            inputs=[
                adapter_name_input(),
                io.Combo.Input(
                    "to", options=LAYOUTS, default="comfyui",
                    tooltip="comfyui: names ComfyUI core's own LoRA loader maps completely (q/k/v fused where ComfyUI "
                    "fuses them). musubi: lora_unet_ names, what Musubi Tuner trains and loads. diffusers: "
                    "<prefix>.<module path>, as Musubi's convert_lora.py --target other writes it.",
                ),
                io.Combo.Input(
                    "prefix", options=list(DIFFUSERS_PREFIXES), default=DIFFUSERS_PREFIXES[0],
                    tooltip="Key prefix of the diffusers layout (ignored for the other layouts).",
                ),
                io.Combo.Input(
                    "architecture", options=ARCHITECTURES, default="auto",
                    tooltip="The model family the file is for. 'auto' reads it from the file's keys and metadata; "
                    "set it for files whose names do not tell.",
                ),
                io.String.Input(
                    "output_name", default="",
                    tooltip="File name inside output/loras (subfolders allowed, .safetensors added). Empty: the "
                    "input's name with _<layout> appended.",
                ),
                io.Boolean.Input(
                    "overwrite", default=False,
                    tooltip="Replace an existing file of that name. Off: an existing file is an error and stays as it is.",
                ),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The file written (absolute path).")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # writing the file is the result
        )

    @classmethod
    def execute(cls, lora_name, to="comfyui", prefix=DIFFUSERS_PREFIXES[0], architecture="auto", output_name="",
                overwrite=False) -> io.NodeOutput:
        with showing_failures(cls):
            source = adapter_path(lora_name)
            name = output_name.strip() or f"{os.path.splitext(os.path.basename(lora_name))[0]}_{to}"
            output = named_output(name, overwrite)
            result = convert_file(source, output, to, prefix=prefix if to == "diffusers" else None,
                                  arch=None if architecture == "auto" else architecture, overwrite=overwrite)
        show_text(cls, convert_summary(result))
        return io.NodeOutput(result.output, ui=ui.PreviewText(result.summary()))

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **kwargs):
        return adapter_fingerprint(lora_name)
