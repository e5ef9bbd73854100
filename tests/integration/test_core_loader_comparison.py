"""ComfyUI core's own LoraLoaderModelOnly vs ours on the files where core falls short.

Musubi Z-Image and HunyuanVideo 1.5 files keep q, k and v as separate modules where ComfyUI fuses them
into one qkv weight. Core has no slice mapping for Musubi's names of them and leaves them out (with a
'lora key not loaded' log line); ours puts each into its rows of the fused weight. Counted on the
weights ComfyUI actually produces (`patch_model`): a module counts as applied when its weight rows
changed.

Releases without those models (0.3.64) collect no comparison on them; there the loader's error says that
this ComfyUI lacks the model (test_newer_architectures.py).
"""

from __future__ import annotations

import re

import pytest
import torch
from comfyui_host import having_model, require_comfyui
from helpers import adapter_entries, expected_weights, module_paths, rel_err

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

QKV = re.compile(r"(attention\.to_[qkv]|_attn_[qkv])$")
FILES = having_model([e for e in adapter_entries() if e["arch_id"] in ("z_image", "hunyuan_video_1_5")],
                     lambda e: e["arch_id"])


def applied(env, patched, where, expected) -> dict[str, bool]:
    """{Musubi path: whether its weight rows changed} after ComfyUI loads the patched model."""
    patched.patch_model()
    try:
        after = {key: env.comfy.utils.get_attr(patched.model, key).detach().clone() for key, _ in where.values()}
    finally:
        patched.unpatch_model()
    return {path: not torch.equal(after[key][rows], expected[f"base/{path}.weight"]) for path, (key, rows) in where.items()}


@pytest.mark.parametrize("entry", FILES, ids=[e["file"] for e in FILES])
def test_core_leaves_split_qkv_out_and_we_apply_them(comfy_env, entry):
    arch, expected = entry["arch_id"], expected_weights(entry)
    mp = comfy_env.model(arch)
    where = comfy_env.set_base(mp, arch, expected)
    paths = module_paths(expected)
    qkv = [p for p in paths if QKV.search(p)]
    assert len(qkv) == {"z_image": 6, "hunyuan_video_1_5": 12}[arch]  # q, k, v of two blocks (img and txt in HV 1.5)

    (core_model,) = comfy_env.core_node("LoraLoaderModelOnly").load_lora_model_only(mp, entry["file"], 1.0)
    ours, report = comfy_env.node("LycorisLoaderModelOnly").execute(
        model=mp, lora_name=entry["file"], strength_model=1.0).args

    core_done, our_done = applied(comfy_env, core_model, where, expected), applied(comfy_env, ours, where, expected)
    core_count, our_count = sum(core_done.values()), sum(our_done.values())
    print(f"\n{entry['file']}: ComfyUI core applies {core_count}/{len(paths)} modules, LycorisLoader {our_count}/{len(paths)}")
    assert our_count == len(paths) and all(our_done[p] for p in qkv)
    assert f"applied       {len(paths)} of {len(paths)} modules" in report
    assert f"fused         {len(qkv)} of them into row slices of fused weights" in report
    if entry["format"] == "musubi":  # the Diffusers copies are counted for the README only
        assert not any(core_done[p] for p in qkv), "core was expected to leave Musubi's split q/k/v out"
        assert core_count < our_count
    if arch == "hunyuan_video_1_5":  # core maps no name at all onto its fused q/k/v slices (why convert
        # --to comfyui refuses its LoKr: test_convert_comfyui.py)
        key_map = comfy_env.comfy.lora.model_lora_keys_unet(mp.model, {})
        assert not any(k.endswith(("img_attn.q", "img_attn_q", "img_attn.to_q")) for k in key_map)
        assert not any(isinstance(v, tuple) for v in key_map.values())


if not FILES:  # releases with neither model (0.3.64): no test here, where an empty parametrization would be a skip
    del test_core_leaves_split_qkv_out_and_we_apply_them


ENTRY = {e["file"]: e for e in adapter_entries()}


@pytest.mark.parametrize("name", having_model(["z_image_lokr_r3_a2.safetensors", "wan_lokr_r3_a2.safetensors"],
                                              lambda name: ENTRY[name]["arch_id"]))
def test_what_core_does_apply_it_applies_exactly_as_we_do(comfy_env, name):
    """Where core does load a module, its weights equal ours (same math, one reference)."""
    entry = ENTRY[name]
    arch, expected = entry["arch_id"], expected_weights(entry)
    mp = comfy_env.model(arch)
    where = comfy_env.set_base(mp, arch, expected)
    (core_model,) = comfy_env.core_node("LoraLoaderModelOnly").load_lora_model_only(mp, entry["file"], 0.5)
    done = applied(comfy_env, core_model, where, expected)
    core_model.patch_model()
    try:
        for path, (key, rows) in where.items():
            if done[path]:
                got = comfy_env.comfy.utils.get_attr(core_model.model, key)[rows]
                assert rel_err(got, expected[f"merged/0.5/{path}.weight"]) <= 1e-5, path
    finally:
        core_model.unpatch_model()
    assert any(done.values())
