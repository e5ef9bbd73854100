"""When a `comfyui-lycoris train` job cannot go on: a rank killed in the middle of a two-process run ends the job
with one line naming that rank, no output file and the last checkpoint intact; a dataset folder that is not
right (a missing shard, pickle files, tensors that differ from the index, latents or captions made for another
model) is refused with one clear line before any step, and nothing is written."""

from __future__ import annotations

import importlib
import json
import os
import signal
import time

import pytest
import torch
from comfyui_host import require_comfyui
from training_runs import TEXT_WIDTH, error_lines, events, finish, start, write_model

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI


def save_dataset(env, folder, name, channels=16, text_width=TEXT_WIDTH["wan"], samples=4):
    """A dataset written by the Save LyCORIS Dataset node (into `folder` as ComfyUI's output directory)."""
    gen = torch.Generator().manual_seed(1)
    fp = env.folder_paths
    old = fp.get_output_directory()
    fp.set_output_directory(str(folder))
    try:
        with torch.inference_mode():
            latents = [{"samples": torch.randn(samples, channels, 1, 8, 8, generator=gen)}]
            conditioning = [[[torch.randn(1, 6, text_width, generator=gen), {}] for _ in range(samples)]]
            (path,) = env.node("LycorisSaveDataset").execute(latents=latents, conditioning=conditioning, name=[name],
                                                             overwrite=[False], samples_per_shard=[2]).args
    finally:
        fp.set_output_directory(old)
    return path


