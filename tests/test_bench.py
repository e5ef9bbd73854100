"""`comfyui-lycoris bench`: the harness and its JSON schema at tiny sizes (no timing assertions).

The run also checks the baselines compute what ours computes: every apply and bypass contender
patches a zero weight once and is compared with the naive ΔW (lycoris-lora's `gamma` conventions,
strength and scale included); a disagreement shows up as a note on the case.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from comfyui_lycoris.benchmarks import suite
from comfyui_lycoris.benchmarks.harness import SCHEMA_NAME, SCHEMA_VERSION, STATUSES, markdown
from comfyui_lycoris.cli import build_parser

TINY = suite.Profile(
    "tiny",
    apply_shapes={"tiny_64x48": (64, 48)},
    apply_runs=2,
    bypass_shapes={"tiny_64x48": (64, 48)},
    bypass_tokens=8,
    bypass_runs=2,
    training_shapes={"tiny_64x48": (64, 48)},
    training_tokens=8,
    training_rank=2,
    training_runs=2,
    training_peers=("lycoris",),
    model_budget=1 << 20,
    model_runs=2,
    files_blocks=1,
    files_convert_bytes=1 << 20,
    files_runs=1,
    files_tool_runs=1,
    files_tiny_tensors=300,
    files_key_bytes=1 << 12,
    dim=64,
    ffn=96,
)

CASE_FIELDS = {
    "group": str, "name": str, "params": dict, "ours": str, "baseline": (str, type(None)),
    "metric": str, "seconds": (float, type(None)), "baseline_seconds": (float, type(None)),
    "ratio": (float, type(None)), "runs": int, "peak_bytes": (int, type(None)),
    "baseline_peak_bytes": (int, type(None)), "target": (str, type(None)), "met": (bool, type(None)),
    "status": str, "note": str,
}
MACHINE_FIELDS = ("cpu", "cores", "usable_cores", "torch_threads", "memory_bytes", "torch", "python", "platform",
                  "device", "device_name", "lycoris_lora", "load_average")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    path = folder / "bench.json"
    result = suite.run(TINY, device="cpu", json_path=str(path), temp_dir=str(folder))
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert [p.name for p in folder.iterdir()] == ["bench.json"], "temporary files left behind"
    return result


def test_report_follows_the_schema(report):
    assert report["schema"] == SCHEMA_NAME and report["schema_version"] == SCHEMA_VERSION
    assert report["mode"] == "tiny"
    assert set(MACHINE_FIELDS) <= set(report["machine"])
    assert report["machine"]["device"] == "cpu"
    names = [case["name"] for case in report["cases"]]
    assert len(names) == len(set(names)), "case names must be unique"
    for case in report["cases"]:
        assert set(case) == set(CASE_FIELDS), case["name"]
        for field, kind in CASE_FIELDS.items():
            assert isinstance(case[field], kind), (case["name"], field, case[field])
        assert case["status"] in STATUSES
        assert case["group"] in suite.GROUPS
        assert case["metric"] in ("time", "memory")
        if case["status"] == "ok":
            assert case["seconds"] > 0 and case["runs"] >= 1
            if case["metric"] == "time" and case["baseline_seconds"]:
                assert case["ratio"] == pytest.approx(case["seconds"] / case["baseline_seconds"])
            if case["target"] is not None:
                assert isinstance(case["met"], bool), case["name"]
        else:
            assert case["note"], f"{case['name']}: a case that did not run must say why"


def test_every_group_ran(report):
    ran = {case["group"] for case in report["cases"] if case["status"] == "ok"}
    assert ran == set(suite.GROUPS)
    assert not [c["name"] for c in report["cases"] if c["status"] == "error"]


def test_baselines_compute_the_same_delta(report):
    """Ours, naive, lycoris-lora and the bypass forms agree (a bad gamma/scale shows as a note)."""
    disagree = [f"{c['name']}: {c['note']}" for c in report["cases"] if "differs" in c["note"]]
    assert not disagree


def test_comfyui_column_says_why_it_is_missing(report):
    comfy = [c for c in report["cases"] if c["name"].endswith("vs comfyui")]
    assert comfy
    for case in comfy:
        assert case["status"] == "ok" or ("ComfyUI" in case["note"] or "COMFYUI_PATH" in case["note"])


def test_memory_cases_report_peaks(report):
    for case in report["cases"]:
        if case["status"] == "ok" and case["group"] in ("training", "files", "model_patch"):
            assert case["peak_bytes"] is not None and case["peak_bytes"] >= 0, case["name"]
    merge = [c for c in report["cases"] if c["name"] == "merge peak memory"]
    assert merge and merge[0]["metric"] == "memory" and merge[0]["params"]["bound_bytes"] > 0


def test_extract_and_to_lora_against_a_plain_read_and_write(report):
    """Both tools are timed against the plain read+write of the files they read, in the same run, and held to
    merge's memory bound."""
    cases = {c["name"]: c for c in report["cases"]}
    for name in ("extract lora r16", "to-lora r16 of a DoRA LoKr"):
        timing, memory = cases[f"{name} time"], cases[f"{name} peak memory"]
        assert timing["status"] == "ok" and timing["baseline"].startswith("plain read") and timing["ratio"] > 0
        assert timing["target"] is None and timing["met"] is None  # reported, not judged
        assert memory["metric"] == "memory" and memory["params"]["bound_bytes"] > 0 and isinstance(memory["met"], bool)


def test_markdown_has_one_row_per_case(report):
    text = markdown(report)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert len(rows) == len(report["cases"])
    assert report["machine"]["device_name"] in text


def test_cli_bench_arguments():
    args = build_parser().parse_args(["bench", "--quick", "--json", "out.json"])
    assert args.quick and args.json == "out.json" and args.only is None
    result = subprocess.run([sys.executable, "-m", "comfyui_lycoris", "bench", "--only", "nope"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown benchmark group 'nope'" in result.stderr
