"""Train LyCORIS (job) inside a real ComfyUI: the node hands the job to the `train` command in child processes (one, or
two under torchrun with gloo on the CPU) and gives back what the command wrote.

The model is ComfyUI's Wan 2.1 t2v at the size its loader detects on every release (tests/training_runs.py), as a file
in a models/diffusion_models folder; the dataset is written by Save LyCORIS Dataset (two latent sizes, one caption
per sample). References: the `train` command run as a user runs it, with the same options spelled out here; ComfyUI's
own loader and this pack's LycorisLoaderModelOnly for the file; the command's checkpoints for Cancel.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import signal
import time

import pytest
import torch
from comfyui_host import require_comfyui
from helpers import rel_err
from safetensors import safe_open
from safetensors.torch import load_file
from training_runs import TEXT_WIDTH, error_lines, events, finish, start, write_model

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

STEPS = 4
# The node's inputs below, as `comfyui-lycoris train` options: the reference run.
CLI_OPTIONS = ["--set", 'algorithm="lokr"', "--set", "rank=4", "--set", "alpha=2.0", "--set", "factor=-1", "--set",
               f"max_steps={STEPS}", "--set", "learning_rate=0.001", "--set", 'optimizer="AdamW"', "--set", "seed=7",
               "--set", "warmup_steps=0", "--set", "gradient_checkpointing=true", "--set", "checkpoint_every=2",
               "--batch-size", "4", "--device", "cpu", "--quiet"]
MODEL = "tiny_wan_job.safetensors"


def node_inputs(dataset: str, processes: int, name: str, **changes) -> dict:
    inputs = dict(unet_name=MODEL, weight_dtype="default", dataset=dataset, processes=processes, algorithm="lokr", rank=4,
                  alpha=2.0, factor=-1, steps=STEPS, learning_rate=0.001, optimizer="AdamW", batch_size=4, seed=7,
                  warmup_steps=0, gradient_checkpointing=True, architecture="auto", rank_dropout=0.0, module_dropout=0.0,
                  include="", exclude="", filename_prefix=f"jobs/{name}", checkpoint_every=2, options="", resume_from="")
    inputs.update(changes)
    return inputs


def wan_inputs():
    """Five samples: three 8×8 latents and two 8×12 (Resolution Bucket's batches), one caption each (7 or 5 tokens)."""
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        latents = [{"samples": torch.randn(3, 16, 1, 8, 8, generator=gen)}, {"samples": torch.randn(2, 16, 1, 8, 12, generator=gen)}]
        conditioning = [[[torch.randn(1, 7 - 2 * (i % 2), TEXT_WIDTH["wan"], generator=gen), {}] for i in range(n)] for n in (3, 2)]
    return latents, conditioning


@pytest.fixture(scope="module")
def setup(comfy_env, tmp_path_factory):
    """ComfyUI's output folder and a diffusion_models folder in a temporary place, the model file and the dataset;
    one thread per process, as torchrun sets it, so one process and two compute alike."""
    fp = comfy_env.folder_paths
    base = tmp_path_factory.mktemp("train_job")
    old_output = fp.get_output_directory()
    fp.set_output_directory(str(base / "output"))
    (base / "models").mkdir()
    model = write_model(comfy_env, "wan", base / "models" / MODEL)
    fp.add_model_folder_path("diffusion_models", str(base / "models"))
    latents, conditioning = wan_inputs()
    with torch.inference_mode():
        (dataset,) = comfy_env.node("LycorisSaveDataset").execute(
            latents=latents, conditioning=conditioning, name=["wan_job"], overwrite=[False], samples_per_shard=[2]).args
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield base, model, dataset
    fp.set_output_directory(old_output)


def execute(env, **inputs):
    return asyncio.run(env.node("LycorisTrainJob").execute(**inputs))


class Ticker:
    """Stands in for the rest of ComfyUI's executor loop while the jobs run: how late a 50 ms sleep wakes up."""

    def __init__(self):
        self.gaps: list[float] = []
        self.running = True

    async def run(self) -> None:
        while self.running:
            begin = time.monotonic()
            await asyncio.sleep(0.05)
            self.gaps.append(time.monotonic() - begin - 0.05)


@pytest.fixture(scope="module")
def runs(comfy_env, setup):
    """The same job three ways at once: the command (reference), the node with one process, the node with two; the
    node runs awaited together in one event loop, with a ticker."""
    base, model, dataset = setup
    fp = comfy_env.folder_paths
    (base / "output" / "loras" / "jobs").mkdir(parents=True)
    listed_before = fp.get_filename_list("loras")  # ComfyUI's cached listing, as the loaders saw it before the job
    cli = start(["--model", str(model), "--dataset", dataset, "--out", str(base / "cli.safetensors"), "--progress-file",
                 str(base / "cli.jsonl"), *CLI_OPTIONS])
    node = comfy_env.node("LycorisTrainJob")
    ticker = Ticker()
    spans = {}

    async def job(name, processes):
        begin = time.monotonic()
        try:
            return await node.execute(**node_inputs(dataset, processes, name))
        finally:
            spans[name] = (begin, time.monotonic())

    async def all_of_them():
        tick = asyncio.ensure_future(ticker.run())
        try:
            return await asyncio.gather(job("one", 1), job("two", 2))
        finally:
            ticker.running = False
            await tick

    bar = []
    comfy_env.comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: bar.append((value, total)))
    try:
        one, two = asyncio.run(all_of_them())
    finally:
        comfy_env.comfy.utils.set_progress_bar_global_hook(None)
    code, _, err = finish(cli)
    assert code == 0 and not error_lines(err), err
    return dict(one=one, two=two, ticker=ticker, spans=spans, listed_before=listed_before, bar=bar, cli=base / "cli.safetensors",
                cli_losses=events(base / "cli.jsonl")[-1]["losses"], loras=base / "output" / "loras")


