"""`convert --to comfyui` in a real ComfyUI: core's own LoraLoaderModelOnly loads all of it, correctly.

Every Musubi fixture (and a LoRA made here for every architecture) is converted to the comfyui layout
by this pack's converter, then loaded by ComfyUI core's own `LoraLoaderModelOnly` node (core's
`load_lora_for_models`, no code of this pack) onto ComfyUI's own model at the fixtures' size. Core
only logs what it cannot map (`lora key not loaded`, `NOT LOADED`): none may appear, and the patched
weights must equal Musubi's merge expectations. Skipped, with the reason, when there is no ComfyUI
(tests/comfyui_host.py: COMFYUI_PATH, or this pack inside ComfyUI/custom_nodes/).
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from comfyui_host import having_model, require_comfyui
from helpers import (
    ARCH_OF_PREFIX,
    MUSUBI,
    adapter_entries,
    expected_weights,
    module_paths,
    rel_err,
)
from safetensors.torch import save_file

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

# Architectures the running ComfyUI has a model for (core has none for FramePack). HunyuanVideo 1.5 LoKr: refused
# (last test).
SOURCES = having_model([e for e in adapter_entries() if e["format"] == "musubi" and e["arch_id"] != "framepack"],
                       lambda e: e["arch_id"])
REFUSED = "hunyuan_video_1_5_lokr_r3_a2.safetensors"
ARCHS = sorted({e["arch_id"] for e in SOURCES})


def arch_of(entry) -> str:
    return ARCH_OF_PREFIX[entry["file"].split("_loha_")[0].split("_lokr_")[0]]


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def converter(comfy_env):
    """This pack's converter, from the pack as ComfyUI loaded it."""
    return importlib.import_module(comfy_env.pack.__name__ + ".convert")


@pytest.fixture
def loras(comfy_env, tmp_path):
    comfy_env.folder_paths.add_model_folder_path("loras", str(tmp_path))
    return tmp_path


def core_patched_weights(env, mp, lora_name: str, strength: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ComfyUI core's LoraLoaderModelOnly on `mp`: (weights after patching, core's load warnings)."""
    warnings = _Warnings()
    logging.getLogger().addHandler(warnings)
    try:
        (patched,) = env.core_node("LoraLoaderModelOnly").load_lora_model_only(mp, lora_name, strength)
    finally:
        logging.getLogger().removeHandler(warnings)
    patched.patch_model()
    try:
        return env.weights(patched), [w for w in warnings.lines if "not loaded" in w.lower()]
    finally:
        patched.unpatch_model()


def assert_loads_like(env, arch, lora_path, expected_at, base: dict, strength=1.0):
    """Core loads `lora_path` completely and every adapted weight equals `expected_at[path]`."""
    mp = env.model(arch)
    where = env.set_base(mp, arch, {f"base/{p}.weight": w for p, w in base.items()})
    before = env.weights(mp)
    after, not_loaded = core_patched_weights(env, mp, lora_path.name, strength)
    assert not_loaded == [], not_loaded[:5]
    for path, (key, rows) in where.items():
        assert rel_err(after[key][rows], expected_at[path]) <= 1e-5, path
    adapted = {key for key, _ in where.values()}
    assert all(torch.equal(after[k], before[k]) for k in before if k not in adapted)


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("entry", [e for e in SOURCES if e["file"] != REFUSED], ids=lambda e: e["file"])
def test_core_loads_converted_fixture(comfy_env, converter, loras, entry, strength):
    out = loras / ("comfyui_" + entry["file"])
    converter.convert_file(MUSUBI / entry["file"], out, "comfyui")
    expected = expected_weights(entry)
    paths = module_paths(expected)
    assert_loads_like(
        comfy_env, arch_of(entry), out,
        {p: expected[f"merged/{strength}/{p}.weight"] for p in paths},
        {p: expected[f"base/{p}.weight"] for p in paths},
        strength,
    )


def lora_on(entry, path, rank=4, alpha=2.0) -> tuple[dict, dict]:
    """A Musubi-layout LoRA on a fixture's layers: ({P: W}, {P: expected W'}) and the file at `path`."""
    expected = expected_weights(entry)
    gen = torch.Generator().manual_seed(12)
    tensors, base, merged = {}, {}, {}
    for p in module_paths(expected):
        w = expected[f"base/{p}.weight"]
        stem = "lora_unet_" + p.replace(".", "_")
        down, up = torch.randn(rank, w.shape[1], generator=gen), torch.randn(w.shape[0], rank, generator=gen)
        tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)})
        base[p], merged[p] = w, (w.double() + alpha / rank * up.double() @ down.double()).float()
    save_file(tensors, str(path), metadata={"ss_base_model_version": entry["ss_base_model_version"]})
    return base, merged


@pytest.mark.parametrize("arch", ARCHS)
def test_core_loads_converted_lora(comfy_env, converter, loras, arch):
    entry = next(e for e in SOURCES if e["arch_id"] == arch and e["algorithm"] == "loha")
    base, merged = lora_on(entry, loras / f"{arch}_lora.safetensors")
    out = loras / f"{arch}_lora.comfyui.safetensors"
    converter.convert_file(loras / f"{arch}_lora.safetensors", out, "comfyui")
    assert_loads_like(comfy_env, arch, out, merged, base)


def test_core_maps_flux_diffusers_lokr_slices(comfy_env, converter, loras):
    """LoKr on FLUX's Diffusers q/k/v cannot be fused: the kept names land on the right rows in core."""
    gen = torch.Generator().manual_seed(13)
    tensors, parts = {}, {}
    for i, p in enumerate("qkv"):
        w1, w2 = torch.randn(2, 2, generator=gen), torch.randn(5, 5, generator=gen)
        tensors.update({f"lycoris_transformer_blocks_1_attn_to_{p}.lokr_w1": w1, f"lycoris_transformer_blocks_1_attn_to_{p}.lokr_w2": w2})
        parts[i] = torch.kron(w1, w2)
    save_file(tensors, str(loras / "flux_split.safetensors"))
    out = loras / "flux_split.comfyui.safetensors"
    converter.convert_file(loras / "flux_split.safetensors", out, "comfyui", arch="flux")
    mp = comfy_env.model("flux")
    before = comfy_env.weights(mp)
    after, not_loaded = core_patched_weights(comfy_env, mp, out.name, 1.0)
    assert not_loaded == []
    key = "diffusion_model.double_blocks.1.img_attn.qkv.weight"
    for i in range(3):
        assert rel_err(after[key][10 * i : 10 * (i + 1)] - before[key][10 * i : 10 * (i + 1)], parts[i]) <= 1e-5


def test_hunyuan_video_1_5_lokr_is_refused_not_approximated(comfy_env, converter, loras):
    """Core maps no name onto HunyuanVideo 1.5's fused q/k/v slices (checked on core's key map where the running
    ComfyUI has the model: test_core_loader_comparison.py), and LoKr cannot be fused exactly. Offline: on every
    release."""
    with pytest.raises(comfy_env.core.AdapterError, match=r"lora_unet_double_blocks_0_img_attn_q.*nothing written"):
        converter.convert_file(MUSUBI / REFUSED, loras / "refused.safetensors", "comfyui")
    assert not (loras / "refused.safetensors").exists()
