"""The adapter tools as nodes, each the core command of the same name: any adapter as a plain LoRA
(LycorisToLora, `to-lora`), a LoRA at another rank (LycorisResize, `resize`), an adapter from the
difference of two diffusion-model files (LycorisExtract, `extract`) and the post-hoc EMA of training
checkpoints (LycorisEma, `ema`).

Adapters come from models/loras and models from models/diffusion_models; every output goes to
output/loras, which the LoRA loaders list. The node shows a progress bar, and ComfyUI's Cancel stops
the work with nothing written (the core writes atomically and asks after every module).
"""

from __future__ import annotations

import fnmatch
import math
import os

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..convert.converter import DIFFUSERS_PREFIXES
from ..convert.ema import MAX_SIGMA_REL, ema_file
from ..convert.extract import ALGORITHMS, extract_file
from ..convert.to_lora import resize_file, to_lora_file
from ..lycoris_core.errors import AdapterError
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
from .outputs import MODEL_FOLDER, listed_name, named_output

TOOLS_CATEGORY = CATEGORY + "/tools"
SAME_LAYOUT = "same as input"
LAYOUTS = ["comfyui", "musubi", "diffusers"]
DTYPES = ["float32", "float16", "bfloat16"]
AS_STORED = "as stored"
NO_BASE = "(none)"
SCHEDULES = ["beta", "beta to beta2", "power (sigma_rel)"]
PROGRESS_STEPS = 1000