def assert_same_adapter(got_path, want_path):
    got, want = load_file(str(got_path)), load_file(str(want_path))
    assert sorted(got) == sorted(want)
    moved = [k for k in want if not k.endswith(".alpha") and want[k].abs().max() > 0]
    assert len(moved) > len(want) // 2  # the zero-initialised factors moved too: the steps trained
    for key in want:
        if want[key].abs().max() > 0:
            assert rel_err(got[key], want[key]) <= 1e-5, key
        else:
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("name", ["one", "two"])
def test_node_writes_the_adapter_the_command_writes(comfy_env, runs, name):
    result = runs[name]
    lora_name, image = result.args
    assert lora_name == f"jobs/{name}_00001_.safetensors"
    assert_same_adapter(runs["loras"] / lora_name, runs["cli"])
    with safe_open(str(runs["loras"] / lora_name), "pt") as f:
        assert f.metadata()["ss_steps"] == str(STEPS) and f.metadata()["ss_network_module"] == "networks.lokr"
    assert image.shape[0] == 1 and image.shape[-1] == 3 and 0 <= float(image.min()) and float(image.max()) <= 1
    assert "images" in result.ui.as_dict()  # the loss chart shows on the node
    # Only the adapter (and its loss chart) lands in output/loras: checkpoints go to output/lycoris_checkpoints.
    assert sorted(os.listdir(runs["loras"] / "jobs")) == sorted(
        f"{n}_00001_{suffix}" for n in ("one", "two") for suffix in (".safetensors", "_loss.png"))
    checkpoints = runs["loras"].parent / "lycoris_checkpoints" / "jobs" / f"{name}_00001_"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-0000002.safetensors", "checkpoint-0000004.safetensors"]


def test_progress_reaches_comfyuis_bar(runs):
    """Each job's bar starts at 0 and ends at the last step (ComfyUI 0.28 throttles the updates in between)."""
    assert runs["bar"].count((0, STEPS)) == 2 and runs["bar"].count((STEPS, STEPS)) == 2


def test_losses_are_the_commands(comfy_env, runs):
    """The loss chart is drawn from the job's losses: the same curve as the command's, whatever the process count."""
    training = importlib.import_module(comfy_env.pack.__name__ + ".nodes.training")
    for name in ("one", "two"):
        _, image = runs[name].args
        chart = training.loss_image(runs["cli_losses"])
        assert image.shape == chart.shape and (image - chart).abs().max() <= 1 / 255


