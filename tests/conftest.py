"""pytest fixtures shared by the tests."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file


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
