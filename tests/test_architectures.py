"""Architecture registry: detection from files and from models, coverage of real ComfyUI names."""

from __future__ import annotations

import pytest
import torch
from comfyui_lycoris.lycoris_core import AdapterError, read_adapter
from comfyui_lycoris.lycoris_core.architectures import Part
from comfyui_lycoris.lycoris_core.detection import detect_adapter_architecture, detect_model_architecture
from comfyui_lycoris.lycoris_core.naming import module_path, naming_for
from comfyui_lycoris.lycoris_core.plan import make_plan
from comfyui_lycoris.lycoris_core.rows import Rows
from helpers import ARCH_OF_PREFIX, COMFY_MODELS, MUSUBI, adapter_entries, comfy_names, expected_weights
from safetensors.torch import load_file

ENTRIES = adapter_entries()
COMFY_ARCHS = sorted(p.stem for p in COMFY_MODELS.glob("*.json") if "." not in p.stem)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_file_architecture_from_metadata_and_from_keys_alone(entry):
    adapter = read_adapter(MUSUBI / entry["file"])
    assert adapter.architecture == entry["arch_id"]
    shapes = {stem: m.shape for stem, m in adapter.modules.items()}
    assert detect_adapter_architecture(shapes, {}) == entry["arch_id"]


@pytest.mark.parametrize("arch", sorted(set(ARCH_OF_PREFIX.values())))
def test_model_architecture_from_original_names(arch):
    entry = next(e for e in ENTRIES if e["arch_id"] == arch)
    names = [k.split("/", 1)[1] for k in expected_weights(entry) if k.startswith(("base/", "unadapted/"))]
    assert detect_model_architecture(names) == arch
    assert detect_model_architecture(["model.diffusion_model." + n for n in names]) == arch


@pytest.mark.parametrize("arch", COMFY_ARCHS)
def test_model_architecture_from_real_comfyui_names(arch):
    assert detect_model_architecture(comfy_names(arch)) == arch
    assert detect_model_architecture(["diffusion_model." + n for n in comfy_names(arch)]) == arch


@pytest.mark.parametrize("arch", COMFY_ARCHS)
def test_registry_names_every_linear_of_the_comfyui_model(arch):
    """Each 2-D weight of ComfyUI's real model is a layer the registry knows (so no target is missed)."""
    naming = naming_for(arch)
    unknown = [
        name for name, shape in comfy_names(arch).items()
        if name.endswith(".weight") and len(shape) == 2 and naming.place(module_path(name)).naming is None
    ]
    assert unknown == []


def test_part_rules():
    third = Part(1, ("third", "third", "third"))
    assert third.rows((30, 10)) == Rows(10, 20)
    linear1 = Part(3, ("in", "in", "in", "rest"))
    assert linear1.rows((70, 10)) == Rows(30, 70)
    with pytest.raises(AdapterError, match="three equal parts"):
        third.rows((31, 10))


def test_kandinsky5_is_refused_with_a_reason(write_safetensors):
    """Metadata naming Kandinsky 5 on keys no supported model has: refused, saying why."""
    stem = "lora_unet_visual_transformer_blocks_0_self_attention_to_query"
    path = write_safetensors(
        {f"{stem}.lokr_w1": torch.randn(2, 2), f"{stem}.lokr_w2": torch.randn(5, 5)},
        metadata={"ss_base_model_version": "kandinsky5"},
    )
    adapter = read_adapter(path)
    assert adapter.architecture == "kandinsky5"
    with pytest.raises(AdapterError, match="Kandinsky 5 is not supported"):
        make_plan(adapter, {"visual_transformer_blocks.0.self_attention.to_query.weight": (10, 10)})


def test_keys_win_over_metadata_naming_a_refused_model(write_safetensors):
    """Metadata is a hint: a file whose every key is Wan's is Wan's, whatever ss_base_model_version says."""
    path = write_safetensors(
        {"lora_unet_blocks_0_self_attn_q.lokr_w1": torch.randn(2, 2), "lora_unet_blocks_0_self_attn_q.lokr_w2": torch.randn(5, 5)},
        metadata={"ss_base_model_version": "kandinsky5"},
    )
    adapter = read_adapter(path)
    assert adapter.architecture == "wan"
    assert len(make_plan(adapter, {"blocks.0.self_attn.q.weight": (10, 10)}).patches) == 1


def test_forced_architecture_must_agree_with_the_model():
    adapter = read_adapter(MUSUBI / "wan_loha_r4_a2.safetensors")
    with pytest.raises(AdapterError, match=r"architecture Qwen-Image \(qwen_image\) was asked for, but the model is Wan"):
        make_plan(adapter, comfy_names("wan"), architecture="qwen_image")
    with pytest.raises(AdapterError, match="unknown architecture 'sdxl'"):
        make_plan(adapter, comfy_names("wan"), architecture="sdxl")
    assert len(make_plan(adapter, comfy_names("wan"), architecture="wan").patches) == 24


