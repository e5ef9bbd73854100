"""Where the integration tests find a real ComfyUI, or why they skip.

ComfyUI is found through the COMFYUI_PATH environment variable, or as `../..` when this pack sits in
`ComfyUI/custom_nodes/<folder>/`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
