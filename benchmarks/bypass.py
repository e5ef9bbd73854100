"""Case 2: bypass (the weight untouched, the adapter added to the layer's output) at inference.

Contenders per shape, all timed in one interleaved group: the bare Linear `F.linear(x, W)`, ours
`BoundModule.bypass_forward` for LoKr (low-rank and full w2) and LoHa (rank 16 and 32), and for
LoHa the form that builds ΔW on every call (what ComfyUI's LoHa bypass does): `F.linear(x, W) +
F.linear(x, s·ΔW)`. Overhead = ours / bare − 1.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import synthetic
from .harness import Result, interleaved, synchronizer

STRENGTH = 0.8
WAN_SHAPES = ("wan14b_attn_5120x5120", "wan14b_ffn_13824x5120")  # where the LoKr overhead target applies
VARIANTS = (  # (label, algorithm, kind, rank)
    ("lokr_lowrank r16", "lokr", "lowrank", 16),
    ("lokr_full", "lokr", "full", 16),
    ("loha r16", "loha", None, 16),
    ("loha r32", "loha", None, 32),
)


def _built(mod, base, x, dtype):
    """LoHa's bypass the way ComfyUI's adapter does it: build s·ΔW, then a second F.linear."""
    return base(x) + F.linear(x, mod.delta_weight(dtype).mul_(STRENGTH))


def _module(algorithm: str, kind: str | None, rank: int, shape, device, dtype):
    generator = torch.Generator().manual_seed(0)
    if algorithm == "loha":
        tensors = synthetic.loha_tensors(shape, rank, generator)
    else:
        tensors = synthetic.lokr_tensors(shape, rank, kind == "full", generator)
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    return synthetic.module(algorithm, tensors, rank / 2, dtype=dtype), tensors


def run(shapes: dict[str, tuple[int, int]], tokens: int, runs: int, device: torch.device, dtype: torch.dtype,
        log) -> list[Result]:
    results = []
    sync = synchronizer(device)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    for shape_name, shape in shapes.items():
        log(f"bypass {shape_name} tokens {tokens}")
        weight = synthetic.fill(shape, dtype, device)
        x = torch.randn(tokens, shape[1], device=device, dtype=dtype)
        base = functools.partial(F.linear, weight=weight)  # bound now: `weight` and `x` are deleted below
        fns = {"bare": functools.partial(base, x)}
        for label, algorithm, kind, rank in VARIANTS:
            mod, _ = _module(algorithm, kind, rank, shape, device, dtype)
            fns[label] = functools.partial(mod.bypass_forward, x, base, STRENGTH)
            if algorithm == "loha":
                fns[label + " build ΔW"] = functools.partial(_built, mod, base, x, dtype)
        with torch.no_grad():
            # warm-up, and a check that ours equals W·x + s·ΔW·x
            reference_base = base(x).float()
            notes = {}
            for label, algorithm, kind, rank in VARIANTS:
                mod, t = _module(algorithm, kind, rank, shape, device, dtype)
                delta = synthetic.module(algorithm, t, rank / 2).delta_weight(torch.float32)
                expected = reference_base + F.linear(x.float(), delta) * STRENGTH
                got = fns[label]().float()
                err = ((got - expected).abs().max() / expected.abs().max()).item()
                if err > (1e-3 if dtype == torch.float32 else 5e-2):
                    notes[label] = f"differs from W·x + s·ΔW·x by {err:.2g} (relative); "
                del expected, got, delta
            del reference_base
            for name, fn in fns.items():
                if "build" in name:
                    fn()
            timings = interleaved(fns, runs, sync)
        bare = timings["bare"]
        params_common = {"out": shape[0], "in": shape[1], "tokens": tokens, "dtype": dtype_name, "strength": STRENGTH}
        for label, algorithm, kind, rank in VARIANTS:
            params = dict(params_common, algorithm=algorithm, rank=rank, kind=kind or "lowrank")
            ours = timings[label]
            r = Result("bypass", f"bypass {label} {shape_name} vs bare Linear", params, "BoundModule.bypass_forward",
                       "bare F.linear(x, W)", seconds=ours.median, baseline_seconds=bare.median, runs=ours.runs,
                       note=notes.get(label, "")).finish()
            r.note += f"overhead {100 * (r.ratio - 1):.1f}%; "
            if algorithm == "lokr" and shape_name in WAN_SHAPES:
                r.target, r.met = "overhead < 15% (ratio < 1.15)", r.ratio < 1.15
            results.append(r)
            if algorithm == "loha":
                built = timings[label + " build ΔW"]
                r = Result("bypass", f"bypass {label} {shape_name} vs building ΔW", params,
                           "BoundModule.bypass_forward", "F.linear(x, W) + F.linear(x, s·ΔW) (ΔW built per call)",
                           seconds=ours.median, baseline_seconds=built.median, runs=ours.runs,
                           note=notes.get(label, "")).finish()
                if rank <= 32:
                    r.target, r.met = "faster than building ΔW (ratio < 1.0)", r.ratio < 1.0
                results.append(r)
        del weight, x, fns
    return results
