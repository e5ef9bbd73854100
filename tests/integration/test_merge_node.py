"""LycorisMerge inside a real ComfyUI: a diffusion-model file from models/diffusion_models baked with
adapters from models/loras into output/diffusion_models (which Load Diffusion Model then lists),
the same bytes as `comfyui-lycoris merge`, cancellable, never over an existing file unless asked."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from comfyui_host import require_comfyui
from helpers import MUSUBI, adapter_entries, expected_weights, module_paths
from safetensors.torch import load_file, save_file

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

ENTRY = {e["file"]: e for e in adapter_entries()}
LOHA, LOKR = ENTRY["wan_loha_r4_a2.safetensors"], ENTRY["wan_lokr_r3_a2.safetensors"]


@pytest.fixture
def folders(comfy_env, tmp_path):
    """A models/diffusion_models folder holding a Wan base (the fixture's weights, original naming), and
    ComfyUI's output folder moved to a temporary place."""
    fp = comfy_env.folder_paths
    models = tmp_path / "diffusion_models"
    models.mkdir()
    expected = expected_weights(LOHA)
    base = {k.split("/", 1)[1]: v.to(torch.bfloat16) for k, v in expected.items() if k.startswith(("base/", "unadapted/"))}
    save_file(base, str(models / "wan_tiny.safetensors"), metadata={"note": "kept"})
    fp.add_model_folder_path("diffusion_models", str(models))
    old = fp.get_output_directory()
    fp.set_output_directory(str(tmp_path / "output"))
    yield models, tmp_path / "output"
    fp.set_output_directory(old)


def bake(env, **inputs):
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return env.node("LycorisMerge").execute(**inputs)


def test_bakes_the_same_file_as_the_command_line(comfy_env, folders, tmp_path):
    models, output = folders
    out = bake(comfy_env, unet_name="wan_tiny.safetensors", lora_name=LOHA["file"], strength=0.5,
               more_adapters=f"# the LoKr at full strength\n{LOKR['file']}:1.0\n", output_name="")
    path, report = out.args
    assert path == str(output / "diffusion_models" / "wan_tiny_wan_loha_r4_a2.safetensors")
    assert "wan_tiny_wan_loha_r4_a2.safetensors" in comfy_env.folder_paths.get_filename_list("diffusion_models")
    assert "24/24 modules matched" in report and "listed by Load Diffusion Model as" in report

    cli_out = tmp_path / "cli.safetensors"
    argv = ["merge", str(models / "wan_tiny.safetensors"), str(cli_out),
            "--adapter", f"{MUSUBI / LOHA['file']}:0.5", "--adapter", f"{MUSUBI / LOKR['file']}:1.0"]
    assert importlib.import_module(comfy_env.pack.__name__ + ".cli").main(argv) == 0
    assert load_file(path).keys() == load_file(str(cli_out)).keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(path).values(), load_file(str(cli_out)).values()))

    # and the numbers are Musubi's: base + 0.5·ΔW(LoHa) + ΔW(LoKr), one bf16 rounding
    e1, e2 = expected_weights(LOHA), expected_weights(LOKR)
    baked = load_file(path)
    for p in module_paths(e1):
        want = (e1[f"base/{p}.weight"].bfloat16().float() + (e1[f"merged/0.5/{p}.weight"] - e1[f"base/{p}.weight"])
                + (e2[f"merged/1.0/{p}.weight"] - e2[f"base/{p}.weight"]))
        assert baked[f"{p}.weight"].dtype == torch.bfloat16
        # bf16 output, one rounding: within half a bf16 unit (2^-8 relative) of the exact fp32 result
        assert ((baked[f"{p}.weight"].float() - want).abs() <= want.abs() * 2**-8 + 1e-7).all(), p


