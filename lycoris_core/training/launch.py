"""Starting the `train` command (train_job.py) as a child job and following it, for a program that hands training off
(the Train LyCORIS (job) node): the command line (one process, or torchrun with several), its options as
`--set FIELD=VALUE`, the job run in a process group of its own, its JSON-lines progress read as it comes, a stop that
keeps a checkpoint (SIGTERM: the command stops after the step in progress; torchrun passes it on to every rank), and
the command's one-line error when it fails.

The child runs this copy of the pack: `python -m comfyui_lycoris` where that imports this folder (the pack installed,
editable or linked), else a few lines given to `python -c` that import this folder under that name first (the pack
sits in ComfyUI's custom_nodes without being installed, or another copy is installed).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ERROR_PREFIX = "comfyui-lycoris train: error: "  # the command's one line on stderr
PROGRESS_FILE = "progress.jsonl"  # in the job's folder
LOG_FILE = "job.log"  # the job's stdout and stderr, in its folder
POLL_SECONDS = 0.2  # how often the progress file and the stop request are looked at
STOP_SECONDS = 120.0  # after a stop: how long the step in progress and the checkpoint may take before the job is killed
PACK_FOLDER = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BOOTSTRAP = """\
import importlib.util, os, runpy, sys
folder = {folder!r}
spec = importlib.util.spec_from_file_location("comfyui_lycoris", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
sys.modules["comfyui_lycoris"] = pack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pack)
runpy.run_module("comfyui_lycoris", run_name="__main__", alter_sys=True)
"""


# ---------------------------------------------------------------------------------------------
# The command line


def pack_installed() -> bool:
    """Whether `python -m comfyui_lycoris` (this Python, started in a folder of its own) runs this very folder."""
    try:
        spec = importlib.util.find_spec("comfyui_lycoris")
    except (ImportError, ValueError):
        return False
    origin = getattr(spec, "origin", None)
    return bool(origin) and os.path.realpath(os.path.dirname(origin)) == os.path.realpath(PACK_FOLDER)


def job_command(processes: int, args: list[str], installed: bool, python: str = sys.executable) -> list[str]:
    """`comfyui-lycoris train ARGS` in one process, or under torchrun (`--standalone`, this machine) in `processes`."""
    if installed:
        run = ["-m", "comfyui_lycoris", "train", *args]
        if processes == 1:
            return [python, *run]
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *run]
    run = ["-c", BOOTSTRAP.format(folder=PACK_FOLDER), "train", *args]
    if processes == 1:
        return [python, *run]
    # torchrun starts `python -c ...` as a program of its own (--no-python), with its arguments as they are
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "--no-python", python, *run]


def option_text(value) -> str:
    """A value as `--set NAME=TEXT` reads it (a TOML value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return json.dumps(value)


def option_lines(text: str) -> list[str]:
    """FIELD=VALUE lines as a person types them: one per line; blank lines and # comments skipped."""
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


# ---------------------------------------------------------------------------------------------
# The running job


_RUNNING: set[subprocess.Popen] = set()


def _signal_job(process: subprocess.Popen, signum: int) -> None:
    """`signum` to the job's process group (the command, or torchrun, which passes it on to its ranks)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.name == "posix":
            os.killpg(process.pid, signum)
        else:  # Windows has no process groups to signal, nor SIGTERM: the job ends at once
            process.terminate()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc; elsewhere none): torchrun's ranks run in sessions of their own."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _kill_job(process: subprocess.Popen) -> None:
    """The last resort, when a stopped job does not end: SIGKILL to it and to every process below it."""
    below = _descendants(process.pid)
    kill = getattr(signal, "SIGKILL", signal.SIGTERM)
    _signal_job(process, kill)
    for pid in below:
        with contextlib.suppress(OSError):
            os.kill(pid, kill)


@atexit.register
def _stop_running_jobs() -> None:
    """The program that started jobs is quitting (they run in process groups of their own, which a Ctrl-C in its
    terminal does not reach): they stop too, after their step, with a checkpoint."""
    for process in list(_RUNNING):
        if process.poll() is None:
            _signal_job(process, signal.SIGTERM)


class ProgressEvents:
    """The new complete lines of the command's progress file, as dicts (the file appears when the command starts)."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]


@dataclass
class Outcome:
    code: int
    events: list[dict] = field(default_factory=list)
    stopped: bool = False  # stopped on request (should_stop)
    log: str = ""

    def last(self, kind: str) -> dict | None:
        return next((e for e in reversed(self.events) if e["event"] == kind), None)

    def error(self) -> str:
        """The command's one line saying what failed."""
        event = self.last("error")
        if event is not None:
            return event["message"]  # rank 0's (it writes the progress file)
        lines = [line.strip() for line in self.log.splitlines() if line.strip()]
        said = [line[len(ERROR_PREFIX):] for line in lines if line.startswith(ERROR_PREFIX)]
        if said:
            return said[-1]  # another rank's, or an error before the progress file was opened
        stopped = self.last("stopped")
        if stopped is not None:  # a signal from someone else
            return (f"the train command was stopped from outside at step {stopped['step']}"
                    + (f"; checkpoint {stopped['checkpoint']}" if stopped.get("checkpoint") else ""))
        return f"the train command exited with code {self.code}" + (f": {lines[-1]}" if lines else "")


async def run_job(command: list[str], env: dict, folder: str, on_event: Callable[[dict], None],
                  should_stop: Callable[[], bool], poll: float = POLL_SECONDS, stop_seconds: float = STOP_SECONDS) -> Outcome:
    """Run the job in `folder` (its working folder: the progress file is PROGRESS_FILE there, its output LOG_FILE)
    until it ends, calling `on_event(event)` for each progress event as it comes. When `should_stop()` turns true:
    SIGTERM to its process group, then wait for it to stop (killed after `stop_seconds`). Awaiting it leaves the
    event loop free between looks."""
    progress = ProgressEvents(os.path.join(folder, PROGRESS_FILE))
    log_path = os.path.join(folder, LOG_FILE)
    events: list[dict] = []

    def take_events() -> None:
        for event in progress.read():
            events.append(event)
            on_event(event)

    with open(log_path, "wb") as log:
        group = {"start_new_session": True} if os.name == "posix" else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        process = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, **group)
    _RUNNING.add(process)
    stop_by = None
    try:
        while process.poll() is None:
            take_events()
            if stop_by is None and should_stop():
                _signal_job(process, signal.SIGTERM)
                stop_by = time.monotonic() + stop_seconds
            elif stop_by is not None and time.monotonic() > stop_by:
                _kill_job(process)
            await asyncio.sleep(poll)
        take_events()
    except BaseException:  # the caller failed or was cancelled: the job must not go on alone
        if process.poll() is None:
            _signal_job(process, signal.SIGTERM)
        raise
    finally:
        _RUNNING.discard(process)
    with open(log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return Outcome(process.returncode, events, stopped=stop_by is not None, log=text)
