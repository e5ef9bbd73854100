"""Timing, memory measurement, the result record and its rendering (JSON and a markdown table).

Timings are medians of interleaved runs: each round runs every contender once, in an order rotated
from round to round, so background load on a shared machine hits all of them alike. Peak memory is
measured in a fresh subprocess (`worker.py`) so nothing a previous case allocated is counted or
reused: the kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs where allowed) and, by a
sampling thread, the peak of anonymous memory (RSS minus pages of mapped files).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

SCHEMA_NAME = "comfyui-lycoris-bench"
SCHEMA_VERSION = 1
STATUSES = ("ok", "skipped", "not available", "error")
MB = 1 << 20


@dataclass
class Result:
    """One comparison: ours against one baseline, measured in the same run (schema: __init__.py)."""

    group: str
    name: str
    params: dict
    ours: str
    baseline: str | None
    seconds: float | None = None
    baseline_seconds: float | None = None
    ratio: float | None = None
    runs: int = 0
    peak_bytes: int | None = None
    baseline_peak_bytes: int | None = None
    target: str | None = None
    met: bool | None = None
    status: str = "ok"
    note: str = ""
    metric: str = "time"  # "time": ratio = seconds / baseline_seconds; "memory": peak_bytes / baseline_peak_bytes

    def finish(self) -> Result:
        if self.ratio is None and self.seconds is not None and self.baseline_seconds:
            self.ratio = self.seconds / self.baseline_seconds
        return self


def unavailable(group: str, name: str, params: dict, ours: str, baseline: str | None, why: str, target=None,
                status: str = "not available") -> Result:
    return Result(group, name, params, ours, baseline, target=target, status=status, note=why)


# ---------------------------------------------------------------------------------------------
# Timing


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def runs(self) -> int:
        return len(self.samples)


def interleaved(contenders: dict[str, Callable[[], object]], runs: int, sync: Callable[[], None]) -> dict[str, Timing]:
    """Median-ready timings of each contender over `runs` interleaved rounds (no warm-up here)."""
    names = list(contenders)
    timings = {name: Timing() for name in names}
    for round_ in range(runs):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            contenders[name]()
            sync()
            timings[name].samples.append(time.perf_counter() - start)
    return timings


# ---------------------------------------------------------------------------------------------
# Memory (Linux /proc; elsewhere the numbers are None)


def proc_status() -> dict[str, int]:
    """Memory lines of /proc/self/status, in bytes ({} where there is no procfs)."""
    try:
        with open("/proc/self/status") as f:
            lines = f.readlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            values[key] = int(parts[0]) * 1024
    return values


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class AnonPeak:
    """Samples RssAnon every few milliseconds while active: the peak of memory the process allocated,
    without the pages of files it has mapped (which the kernel can drop) that VmHWM includes."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = proc_status().get("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = proc_status().get("RssAnon")
            if value is not None and (self.peak is None or value > self.peak):
                self.peak = value

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        value = proc_status().get("RssAnon")
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value


def available_memory() -> int:
    """MemAvailable in bytes (a conservative 4 GB where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class WorkerError(RuntimeError):
    pass


def run_worker(task: str, params: dict, env: dict | None = None, timeout: float = 1800) -> dict:
    """Run `worker.py TASK PARAMS` in a fresh interpreter; its last stdout line is the JSON answer."""
    command = [sys.executable, "-m", f"{__package__}.worker", task, json.dumps(params)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise WorkerError(f"worker {task} exited {proc.returncode}: {tail[-1] if tail else 'no output'}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# Machine description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    meminfo_total = None
    try:
        with open("/proc/meminfo") as f:
            meminfo_total = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": meminfo_total,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "lycoris_lora": _version("lycoris-lora"),
        # the machine may be shared: load at the end of the run says how noisy the timings were
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return info


# ---------------------------------------------------------------------------------------------
# Rendering


def report_dict(mode: str, machine: dict, results: list[Result], wall_seconds: float, notes: list[str]) -> dict:
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "mode": mode,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": round(wall_seconds, 3),
        "machine": machine,
        "notes": notes,
        "cases": [asdict(r.finish()) for r in results],
    }


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.2f} s"


def _mb(value: int | None) -> str:
    return "—" if value is None else f"{value / MB:.0f}"


def _met(result: dict) -> str:
    if result["status"] != "ok":
        return result["status"]
    return {True: "met", False: "**missed**", None: ""}[result["met"]]


def markdown(report: dict) -> str:
    """The results as a markdown table, with the machine line above it."""
    m = report["machine"]
    load = ""
    if m.get("load_average"):
        load = f"; load average {'/'.join(f'{x:.1f}' for x in m['load_average'])} (1/5/15 min) at the end"
    lines = [
        f"`comfyui-lycoris bench{' --quick' if report['mode'] == 'quick' else ''}` on {m['device_name']} "
        f"({m['usable_cores']} of {m['cores']} cores usable, {m['torch_threads']} torch threads"
        f"{', ' + str(round(m['memory_bytes'] / (1 << 30))) + ' GiB RAM' if m.get('memory_bytes') else ''}), "
        f"torch {m['torch']}, device {m['device']}, lycoris-lora {m['lycoris_lora'] or 'absent'}; "
        f"{report['wall_seconds']:.0f} s in all"
        f"{load}.",
        "",
        "| case | ours | baseline | ours time | baseline time | ratio | peak MB (ours / base) | target | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cases"]:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
        peak = "—" if r["peak_bytes"] is None else f"{_mb(r['peak_bytes'])} / {_mb(r['baseline_peak_bytes'])}"
        lines.append(
            f"| {r['name']} | {r['ours']} | {r['baseline'] or '—'} | {_seconds(r['seconds'])} | "
            f"{_seconds(r['baseline_seconds'])} | {ratio} | {peak} | {r['target'] or ''} | {_met(r)} |"
        )
    by_note: dict[str, list[str]] = {}  # one line per distinct note (many cases share "why skipped")
    for r in report["cases"]:
        if r["note"]:
            by_note.setdefault(r["note"].strip().rstrip(";"), []).append(r["name"])
    notes = [f"- {names[0]}{f' (and {len(names) - 1} more like it)' if len(names) > 1 else ''}: {note}"
             for note, names in by_note.items()]
    if report["notes"] or notes:
        lines += ["", "Notes:", *[f"- {n}" for n in report["notes"]], *notes]
    return "\n".join(lines)
