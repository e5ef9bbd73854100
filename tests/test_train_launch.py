"""Handing training off to a child job (lycoris_core/training/launch.py), without ComfyUI: the command lines it starts,
the options it passes, the way the child finds this pack when Python's own import would not, and following a job (its
progress as it comes, a stop with SIGTERM, a kill when the job does not stop, the one-line error)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import comfyui_lycoris
import pytest
from comfyui_lycoris.lycoris_core.training import launch
from comfyui_lycoris.lycoris_core.training.options import coerce, parse_value


def test_command_lines():
    assert launch.job_command(1, ["--model", "m"], True, python="py") == ["py", "-m", "comfyui_lycoris", "train", "--model", "m"]
    assert launch.job_command(2, ["--model", "m"], True, python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "comfyui_lycoris", "train", "--model", "m"]
    one = launch.job_command(1, ["--model", "m"], False, python="py")
    assert one[:2] == ["py", "-c"] and one[3:] == ["train", "--model", "m"]
    two = launch.job_command(4, ["--model", "m"], False, python="py")
    assert two[:7] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "--no-python", "py"]
    assert two[7:] == one[1:]
    assert f"folder = {launch.PACK_FOLDER!r}" in one[2] and "sys.path" not in one[2]


def test_the_pack_folder_is_the_one_imported():
    """The tests import the pack as installed (a copy or this checkout): `python -m comfyui_lycoris` runs that folder."""
    assert Path(launch.PACK_FOLDER) == Path(comfyui_lycoris.__file__).resolve().parent
    assert launch.pack_installed()


def decoy(folder: Path) -> Path:
    """A `comfyui_lycoris` package that is not this pack, first on the import path of a child started in `folder`."""
    (folder / "comfyui_lycoris").mkdir()
    (folder / "comfyui_lycoris" / "__init__.py").write_text("raise ImportError('the decoy was imported')\n")
    (folder / "comfyui_lycoris" / "__main__.py").write_text("")
    return folder


@pytest.mark.parametrize("processes", [1, 2])
def test_the_bootstrap_runs_this_folder_whatever_python_would_import(tmp_path, processes):
    folder = decoy(tmp_path)
    plain = subprocess.run(launch.job_command(1, ["--help"], True), cwd=folder, capture_output=True, text=True, timeout=120)
    assert plain.returncode != 0 and "the decoy was imported" in plain.stderr  # what `-m` would run here
    result = subprocess.run(launch.job_command(processes, ["--help"], False), cwd=folder, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("usage: comfyui-lycoris train") == processes  # every rank ran the pack's command


@pytest.mark.parametrize("name,value", [
    ("algorithm", "loha"), ("rank", 4), ("alpha", 2.0), ("learning_rate", 1e-05), ("learning_rate", 0.0005),
    ("gradient_checkpointing", True), ("shuffle", False), ("exclude", (r"blocks\.0\..*", ".*ffn.*")), ("include", ()),
    ("save_dtype", 'float"16'),
])
def test_option_text_reads_back_as_the_value(name, value):
    assert coerce(name, parse_value(launch.option_text(value)), "test") == value


def test_option_lines():
    text = "\n  lr_scheduler=\"cosine\"  \n# a comment\n\noptimizer_args={weight_decay = 0.01}\n"
    assert launch.option_lines(text) == ['lr_scheduler="cosine"', "optimizer_args={weight_decay = 0.01}"]


def test_the_error_line_is_the_commands():
    log = "W0101 torchrun noise\ncomfyui-lycoris train: error: rank 1 of 2 ended during step 3\nmore noise\n"
    assert launch.Outcome(1, [], log=log).error() == "rank 1 of 2 ended during step 3"
    said = [{"event": "step", "step": 1}, {"event": "error", "message": "dataset d: shard 1 is missing"}]
    assert launch.Outcome(2, said, log=log).error() == "dataset d: shard 1 is missing"  # rank 0's, from the progress file
    stopped = [{"event": "stopped", "step": 7, "checkpoint": "/c/checkpoint-0000007.safetensors"}]
    assert launch.Outcome(143, stopped).error() == ("the train command was stopped from outside at step 7; checkpoint "
                                                    "/c/checkpoint-0000007.safetensors")
    assert launch.Outcome(-9, [], log="Killed\n").error() == "the train command exited with code -9: Killed"


# A stand-in for the train command with its progress protocol: a step every 50 ms; on SIGTERM it stops after the step
# ("stopped", exit 143), or ignores SIGTERM and starts a process in a session of its own, as torchrun's ranks are.
FAKE = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    progress, mode = sys.argv[1], sys.argv[2]
    stop = []
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rank = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"],
                                start_new_session=True)
        open("rank.pid", "w").write(str(rank.pid))
    else:
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    with open(progress, "a") as f:
        def event(kind, **fields):
            f.write(json.dumps({"event": kind, **fields}) + "\\n")
            f.flush()
        event("start", step=0, steps=1000)
        for step in range(1, 1000):
            time.sleep(0.05)
            event("step", step=step, steps=1000, loss=1.0 / step)
            if stop:
                event("stopped", step=step, checkpoint=None)
                sys.exit(143)
""")


def follow(tmp_path, mode, stop_after, stop_seconds=60.0):
    seen = []

    def should_stop():
        return any(e["event"] == "step" and e["step"] >= stop_after for e in seen)

    command = [sys.executable, "-c", FAKE, str(tmp_path / launch.PROGRESS_FILE), mode]
    outcome = asyncio.run(launch.run_job(command, dict(os.environ), str(tmp_path), seen.append, should_stop, poll=0.05,
                                         stop_seconds=stop_seconds))
    return outcome, seen


def test_a_stop_ends_the_job_after_its_step(tmp_path):
    outcome, seen = follow(tmp_path, "polite", stop_after=3)
    assert outcome.stopped and outcome.code == 143
    assert seen == outcome.events and seen[0]["event"] == "start" and seen[-1]["event"] == "stopped"
    steps = [e["step"] for e in seen if e["event"] == "step"]
    assert steps == list(range(1, len(steps) + 1)) and 3 <= steps[-1] == seen[-1]["step"]
    assert not launch._RUNNING


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True


def test_a_job_that_does_not_stop_is_killed_with_everything_below_it(tmp_path):
    begin = time.monotonic()
    outcome, _ = follow(tmp_path, "stubborn", stop_after=2, stop_seconds=1.0)
    assert outcome.stopped and outcome.code == -signal.SIGKILL and time.monotonic() - begin < 30
    rank = int((tmp_path / "rank.pid").read_text())
    deadline = time.monotonic() + 10
    while not gone(rank):
        assert time.monotonic() < deadline, "the process in its own session was left running"
        time.sleep(0.1)


def test_progress_lines_are_read_whole(tmp_path):
    path = tmp_path / "p.jsonl"
    events = launch.ProgressEvents(str(path))
    assert events.read() == []  # not there yet
    path.write_text(json.dumps({"event": "start"}) + "\n" + '{"event": "st')
    assert events.read() == [{"event": "start"}]
    with open(path, "a") as f:
        f.write('ep", "step": 1}\n')
    assert events.read() == [{"event": "step", "step": 1}] and events.read() == []
