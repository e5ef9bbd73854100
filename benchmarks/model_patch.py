"""Case 4: patch a whole Wan-14B-shaped model with a Musubi LoKr file, as a loader does.

The adapter covers every block's self_attn q/k/v/o, cross_attn q/k/v/o (5120×5120), ffn.0
(13824×5120) and ffn.2 (5120×13824), written to a real file. "Ours" is the full load path: read the
file, plan it against the model's weight names and shapes, `apply_` every module in place. The
baseline is the bandwidth floor of the same work: one `W.add_(X)` per patched weight.

The 40-block base is 28 GB in bf16, so the run patches as many blocks as fit the memory budget
(always in a fresh subprocess, which reports its peak) and says how many that was.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from . import synthetic
from .harness import MB, Result, WorkerError, available_memory, run_worker

STRENGTH = 0.8


def block_bytes(dtype: torch.dtype, dim: int = synthetic.WAN14B_DIM, ffn: int = synthetic.WAN14B_FFN) -> int:
    return sum(synthetic.nbytes(shape, dtype) for _, shape in synthetic.wan_block_layers(dim, ffn))


def blocks_for(budget: int, dtype: torch.dtype, dim: int = synthetic.WAN14B_DIM, ffn: int = synthetic.WAN14B_FFN) -> int:
    """Blocks whose base fits `budget`, and never more than 40% of the memory available now."""
    limit = min(budget, int(available_memory() * 0.4))
    return max(1, min(synthetic.WAN14B_BLOCKS, limit // block_bytes(dtype, dim, ffn)))


def run(budget: int, rank: int, runs: int, device: torch.device, dtype_name: str, log,
        dim: int = synthetic.WAN14B_DIM, ffn: int = synthetic.WAN14B_FFN) -> list[Result]:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    blocks = blocks_for(budget, dtype, dim, ffn)
    log(f"model patch: Wan-14B-shaped LoKr r{rank}, {blocks} of 40 blocks, {dtype_name}")
    params = {"blocks": blocks, "blocks_in_wan14b": synthetic.WAN14B_BLOCKS, "layers": blocks * 10, "rank": rank,
              "dim": dim, "ffn": ffn, "dtype": dtype_name, "base_bytes": blocks * block_bytes(dtype, dim, ffn),
              "strength": STRENGTH}
    name = f"model patch wan lokr r{rank} {blocks}/40 blocks {dtype_name}"
    ours = "read_adapter + make_plan + apply_ (every layer)"
    baseline = "bandwidth floor: W.add_(X) per layer"
    try:
        answer = run_worker("model_patch", {"blocks": blocks, "rank": rank, "runs": runs, "device": str(device),
                                            "dtype": dtype_name, "dim": dim, "ffn": ffn})
    except WorkerError as e:
        return [Result("model_patch", name, params, ours, baseline, status="error", note=str(e))]
    r = Result("model_patch", name, params, ours, baseline, seconds=answer["seconds"],
               baseline_seconds=answer["floor_seconds"], runs=answer["runs"], peak_bytes=answer["peak_bytes"],
               target="ratio ≤ 1.5 (the LoKr apply target, whole model)").finish()
    r.met = r.ratio <= 1.5
    projected = answer["seconds"] / blocks * synthetic.WAN14B_BLOCKS
    r.note = (f"{blocks} of 40 blocks ({params['base_bytes'] / MB:.0f} MB base) run; all 40 would take ≈ "
              f"{projected:.1f} s at this rate (projection, not measured); peak = memory added over the base "
              f"({answer['peak_anon_bytes'] / MB:.0f} MB anonymous) while patching; ")
    if answer.get("unmatched"):
        r.note += f"{answer['unmatched']} modules unmatched; "
    return [r]


def worker(params: dict) -> dict:
    """Inside the subprocess: build the base in memory, write the adapter, time load + patch."""
    import gc

    from ..lycoris_core.adapter_file import read_adapter
    from ..lycoris_core.plan import make_plan
    from .harness import AnonPeak, interleaved, proc_status, reset_peak_rss, synchronizer

    device = torch.device(params["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[params["dtype"]]
    blocks, rank, dim, ffn = params["blocks"], params["rank"], params["dim"], params["ffn"]
    sync = synchronizer(device)
    with tempfile.TemporaryDirectory(prefix="comfyui-lycoris-bench-") as folder:
        path = os.path.join(folder, "wan14b_lokr.safetensors")
        adapter = synthetic.wan_lokr_adapter(blocks, rank, dim, ffn)
        synthetic.write_adapter(path, adapter, synthetic.musubi_metadata("lokr", rank))
        del adapter
        base = {f"blocks.{n}.{layer}.weight": synthetic.fill(shape, dtype, device)
                for n in range(blocks) for layer, shape in synthetic.wan_block_layers(dim, ffn)}
        shapes = {key: tuple(w.shape) for key, w in base.items()}

        def patch():
            adapter = read_adapter(path)
            plan = make_plan(adapter, shapes, "auto")
            for p in plan.patches:
                p.module.bind().apply_(base[p.target.key], STRENGTH)
            return plan

        gc.collect()
        reset_peak_rss()
        before = proc_status().get("VmRSS", 0)
        with AnonPeak() as anon:
            anon_before = proc_status().get("RssAnon", 0)
            sync()
            start = time.perf_counter()
            plan = patch()  # the first (cold) run is the one whose memory is reported
            sync()
            first = time.perf_counter() - start
        peak = proc_status().get("VmHWM", 0) - before
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - sum(w.numel() * w.element_size() for w in base.values())
        # The floor: one same-size add per weight (X shared by weights of the same size).
        xs = {}
        for w in base.values():
            xs.setdefault(w.numel(), synthetic.fill((w.numel(),), dtype, device))

        def floor():
            for w in base.values():
                w.view(-1).add_(xs[w.numel()])

        floor()  # warm-up
        timings = interleaved({"ours": patch, "floor": floor}, max(1, params["runs"] - 1), sync)
    samples = [first] + timings["ours"].samples
    return {
        "seconds": statistics.median(samples),
        "first_seconds": first,
        "floor_seconds": timings["floor"].median,
        "runs": len(samples),
        "peak_bytes": peak,
        "peak_anon_bytes": (anon.peak or 0) - anon_before,
        "unmatched": len(plan.unmatched),
        "patched": len(plan.patches),
    }