def test_new_file_is_listed_and_loads(comfy_env, runs):
    fp = comfy_env.folder_paths
    lora_name = runs["two"].args[0]
    assert lora_name not in runs["listed_before"] and lora_name in fp.get_filename_list("loras")
    model = comfy_env.core_node("UNETLoader").load_unet(MODEL, "default")[0]
    out = comfy_env.node("LycorisLoaderModelOnly").execute(model=model, lora_name=lora_name, strength_model=1.0)
    report = out.args[1]
    assert "applied       20 of 20 modules: 20 lokr" in report and "unmatched     0" in report, report
    assert "architecture  Wan 2.1/2.2 (wan)" in report


def test_the_event_loop_stays_free_while_jobs_train(comfy_env, runs):
    """ComfyUI awaits the node as a task (an async execute): its executor's loop runs other work meanwhile. Here two
    jobs ran in one loop at the same time, and a 50 ms timer on that loop woke up on time throughout."""
    node = comfy_env.node("LycorisTrainJob")
    assert inspect.iscoroutinefunction(node.execute) and node.FUNCTION == "EXECUTE_NORMALIZED_ASYNC"
    (a0, a1), (b0, b1) = runs["spans"]["one"], runs["spans"]["two"]
    assert a0 < b1 and b0 < a1, "the two jobs overlapped"
    gaps = runs["ticker"].gaps
    assert len(gaps) >= 20 and max(gaps) < 1.0, (len(gaps), max(gaps))


