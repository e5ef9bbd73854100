"""The bench's node comparison (benchmarks/train_scaling.py) with a real ComfyUI: Train LyCORIS and ComfyUI core's
Train LoRA, LoKr and LoHa, each trained in a fresh ComfyUI process on the same model file and data. No timing
assertions: the records are complete, both nodes took every step, and the numbers are the ones measured."""

from __future__ import annotations

import pytest
import torch
from comfyui_host import require_comfyui

root = require_comfyui()  # skips this module, with the reason, when there is no ComfyUI


@pytest.fixture(scope="module")
def cases(comfy_env, tmp_path_factory):
    from comfyui_lycoris.benchmarks import train_scaling

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMFYUI_PATH", str(root))
        size = train_scaling.ScalingSize()
        results = train_scaling.nodes(size, torch.device("cpu"), lambda message: None, str(tmp_path_factory.mktemp("bench")))
    return size, {r.name: r for r in results}


@pytest.mark.parametrize("algorithm", ["lokr", "loha"])
def test_both_nodes_train_and_are_measured(comfy_env, cases, algorithm):
    size, found = cases
    case = found[f"train node {algorithm} r{size.node_rank} LycorisTrain vs TrainLoraNode"]
    assert case.status == "ok", case.note
    assert case.params["comfyui"] == comfy_env.version and case.params["algorithm"] == algorithm
    assert "took" not in case.note, case.note  # every optimizer step of both was timed
    assert case.runs == size.node_steps - 1 and case.seconds > 0 and case.baseline_seconds > 0
    assert case.ratio == pytest.approx(case.seconds / case.baseline_seconds)
    assert case.peak_bytes > 0 and case.baseline_peak_bytes > 0
    assert case.note.startswith("trained: ours ") and " parameters in " in case.note