def _progress():
    """on_progress for the core: moves the node's bar and stops on Cancel (the core then writes nothing)."""
    bar = comfy.utils.ProgressBar(PROGRESS_STEPS)

    def on_progress(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(round(PROGRESS_STEPS * done / max(total, 1)), PROGRESS_STEPS)

    return on_progress


def _size_inputs(rank_min: int = 1, rank_tooltip: str = "") -> list:
    return [
        io.Int.Input("rank", default=32, min=rank_min, max=16384,
                     tooltip=rank_tooltip or "The LoRA rank of every module (at most each module's own)."),
        io.Float.Input("max_error", default=0.0, min=0.0, max=1.0, step=0.001,
                       tooltip="Above 0: per module, the smallest rank whose relative error ||ΔW - LoRA|| / ||ΔW|| "
                       "(Frobenius) is at most this, and rank is ignored. 0: the rank above."),
    ]


def _size(rank: int, max_error: float) -> dict:
    return {"max_error": max_error} if max_error > 0 else {"rank": rank}


def _layout_inputs(default: str, same: bool) -> list:
    options = [SAME_LAYOUT, *LAYOUTS] if same else LAYOUTS
    return [
        io.Combo.Input(
            "to", options=options, default=default,
            tooltip="Key layout of the output: comfyui (what ComfyUI core's LoRA loader maps completely), musubi "
            "(lora_unet_ names, what Musubi Tuner loads), diffusers (<prefix>.<module path>)"
            + (", or the input's own." if same else "."),
        ),
        io.Combo.Input("prefix", options=list(DIFFUSERS_PREFIXES), default=DIFFUSERS_PREFIXES[0],
                       tooltip="Key prefix of the diffusers layout (ignored for the other layouts)."),
    ]


def _layout(to: str, prefix: str) -> dict:
    if to == SAME_LAYOUT:
        return {"to": None, "prefix": None}
    return {"to": to, "prefix": prefix if to == "diffusers" else None}


def _output_inputs(empty_means: str) -> list:
    return [
        io.String.Input("output_name", default="",
                        tooltip=f"File name inside output/loras (subfolders allowed, .safetensors added). Empty: {empty_means}."),
        io.Boolean.Input("overwrite", default=False,
                         tooltip="Replace an existing file of that name. Off: an existing file is an error and stays as it is."),
    ]


OUTPUTS = [
    io.String.Output(display_name="path", tooltip="The file written (absolute path)."),
    io.String.Output(display_name="report", tooltip="Every module's rank and relative error, and what was written."),
]


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def _model_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(MODEL_FOLDER, name)


def _model_fingerprint(name: str | None) -> str:
    path = folder_paths.get_full_path(MODEL_FOLDER, name) if name and name != NO_BASE else None
    if path is None:
        return ""
    stat = os.stat(path)
    return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"


def _finish(cls, result, what: str) -> io.NodeOutput:
    """Show the node's few lines, return the path and the whole report."""
    listed = listed_name(result.conversion.output)
    conversion = result.conversion
    lines = [f"wrote {listed}", f"in output/loras, {conversion.target} layout", what]
    show_text(cls, "\n".join(lines + [f"note: {note}" for note in (*conversion.notes, *result.notes)]))
    report = result.summary() + f"\nlisted by the LoRA loaders as {listed}"
    return io.NodeOutput(conversion.output, report, ui=ui.PreviewText(report))


def _ranks_text(modules) -> str:
    ranks = sorted(m.rank for m in modules if m.rank is not None)
    if not ranks:
        return "no LoRA modules"
    worst = max(m.error for m in modules)
    span = f"rank {ranks[0]}" + (f" to {ranks[-1]}" if ranks[-1] != ranks[0] else "")
    return f"{len(ranks)} modules as LoRA, {span}; largest relative error {worst:.2e}"


class LycorisToLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisToLora",
            display_name="LyCORIS to LoRA",
            category=TOOLS_CATEGORY,
            description="Writes any LoHa, LoKr, LoRA or full-difference file as a plain LoRA (for tools that read only "
            "LoRA): every module's ΔW by its truncated SVD, at a rank or within a relative error, exact at full rank. "
            "Into output/loras. Same result as `comfyui-lycoris to-lora`.",
            inputs=[
                adapter_name_input(),
                *_size_inputs(),
                *_layout_inputs(SAME_LAYOUT, same=True),
                io.Combo.Input(
                    "base_model", options=[NO_BASE, *folder_paths.get_filename_list(MODEL_FOLDER)], default=NO_BASE,
                    tooltip="Only for files with DoRA modules (they rescale the base weight): the diffusion model they "
                    "are for; their change to it at strength 1 is written.",
                ),
                io.Combo.Input("dtype", options=[AS_STORED, *DTYPES], default=AS_STORED,
                               tooltip="dtype of the written factors (as stored: each module's own)."),
                io.Combo.Input("architecture", options=ARCHITECTURES, default="auto",
                               tooltip="The model family the file is for; 'auto' reads it from the file."),
                lokr_full_matrix_alpha_input(),
                *_output_inputs("the input's name with _lora_r<rank> (or _lora_e<max_error>) appended"),
            ],
            outputs=OUTPUTS,
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # writing the file is the result
        )

    @classmethod
    def execute(cls, lora_name, rank=32, max_error=0.0, to=SAME_LAYOUT, prefix=DIFFUSERS_PREFIXES[0], base_model=NO_BASE,
                dtype=AS_STORED, architecture="auto", lokr_full_matrix_alpha=False, output_name="",
                overwrite=False) -> io.NodeOutput:
        with showing_failures(cls):
            source = adapter_path(lora_name)
            suffix = f"_lora_e{max_error:g}" if max_error > 0 else f"_lora_r{rank}"
            output = named_output(output_name.strip() or _stem(lora_name) + suffix, overwrite)
            result = to_lora_file(
                source, output, **_size(rank, max_error), **_layout(to, prefix),
                arch=None if architecture == "auto" else architecture,
                base=None if base_model == NO_BASE else _model_path(base_model),
                dtype=None if dtype == AS_STORED else dtype, overwrite=overwrite,
                lokr_full_matrix_alpha=lokr_full_matrix_alpha, on_progress=_progress(),
            )
        return _finish(cls, result, _ranks_text(result.modules))

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, base_model=None, **kwargs):
        return adapter_fingerprint(lora_name) + "|" + _model_fingerprint(base_model)


class LycorisResize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisResize",
            display_name="Resize LoRA",
            category=TOOLS_CATEGORY,
            description="Writes a LoRA file at another rank, or each module at the smallest rank within a relative "
            "error (truncated SVD of every module's ΔW, the best approximation of that rank). LoHa and LoKr files "
            "go through 'LyCORIS to LoRA'. Into output/loras. Same result as `comfyui-lycoris resize`.",
            inputs=[
                adapter_name_input(),
                *_size_inputs(),
                *_layout_inputs(SAME_LAYOUT, same=True),
                io.Combo.Input("dtype", options=[AS_STORED, *DTYPES], default=AS_STORED,
                               tooltip="dtype of the written factors (as stored: each module's own)."),
                *_output_inputs("the input's name with _r<rank> (or _e<max_error>) appended"),
            ],
            outputs=OUTPUTS,
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora_name, rank=32, max_error=0.0, to=SAME_LAYOUT, prefix=DIFFUSERS_PREFIXES[0], dtype=AS_STORED,
                output_name="", overwrite=False) -> io.NodeOutput:
        with showing_failures(cls):
            source = adapter_path(lora_name)
            suffix = f"_e{max_error:g}" if max_error > 0 else f"_r{rank}"
            output = named_output(output_name.strip() or _stem(lora_name) + suffix, overwrite)
            result = resize_file(source, output, **_size(rank, max_error), **_layout(to, prefix),
                                 dtype=None if dtype == AS_STORED else dtype, overwrite=overwrite, on_progress=_progress())
        return _finish(cls, result, _ranks_text(result.modules))

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **kwargs):
        return adapter_fingerprint(lora_name)


