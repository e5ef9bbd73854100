"""Plain helpers shared by the tests: the Musubi reference fixtures and error measures."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"
MUSUBI = FIXTURES / "musubi"


def manifest() -> dict:
    return json.loads((MUSUBI / "manifest.json").read_text())


def manifest_files() -> list[dict]:
    return manifest()["files"]


def adapter_entries() -> list[dict]:
    """Every adapter file of the Musubi set (sources and Diffusers copies), with its manifest entry."""
    return [f for f in manifest_files() if not f["file"].endswith(".expected.safetensors")]


def expected_weights(entry: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(MUSUBI / entry["expected"]))


def module_paths(expected: dict[str, torch.Tensor]) -> list[str]:
    """The dotted module paths P that the expectation file says are adapted."""
    return sorted(k[len("base/") : -len(".weight")] for k in expected if k.startswith("base/"))


def stem_of(entry: dict, path: str) -> str:
    """The key stem a fixture file uses for module path P, as the fixture README defines it."""
    if entry["format"] == "musubi":
        return "lora_unet_" + path.replace(".", "_")
    for wrong in entry.get("wrong_names", []):
        if wrong["module"] == path:
            return f"{entry['diffusers_prefix']}.{wrong['converted_as']}"
    return f"{entry['diffusers_prefix']}.{path}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