@pytest.fixture(scope="module")
def setup(comfy_env, tmp_path_factory):
    base = tmp_path_factory.mktemp("train_failures")
    return base, write_model(comfy_env, "wan", base / "wan.safetensors"), save_dataset(comfy_env, base, "good")


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process `rank` (its children, told apart by their RANK variable)."""
    for child in open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split():
        environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"torchrun {launcher_pid} has no rank {rank}")


def test_a_killed_rank_stops_the_job_and_is_named(comfy_env, setup):
    base, model, dataset = setup
    out, progress = base / "killed.safetensors", base / "killed.jsonl"
    job = start(["--model", str(model), "--dataset", dataset, "--out", str(out), "--progress-file", str(progress),
                 "--set", "max_steps=100000", "--set", "checkpoint_every=2", "--batch-size", "2", "--quiet"], processes=2)
    deadline = time.monotonic() + 180
    while not any(e["event"] == "checkpoint" for e in events(progress)):
        assert job.poll() is None and time.monotonic() < deadline, "no checkpoint: " + (job.stderr.read() if job.poll() is not None else "timeout")
        time.sleep(0.2)
    victim = rank_pid(job.pid, 1)
    os.kill(victim, signal.SIGKILL)
    code, _, err = finish(job)
    assert code != 0
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"comfyui-lycoris train: error: rank 1 of 2 (pid {victim} on ") and " ended during step " in lines[0]
    assert f"{out} was not written" in lines[0] and not out.exists()
    saved = [e for e in events(progress) if e["event"] == "checkpoint"]
    last = saved[-1]["path"]
    assert f"last checkpoint {last}" in lines[0]
    info, tensors = comfy_env.core.training.read_checkpoint(last)  # intact: a complete, valid checkpoint
    assert info["step"] == saved[-1]["step"] and info["job"] == {"batch_size": 2, "samples": 4, "processes": 2}
    assert any(k.startswith("adapter.") for k in tensors)
    assert events(progress)[-1]["event"] == "error"


def test_sigterm_stops_every_rank_after_the_step_with_a_checkpoint(comfy_env, setup):
    """What a program that started the job does to cancel it: SIGTERM to torchrun, which passes it on to every rank."""
    base, model, dataset = setup
    out, progress = base / "stopped.safetensors", base / "stopped.jsonl"
    job = start(["--model", str(model), "--dataset", dataset, "--out", str(out), "--progress-file", str(progress),
                 "--set", "max_steps=100000", "--batch-size", "2", "--quiet"], processes=2)
    deadline = time.monotonic() + 180
    while not any(e["event"] == "step" for e in events(progress)):
        assert job.poll() is None and time.monotonic() < deadline, "no step: " + (job.stderr.read() if job.poll() is not None else "timeout")
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    code, _, err = finish(job)
    assert code != 0 and not out.exists()
    stopped = events(progress)[-1]
    assert stopped["event"] == "stopped" and stopped["step"] >= 1, err
    steps = [e["step"] for e in events(progress) if e["event"] == "step"]
    assert steps == list(range(1, stopped["step"] + 1))
    assert error_lines(err)[-1] == (f"comfyui-lycoris train: stopped at step {stopped['step']} of 100000; checkpoint "
                                    f"{stopped['checkpoint']} (--resume continues from it)")
    info, _ = comfy_env.core.training.read_checkpoint(stopped["checkpoint"])
    assert info["step"] == stopped["step"] and len(info["losses"]) == stopped["step"]
    assert (base / "stopped_loss.png").exists()


@pytest.fixture(scope="module")
def cli(comfy_env):
    return importlib.import_module(comfy_env.pack.__name__ + ".cli")


def refused(cli, capsys, setup, dataset, name) -> str:
    """Run the command in this process on `dataset`: its one error line, after checking that nothing trained or was written."""
    base, model, _ = setup
    out, progress = base / f"{name}.safetensors", base / f"{name}.jsonl"
    code = cli.main(["train", "--model", str(model), "--dataset", str(dataset), "--out", str(out), "--progress-file",
                     str(progress), "--set", "max_steps=2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert [e["event"] for e in events(progress)] == ["error"]  # no step began
    assert not out.exists() and not (base / f"{name}_checkpoints").exists() and not (base / f"{name}_loss.png").exists()
    return err.strip()


def test_missing_shard(cli, capsys, comfy_env, setup):
    dataset = save_dataset(comfy_env, setup[0], "missing")
    os.remove(os.path.join(dataset, "shard-00001.safetensors"))
    assert refused(cli, capsys, setup, dataset, "missing") == (
        f"comfyui-lycoris train: error: dataset {dataset}: shard shard-00001.safetensors is missing (samples 2–3)")


def test_pickle_files_are_refused_unread(cli, capsys, comfy_env, setup, monkeypatch):
    """ComfyUI's Save Training Dataset output (shard_0000.pkl, metadata.json): refused, never unpickled."""
    folder = setup[0] / "comfy_pickle"
    folder.mkdir()
    with open(folder / "shard_0000.pkl", "wb") as f:
        torch.save({"latents": [{"samples": torch.zeros(1, 16, 1, 8, 8)}], "conditioning": [[[torch.zeros(1, 6, 8), {}]]]}, f)
    (folder / "metadata.json").write_text(json.dumps({"num_samples": 1, "num_shards": 1, "shard_size": 1000}))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    line = refused(cli, capsys, setup, folder, "pickle")
    assert line.startswith(f"comfyui-lycoris train: error: dataset {folder}: holds pickle files (ComfyUI's Save Training "
                           "Dataset output): shard_0000.pkl;")


def test_tensor_that_differs_from_the_index(cli, capsys, comfy_env, setup):
    from safetensors.torch import load_file, save_file

    dataset = save_dataset(comfy_env, setup[0], "differs")
    shard = os.path.join(dataset, "shard-00000.safetensors")
    tensors = load_file(shard)
    tensors["sample.1.latent"] = tensors["sample.1.latent"][:, :, :4].contiguous()
    save_file(tensors, shard)
    assert refused(cli, capsys, setup, dataset, "differs") == (
        f"comfyui-lycoris train: error: dataset {dataset}: sample 1's latent in shard-00000.safetensors is F32 [16, 1, 4, 8], "
        "the index says F32 [16, 1, 8, 8]")


@pytest.mark.parametrize("what,changes", [("latents", {"channels": 8}), ("captions", {"text_width": 32})])
def test_dataset_made_for_another_model(cli, capsys, comfy_env, setup, what, changes):
    dataset = save_dataset(comfy_env, setup[0], f"other_{what}", **changes)
    line = refused(cli, capsys, setup, dataset, f"other_{what}")
    shape = [changes.get("channels", 16), 1, 8, 8]
    assert line.startswith(f"comfyui-lycoris train: error: dataset {dataset}: sample 0 (latent {shape}, caption 0 "
                           f"[1, 6, {changes.get('text_width', TEXT_WIDTH['wan'])}]) does not fit the model {setup[1]} (")
