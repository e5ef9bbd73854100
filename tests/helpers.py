"""Plain helpers shared by the tests: the Musubi reference fixtures and error measures."""

from __future__ import annotations

import json
import re
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


COMFY_MODELS = FIXTURES / "comfyui_models"
# fixture file prefix -> architecture id
ARCH_OF_PREFIX = {
    "wan": "wan", "hunyuan_video": "hunyuan_video", "hunyuan_video_1_5": "hunyuan_video_1_5",
    "framepack": "framepack", "flux_kontext": "flux", "flux_2": "flux2", "qwen_image": "qwen_image", "z_image": "z_image",
}


def comfy_names(arch: str) -> dict[str, tuple]:
    """{weight name: shape} of ComfyUI's own model for `arch` (dumped from a real ComfyUI)."""
    return {k: tuple(v) for k, v in json.loads((COMFY_MODELS / f"{arch}.json").read_text()).items()}


# How ComfyUI names a Musubi module, written out by hand for the tests (independent of the pack's
# registry): plain renames, and q/k/v that ComfyUI fuses into one weight (part index 0/1/2).
_COMFY_RENAMES = {
    "hunyuan_video": [("_attn_qkv", "_attn.qkv"), ("_attn_proj", "_attn.proj"), ("_mlp.fc1", "_mlp.0"),
                      ("_mlp.fc2", "_mlp.2"), ("_mod.linear", "_mod.lin"), ("modulation.linear", "modulation.lin")],
    "hunyuan_video_1_5": [("_attn_proj", "_attn.proj"), ("_mlp.fc1", "_mlp.0"), ("_mlp.fc2", "_mlp.2"),
                          ("_mod.linear", "_mod.lin")],
    "z_image": [("attention.to_out.0", "attention.out")],
}
_COMFY_FUSED = {
    "hunyuan_video_1_5": [("_attn_q", "_attn.qkv", 0), ("_attn_k", "_attn.qkv", 1), ("_attn_v", "_attn.qkv", 2)],
    "z_image": [("attention.to_q", "attention.qkv", 0), ("attention.to_k", "attention.qkv", 1), ("attention.to_v", "attention.qkv", 2)],
}


def comfy_location(arch: str, path: str) -> tuple[str, int | None]:
    """(ComfyUI weight name, q/k/v part index or None) of Musubi module path `path`."""
    for old, new, part in _COMFY_FUSED.get(arch, []):
        if path.endswith(old):
            return path[: -len(old)] + new + ".weight", part
    for old, new in _COMFY_RENAMES.get(arch, []):
        path = path.replace(old, new)
    return path + ".weight", None


def original_base(expected) -> dict[str, torch.Tensor]:
    """The tiny Musubi model's weights, in Musubi's (= the original checkpoint's) naming."""
    return {k.split("/", 1)[1]: v for k, v in expected.items() if k.startswith(("base/", "unadapted/"))}


def comfy_base(arch, expected, key_prefix="") -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """A base with ComfyUI's real weight names and shapes, holding the fixture's weights where adapted.

    Returns (tensors, {Musubi path: (key, row slice)}).
    """
    gen = torch.Generator().manual_seed(7)
    tensors = {key_prefix + k: torch.randn(shape, generator=gen) for k, shape in comfy_names(arch).items()}
    where = {}
    for path in module_paths(expected):
        name, part = comfy_location(arch, path)
        key = key_prefix + name
        assert key in tensors, f"{path} -> {key} is not a weight of ComfyUI's {arch} model"
        weight = expected[f"base/{path}.weight"]
        rows = slice(None) if part is None else slice(part * weight.shape[0], (part + 1) * weight.shape[0])
        assert tensors[key][rows].shape == weight.shape
        tensors[key][rows] = weight
        where[path] = (key, rows)
    return tensors, where


WILD = FIXTURES / "wild"


def wild_manifest() -> dict:
    """The reference files from other trainers (SimpleTuner, ai-toolkit, PEFT, ComfyUI's trainer)."""
    return json.loads((WILD / "manifest.json").read_text())


def wild_entries() -> list[dict]:
    return wild_manifest()["files"]


def wild_expected(entry: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(WILD / entry["expected"]))


def wild_changed_keys(expected: dict[str, torch.Tensor], strength: str = "1.0") -> list[str]:
    """The ComfyUI weight keys (no prefix) a wild expectation file says the adapter changes."""
    prefix = f"merged/{strength}/"
    return sorted(k[len(prefix) :] for k in expected if k.startswith(prefix))


def change_err(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> float:
    """||got − want|| / ||want − base||: the error relative to the size of the change."""
    return float((got.double() - want.double()).norm() / (want.double() - base.double()).norm().clamp_min(1e-30))


# -- block weights -----------------------------------------------------------------------------------
# The documented block order of each architecture, written out here: lists of blocks by the names their
# weights have in the original checkpoints (= ComfyUI's, except FramePack), each list's blocks by index.
BLOCK_ORDER = {
    "wan": ["blocks"],
    "hunyuan_video": ["double_blocks", "single_blocks"],
    "hunyuan_video_1_5": ["double_blocks"],
    "framepack": ["transformer_blocks", "single_transformer_blocks"],
    "flux": ["double_blocks", "single_blocks"],
    "flux2": ["double_blocks", "single_blocks"],
    "qwen_image": ["transformer_blocks"],
    "z_image": ["context_refiner", "siglip_refiner", "noise_refiner", "layers"],
}
# Words that make a Musubi module path an attention layer (FLUX / HunyuanVideo single-block linear1 and
# linear2 and FramePack's single-block proj_out carry attention together with the MLP).
ATTENTION_WORDS = ("attn", "attention", "linear1", "linear2", "proj_out")
VECTOR_VALUES = (0.0, 1.5, -0.5, 2.0)  # cycled over the blocks from the last one: 0 switches it off


def block_of(arch: str, name: str) -> tuple[str, int] | None:
    """(list, index) of a module path or a model's weight key, or None outside the blocks."""
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        name = name.removeprefix(prefix)
    found = re.match(r"([a-z_]+)\.(\d+)\.", name)
    if found and found[1] in BLOCK_ORDER[arch]:
        return found[1], int(found[2])
    return None


def blocks_in(arch: str, names) -> list[tuple[str, int]]:
    """The blocks a model with these weight names has, in block order."""
    found = {block_of(arch, name) for name in names} - {None}
    return sorted(found, key=lambda b: (BLOCK_ORDER[arch].index(b[0]), b[1]))


def vector_for(blocks: list) -> list[float]:
    """One value per block: the last block (adapted in every fixture) at 0, the others at other values."""
    return [VECTOR_VALUES[(len(blocks) - 1 - i) % len(VECTOR_VALUES)] for i in range(len(blocks))]


def is_attention(path: str) -> bool:
    return any(word in path for word in ATTENTION_WORDS)


def scaled_merge(expected: dict, path: str, strength: float, factor: float) -> torch.Tensor:
    """base + strength·factor·ΔW of module path `path`, with ΔW = Musubi's merge at strength 1 − base."""
    base = expected[f"base/{path}.weight"]
    return base + strength * factor * (expected[f"merged/1.0/{path}.weight"] - base)
