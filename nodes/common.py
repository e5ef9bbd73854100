"""What every node of the pack shares: the node category, the adapter file list, showing text on a node."""

from __future__ import annotations

import contextlib
import inspect
import os

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..lycoris_core.errors import AdapterError

CATEGORY = "loaders/lycoris"
ADAPTER_FOLDER = "loras"  # adapters live with LoRAs, where users already put them

# Inputs the frontend folds away as "advanced": `advanced=` is a newer V3 keyword (ComfyUI 0.3.64's
# inputs do not take it), so it is passed only where the running ComfyUI knows it.
ADVANCED = {"advanced": True} if "advanced" in inspect.signature(io.Float.Input.__init__).parameters else {}

# A seed that stays as set. The frontend gives an INT input named `seed` a "control after generate" widget
# that re-randomizes it after every run unless the input names another default; ComfyUI 0.28 has the values
# as io.ControlAfterGenerate, older V3 inputs pass the same string to the frontend as it is.
FIXED_SEED = {"control_after_generate": io.ControlAfterGenerate.fixed if hasattr(io, "ControlAfterGenerate") else "fixed"}


def adapter_name_input() -> io.Combo.Input:
    return io.Combo.Input(
        "lora_name",
        options=folder_paths.get_filename_list(ADAPTER_FOLDER),
        tooltip="The adapter file (LoHa, LoKr or LoRA; Musubi Tuner, Diffusers, LyCORIS or ComfyUI key layout), "
        "from the models/loras folder.",
    )


def lokr_full_matrix_alpha_input() -> io.Boolean.Input:
    return io.Boolean.Input(
        "lokr_full_matrix_alpha",
        default=False,
        tooltip="Only for LoKr files from trainers that applied alpha to full-matrix modules (both lokr_w1 and lokr_w2 "
        "stored full): scale those modules by alpha / ss_network_dim instead of 1. Musubi Tuner and LyCORIS files "
        "need this off.",
    )


def adapter_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, name)


def adapter_fingerprint(name: str | None) -> str:
    """Changes when the file is replaced on disk, so ComfyUI runs the node again instead of reusing its output."""
    path = folder_paths.get_full_path(ADAPTER_FOLDER, name) if name else None
    if path is None:
        return ""
    stat = os.stat(path)
    return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"


def show_text(node_cls: type[io.ComfyNode], text: str) -> None:
    """Draw `text` on the node in the ComfyUI frontend (ComfyUI's own way, no JavaScript needed).

    Outside a running server (scripts, tests) there is no node to draw on, and nothing happens.
    """
    node_id = getattr(getattr(node_cls, "hidden", None), "unique_id", None)
    if node_id is None:
        return
    from server import PromptServer  # ComfyUI's server module, loaded only when a server runs the node

    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_progress_text(text, node_id)


def without_model_folders(message: str) -> str:
    """`message` with the model folders left out of its file paths: the file as the node lists it
    ("loras/x.safetensors is …"), so the few lines an error toast shows hold what is wrong."""
    for kind in (ADAPTER_FOLDER, "diffusion_models"):
        for folder in folder_paths.get_folder_paths(kind):
            message = message.replace(os.path.join(os.path.abspath(folder), ""), f"{kind}/")
    return message


@contextlib.contextmanager
def showing_failures(node_cls: type[io.ComfyNode]):
    """Around one run of a node that shows text: the last run's text goes at once, and a failure shows its
    one-line message on the node (the error still stops the run, an AdapterError with the shorter paths)."""
    show_text(node_cls, "")
    try:
        yield
    except comfy.model_management.InterruptProcessingException:
        show_text(node_cls, "cancelled")
        raise
    except AdapterError as e:
        message = without_model_folders(str(e))
        show_text(node_cls, f"failed: {message}")
        raise AdapterError(message) from e
    except Exception as e:
        show_text(node_cls, f"failed: {without_model_folders(str(e).splitlines()[0]) if str(e) else type(e).__name__}")
        raise


def short(name: str) -> str:
    """A file's name without its folder, as the node summaries show it."""
    return os.path.basename(name.rstrip("/\\")) or name


def report_lines(report: str, *keys: str) -> dict[str, str]:
    """{key: value} of the report's `key   value` lines (the core's reports align their keys in a column)."""
    found = {}
    for line in report.splitlines():
        key, _, value = line.partition(" ")
        if key in keys and key not in found:
            found[key] = value.strip()
    return found


def load_summary(report: str) -> str:
    """The head of a load report (Loader, Apply) in a few short lines, for the node; the whole report is the
    STRING output."""
    r = report_lines(report, "file", "architecture", "mode", "applied", "unmatched", "blocks", "zeroed", "warning", "problem")
    applied, _, kinds = r.get("applied", "").partition(": ")  # "24 of 24 modules: 24 lokr (20 full-matrix, ...)"
    unmatched = r.get("unmatched", "0").split(" (")[0]
    lines = [r.get("file"), f"{r.get('architecture')}, {r.get('mode')}", f"{applied} applied, {unmatched} unmatched", kinds]
    if "blocks" in r:  # "attn_only: blocks.0-39: 0, attn 1; ...": what was asked for, and how many it turned off
        zeroed = r.get("zeroed", "0").split(" ")[0]
        lines.append(f"block weights {r['blocks'].split(': ')[0]}, {zeroed} modules at 0")
    lines += [f"{key}: {r[key]}" for key in ("warning", "problem") if key in r]
    return "\n".join(line for line in lines if line)
