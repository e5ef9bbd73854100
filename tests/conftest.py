"""pytest fixtures shared by the tests."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from safetensors.torch import save_file

# tests/integration/ needs ComfyUI's own environment; where tests/test_releases.py runs it there (CI),
# this interpreter does not collect it at all (rather than listing every module as skipped).
collect_ignore_glob = (
    ["integration/*"] if os.environ.get("COMFYUI_RELEASES") and importlib.util.find_spec("torchvision") is None else []
)


@pytest.fixture
def write_safetensors(tmp_path):
    """Write a dict of tensors to a fresh safetensors file and return its path."""
    counter = iter(range(10**6))

    def write(tensors: dict[str, torch.Tensor], metadata: dict | None = None, name: str | None = None) -> str:
        path = tmp_path / (name or f"adapter_{next(counter)}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return str(path)

    return write


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
