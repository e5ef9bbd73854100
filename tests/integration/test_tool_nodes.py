"""The tool nodes inside a real ComfyUI (LycorisToLora, LycorisResize, LycorisExtract, LycorisEma): adapters from
models/loras and models from models/diffusion_models, written into output/loras (which the LoRA loaders then
list) with the same tensors and metadata as the command line, a progress bar, never over an existing file
unless asked, and nothing at all (no file, no temporary file) when Cancel is pressed mid-way."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from comfyui_host import require_comfyui
from helpers import MUSUBI, adapter_entries, expected_weights, module_paths, original_base, rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

ENTRY = {e["file"]: e for e in adapter_entries()}
LOKR = "wan_lokr_r3_a2.safetensors"
LOHA = "wan_loha_r4_a2.safetensors"


@pytest.fixture
def folders(comfy_env, tmp_path):
    """models/diffusion_models with the Wan fixture's tiny base and the same model with Musubi's merge of the
    LoKr fixture in it (float32: their difference is Musubi's ΔW to float32 rounding), models/loras with two later checkpoints of the LoKr
    (the fixture's factors moved a little), and ComfyUI's output folder moved to a temporary place."""
    fp = comfy_env.folder_paths
    models, loras = tmp_path / "diffusion_models", tmp_path / "loras"
    models.mkdir()
    (loras / "run").mkdir(parents=True)
    expected = expected_weights(ENTRY[LOKR])
    base = original_base(expected)
    tuned = dict(base)
    for path in module_paths(expected):
        tuned[f"{path}.weight"] = expected[f"merged/1.0/{path}.weight"]
    save_file(base, str(models / "wan_tiny.safetensors"))
    save_file(tuned, str(models / "wan_tiny_tuned.safetensors"))
    with safe_open(str(MUSUBI / LOKR), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        metadata = f.metadata()
    gen = torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        tensors = {k: v if k.endswith(".alpha") else v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
        save_file(tensors, str(loras / "run" / f"run-{step:04d}.safetensors"), metadata=metadata)
    added = {"diffusion_models": str(models), "loras": str(loras)}
    for kind, folder in added.items():  # first in the lists: other tests' folders may hold files of the same names
        fp.add_model_folder_path(kind, folder, is_default=True)
    fp.filename_list_cache.clear()
    old = fp.get_output_directory()
    fp.set_output_directory(str(tmp_path / "output"))
    yield models, loras, tmp_path / "output" / "loras"
    fp.set_output_directory(old)
    # the next test's folders hold files of the same names: these must not answer for them
    for kind, folder in (*added.items(), ("loras", str(tmp_path / "output" / "loras"))):
        if folder in fp.folder_names_and_paths[kind][0]:
            fp.folder_names_and_paths[kind][0].remove(folder)
    fp.filename_list_cache.clear()


def run(env, node_id, **inputs):
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return env.node(node_id).execute(**inputs)


def cli(env, *argv) -> None:
    assert importlib.import_module(env.pack.__name__ + ".cli").main([str(a) for a in argv]) == 0


def same_file(a, b, ignore=()) -> None:
    """The same tensors (names, dtypes, values) and metadata (but the `ignore` keys) in both files."""
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert list(fa.keys()) == list(fb.keys())
        for key in fa.keys():  # noqa: SIM118 (not a dict)
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key
        meta_a, meta_b = fa.metadata() or {}, fb.metadata() or {}
    assert {k: v for k, v in meta_a.items() if k not in ignore} == {k: v for k, v in meta_b.items() if k not in ignore}


@pytest.mark.parametrize("node_id", ["LycorisToLora", "LycorisResize", "LycorisExtract", "LycorisEma"])
def test_node_info_as_the_server_lists_it(comfy_env, node_id):
    """What /object_info serves (ComfyUI's server calls GET_NODE_INFO_V1): the tools' category, the path and
    report outputs, an output node, a tooltip on every input."""
    info = comfy_env.node(node_id).GET_NODE_INFO_V1()
    assert (info["category"], info["output"], info["output_node"]) == ("loaders/lycoris/tools", ["STRING", "STRING"], True)
    assert info["description"]
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


# ---------------------------------------------------------------------------------------------
# Each node writes what the command line writes


def test_to_lora_writes_the_command_lines_file(comfy_env, folders, tmp_path):
    _, _, output = folders
    path, report = run(comfy_env, "LycorisToLora", lora_name=LOHA, rank=3, max_error=0.0, to="same as input",
                       output_name="").args
    assert path == str(output / "wan_loha_r4_a2_lora_r3.safetensors")
    assert "wan_loha_r4_a2_lora_r3.safetensors" in comfy_env.folder_paths.get_filename_list("loras")
    cli(comfy_env, "to-lora", MUSUBI / LOHA, tmp_path / "cli.safetensors", "--rank", "3")
    same_file(path, tmp_path / "cli.safetensors")
    assert "24 modules as LoRA, rank 3" in report and "listed by the LoRA loaders as wan_loha_r4_a2_lora_r3.safetensors" in report

    # an error bound and another layout
    path, report = run(comfy_env, "LycorisToLora", lora_name=LOKR, rank=32, max_error=0.05, to="diffusers",
                       prefix="transformer", dtype="bfloat16", output_name="sub/lokr_as_lora").args
    assert path == str(output / "sub" / "lokr_as_lora.safetensors")
    cli(comfy_env, "to-lora", MUSUBI / LOKR, tmp_path / "cli2.safetensors", "--max-error", "0.05", "--to", "diffusers",
        "--prefix", "transformer", "--dtype", "bfloat16")
    same_file(path, tmp_path / "cli2.safetensors")


def test_resize_writes_the_command_lines_file(comfy_env, folders, tmp_path):
    _, loras, output = folders
    cli(comfy_env, "to-lora", MUSUBI / LOHA, loras / "wan_lora.safetensors", "--max-error", "0")
    path, report = run(comfy_env, "LycorisResize", lora_name="wan_lora.safetensors", rank=2, output_name="").args
    assert path == str(output / "wan_lora_r2.safetensors")
    cli(comfy_env, "resize", loras / "wan_lora.safetensors", tmp_path / "cli.safetensors", "--rank", "2")
    same_file(path, tmp_path / "cli.safetensors")
    with pytest.raises(comfy_env.core.AdapterError, match="resize takes LoRA files"):
        run(comfy_env, "LycorisResize", lora_name=LOKR, rank=2, output_name="not_lora")
    assert not (output / "not_lora.safetensors").exists()


def test_extract_writes_the_command_lines_file_and_recovers_the_lokr(comfy_env, folders, tmp_path):
    models, _, output = folders
    path, report = run(comfy_env, "LycorisExtract", base_model="wan_tiny.safetensors", tuned_model="wan_tiny_tuned.safetensors",
                       algorithm="lokr", rank=3, output_name="").args
    assert path == str(output / "wan_tiny_tuned_lokr.safetensors")
    cli(comfy_env, "extract", models / "wan_tiny.safetensors", models / "wan_tiny_tuned.safetensors", tmp_path / "cli.safetensors",
        "--algorithm", "lokr", "--rank", "3")
    same_file(path, tmp_path / "cli.safetensors", ignore=("modelspec.date", "modelspec.title", "ss_output_name"))
    assert "24 layers of Wan 2.1/2.2 (wan) as lokr" in report
    # Musubi's ΔW back, through the pack's own reader
    expected = expected_weights(ENTRY[LOKR])
    modules = comfy_env.core.read_adapter(path).modules
    for p in module_paths(expected):
        want = expected[f"merged/1.0/{p}.weight"].double() - expected[f"base/{p}.weight"].double()
        assert rel_err(modules["lora_unet_" + p.replace(".", "_")].delta_weight(torch.float64), want) <= 1e-5, p


def test_ema_writes_the_command_lines_file(comfy_env, folders, tmp_path):
    _, loras, output = folders
    path, report = run(comfy_env, "LycorisEma", checkpoints="# the run, oldest first\nrun/run-*.safetensors\n",
                       schedule="power (sigma_rel)", sigma_rel=0.2, exact=True, to="comfyui", output_name="").args
    assert path == str(output / "run-0003_ema.safetensors")
    files = [loras / "run" / f"run-{step:04d}.safetensors" for step in (1, 2, 3)]
    cli(comfy_env, "ema", *files, tmp_path / "cli.safetensors", "--power-ema", "0.2", "--exact", "--to", "comfyui")
    same_file(path, tmp_path / "cli.safetensors")
    assert "averaging the factors instead (Musubi's lora_post_hoc_ema.py) would be off by" in report

    path, _ = run(comfy_env, "LycorisEma", checkpoints="run/run-0001.safetensors\nrun/run-0003.safetensors",
                  schedule="beta to beta2", beta=0.8, beta2=0.9, rank=4, output_name="two").args
    cli(comfy_env, "ema", files[0], files[2], tmp_path / "cli2.safetensors", "--beta", "0.8", "--beta2", "0.9", "--rank", "4")
    same_file(path, tmp_path / "cli2.safetensors")
    with pytest.raises(comfy_env.core.AdapterError, match="'run/nope.safetensors' is not a file in the loras folders"):
        run(comfy_env, "LycorisEma", checkpoints="run/run-0001.safetensors\nrun/nope.safetensors", output_name="bad")
    with pytest.raises(comfy_env.core.AdapterError, match="the pattern 'other/\\*' matches no file"):
        run(comfy_env, "LycorisEma", checkpoints="other/*", output_name="bad")
    assert not (output / "bad.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Progress, Cancel, overwrite


CASES = {
    "LycorisToLora": dict(lora_name=LOHA, rank=2),
    "LycorisResize": None,  # needs a LoRA in the loras folder: made in the test
    "LycorisExtract": dict(base_model="wan_tiny.safetensors", tuned_model="wan_tiny_tuned.safetensors", algorithm="loha", rank=2),
    "LycorisEma": dict(checkpoints="run/run-*.safetensors", beta=0.9, rank=2),
}


def inputs_for(env, node_id, loras) -> dict:
    if node_id == "LycorisResize":
        cli(env, "to-lora", MUSUBI / LOHA, loras / "wan_lora.safetensors", "--rank", "4")
        return dict(lora_name="wan_lora.safetensors", rank=2)
    return dict(CASES[node_id])


@pytest.mark.parametrize("node_id", list(CASES))
def test_the_bar_moves_and_cancel_leaves_nothing(comfy_env, folders, monkeypatch, node_id):
    """The progress bar goes forward to the end; Cancel pressed on the k-th check (while computing, and while
    writing) stops the node with no file and no temporary file in output/loras."""
    _, loras, output = folders
    inputs = inputs_for(comfy_env, node_id, loras)
    utils, mm = comfy_env.comfy.utils, comfy_env.comfy.model_management
    seen = []

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            seen.append((value, total))

    monkeypatch.setattr(utils, "ProgressBar", Bar)
    checks = []
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", lambda: checks.append(1))
    path, _ = run(comfy_env, node_id, **inputs, output_name="done").args
    assert seen and [v for v, _ in seen] == sorted(v for v, _ in seen) and seen[-1] == (1000, 1000)
    assert len(checks) == len(seen) >= 4
    written = sorted(os.listdir(output))
    for stop_at in (1, len(checks) // 2 + 1, len(checks)):
        def interrupted(stop_at=stop_at, calls=[]):  # noqa: B006 (one list per loop round, counting its checks)
            calls.append(1)
            if len(calls) == stop_at:
                raise mm.InterruptProcessingException()

        monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", interrupted)
        with pytest.raises(mm.InterruptProcessingException):
            run(comfy_env, node_id, **inputs, output_name="cancelled")
        assert sorted(os.listdir(output)) == written, stop_at  # no file, no temporary left behind


@pytest.mark.parametrize("node_id", list(CASES))
def test_refuses_to_overwrite_unless_asked(comfy_env, folders, node_id):
    _, loras, output = folders
    inputs = inputs_for(comfy_env, node_id, loras)
    path, _ = run(comfy_env, node_id, **inputs, output_name="same").args
    before = open(path, "rb").read()
    with pytest.raises(comfy_env.core.AdapterError, match="exists; turn on 'overwrite'"):
        run(comfy_env, node_id, **inputs, output_name="same")
    assert open(path, "rb").read() == before
    again, _ = run(comfy_env, node_id, **inputs, output_name="same", overwrite=True).args
    assert again == path and os.listdir(output) == ["same.safetensors"]  # replaced in place, no temporary left
    assert load_file(path).keys() == load_file(str(loras / ".." / "output" / "loras" / "same.safetensors")).keys()