def test_cancel_writes_nothing(comfy_env, folders, monkeypatch):
    _, output = folders
    mm = comfy_env.comfy.model_management
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupted)
    with pytest.raises(mm.InterruptProcessingException):
        bake(comfy_env, unet_name="wan_tiny.safetensors", lora_name=LOHA["file"], strength=1.0, output_name="cancelled")
    assert os.listdir(output / "diffusion_models") == []  # no file, no temporary left behind


def test_refuses_to_overwrite_and_bad_lines(comfy_env, folders):
    _, output = folders
    inputs = dict(unet_name="wan_tiny.safetensors", lora_name=LOKR["file"], strength=1.0, output_name="sub/baked")
    (path, _) = bake(comfy_env, **inputs).args
    before = open(path, "rb").read()
    with pytest.raises(comfy_env.core.AdapterError, match="exists; turn on 'overwrite'"):
        bake(comfy_env, **inputs)
    assert open(path, "rb").read() == before
    with pytest.raises(comfy_env.core.AdapterError, match="'nope.safetensors' is not a file in the loras folders"):
        bake(comfy_env, **dict(inputs, output_name="other"), more_adapters="nope.safetensors:0.5")
    assert not (output / "diffusion_models" / "other.safetensors").exists()
    with pytest.raises(comfy_env.core.AdapterError, match="Wan 2.1/2.2.*FLUX|FLUX.*Wan 2.1/2.2"):
        bake(comfy_env, **dict(inputs, output_name="other", lora_name="flux_kontext_lokr_r3_a2.safetensors"))
    assert not (output / "diffusion_models" / "other.safetensors").exists()


@pytest.mark.parametrize("line", ["{lokr}:nan", "{lokr}:inf", "{lokr}:1e39"])
def test_strengths_from_the_text_list_are_checked(comfy_env, folders, line):
    """The extra adapters' strengths come as text, past the strength widget's bounds."""
    _, output = folders
    with pytest.raises(comfy_env.core.AdapterError, match="strength"):
        bake(comfy_env, unet_name="wan_tiny.safetensors", lora_name=LOKR["file"], strength=1.0, output_name="odd",
             more_adapters=line.format(lokr=LOKR["file"]))
    assert not (output / "diffusion_models" / "odd.safetensors").exists()


def test_block_weights_for_the_adapter_and_in_the_text_list(comfy_env, folders):
    """`block_weights` for lora_name, `name:strength:blocks` lines for the others: Musubi's merges scaled per block."""
    _, output = folders
    out = bake(comfy_env, unet_name="wan_tiny.safetensors", lora_name=LOHA["file"], strength=1.0, block_weights="0, 1",
               more_adapters=f"{LOKR['file']}:0.5:attn_only", output_name="blocks")
    path, report = out.args
    assert "block weights 2 numbers: blocks.0: 0; blocks.1: 1; outside the blocks: 1" in report
    assert "block weights attn_only: blocks.0-1: 0, attn 1; outside the blocks: 1" in report
    e1, e2 = expected_weights(LOHA), expected_weights(LOKR)
    baked = load_file(path)
    for p in module_paths(e1):
        first = 0.0 if p.startswith("blocks.0.") else 1.0  # the factors, from the module paths
        second = 1.0 if "attn" in p else 0.0
        want = (e1[f"base/{p}.weight"].bfloat16().float() + first * (e1[f"merged/1.0/{p}.weight"] - e1[f"base/{p}.weight"])
                + 0.5 * second * (e2[f"merged/1.0/{p}.weight"] - e2[f"base/{p}.weight"]))
        assert ((baked[f"{p}.weight"].float() - want).abs() <= want.abs() * 2**-8 + 1e-7).all(), p
    with pytest.raises(comfy_env.core.AdapterError, match="3 numbers given; this Wan 2.1/2.2 \\(wan\\) model has 2 blocks"):
        bake(comfy_env, unet_name="wan_tiny.safetensors", lora_name=LOKR["file"], strength=1.0, output_name="bad",
             more_adapters=f"{LOHA['file']}:1:1,1,1")
    assert not (output / "diffusion_models" / "bad.safetensors").exists()
