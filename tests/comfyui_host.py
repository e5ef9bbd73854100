"""Where the integration tests find a real ComfyUI, or why they skip; which models it has.

ComfyUI is found through the COMFYUI_PATH environment variable, or as `../..` when this pack sits in
`ComfyUI/custom_nodes/<folder>/`.

Releases differ in the models they have (0.3.64 has no FLUX.2, Z-Image or HunyuanVideo 1.5). A test for
one architecture's model is only collected where the running ComfyUI has that model: the test modules
build their parameter lists with `having_model`, the one place that decides it (from
`comfy.supported_models`, imported at collection time as the tests host it).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The comfy.supported_models class of ComfyUI's model for each architecture the integration tests build.
MODEL_CLASSES = {
    "wan": "WAN21_I2V", "hunyuan_video": "HunyuanVideo", "hunyuan_video_1_5": "HunyuanVideo15", "flux": "Flux",
    "flux2": "Flux2", "qwen_image": "QwenImage", "z_image": "ZImage",
}


def find_comfyui() -> tuple[Path | None, str]:
    """(ComfyUI root, '') or (None, why not)."""
    env = os.environ.get("COMFYUI_PATH")
    candidate = Path(env) if env else REPO.parent.parent
    if (candidate / "comfy" / "model_patcher.py").is_file() and (candidate / "nodes.py").is_file():
        return candidate.resolve(), ""
    if env:
        return None, f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/model_patcher.py and nodes.py there)"
    return None, (f"no ComfyUI: set COMFYUI_PATH, or put this pack in ComfyUI/custom_nodes/ "
                  f"({candidate} is not a ComfyUI checkout)")


def require_comfyui() -> Path:
    """The ComfyUI root; else skips the calling test module, with the reason (one line under -ra)."""
    root, why = find_comfyui()
    if root is None:
        pytest.skip(why, allow_module_level=True)
    return root


def comfyui_version(root: Path) -> str:
    """The release of the ComfyUI at `root`, from its comfyui_version.py ('unknown' where it has none)."""
    try:
        found = re.search(r"""__version__\s*=\s*["']([^"']+)""", (root / "comfyui_version.py").read_text())
    except OSError:
        found = None
    return found[1] if found else "unknown"


@functools.cache
def host_comfyui() -> Path:
    """Host the found ComfyUI in this process as its `main.py` does (its root first on sys.path, this pack's
    folder not on it at all, CPU) and return its root. Skips the calling test module where there is none."""
    root = require_comfyui()
    sys.path[:] = [str(root)] + [p for p in sys.path if Path(p or os.getcwd()).resolve() not in (REPO, root)]
    try:
        cli_args = importlib.import_module("comfy.cli_args")
    except ImportError as e:
        pytest.skip(f"ComfyUI at {root} cannot be imported with {sys.executable}: {e}", allow_module_level=True)
    cli_args.args.cpu = True  # before comfy.model_management decides the device
    return root


def comfyui_has(arch: str) -> bool:
    """Whether the running ComfyUI has a model for `arch` (its class in comfy.supported_models)."""
    host_comfyui()
    return hasattr(importlib.import_module("comfy.supported_models"), MODEL_CLASSES[arch])


def having_model(cases, arch=lambda case: case) -> list:
    """The cases (`arch(case)` is each one's architecture) for which the running ComfyUI has a model."""
    return [case for case in cases if comfyui_has(arch(case))]


def example_workflow(node_type: str) -> tuple[str, dict]:
    """(name, workflow) of the pack's one example workflow (example_workflows/*.json, ComfyUI's templates of the
    pack, served by file name) that uses `node_type`: found by what it does, whatever it is called."""
    workflows = {path.stem: json.loads(path.read_text()) for path in sorted((REPO / "example_workflows").glob("*.json"))}
    found = [(name, w) for name, w in workflows.items() if any(node["type"] == node_type for node in w["nodes"])]
    assert len(found) == 1, f"{len(found)} example workflows use {node_type}: {[name for name, _ in found]}"
    return found[0]