def children_of(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def rank_pid(rank: int) -> int:
    """The pid of rank `rank` of the job this test process started (torchrun's worker, by its RANK variable)."""
    for launcher in children_of(os.getpid()):
        if b"torch.distributed.run" not in open(f"/proc/{launcher}/cmdline", "rb").read():
            continue
        for child in children_of(launcher):
            if f"RANK={rank}".encode() in open(f"/proc/{child}/environ", "rb").read().split(b"\0"):
                return child
    raise AssertionError(f"no rank {rank} below this process")


@pytest.fixture
def watching(comfy_env, monkeypatch):
    """`watch(action)`: `action()` each time the node looks for ComfyUI's Cancel (every poll, while the job runs)."""
    mm = comfy_env.comfy.model_management
    original = mm.processing_interrupted

    def watch(action):
        def processing_interrupted():
            action()
            return original()
        monkeypatch.setattr(mm, "processing_interrupted", processing_interrupted)

    return watch


def test_cancel_stops_the_job_with_a_checkpoint_and_resume_continues(comfy_env, setup, watching):
    base, _, dataset = setup
    mm = comfy_env.comfy.model_management
    folder = base / "output" / "lycoris_checkpoints" / "jobs" / "cancel_00001_"
    # Cancel once the first step's checkpoint is there (the job writes one every step).
    watching(lambda: (folder / "checkpoint-0000001.safetensors").exists() and mm.interrupt_current_processing(True))
    with pytest.raises(mm.InterruptProcessingException):
        execute(comfy_env, **node_inputs(dataset, 2, "cancel", steps=100000, checkpoint_every=1))
    assert not mm.interrupt_processing, "the interrupt is consumed, so the next prompt runs"
    loras = base / "output" / "loras" / "jobs"
    assert not [n for n in os.listdir(loras) if n.startswith("cancel") and n.endswith(".safetensors")], "an adapter was written"
    assert not [n for n in os.listdir(loras) if n.startswith(".")], "a temporary file was left"
    saved = sorted(os.listdir(folder))
    stopped = int(saved[-1][len("checkpoint-"):-len(".safetensors")])
    assert saved == [f"checkpoint-{step:07d}.safetensors" for step in range(1, stopped + 1)]  # every step, then the stop
    info, tensors = comfy_env.core.training.read_checkpoint(folder / saved[-1])
    assert info["step"] == stopped and len(info["losses"]) == stopped
    assert info["job"] == {"batch_size": 4, "samples": 5, "processes": 2} and any(k.startswith("adapter.") for k in tensors)

    # resume_from continues it (on one process); the loaders list the file at once even where a folder's time would
    # not show the change (file systems with coarse times): the node drops ComfyUI's cached listing itself.
    watching(lambda: None)  # Cancel is not pressed this time
    fp = comfy_env.folder_paths
    listed = fp.get_filename_list("loras")
    stamp = os.stat(loras).st_mtime_ns
    result = execute(comfy_env, **node_inputs(dataset, 1, "resumed", steps=stopped + 2, checkpoint_every=0,
                                              resume_from="jobs/cancel_00001_"))
    os.utime(loras, ns=(stamp, stamp))  # as if writing the file had not changed the folder's time
    lora_name = result.args[0]
    assert lora_name not in listed and lora_name in fp.get_filename_list("loras")
    with safe_open(str(base / "output" / "loras" / lora_name), "pt") as f:
        assert f.metadata()["ss_steps"] == str(stopped + 2)
    assert sorted(os.listdir(folder))[-1] == f"checkpoint-{stopped:07d}.safetensors"  # checkpoint_every=0: none more


def test_a_killed_rank_is_a_node_error_naming_it(comfy_env, setup, watching, monkeypatch):
    """Also the way in for a ComfyUI whose Python has not installed the pack: the job imports the pack folder itself."""
    base, _, dataset = setup
    job_module = importlib.import_module(comfy_env.pack.__name__ + ".nodes.train_job")
    monkeypatch.setattr(job_module, "pack_installed", lambda: False)
    checkpoint = base / "output" / "lycoris_checkpoints" / "jobs" / "killed_00001_" / "checkpoint-0000002.safetensors"
    victim = []

    def kill_after_the_checkpoint():
        if checkpoint.exists() and not victim:
            victim.append(rank_pid(1))
            os.kill(victim[0], signal.SIGKILL)

    watching(kill_after_the_checkpoint)
    error = comfy_env.core.AdapterError
    with pytest.raises(error) as caught:
        execute(comfy_env, **node_inputs(dataset, 2, "killed", steps=100000, checkpoint_every=2))
    message = str(caught.value)
    assert message.startswith(f"rank 1 of 2 (pid {victim[0]} on ") and " ended during step " in message, message
    assert "loras/jobs/killed_00001_.safetensors was not written" in message, message  # the path as the node lists it
    last = sorted(os.listdir(checkpoint.parent))[-1]
    assert message.endswith(f"last checkpoint {checkpoint.parent / last}"), message
    comfy_env.core.training.read_checkpoint(checkpoint.parent / last)  # intact
    assert not os.path.exists(base / "output" / "loras" / "jobs" / "killed_00001_.safetensors")


def test_bad_options_fail_before_anything_starts(comfy_env, setup):
    _, _, dataset = setup
    error = comfy_env.core.AdapterError
    with pytest.raises(error, match=r"--set lr_schedule=\"cosine\": unknown training option 'lr_schedule'"):
        execute(comfy_env, **node_inputs(dataset, 1, "bad", options='lr_schedule="cosine"'))
    with pytest.raises(error, match="2 processes need a batch of at least 2 samples"):
        execute(comfy_env, **node_inputs(dataset, 2, "bad", batch_size=1))
    with pytest.raises(error, match="must be inside output/datasets"):
        execute(comfy_env, **node_inputs(str(setup[0]), 1, "bad"))
    with pytest.raises(error, match="no dataset saved there"):
        execute(comfy_env, **node_inputs("missing", 1, "bad"))


def test_node_info_as_the_server_lists_it(comfy_env, setup):
    """What /object_info serves for the node: every input has a tooltip; the training inputs are Train LyCORIS's."""
    info = comfy_env.node("LycorisTrainJob").GET_NODE_INFO_V1()
    assert (info["category"], info["output"], info["output_node"]) == ("training/lycoris", ["STRING", "IMAGE"], True)
    specs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert all(spec[1].get("tooltip") for spec in specs.values()), [n for n, s in specs.items() if not s[1].get("tooltip")]
    assert MODEL in specs["unet_name"][1]["options"]
    train = comfy_env.node("LycorisTrain").GET_NODE_INFO_V1()["input"]
    train = {**train["required"], **train.get("optional", {})}
    for name in ("algorithm", "rank", "alpha", "factor", "steps", "learning_rate", "optimizer", "batch_size", "seed",
                 "warmup_steps", "gradient_checkpointing", "architecture", "rank_dropout", "module_dropout", "include",
                 "exclude"):
        assert specs[name] == train[name], name
