"""`comfyui-lycoris train` on ComfyUI's HunyuanVideo model: one caption for every sample (with its pooled output and
guidance, batched into one forward pass), LoHa, gradient checkpointing; two processes (torchrun, gloo) against one.
The trained file is the Musubi Tuner file for these layers (Musubi's own file for HunyuanVideo names the same
modules and tensors), and the loader node applies exactly what its tensors say.
"""

from __future__ import annotations

import re

import pytest
import torch
from comfyui_host import require_comfyui
from helpers import MUSUBI, comfy_location, expected_weights, manifest_files, module_paths, rel_err
from safetensors import safe_open
from training_runs import TEXT_WIDTH, error_lines, events, finish, start, write_model

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

STEPS = 3
OPTIONS = ["--set", f"max_steps={STEPS}", "--set", "algorithm=loha", "--set", "rank=4", "--set", "alpha=2",
           "--set", "learning_rate=1e-3", "--set", "gradient_checkpointing=true", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def runs(comfy_env, tmp_path_factory):
    fp = comfy_env.folder_paths
    old = fp.get_output_directory()
    base = tmp_path_factory.mktemp("train_hunyuan")
    fp.set_output_directory(str(base / "output"))
    gen = torch.Generator().manual_seed(5)
    try:
        with torch.inference_mode():
            latents = [{"samples": torch.randn(4, 16, 1, 8, 8, generator=gen)}]
            extra = {"pooled_output": torch.randn(1, 768, generator=gen), "guidance": 3.5}
            conditioning = [[[torch.randn(1, 7, TEXT_WIDTH["hunyuan_video"], generator=gen), extra]]]
            (dataset,) = comfy_env.node("LycorisSaveDataset").execute(
                latents=latents, conditioning=conditioning, name=["hunyuan"], overwrite=[False], samples_per_shard=[256]).args
    finally:
        fp.set_output_directory(old)
    model = write_model(comfy_env, "hunyuan_video", base / "hunyuan.safetensors")
    common = ["--model", str(model), "--dataset", dataset, *OPTIONS]
    one = start([*common, "--out", str(base / "one.safetensors"), "--progress-file", str(base / "one.jsonl")])
    two = start([*common, "--out", str(base / "two.safetensors"), "--progress-file", str(base / "two.jsonl")], processes=2)
    for name, (code, _, err) in {"one": finish(one), "two": finish(two)}.items():
        assert code == 0, f"{name}: exit {code}\n{err[-3000:]}"
        assert not error_lines(err), err
    return base, model


def test_two_processes_train_the_adapter_one_process_trains(runs):
    from safetensors.torch import load_file

    base, _ = runs
    one, two = load_file(str(base / "one.safetensors")), load_file(str(base / "two.safetensors"))
    assert sorted(one) == sorted(two)
    assert all(two[k].abs().max() > 0 for k in two)  # hada_w2_a starts at 0: it moved
    assert max(rel_err(two[k], one[k]) for k in one) <= 1e-5
    got, want = events(base / "two.jsonl")[-1]["losses"], events(base / "one.jsonl")[-1]["losses"]
    assert len(want) == STEPS and max(abs(g - w) / abs(w) for g, w in zip(got, want)) <= 1e-5


def musubi_layout() -> dict[str, dict[str, tuple]]:
    """Musubi Tuner's own LoHa file for HunyuanVideo (rank 4): stem -> {tensor suffix: shape}, for the first double
    and single block (the model trained here has one of each)."""
    layout: dict[str, dict[str, tuple]] = {}
    with safe_open(str(MUSUBI / "hunyuan_video_loha_r4_a2.safetensors"), "pt") as f:
        for key in f.keys():
            stem, suffix = key.rsplit(".", 1)
            if re.search(r"_blocks_0_", stem):
                layout.setdefault(stem, {})[suffix] = tuple(f.get_slice(key).get_shape())
    return layout


def test_trained_file_is_musubis_and_loads_exactly(comfy_env, runs):
    base, model_file = runs
    trained = base / "two.safetensors"
    adapter = comfy_env.core.read_adapter(trained)
    assert (adapter.format, adapter.architecture) == ("musubi", "hunyuan_video")
    assert adapter.metadata["ss_network_module"] == "networks.loha" and adapter.metadata["ss_base_model_version"] == "hunyuan_video"
    with safe_open(str(trained), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layout = {}
    for key, value in tensors.items():
        stem, suffix = key.rsplit(".", 1)
        layout.setdefault(stem, {})[suffix] = tuple(value.shape)
    musubi = musubi_layout()
    assert sorted(layout) == sorted(musubi) and all(set(layout[s]) == set(musubi[s]) for s in musubi)
    assert all(layout[s]["hada_w1_b"][0] == 4 for s in layout)  # rank 4, as the options said

    # ComfyUI loads the base file; the loader node patches it with the trained file. Reference: W + (alpha/rank)·ΔW
    # from the file's own tensors, on the ComfyUI weight each Musubi module names.
    entry = next(e for e in manifest_files() if e["file"] == "hunyuan_video_loha_r4_a2.safetensors")
    where = {"lora_unet_" + p.replace(".", "_"): comfy_location("hunyuan_video", p) for p in module_paths(expected_weights(entry))}
    patcher = comfy_env.comfy.sd.load_diffusion_model(str(model_file))
    comfy_env.folder_paths.add_model_folder_path("loras", str(base))
    with torch.inference_mode():
        loaded, report = comfy_env.node("LycorisLoaderModelOnly").execute(
            model=patcher, lora_name="two.safetensors", strength_model=1.0, architecture="auto", mode="patch").args
    assert "applied       10 of 10 modules" in report
    before = comfy_env.weights(patcher)
    loaded.patch_model()
    try:
        after = comfy_env.weights(loaded)
    finally:
        loaded.unpatch_model()
    changed = sorted(k for k in before if not torch.equal(after[k], before[k]))
    expected = {}
    for stem in layout:
        name, part = where[stem]
        assert part is None
        t = {n: tensors[f"{stem}.{n}"].double() for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")}
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (t["alpha"] / t["hada_w1_b"].shape[0])
        expected["diffusion_model." + name] = before["diffusion_model." + name].double() + delta
    assert changed == sorted(expected)
    assert max(rel_err(after[k], expected[k]) for k in expected) < 1e-6
