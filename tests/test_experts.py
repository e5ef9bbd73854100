"""Wan 2.2 experts (lycoris_core.experts): ai-toolkit's file holding both experts read as one adapter per expert."""

from __future__ import annotations

import pytest
import torch
from comfyui_lycoris.lycoris_core import AdapterError, read_adapter
from comfyui_lycoris.lycoris_core.experts import experts_in, named_expert, select_expert
from comfyui_lycoris.lycoris_core.plan import make_plan
from helpers import MUSUBI, comfy_names
from safetensors.torch import load_file


def both_experts(write_safetensors, high="wan_loha_r4_a2", low="wan_lokr_r3_a2", extra=None) -> str:
    """ai-toolkit's layout: `diffusion_model.transformer_1.<path>` (high noise), `transformer_2.` (low noise)."""
    tensors = {}
    for segment, name in (("transformer_1", high), ("transformer_2", low)):
        if name:
            for key, value in load_file(str(MUSUBI / f"{name}.diffusers.safetensors")).items():
                tensors[key.replace("diffusion_model.", f"diffusion_model.{segment}.", 1)] = value
    return write_safetensors({**tensors, **(extra or {})})


def test_each_expert_takes_its_own_modules(write_safetensors):
    adapter = read_adapter(both_experts(write_safetensors))
    assert {e: len(s) for e, s in experts_in(adapter).items()} == {"high_noise": 24, "low_noise": 24}
    shapes = {"diffusion_model." + k: v for k, v in comfy_names("wan").items()}
    for expert, algorithm, source in (("high_noise", "loha", "wan_loha_r4_a2"), ("low_noise", "lokr", "wan_lokr_r3_a2")):
        view = select_expert(adapter, expert)
        assert {m.algorithm for m in view.modules.values()} == {algorithm} and len(view.modules) == 24
        assert all(f".{'transformer_1' if expert == 'high_noise' else 'transformer_2'}." in k for k in view.tensors)
        plan = make_plan(view, shapes, "auto")
        assert plan.modules_applied == 24 and not plan.unmatched
        plain = read_adapter(MUSUBI / f"{source}.diffusers.safetensors")
        for patch in plan.patches:  # the same ΔW as the single-expert file lands on the same weight
            stem = patch.stem.replace("transformer_1.", "").replace("transformer_2.", "")
            assert torch.equal(view.modules[patch.stem].delta_weight(), plain.modules[stem].delta_weight())
            assert patch.target.key == "diffusion_model." + stem.removeprefix("diffusion_model.") + ".weight"


def test_one_model_cannot_take_both(write_safetensors):
    adapter = read_adapter(both_experts(write_safetensors))
    with pytest.raises(AdapterError, match=r"holds both Wan 2\.2 experts \(24 high-noise modules under transformer_1, "
                                           r"24 low-noise under transformer_2\)"):
        select_expert(adapter, None)
    only_low = read_adapter(both_experts(write_safetensors, high=None))
    assert select_expert(only_low, "low_noise").modules.keys() == only_low.modules.keys()
    with pytest.raises(AdapterError, match=r"holds only the low-noise expert \(transformer_2\), nothing for the high-noise model"):
        select_expert(only_low, "high_noise")
    stray = {"diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.randn(2, 10),
             "diffusion_model.blocks.0.ffn.0.lora_B.weight": torch.randn(40, 2)}
    mixed = read_adapter(both_experts(write_safetensors, extra=stray))
    with pytest.raises(AdapterError, match=r"48 modules belong to a Wan 2\.2 expert \(transformer_1 or transformer_2\) and 1 "
                                           r"to neither \(e\.g\. diffusion_model\.blocks\.0\.ffn\.0\)"):
        select_expert(mixed, "high_noise")


def test_an_ordinary_file_is_every_experts(write_safetensors):
    for name in ("wan_lokr_r3_a2.safetensors", "wan_lokr_r3_a2.diffusers_transformer.safetensors"):
        adapter = read_adapter(MUSUBI / name)
        assert not experts_in(adapter)
        assert all(select_expert(adapter, e) is adapter for e in (None, "high_noise", "low_noise"))


@pytest.mark.parametrize(("name", "expert"), [
    ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors", "high_noise"),
    ("my_lokr_low_noise.safetensors", "low_noise"), ("Wan22-HighNoise.safetensors", "high_noise"),
    ("loras/high_noise/my_lokr.safetensors", None),  # a folder's name says nothing of the file
    ("my_lokr.safetensors", None), ("high_noise_and_low_noise.safetensors", None)])
def test_named_expert(name, expert):
    assert named_expert(name) == expert


def test_merge_refuses_a_file_of_both_experts(write_safetensors, tmp_path):
    from comfyui_lycoris.lycoris_core.merge import merge
    from safetensors.torch import save_file

    base = tmp_path / "wan.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in comfy_names("wan").items()}, str(base))
    out = tmp_path / "out.safetensors"
    with pytest.raises(AdapterError, match=r"holds both Wan 2\.2 experts"):
        merge(base, out, [(both_experts(write_safetensors), 1.0, "")], progress=False)
    assert not out.exists()
