"""Baking inside ComfyUI: our loader's patched model saved with ComfyUI's own ModelSave
(comfy_extras' `save_checkpoint`) holds the merged weights, the same as `comfyui-lycoris merge`."""

from __future__ import annotations

import importlib

import pytest
import torch
from comfyui_host import having_model, require_comfyui
from helpers import MUSUBI, adapter_entries, expected_weights, rel_err
from safetensors.torch import load_file

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

ENTRY = {e["file"]: e for e in adapter_entries()}
CASES = having_model(["z_image_loha_r4_a2.safetensors", "wan_lokr_r3_a2.safetensors", "hunyuan_video_1_5_loha_r4_a2.safetensors"],
                     lambda name: ENTRY[name]["arch_id"])


def save_with_model_save(env, model, folder) -> dict[str, torch.Tensor]:
    merging = importlib.import_module("comfy_extras.nodes_model_merging")
    merging.save_checkpoint(model, filename_prefix="baked", output_dir=str(folder))
    (path,) = folder.glob("baked*.safetensors")
    return load_file(str(path))


@pytest.mark.parametrize("name", CASES)
def test_model_save_of_a_patch_mode_model_is_the_merge(comfy_env, name, tmp_path):
    entry = ENTRY[name]
    arch = entry["arch_id"]
    expected = expected_weights(entry)
    mp = comfy_env.build(arch, seed=11)
    where = comfy_env.set_base(mp, arch, expected)
    before = comfy_env.weights(mp)
    model, report = comfy_env.node("LycorisLoaderModelOnly").execute(
        model=mp, lora_name=entry["file"], strength_model=0.5, mode="patch").args
    saved = save_with_model_save(comfy_env, model, tmp_path)
    # ComfyUI writes most models under model.diffusion_model., HunyuanVideo (1.5) under model.model.
    prefix = "model.model." if any(k.startswith("model.model.") for k in saved) else "model.diffusion_model."
    saved = {"diffusion_model." + k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    assert set(saved) == set(before)
    touched = set()
    for path, (key, rows) in where.items():
        assert rel_err(saved[key][rows], expected[f"merged/0.5/{path}.weight"]) <= 1e-5, path
        touched.add(key)
    for key, tensor in before.items():
        if key in touched:
            unadapted = torch.ones(tensor.shape[0], dtype=torch.bool)
            for k, rows in where.values():
                if k == key:
                    unadapted[rows] = False
            assert torch.equal(saved[key][unadapted], tensor[unadapted]), key
        else:
            assert torch.equal(saved[key], tensor), key


def test_bypass_mode_report_says_the_weights_stay_untouched(comfy_env):
    entry = ENTRY["wan_lokr_r3_a2.safetensors"]
    _, report = comfy_env.node("LycorisLoaderModelOnly").execute(
        model=comfy_env.model("wan"), lora_name=entry["file"], strength_model=1.0, mode="bypass").args
    assert "weights       untouched" in report and "ModelSave" in report and "patch mode bakes it" in report


@pytest.mark.parametrize("arch", having_model(["hunyuan_video", "hunyuan_video_1_5"]))
def test_a_model_saved_by_comfyui_is_a_merge_base(comfy_env, tmp_path, arch):
    """What ModelSave writes (HunyuanVideo and HunyuanVideo 1.5 under `model.model.`) is a base `merge` maps onto."""
    entry = ENTRY[f"{arch}_lokr_r3_a2.safetensors"]
    expected = expected_weights(entry)
    mp = comfy_env.build(arch, seed=12)
    where = comfy_env.set_base(mp, arch, expected)
    folder = tmp_path / "saved"
    folder.mkdir()
    save_with_model_save(comfy_env, mp, folder)
    (base,) = folder.glob("baked*.safetensors")
    out = tmp_path / "merged.safetensors"
    merge = importlib.import_module(comfy_env.pack.__name__ + ".lycoris_core.merge").merge
    result = merge(base, out, [(MUSUBI / entry["file"], 1.0)], progress=False)
    assert not result.plans[0].unmatched and result.plans[0].architecture == arch
    merged = load_file(str(out))
    for path, (key, rows) in where.items():
        assert rel_err(merged["model.model." + key[len("diffusion_model."):]][rows], expected[f"merged/1.0/{path}.weight"]) <= 1e-5
