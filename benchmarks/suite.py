"""The benchmark suite: which cases run at which sizes (a Profile), and the report they produce."""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from . import apply, bypass, files, model_patch, synthetic, train_scaling, training
from .harness import Result, machine_info, markdown, report_dict

GROUPS = ("apply", "bypass", "training", "model_patch", "files", "reading", "train_scaling")
WAN_ATTN = {"wan14b_attn_5120x5120": synthetic.SHAPES["wan14b_attn_5120x5120"]}
WAN = {k: v for k, v in synthetic.SHAPES.items() if k.startswith("wan14b")}


@dataclass(frozen=True)
class Profile:
    name: str
    apply_shapes: dict
    apply_dtypes: tuple = ("fp32", "bf16")
    apply_runs: int = 5
    bypass_shapes: dict = field(default_factory=lambda: dict(synthetic.SHAPES))
    bypass_tokens: int = 4096
    bypass_runs: int = 3
    training_shapes: dict = field(default_factory=lambda: dict(WAN))
    training_tokens: int = 2048
    training_rank: int = 16
    training_runs: int = 3
    training_peers: tuple = ("lycoris", "lycoris_bypass")  # lycoris-lora contenders in the training case
    model_budget: int = 6 << 30  # bytes of base model the whole-model patch may build
    model_runs: int = 3
    files_blocks: int = 3  # Wan-14B blocks in the merge base (≈ 0.7 GB each in bf16)
    files_convert_bytes: int = 1 << 30
    files_runs: int = 3
    files_tool_runs: int = 1  # extract and to-lora decompose every layer of the base (minutes): one run
    files_tiny_tensors: int = 200_000  # the tensors of the file `inspect` reads (linear reading)
    files_key_bytes: int = 1 << 20  # the key `read_adapter` matches (linear name matching)
    dim: int = synthetic.WAN14B_DIM  # Wan model width for the whole-model and file cases
    ffn: int = synthetic.WAN14B_FFN
    scaling_size: train_scaling.ScalingSize = field(default_factory=train_scaling.ScalingSize)  # the train_scaling group
    notes: tuple = ()


FULL = Profile("full", apply_shapes=dict(synthetic.SHAPES), bypass_runs=5, scaling_size=train_scaling.FULL_SIZE)
QUICK = Profile(
    "quick",
    apply_shapes=dict(WAN_ATTN),
    apply_runs=3,
    bypass_shapes=dict(WAN),
    bypass_tokens=256,
    bypass_runs=3,
    training_shapes=dict(WAN_ATTN),
    training_tokens=256,
    training_runs=3,
    training_peers=(),
    model_budget=model_patch.block_bytes(torch.bfloat16),  # one block
    model_runs=2,
    files_blocks=1,
    files_convert_bytes=32 << 20,
    files_runs=2,
    files_tiny_tensors=30_000,
    scaling_size=train_scaling.QUICK_SIZE,
    notes=(
        "--quick runs smaller than the full run: apply at 5120×5120 only, 3 runs; bypass at 256 tokens, not "
        "4096; training at 5120×5120 only, 256 tokens, without the lycoris-lora contenders; whole-model patch of "
        "1 Wan block, not 40; merge, extract and to-lora on a 1-block (0.7 GB) base, not the 2 GB one; convert of "
        "a 32 MB adapter, not 1 GB; inspect of 30000 tiny tensors, not 200000; 2 runs of each file case (extract and "
        "to-lora: 1, as in the full run).",
    ),
)


def _log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)


def run(profile: Profile, groups=GROUPS, device: str = "auto", json_path: str | None = None,
        temp_dir: str | None = None) -> dict:
    """Run the chosen case groups; returns the report (and writes it as JSON to `json_path`)."""
    start = time.perf_counter()

    def log(message: str) -> None:
        _log(message, start)

    if device == "auto":
        device = "cuda" if profile.name != "quick" and torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    compute_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    notes = list(profile.notes)
    notes.append(f"torch threads {torch.get_num_threads()} (default, not changed); timings are medians of "
                 "interleaved runs; ratio = ours / baseline (below 1: ours is faster).")
    if dev.type == "cpu" and {"bypass", "training"} & set(groups):
        notes.append("bypass and training run in fp32 on the CPU (bf16 matmuls are not the CPU's fast path).")
    log(f"bench {profile.name} on {dev}")
    results: list[Result] = []
    for group in groups:
        try:
            if group == "apply":
                results += apply.run(profile.apply_shapes, list(profile.apply_dtypes), profile.apply_runs, dev, log)
            elif group == "bypass":
                results += bypass.run(profile.bypass_shapes, profile.bypass_tokens, profile.bypass_runs, dev,
                                      compute_dtype, log)
            elif group == "training":
                results += training.run(profile.training_shapes, profile.training_tokens, profile.training_rank,
                                        profile.training_runs, dev, compute_dtype, log, profile.training_peers)
            elif group == "model_patch":
                results += model_patch.run(profile.model_budget, 16, profile.model_runs, dev, "bf16", log,
                                           profile.dim, profile.ffn)
            elif group == "files":
                results += files.run(profile.files_blocks, profile.files_convert_bytes, profile.files_runs, temp_dir,
                                     log, profile.dim, profile.ffn, profile.files_tool_runs)
            elif group == "reading":
                results += files.run_reading(profile.files_tiny_tensors, profile.files_key_bytes, profile.files_runs,
                                             temp_dir, log)
            elif group == "train_scaling":
                results += train_scaling.run(profile.scaling_size, dev, log, temp_dir)
            else:
                raise ValueError(f"unknown benchmark group {group!r} (one of {', '.join(GROUPS)})")
        except ValueError:
            raise
        except Exception as e:  # a broken case must not lose the others' results
            log(f"{group} failed: {traceback.format_exc()}")
            results.append(Result(group, group, {}, "", None, status="error", note=f"{type(e).__name__}: {e}"))
    report = report_dict(profile.name, machine_info(dev), results, time.perf_counter() - start, notes)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    log("done")
    return report


__all__ = ["FULL", "GROUPS", "QUICK", "Profile", "markdown", "run"]
