"""What every node of the pack shares: the node category, the adapter file list, showing text on a node."""

from __future__ import annotations

import inspect
import os

import folder_paths
from comfy_api.latest import io

CATEGORY = "loaders/lycoris"
ADAPTER_FOLDER = "loras"  # adapters live with LoRAs, where users already put them

# Inputs the frontend folds away as "advanced": `advanced=` is a newer V3 keyword (ComfyUI 0.3.64's
# inputs do not take it), so it is passed only where the running ComfyUI knows it.
ADVANCED = {"advanced": True} if "advanced" in inspect.signature(io.Float.Input.__init__).parameters else {}


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
