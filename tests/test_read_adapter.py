"""The file model: key families, per-module algorithm detection, alphas, metadata, unknown keys."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from comfyui_lycoris.lycoris_core import AdapterError, read_adapter


def test_mixed_algorithms_in_one_file(write_safetensors):
    path = write_safetensors(
        {
            "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(8, 2),
            "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(2, 8),
            "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(1.0),
            "lora_unet_blocks_0_self_attn_k.hada_w1_a": torch.randn(8, 2),
            "lora_unet_blocks_0_self_attn_k.hada_w1_b": torch.randn(2, 8),
            "lora_unet_blocks_0_self_attn_k.hada_w2_a": torch.randn(8, 2),
            "lora_unet_blocks_0_self_attn_k.hada_w2_b": torch.randn(2, 8),
            "lora_unet_blocks_0_self_attn_v.lokr_w1": torch.randn(2, 2),
            "lora_unet_blocks_0_self_attn_v.lokr_w2": torch.randn(4, 4),
            "lora_unet_blocks_0_self_attn_o.diff": torch.randn(8, 8),
        },
        metadata={"ss_base_model_version": "wan", "ss_network_module": "networks.lora"},
    )
    adapter = read_adapter(path)
    assert {stem: m.algorithm for stem, m in adapter.modules.items()} == {
        "lora_unet_blocks_0_self_attn_q": "lora",
        "lora_unet_blocks_0_self_attn_k": "loha",
        "lora_unet_blocks_0_self_attn_v": "lokr",
        "lora_unet_blocks_0_self_attn_o": "diff",
    }
    assert adapter.format == "musubi"
    assert adapter.architecture == "wan"
    assert adapter.metadata["ss_network_module"] == "networks.lora"
    assert adapter.modules["lora_unet_blocks_0_self_attn_q"].scale == 0.5
    assert adapter.modules["lora_unet_blocks_0_self_attn_k"].alpha is None  # missing alpha: scale 1
    assert adapter.modules["lora_unet_blocks_0_self_attn_k"].scale == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_alpha_in_any_float_dtype(dtype, write_safetensors):
    alpha = torch.tensor(3.0, dtype=dtype)
    path = write_safetensors(
        {
            "m.hada_w1_a": torch.randn(8, 4).to(dtype), "m.hada_w1_b": torch.randn(4, 8).to(dtype),
            "m.hada_w2_a": torch.randn(8, 4).to(dtype), "m.hada_w2_b": torch.randn(4, 8).to(dtype),
            "m.alpha": alpha,
        }
    )
    module = read_adapter(path).modules["m"]
    assert module.alpha == 3.0 and module.scale == 0.75


def test_bf16_alpha_is_read_exactly(write_safetensors):
    alpha = torch.tensor(0.3, dtype=torch.bfloat16)  # not representable: 0.30078125
    path = write_safetensors({"m.lora_up.weight": torch.randn(4, 2), "m.lora_down.weight": torch.randn(2, 4), "m.alpha": alpha})
    assert read_adapter(path).modules["m"].alpha == alpha.item() == 0.30078125


def test_unknown_keys_are_kept_and_reported(write_safetensors):
    path = write_safetensors(
        {
            "lora_unet_x.lora_up.weight": torch.randn(4, 2),
            "lora_unet_x.lora_down.weight": torch.randn(2, 4),
            "lora_unet_x.some_new_thing": torch.randn(3),
            "text_projection.weight": torch.randn(2, 2),
            "lora_unet_y.alpha": torch.tensor(1.0),  # an alpha whose weights are missing
        }
    )
    adapter = read_adapter(path)
    assert list(adapter.modules) == ["lora_unet_x"]
    assert sorted(adapter.unknown_keys) == ["lora_unet_x.some_new_thing", "lora_unet_y.alpha", "text_projection.weight"]
    assert any("lora_unet_y" in p for p in adapter.problems)


@pytest.mark.parametrize(
    "keys, family",
    [
        (("lora_unet_blocks_0_q.lora_up.weight", "lora_unet_blocks_0_q.lora_down.weight"), "musubi"),
        (("diffusion_model.blocks.0.q.lora_B.weight", "diffusion_model.blocks.0.q.lora_A.weight"), "diffusers"),
        (("lycoris_transformer_blocks_0_attn_to_q.lora_up.weight", "lycoris_transformer_blocks_0_attn_to_q.lora_down.weight"), "lycoris"),
        (("transformer.transformer_blocks.0.attn.to_q.lora.up.weight", "transformer.transformer_blocks.0.attn.to_q.lora.down.weight"), "diffusers"),
        (("base_model.model.blocks.0.q.lora_B.weight", "base_model.model.blocks.0.q.lora_A.weight"), "peft"),
        (("base_model.model.blocks.0.q.lora_B.default.weight", "base_model.model.blocks.0.q.lora_A.default.weight"), "peft"),
    ],
)
def test_key_families(keys, family, write_safetensors):
    up, down = keys
    path = write_safetensors({up: torch.randn(6, 2), down: torch.randn(2, 6)})
    adapter = read_adapter(path)
    (stem,) = adapter.modules
    assert adapter.format == family
    assert up.startswith(stem + ".") and down.startswith(stem + ".")
    assert adapter.modules[stem].rank == 2


def test_pickle_is_read_weights_only(tmp_path):
    path = tmp_path / "adapter.pt"
    torch.save({"m.lokr_w1": torch.randn(2, 2), "m.lokr_w2": torch.randn(3, 3)}, path)
    assert read_adapter(path).modules["m"].shape == (6, 6)

    evil = tmp_path / "evil.ckpt"
    torch.save({"m.lokr_w1": argparse.Namespace(payload="arbitrary object")}, evil)  # not allowed weights-only
    with pytest.raises(AdapterError, match="weights-only"):
        read_adapter(evil)


def test_lokr_full_matrix_alpha_override(write_safetensors):
    tensors = {"m.lokr_w1": torch.randn(2, 2), "m.lokr_w2": torch.randn(4, 4), "m.alpha": torch.tensor(1.0)}
    path = write_safetensors(tensors, metadata={"ss_network_dim": "32"})
    assert read_adapter(path).modules["m"].scale == 1.0
    assert read_adapter(path, lokr_full_matrix_alpha=True).modules["m"].scale == 1 / 32
    no_dim = write_safetensors(tensors)
    with pytest.raises(AdapterError, match="ss_network_dim"):
        read_adapter(no_dim, lokr_full_matrix_alpha=True)


def test_tensors_are_loaded_lazily(write_safetensors):
    path = write_safetensors({"m.lora_up.weight": torch.randn(4, 2), "m.lora_down.weight": torch.randn(2, 4)})
    adapter = read_adapter(path)
    calls = []
    original = adapter.modules["m"].source

    def counting(key):
        calls.append(key)
        return original(key)

    module = dataclasses.replace(adapter.modules["m"], source=counting)
    assert calls == []
    module.delta_weight()
    assert sorted(calls) == ["m.lora_down.weight", "m.lora_up.weight"]


def test_format_comfyui_when_keys_use_comfyui_only_names(write_safetensors):
    def lokr(stem):
        return {f"{stem}.lokr_w1": torch.randn(2, 2), f"{stem}.lokr_w2": torch.randn(5, 5)}

    comfy = write_safetensors({**lokr("diffusion_model.layers.0.attention.out"), **lokr("diffusion_model.layers.0.feed_forward.w2")},
                              metadata={"ss_base_model_version": "z_image"})
    musubi_dotted = write_safetensors({**lokr("diffusion_model.layers.0.attention.to_out.0"), **lokr("diffusion_model.layers.0.feed_forward.w2")},
                                      metadata={"ss_base_model_version": "z_image"})
    assert read_adapter(comfy).format == "comfyui"
    assert read_adapter(musubi_dotted).format == "diffusers"
