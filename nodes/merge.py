"""LycorisMerge: bake adapters into a diffusion-model file (the core's streaming merge, as
`comfyui-lycoris merge` runs it), written into output/diffusion_models, which Load Diffusion Model lists.

Unlike a patch-mode loader followed by ComfyUI's Save Model, the model is never loaded: one tensor at a
time is read, patched in fp32 and written (fp8 files dequantized and requantized), so even a 14B model
bakes in a few hundred MB of memory, and the output keeps the file's own names, dtypes and metadata.
"""

from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..lycoris_core.errors import AdapterError
from ..lycoris_core.merge import merge, parse_adapter_arg
from .common import (
    ADAPTER_FOLDER,
    CATEGORY,
    adapter_fingerprint,
    adapter_name_input,
    adapter_path,
    lokr_full_matrix_alpha_input,
    short,
    show_text,
    showing_failures,
)
from .converter import ARCHITECTURES
from .loader import STRENGTH, block_weights_input
from .outputs import MODEL_FOLDER, listed_name, named_output


def parse_more_adapters(text: str) -> list[tuple[str, float, str]]:
    """'name[:strength[:blocks]]' per line (names as the loras list shows them, block weights as the loaders
    take them but on one line; blank lines and # comments skipped)."""
    adapters = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, strength, block_weights = parse_adapter_arg(line)
        path = folder_paths.get_full_path(ADAPTER_FOLDER, name.strip())
        if path is None:
            raise AdapterError(f"more_adapters: {name.strip()!r} is not a file in the loras folders")
        adapters.append((path, strength, block_weights))
    return adapters


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def bake_summary(result, listed: str) -> str:
    """What the node shows: the file written and, per adapter, what matched (the report output has the rest)."""
    lines = [f"wrote {listed}", f"in output/diffusion_models, {result.tensors_changed} tensors changed"]
    lines += [f"{short(plan.adapter.path)} @ {s:g}: {plan.summary()}" for plan, s in zip(result.plans, result.strengths)]
    return "\n".join(lines)


class LycorisMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisMerge",
            display_name="Bake LyCORIS into Model",
            category=CATEGORY,
            description="Bakes LoHa, LoKr or LoRA files into a diffusion-model file without loading the model (one "
            "tensor at a time; fp8 files stay fp8), into output/diffusion_models, where Load Diffusion Model "
            "lists it. Same result as `comfyui-lycoris merge`.",
            inputs=[
                io.Combo.Input(
                    "unet_name", options=folder_paths.get_filename_list(MODEL_FOLDER),
                    tooltip="The diffusion-model file to bake into (models/diffusion_models), in ComfyUI's or the "
                    "original naming; it is only read.",
                ),
                adapter_name_input(),
                io.Float.Input("strength", **STRENGTH, tooltip="W + strength·scale·ΔW. Negative values subtract the adapter."),
                io.String.Input(
                    "more_adapters", default="", multiline=True,
                    tooltip="More adapters to bake in the same pass, one per line: a name from the loras list, "
                    "optionally followed by :strength (1.0 if left out) and :block weights (a preset, numbers or "
                    "pattern=value entries, comma-separated), e.g. my_lokr.safetensors:0.8:attn_only.",
                ),
                io.Combo.Input(
                    "architecture", options=ARCHITECTURES, default="auto",
                    tooltip="The model family. 'auto' reads it from the model file's weight names; a file for "
                    "another model is an error.",
                ),
                lokr_full_matrix_alpha_input(),
                io.String.Input(
                    "output_name", default="",
                    tooltip="File name inside output/diffusion_models (subfolders allowed, .safetensors added). "
                    "Empty: <model>_<adapter>.",
                ),
                io.Boolean.Input(
                    "overwrite", default=False,
                    tooltip="Replace an existing file of that name. Off: an existing file is an error and stays as it is.",
                ),
                block_weights_input("the adapter chosen in lora_name (more_adapters take theirs after :strength)"),
            ],
            outputs=[
                io.String.Output(display_name="path", tooltip="The model file written (absolute path)."),
                io.String.Output(display_name="report", tooltip="What was baked: per adapter, matched and unmatched modules."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # writing the file is the result
        )

    @classmethod
    def execute(cls, unet_name, lora_name, strength, more_adapters="", architecture="auto",
                lokr_full_matrix_alpha=False, output_name="", overwrite=False, block_weights="") -> io.NodeOutput:
        bar = comfy.utils.ProgressBar(100)

        def on_progress(done: int, total: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel: nothing is written
            bar.update_absolute(round(100 * done / max(total, 1)), 100)

        with showing_failures(cls):
            base = folder_paths.get_full_path_or_raise(MODEL_FOLDER, unet_name)
            adapters = [(adapter_path(lora_name), strength, block_weights or ""), *parse_more_adapters(more_adapters)]
            output = named_output(output_name.strip() or f"{_stem(unet_name)}_{_stem(lora_name)}", overwrite, MODEL_FOLDER)
            result = merge(base, output, adapters, architecture=architecture, overwrite=overwrite,
                           lokr_full_matrix_alpha=lokr_full_matrix_alpha, progress=False, on_progress=on_progress)
        listed = listed_name(output, MODEL_FOLDER)
        report = result.summary() + f"\nlisted by Load Diffusion Model as {listed}"
        show_text(cls, bake_summary(result, listed))
        return io.NodeOutput(result.output, report, ui=ui.PreviewText(report))

    @classmethod
    def fingerprint_inputs(cls, unet_name=None, lora_name=None, more_adapters="", **kwargs):
        base = folder_paths.get_full_path(MODEL_FOLDER, unet_name) if unet_name else None
        stat = os.stat(base) if base else None
        names = [line.strip() for line in (more_adapters or "").splitlines() if line.strip()]
        parts = [f"{base}:{stat.st_mtime_ns}:{stat.st_size}" if stat else "", adapter_fingerprint(lora_name)]
        parts += [adapter_fingerprint(parse_adapter_arg(n)[0].strip()) for n in names]
        return "|".join(parts)
