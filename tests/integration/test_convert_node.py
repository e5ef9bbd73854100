"""LycorisConvert inside a real ComfyUI: the same bytes as the `comfyui-lycoris convert` command line, written
into ComfyUI's output/loras folder (which the loaders then list), never over an existing file unless asked."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from comfyui_host import require_comfyui
from helpers import MUSUBI

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

SOURCE = "wan_lokr_r3_a2.safetensors"


@pytest.fixture
def output_dir(comfy_env, tmp_path):
    """ComfyUI's output folder moved to a temporary place for one test."""
    fp = comfy_env.folder_paths
    old = fp.get_output_directory()
    fp.set_output_directory(str(tmp_path / "output"))
    yield tmp_path / "output"
    fp.set_output_directory(old)


def convert(env, **inputs):
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return env.node("LycorisConvert").execute(**inputs)


@pytest.mark.parametrize("to,prefix", [("comfyui", "diffusion_model"), ("musubi", "diffusion_model"),
                                       ("diffusers", "transformer")])
def test_writes_the_same_file_as_the_command_line(comfy_env, output_dir, tmp_path, to, prefix):
    out = convert(comfy_env, lora_name=SOURCE, to=to, prefix=prefix, architecture="auto", output_name="", overwrite=False)
    (path,) = out.args
    assert path == str(output_dir / "loras" / f"wan_lokr_r3_a2_{to}.safetensors")
    cli_out = tmp_path / "cli.safetensors"
    argv = ["convert", str(MUSUBI / SOURCE), str(cli_out), "--to", to] + (["--prefix", prefix] if to == "diffusers" else [])
    assert importlib.import_module(comfy_env.pack.__name__ + ".cli").main(argv) == 0
    assert open(path, "rb").read() == cli_out.read_bytes()
    summary = out.ui.as_dict()["text"][0]
    assert summary.startswith(f"wrote {path}: {to} layout, 24 modules from 24")
    assert os.path.basename(path) in comfy_env.folder_paths.get_filename_list("loras")


def test_refuses_to_overwrite_unless_asked(comfy_env, output_dir):
    inputs = dict(lora_name=SOURCE, to="comfyui", prefix="diffusion_model", architecture="wan",
                  output_name="sub/converted", overwrite=False)
    (path,) = convert(comfy_env, **inputs).args
    assert path == str(output_dir / "loras" / "sub" / "converted.safetensors")
    with open(path, "r+b") as f:  # mark the file, to see whether it is replaced
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00" if last != b"\x00" else b"\x01")
    marked = open(path, "rb").read()
    with pytest.raises(comfy_env.core.AdapterError, match="exists; turn on 'overwrite'"):
        convert(comfy_env, **inputs)
    assert open(path, "rb").read() == marked
    assert sorted(os.listdir(os.path.dirname(path))) == ["converted.safetensors"], "no temporary file left behind"
    convert(comfy_env, **dict(inputs, overwrite=True))
    assert open(path, "rb").read() != marked


def test_errors_are_node_errors_and_write_nothing(comfy_env, output_dir):
    with pytest.raises(comfy_env.core.AdapterError, match="inside the output/loras folder"):
        convert(comfy_env, lora_name=SOURCE, to="comfyui", prefix="diffusion_model", architecture="auto",
                output_name="../../escaped", overwrite=False)
    with pytest.raises(comfy_env.core.AdapterError, match="flux"):  # a Wan file converted as FLUX
        convert(comfy_env, lora_name=SOURCE, to="comfyui", prefix="diffusion_model", architecture="flux",
                output_name="wrong", overwrite=False)
    assert os.listdir(output_dir / "loras") == []


@pytest.mark.parametrize("name", ["a\0b", "x" * 240, "sub/" + "y" * 300 + "/z"])
def test_output_names_that_cannot_be_files_are_node_errors(comfy_env, output_dir, name):
    """A NUL byte or a name longer than a file name may be: an AdapterError the UI shows, not an OSError."""
    with pytest.raises(comfy_env.core.AdapterError, match="output name"):
        convert(comfy_env, lora_name=SOURCE, to="comfyui", prefix="diffusion_model", architecture="auto",
                output_name=name, overwrite=False)
    assert os.listdir(output_dir / "loras") == []
