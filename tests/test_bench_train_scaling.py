"""The `train_scaling` bench group (benchmarks/train_scaling.py) at its smallest size: 1 and 2 processes (torchrun,
gloo) on the demo model train the same adapter, and the records say what was measured; without a ComfyUI, the node
comparison says why it did not run. No timing assertions."""

from __future__ import annotations

import pytest
import torch
from comfyui_lycoris.benchmarks import suite, train_scaling


@pytest.fixture(scope="module")
def cases():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("COMFYUI_PATH", raising=False)
        results = train_scaling.run(train_scaling.ScalingSize(), torch.device("cpu"), lambda message: None)
    return {r.name: r for r in results}


def test_two_processes_against_one(cases):
    size = train_scaling.ScalingSize()
    one = cases["train demo 2 processes vs 1 process"]
    threads = cases["train demo 2 processes vs 1 process, 2 threads"]
    for case in (one, threads):
        assert case.group == train_scaling.GROUP and case.status == "ok" and case.metric == "time"
        assert "differ" not in case.note, case.note  # the 2-process run recorded the 1-process run's losses
        assert case.runs == size.runs * (size.steps - 1) and case.seconds > 0 and case.baseline_seconds > 0
        assert case.ratio == pytest.approx(case.seconds / case.baseline_seconds)
        assert case.params["steps_per_second"] == pytest.approx(1 / case.seconds, rel=1e-3)
        assert case.params["baseline_steps_per_second"] == pytest.approx(1 / case.baseline_seconds, rel=1e-3)
        # Two processes each hold the model: the job's memory is about twice one process's.
        assert case.baseline_peak_bytes > case.params["baseline_training_bytes"] >= 0
        assert case.peak_bytes > 1.5 * case.baseline_peak_bytes
    assert one.seconds == threads.seconds  # the same 2-process runs, against two baselines
    assert one.params["efficiency"] == pytest.approx(one.baseline_seconds / (2 * one.seconds), rel=1e-3)
    assert threads.params["efficiency"] == pytest.approx(threads.baseline_seconds / threads.seconds, rel=1e-3)


def test_node_comparison_says_why_it_did_not_run(cases):
    for algorithm in ("lokr", "loha"):
        case = cases[f"train node {algorithm} r4 LycorisTrain vs TrainLoraNode"]
        assert case.status == "skipped" and "COMFYUI_PATH" in case.note and case.seconds is None


def test_the_suite_runs_the_group():
    assert train_scaling.GROUP in suite.GROUPS
    assert suite.QUICK.scaling_size == train_scaling.QUICK_SIZE and suite.FULL.scaling_size == train_scaling.FULL_SIZE


def test_node_comparison_names_a_folder_that_is_not_comfyui(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    results = train_scaling.nodes(train_scaling.ScalingSize(), torch.device("cpu"), lambda message: None)
    assert [r.status for r in results] == ["skipped", "skipped"]
    assert all(r.note == f"COMFYUI_PATH={tmp_path} is not a ComfyUI checkout (no comfy/model_patcher.py and nodes.py)"
               for r in results)