class LycorisExtract(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        models = folder_paths.get_filename_list(MODEL_FOLDER)
        return io.Schema(
            node_id="LycorisExtract",
            display_name="Extract LyCORIS from Models",
            category=TOOLS_CATEGORY,
            description="Writes the LoRA, LoHa or LoKr that takes one diffusion model to another (a fine-tune of it), "
            "on the layers Musubi Tuner trains and under its names, reading one weight at a time (fp8 dequantized). "
            "LoRA: truncated SVD; LoHa: the SVD refined by alternating least squares; LoKr: the nearest Kronecker "
            "product. Into output/loras. Same result as `comfyui-lycoris extract`.",
            inputs=[
                io.Combo.Input("base_model", options=models,
                               tooltip="The model before fine-tuning (models/diffusion_models); only read."),
                io.Combo.Input("tuned_model", options=models,
                               tooltip="The same model after fine-tuning (same weights and shapes); only read."),
                io.Combo.Input("algorithm", options=list(ALGORITHMS), default="lora", tooltip="What to write."),
                *_size_inputs(
                    0, "LoRA and LoHa: the rank of every module. LoKr: the rank of w2 where Musubi stores it low-rank, "
                    "0 to keep w2 full (the nearest Kronecker product itself)."),
                io.Int.Input("factor", default=-1, min=-1, max=8192,
                             tooltip="LoKr only: how the dimensions split (Musubi's factor network argument); -1: as "
                             "balanced as possible."),
                io.Combo.Input("architecture", options=ARCHITECTURES, default="auto",
                               tooltip="The model family; 'auto' reads it from the base model's weight names."),
                *_layout_inputs("musubi", same=False),
                io.Combo.Input("dtype", options=DTYPES, default="float32", tooltip="dtype of the written tensors."),
                *_output_inputs("<tuned model>_<algorithm>"),
            ],
            outputs=OUTPUTS,
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, base_model, tuned_model, algorithm="lora", rank=32, max_error=0.0, factor=-1, architecture="auto",
                to="musubi", prefix=DIFFUSERS_PREFIXES[0], dtype="float32", output_name="", overwrite=False) -> io.NodeOutput:
        with showing_failures(cls):
            base, tuned = _model_path(base_model), _model_path(tuned_model)
            output = named_output(output_name.strip() or f"{_stem(tuned_model)}_{algorithm}", overwrite)
            size = _size(rank, max_error)
            if algorithm == "lokr" and size.get("rank") == 0:
                size = {}  # w2 full
            result = extract_file(base, tuned, output, algorithm, **size, factor=factor, **_layout(to, prefix),
                                  arch=None if architecture == "auto" else architecture, dtype=dtype, overwrite=overwrite,
                                  on_progress=_progress())
        worst = max(result.modules, key=lambda m: m.error)
        what = (f"{len(result.modules)} {algorithm} modules, {len(result.zero)} layers unchanged; largest relative "
                f"error {worst.error:.2e}")
        return _finish(cls, result, what)

    @classmethod
    def fingerprint_inputs(cls, base_model=None, tuned_model=None, **kwargs):
        return _model_fingerprint(base_model) + "|" + _model_fingerprint(tuned_model)


def checkpoint_names(text: str) -> list[str]:
    """The names of the checkpoints text lists, in order: one name per line as the loras list shows it, or a
    pattern (`run/step-*.safetensors`) standing for every listed name it matches, in the list's order; blank
    lines and # comments skipped."""
    listed = folder_paths.get_filename_list(ADAPTER_FOLDER)
    names = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(c in line for c in "*?["):
            found = [name for name in listed if fnmatch.fnmatchcase(name.replace(os.sep, "/"), line)]
            if not found:
                raise AdapterError(f"checkpoints: the pattern {line!r} matches no file in the loras folders")
            names += found
        elif folder_paths.get_full_path(ADAPTER_FOLDER, line) is None:
            raise AdapterError(f"checkpoints: {line!r} is not a file in the loras folders")
        else:
            names.append(line)
    if not names:
        raise AdapterError("checkpoints: list at least one adapter file (one per line, oldest first)")
    return names


class LycorisEma(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisEma",
            display_name="Post-hoc EMA of LyCORIS Checkpoints",
            category=TOOLS_CATEGORY,
            description="Averages checkpoints of one training run with Musubi's post-hoc EMA weights, over each "
            "module's weight change (never over its factors, which would be off: the report says by how much). "
            "Written as a LoRA at a rank or error, or exactly as full differences. Into output/loras. Same result as "
            "`comfyui-lycoris ema`.",
            inputs=[
                io.String.Input(
                    "checkpoints", default="", multiline=True,
                    tooltip="Adapter files from the loras list, oldest first, one per line; a pattern such as "
                    "my_run/my_run-*.safetensors stands for every matching name in the list's order.",
                ),
                io.Combo.Input(
                    "schedule", options=SCHEDULES, default=SCHEDULES[0],
                    tooltip="beta: avg = beta·avg + (1 - beta)·checkpoint at every checkpoint; beta to beta2: beta moves "
                    "linearly to beta2 over the checkpoints; power: the power-function EMA of relative width sigma_rel "
                    "(Karras et al.).",
                ),
                io.Float.Input("beta", default=0.95, min=0.0, max=1.0, step=0.001, tooltip="The decay (beta schedules)."),
                io.Float.Input("beta2", default=0.99, min=0.0, max=1.0, step=0.001,
                               tooltip="The decay at the last checkpoint ('beta to beta2' only)."),
                io.Float.Input("sigma_rel", default=0.2, min=0.001, max=math.floor(MAX_SIGMA_REL * 1e4) / 1e4, step=0.001,
                               tooltip="Relative width of the power-function EMA ('power' only)."),
                *_size_inputs(),
                io.Boolean.Input("exact", default=False,
                                 tooltip="Write the average exactly, as full differences (diff; a file as big as the "
                                 "layers it changes), instead of a LoRA. Needs the comfyui or diffusers layout."),
                *_layout_inputs(SAME_LAYOUT, same=True),
                io.Combo.Input("dtype", options=[AS_STORED, *DTYPES], default=AS_STORED,
                               tooltip="dtype of the written tensors (as stored: each module's own)."),
                *_output_inputs("the last checkpoint's name with _ema appended"),
            ],
            outputs=OUTPUTS,
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, checkpoints, schedule=SCHEDULES[0], beta=0.95, beta2=0.99, sigma_rel=0.2, rank=32, max_error=0.0,
                exact=False, to=SAME_LAYOUT, prefix=DIFFUSERS_PREFIXES[0], dtype=AS_STORED, output_name="",
                overwrite=False) -> io.NodeOutput:
        with showing_failures(cls):
            names = checkpoint_names(checkpoints)
            paths = [adapter_path(name) for name in names]
            output = named_output(output_name.strip() or _stem(names[-1]) + "_ema", overwrite)
            weights = ({"sigma_rel": sigma_rel} if schedule == SCHEDULES[2]
                       else {"beta": beta, "beta2": beta2 if schedule == SCHEDULES[1] else None})
            result = ema_file(paths, output, **weights, **({} if exact else _size(rank, max_error)), exact=exact,
                              **_layout(to, prefix), dtype=None if dtype == AS_STORED else dtype, overwrite=overwrite,
                              on_progress=_progress())
        overall = result.factor_average_error
        what = (f"{len(names)} checkpoints ({', '.join(short(n) for n in names[:3])}{', ...' if len(names) > 3 else ''}); "
                + ("exact (diff)" if exact else _ranks_text(result.modules))
                + ("" if overall is None else f"; averaging the factors would be off by {overall:.2e}"))
        return _finish(cls, result, what)

    @classmethod
    def fingerprint_inputs(cls, checkpoints="", **kwargs):
        try:
            names = checkpoint_names(checkpoints or "")
        except AdapterError:
            return ""
        return "|".join(adapter_fingerprint(name) for name in names)
