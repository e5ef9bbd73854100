"""LycorisInspect: what an adapter file is and what is wrong with it, shown on the node."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..lycoris_core.loading import read_adapter_cached
from ..lycoris_core.report import VARIANT_WORDS, describe, format_report
from .common import (
    CATEGORY,
    adapter_fingerprint,
    adapter_name_input,
    adapter_path,
    lokr_full_matrix_alpha_input,
    short,
    show_text,
    showing_failures,
)


def inspect_summary(report: dict) -> str:
    """The report's head in four short lines, for the node (the whole report is the STRING output)."""
    kinds = []
    for name, n in sorted(report["algorithms"].items(), key=lambda kv: -kv[1]):
        forms = [f"{k} {VARIANT_WORDS[v]}" for v, k in report.get(name, {}).items() if k]  # LoKr: full / low-rank
        kinds.append(f"{n} {name}" + (f" ({', '.join(forms)})" if forms else ""))
    problems = len(report["problems"])
    return "\n".join([
        short(report["file"]),
        f"{report['architecture'] or 'architecture unknown'}, {report['format']} keys",
        ", ".join(kinds) or "no modules",
        "no problems" if not problems else f"{problems} problem{'s' * (problems > 1)}: see the report",
    ])


class LycorisInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisInspect",
            display_name="Inspect LyCORIS File",
            category=CATEGORY,
            description="Says what an adapter file is: key format, architecture, LoHa/LoKr/LoRA module counts, ranks, "
            "alphas, scales, LoKr full/low-rank split, dtypes, metadata and problems (NaN/Inf, unknown keys). The node "
            "shows a summary; the report output has everything.",
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
        with showing_failures(cls):
            adapter = read_adapter_cached(adapter_path(lora_name), lokr_full_matrix_alpha=lokr_full_matrix_alpha)
            described = describe(adapter)
        report = format_report(described, max_modules=max_modules)
        show_text(cls, inspect_summary(described))
        return io.NodeOutput(report, ui=ui.PreviewText(report))

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **kwargs):
        return adapter_fingerprint(lora_name)
