"""lycoris_core.loading: the cache, tensor loading with the NaN check, bound modules, the load report."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch
from comfyui_lycoris.lycoris_core import AdapterError
from comfyui_lycoris.lycoris_core.loading import (
    load_report,
    load_tensors,
    read_adapter_cached,
    weight_shapes,
)
from comfyui_lycoris.lycoris_core.module import BoundModule
from comfyui_lycoris.lycoris_core.naming import is_text_encoder_stem
from comfyui_lycoris.lycoris_core.plan import make_plan
from helpers import MUSUBI, comfy_names, rel_err


def test_cache_keeps_one_parse_per_file_version(tmp_path):
    path = tmp_path / "a.safetensors"
    shutil.copy(MUSUBI / "wan_loha_r4_a2.safetensors", path)
    first = read_adapter_cached(path)
    assert read_adapter_cached(str(path)) is first
    assert read_adapter_cached(path, lokr_full_matrix_alpha=True) is not first  # the option is part of the key
    shutil.copy(MUSUBI / "wan_lokr_r3_a2.safetensors", path)  # replaced on disk: another size
    os.utime(path, ns=(1, 1))
    second = read_adapter_cached(path)
    assert second is not first and {m.algorithm for m in second.modules.values()} == {"lokr"}
    with pytest.raises(AdapterError, match="no such file"):
        read_adapter_cached(tmp_path / "missing.safetensors")


def test_load_tensors_keeps_dtypes_and_refuses_non_finite(write_safetensors):
    stem = "lora_unet_blocks_0_self_attn_q"
    good = {f"{stem}.lora_up.weight": torch.randn(10, 2, dtype=torch.bfloat16),
            f"{stem}.lora_down.weight": torch.randn(2, 10, dtype=torch.bfloat16), f"{stem}.alpha": torch.tensor(1.0)}
    shapes = comfy_names("wan")
    plan = make_plan(read_adapter_cached(write_safetensors(good)), shapes)
    seen = []
    tensors = load_tensors(plan, progress=lambda done, total: seen.append((done, total)))
    assert {k: v.dtype for k, v in tensors[stem].items()} == {"up": torch.bfloat16, "down": torch.bfloat16}
    assert seen == [(1, 1)]
    bad = dict(good)
    bad[f"{stem}.lora_up.weight"] = good[f"{stem}.lora_up.weight"].clone()
    bad[f"{stem}.lora_up.weight"][0, :2] = float("nan")
    plan = make_plan(read_adapter_cached(write_safetensors(bad)), shapes)
    with pytest.raises(AdapterError, match=r"2 non-finite values .* lora_unet_blocks_0_self_attn_q.lora_up.weight \(2\)"):
        load_tensors(plan)


def test_a_module_bound_to_given_tensors_never_reads_its_file():
    adapter = read_adapter_cached(MUSUBI / "wan_lokr_r3_a2.safetensors")
    module = adapter.modules["lora_unet_blocks_0_ffn_0"]
    def no_file(key):
        raise AssertionError(f"{key} was read from the file")

    record = dataclasses.replace(module, source=no_file)
    with pytest.raises(AssertionError, match="was read from the file"):
        record.delta_weight()
    tensors = module.read()
    bound = BoundModule(record, tensors)
    weight = torch.randn(module.shape)
    want = weight + 0.5 * module.delta_weight()
    bound.apply_(weight, 0.5)
    assert rel_err(weight, want) <= 1e-6
    assert torch.equal(bound.delta_weight(), module.delta_weight())


def test_weight_shapes_reads_no_data():
    layer = torch.nn.Linear(3, 4, device="meta")  # meta tensors have shapes and no data
    assert weight_shapes(layer.state_dict()) == {"weight": (4, 3), "bias": (4,)}
    assert weight_shapes(layer.named_parameters()) == {"weight": (4, 3), "bias": (4,)}


def test_load_report_says_what_was_and_was_not_applied(write_safetensors):
    source = read_adapter_cached(MUSUBI / "z_image_lokr_r3_a2.safetensors")
    tensors = {key: source.load(key) for key in source.tensors}
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(4, 2)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(2, 4)
    tensors["lora_unet_layers_0_no_such_layer.lora_up.weight"] = torch.randn(4, 2)
    tensors["lora_unet_layers_0_no_such_layer.lora_down.weight"] = torch.randn(2, 4)
    adapter = read_adapter_cached(write_safetensors(tensors, metadata=source.metadata))
    plan = make_plan(adapter, comfy_names("z_image"))
    delegated = {"lora_te_text_model_encoder_layers_0_mlp_fc1": "text encoder, by ComfyUI"}
    text = load_report(plan, 0.75, "bypass", delegated=delegated)
    lines = text.splitlines()
    assert "format        musubi" in lines
    assert "architecture  Z-Image (z_image)" in lines
    assert "mode          bypass, strength 0.75" in lines
    assert any(line.startswith("weights       untouched") for line in lines)
    assert not any(line.startswith("weights ") for line in load_report(plan, 0.75, "patch").splitlines())
    full = sum(m.rank is None for m in source.modules.values())
    assert f"applied       14 of 16 modules: 14 lokr ({full} full-matrix, {14 - full} low-rank)" in lines
    assert "fused         6 of them into row slices of fused weights (split q/k/v)" in lines
    assert "delegated     1 modules: text encoder, by ComfyUI" in lines
    assert "unmatched     1 (listed below; they were not applied)" in lines
    assert "  lora_unet_layers_0_no_such_layer: no weight of the model has this name" in lines


def test_text_encoder_stems():
    assert is_text_encoder_stem("lora_te_text_model_encoder_layers_0_mlp_fc1")
    assert is_text_encoder_stem("lora_te2_text_model_encoder_layers_0_mlp_fc1")
    assert is_text_encoder_stem("text_encoder.text_model.encoder.layers.0.mlp.fc1")
    assert not is_text_encoder_stem("lora_unet_blocks_0_self_attn_q")
    assert not is_text_encoder_stem("diffusion_model.txt_in.input_embedder")
