"""LycorisInspect: what an adapter file is and what is wrong with it, shown on the node."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..lycoris_core.loading import read_adapter_cached
from ..lycoris_core.report import describe, format_report
from .common import CATEGORY, adapter_fingerprint, adapter_name_input, adapter_path, lokr_full_matrix_alpha_input, show_text


class LycorisInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisInspect",
            display_name="Inspect LyCORIS File",
            category=CATEGORY,
            description="Says what an adapter file is: key format, architecture, LoHa/LoKr/LoRA module counts, ranks, "
            "alphas, scales, LoKr full/low-rank split, dtypes, metadata and problems (NaN/Inf, unknown keys).",
            inputs=[
                adapter_name_input(),
                lokr_full_matrix_alpha_input(),
                io.Int.Input("max_modules", default=40, min=0, max=100000,
                             tooltip="How many modules to list one per line after the summary."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="The report shown on the node, as text.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # runs on its own: the report is the result
        )

    @classmethod
    def execute(cls, lora_name, lokr_full_matrix_alpha=False, max_modules=40) -> io.NodeOutput:
        adapter = read_adapter_cached(adapter_path(lora_name), lokr_full_matrix_alpha=lokr_full_matrix_alpha)
        report = format_report(describe(adapter), max_modules=max_modules)
        show_text(cls, report)
        return io.NodeOutput(report, ui=ui.PreviewText(report))

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **kwargs):
        return adapter_fingerprint(lora_name)
