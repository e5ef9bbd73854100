"""`comfyui-lycoris train` on ComfyUI's Wan model, in one process and in two (torchrun, gloo on the CPU).

The model is a file ComfyUI's own loader detects (tests/training_runs.py); the dataset is written by the Save
LyCORIS Dataset node from what ComfyUI's dataset nodes hand over: latents in two sizes (Resolution Bucket's
batches) and one caption per sample, of two token lengths. References: the same command in one process
(same global batch and seed); ComfyUI's own loading of the model file.
"""

from __future__ import annotations

import pytest
import torch
from comfyui_host import require_comfyui
from helpers import rel_err
from training_runs import TEXT_WIDTH, error_lines, events, finish, start, write_model

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

STEPS = 4
OPTIONS = ["--set", f"max_steps={STEPS}", "--set", "rank=4", "--set", "alpha=2", "--set", "learning_rate=1e-3",
           "--set", "checkpoint_every=2", "--set", "seed=7", "--batch-size", "4", "--quiet"]


def wan_inputs():
    """Five samples: a bucket of three 8×8 latents and one of two 8×12, one caption each (7 or 5 tokens), made
    in inference mode as ComfyUI's nodes make them."""
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        latents = [{"samples": torch.randn(3, 16, 1, 8, 8, generator=gen)}, {"samples": torch.randn(2, 16, 1, 8, 12, generator=gen)}]
        conditioning = [[[torch.randn(1, 7 - 2 * (i % 2), TEXT_WIDTH["wan"], generator=gen), {}] for i in range(n)] for n in (3, 2)]
    return latents, conditioning


@pytest.fixture(scope="module")
def runs(comfy_env, tmp_path_factory):
    """The same job three ways: one process; two processes (torchrun); one process resuming the two-process run's
    checkpoint at step 2."""
    fp = comfy_env.folder_paths
    old = fp.get_output_directory()
    base = tmp_path_factory.mktemp("train_wan")
    fp.set_output_directory(str(base / "output"))
    try:
        latents, conditioning = wan_inputs()
        with torch.inference_mode():
            (dataset,) = comfy_env.node("LycorisSaveDataset").execute(
                latents=latents, conditioning=conditioning, name=["wan"], overwrite=[False], samples_per_shard=[2]).args
    finally:
        fp.set_output_directory(old)
    model = write_model(comfy_env, "wan", base / "wan.safetensors")
    common = ["--model", str(model), "--dataset", dataset, *OPTIONS]
    one = start([*common, "--out", str(base / "one.safetensors"), "--progress-file", str(base / "one.jsonl")])
    two = start([*common, "--out", str(base / "two.safetensors"), "--progress-file", str(base / "two.jsonl")], processes=2)
    done = {"one": finish(one), "two": finish(two)}
    resumed = start([*common, "--out", str(base / "resumed.safetensors"), "--progress-file", str(base / "resumed.jsonl"),
                     "--resume", str(base / "two_checkpoints" / "checkpoint-0000002.safetensors")])
    done["resumed"] = finish(resumed)
    for name, (code, _, err) in done.items():
        assert code == 0, f"{name}: exit {code}\n{err[-3000:]}"
        assert not error_lines(err), err
    return base


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def losses(path) -> list[float]:
    return events(path)[-1]["losses"]


def assert_same_adapter(got_path, want_path):
    got, want = tensors(got_path), tensors(want_path)
    assert sorted(got) == sorted(want)
    moved = [k for k in want if not k.endswith(".alpha") and want[k].abs().max() > 0]
    assert len(moved) > len(want) // 2  # the zero-initialised factors moved too: the steps trained
    for key in want:
        if want[key].abs().max() > 0:
            assert rel_err(got[key], want[key]) <= 1e-5, key
        else:
            assert torch.equal(got[key], want[key]), key


def test_two_processes_train_the_adapter_one_process_trains(comfy_env, runs):
    one, two = events(runs / "one.jsonl"), events(runs / "two.jsonl")
    assert one[0]["event"] == two[0]["event"] == "start" and (one[0]["processes"], two[0]["processes"]) == (1, 2)
    assert one[0]["dataset"] == "5 samples in 2 sizes (16×1×8×8: 3, 16×1×8×12: 2), 5 captions"
    assert [e["step"] for e in two if e["event"] == "step"] == [1, 2, 3, 4]
    assert [e["step"] for e in two if e["event"] == "checkpoint"] == [2, 4]
    assert_same_adapter(runs / "two.safetensors", runs / "one.safetensors")
    got, want = losses(runs / "two.jsonl"), losses(runs / "one.jsonl")
    assert len(want) == STEPS and max(abs(g - w) / abs(w) for g, w in zip(got, want)) <= 1e-5
    # The loaders read it as the Musubi Tuner file it is, for Wan.
    adapter = comfy_env.core.read_adapter(runs / "two.safetensors")
    assert (adapter.format, adapter.architecture) == ("musubi", "wan")
    assert adapter.metadata["ss_network_module"] == "networks.lokr" and adapter.metadata["ss_steps"] == str(STEPS)
    assert (runs / "two_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_two_process_checkpoint_resumes_on_one_process(runs):
    resumed = events(runs / "resumed.jsonl")
    assert resumed[0]["step"] == 2 and resumed[0]["processes"] == 1
    assert [e["step"] for e in resumed if e["event"] == "step"] == [3, 4]
    assert_same_adapter(runs / "resumed.safetensors", runs / "one.safetensors")
    got, want = losses(runs / "resumed.jsonl"), losses(runs / "one.jsonl")
    assert len(got) == STEPS and max(abs(g - w) / abs(w) for g, w in zip(got, want)) <= 1e-5