def test_diffusers_wan_names_load_onto_a_comfyui_wan_model(write_safetensors):
    """Diffusers-named Wan files (attn1/attn2/ffn.net) map onto ComfyUI's self_attn/cross_attn/ffn."""
    renames = {"self_attn.q": "attn1.to_q", "cross_attn.k_img": "attn2.add_k_proj", "ffn.0": "ffn.net.0.proj", "self_attn.o": "attn1.to_out.0"}
    tensors = {}
    for old, new in renames.items():
        tensors[f"transformer.blocks.1.{new}.lokr_w1"] = torch.randn(2, 2)
        tensors[f"transformer.blocks.1.{new}.lokr_w2"] = torch.randn(20 if old == "ffn.0" else 5, 5)
    plan = make_plan(read_adapter(write_safetensors(tensors)), comfy_names("wan"))
    assert {p.target.key for p in plan.patches} == {f"blocks.1.{old}.weight" for old in renames}
    assert plan.architecture == "wan"


def test_diffusers_flux_qkv_and_single_block_land_on_fused_slices(write_safetensors):
    tensors = {}
    for name, out in (("transformer_blocks.0.attn.to_k", 10), ("transformer_blocks.0.attn.add_v_proj", 10),
                      ("single_transformer_blocks.1.attn.to_v", 10), ("single_transformer_blocks.1.proj_mlp", 40)):
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(2, 10)
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out, 2)
    plan = make_plan(read_adapter(write_safetensors(tensors, metadata={"ss_base_model_version": "flux_kontext"})), comfy_names("flux"))
    got = {p.stem.split(".", 1)[1]: (p.target.key, p.target.rows) for p in plan.patches}
    assert got == {
        "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv.weight", Rows(10, 20)),
        "transformer_blocks.0.attn.add_v_proj": ("double_blocks.0.txt_attn.qkv.weight", Rows(20, 30)),
        "single_transformer_blocks.1.attn.to_v": ("single_blocks.1.linear1.weight", Rows(20, 30)),
        "single_transformer_blocks.1.proj_mlp": ("single_blocks.1.linear1.weight", Rows(30, 70)),
    }


FLUX2_FILE = MUSUBI / "flux_2_lokr_r3_a2.safetensors"  # Musubi's FLUX.2 klein fixture
FLUX1_FILE = MUSUBI / "flux_kontext_lokr_r3_a2.safetensors"


@pytest.mark.parametrize("metadata", [
    {"ss_base_model_version": "flux_2_dev", "modelspec.architecture": "Flux.2-dev/lora"},  # Musubi, FLUX.2 [dev]
    {"modelspec.architecture": "Flux.2-dev/lora"},
    {"ss_base_model_version": "flux_2_klein_9b"},
    {"ss_base_model_version": "flux2"},  # ai-toolkit
    {},
], ids=["musubi-dev", "modelspec-only", "klein-9b", "ai-toolkit", "none"])
def test_flux2_files_are_flux2_in_every_spelling(metadata, write_safetensors):
    tensors = load_file(str(FLUX2_FILE))
    assert read_adapter(write_safetensors(tensors, metadata=metadata)).architecture == "flux2"


def test_shapes_overrule_metadata_between_flux1_and_flux2(write_safetensors):
    """FLUX.1 and FLUX.2 share block names; the MLP width (4x vs 6x) decides, whatever the metadata says."""
    flux1 = write_safetensors(load_file(str(FLUX1_FILE)), metadata={"ss_base_model_version": "flux_2_dev"})
    assert read_adapter(flux1).architecture == "flux"
    flux2 = write_safetensors(load_file(str(FLUX2_FILE)), metadata={"modelspec.architecture": "Flux.1-dev/lora"})
    assert read_adapter(flux2).architecture == "flux2"


@pytest.mark.parametrize("value, arch", [
    ("wan2.1/lora", "wan"), ("hunyuan-video/lora", "hunyuan_video"), ("hunyuan-video-1.5/lora", "hunyuan_video_1_5"),
    ("Flux.1-dev/lora", "flux"), ("flux-1-dev/lora", "flux"), ("Flux.2-klein-4b/lora", "flux2"),
    ("Qwen-Image-Edit/lora", "qwen_image"), ("Z-Image/lora", "z_image"), ("framepack/lora", "framepack"),
])
def test_modelspec_architecture_spellings(value, arch):
    from comfyui_lycoris.lycoris_core.detection import architecture_from_metadata

    assert architecture_from_metadata({"modelspec.architecture": value}) == arch
