"""Case 3: one LoKr training step (forward + backward) on a frozen Linear, time and peak memory.

Contenders (same W, x and output gradient; only the adapter's factors train, x needs its gradient
as it would inside a model):
  ours         `lycoris_core.training`'s trainable LoKr in bypass mode (what training runs)
  materialize  the reference: `F.linear(x, W + s·kron(w1, w2a@w2b))`, ΔW built every step (the
               cheapest materializing form: one full-size matmul forward, two backward)
  musubi       Musubi Tuner's LoKr forward as its networks/lokr.py writes it:
               `W·x + F.linear(x, s·kron(w1, w2))`, two full-size matmuls forward and three backward
  lycoris      lycoris-lora's `LokrModule` on the Linear: its default forward (rebuilds ΔW) and
               `bypass_mode=True` (kron_bypass)
Times are interleaved medians in this process; each contender's peak memory is the growth of RSS
(or CUDA allocated memory) over one step in a fresh subprocess.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lycoris_core.training.modules import TrainableAdapter, make_adapter
from . import synthetic
from .harness import Result, WorkerError, interleaved, run_worker, synchronizer

TITLES = {
    "ours": "lycoris_core.training (bypass)",
    "materialize": "ΔW-materializing F.linear(x, W + s·ΔW)",
    "musubi": "Musubi-style W·x + F.linear(x, s·ΔW)",
    "lycoris": "lycoris-lora LokrModule (default forward)",
    "lycoris_bypass": "lycoris-lora LokrModule (bypass_mode)",
}


class AdaptedLinear(nn.Module):
    """A frozen Linear plus one trainable adapter: `base(x) + adapter(x)`. For benchmarks and
    tests of a single layer; models are adapted in place by `inject_adapters`."""

    def __init__(self, base: nn.Linear, adapter: TrainableAdapter):
        super().__init__()
        self.base, self.adapter = base, adapter
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        delta = self.adapter(x)
        return y if delta is None else y + delta.to(y.dtype)


def build_trainable_linear(
    algorithm: str,
    out_features: int,
    in_features: int,
    rank: int,
    alpha: float = 1.0,
    factor: int = -1,
    mode: str = "bypass",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    base_dtype: torch.dtype | None = None,
    seed: int = 0,
    randomize: bool = True,
) -> AdaptedLinear:
    """One trainable layer at a given size, for `comfyui-lycoris bench`.

    mode "bypass" is what training uses; "materialize" builds s·ΔW and calls F.linear (the
    Musubi-style reference). `randomize` fills the zero-initialised half with small random values
    so gradients reach every factor. Returns AdaptedLinear(base, adapter); only the adapter trains.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        base = nn.Linear(in_features, out_features, bias=False, device=device, dtype=base_dtype or dtype)
        adapter = make_adapter(algorithm, out_features, in_features, rank, alpha, factor, mode=mode)
        if randomize:
            with torch.no_grad():
                for p in adapter.parameters():
                    if not p.any():
                        p.normal_(std=0.01)
    return AdaptedLinear(base, adapter.to(device=device, dtype=dtype))


def build_step(variant: str, shape: tuple[int, int], rank: int, tokens: int, device: torch.device, dtype: torch.dtype):
    """A closure running one forward + backward of `variant`, gradients cleared first."""
    out, in_ = shape
    alpha = rank / 2
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(tokens, out, generator=generator).to(device=device, dtype=dtype)
    if variant == "ours":
        layer = build_trainable_linear("lokr", out, in_, rank, alpha, mode="bypass", device=device, dtype=dtype)
        forward, params = layer, [p for p in layer.parameters() if p.requires_grad]
    elif variant in ("materialize", "musubi"):
        weight = synthetic.fill(shape, dtype, device)
        t = {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in
             synthetic.lokr_tensors(shape, rank, generator=generator).items()}
        scale = alpha / rank if "lokr_w2_a" in t else 1.0
        params = list(t.values())
        if variant == "materialize":
            def forward(v):
                w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
                return F.linear(v, weight + scale * torch.kron(t["lokr_w1"], w2))
        else:
            def forward(v):
                w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
                return F.linear(v, weight) + F.linear(v, torch.kron(t["lokr_w1"], w2) * scale)
    elif variant in ("lycoris", "lycoris_bypass"):
        from lycoris.modules import LokrModule

        base = nn.Linear(in_, out, bias=False, device=device, dtype=dtype).requires_grad_(False)
        module = LokrModule("bench", base, lora_dim=rank, alpha=alpha, factor=-1,
                            bypass_mode=True if variant == "lycoris_bypass" else None).to(device=device, dtype=dtype)
        module.apply_to()
        with torch.no_grad():
            for p in module.parameters():
                if not p.any():
                    p.normal_(std=0.01)  # the zero-initialised half, so every factor gets a gradient
        forward, params = base, [p for p in module.parameters() if p.requires_grad]
    else:
        raise ValueError(variant)

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        forward(x).backward(grad)

    return step


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def run(shapes: dict[str, tuple[int, int]], tokens: int, rank: int, runs: int, device: torch.device, dtype: torch.dtype,
        log, peers: tuple = ("lycoris", "lycoris_bypass")) -> list[Result]:
    """`peers`: the lycoris-lora contenders to include (when lycoris-lora is installed)."""
    have_lycoris = importlib.util.find_spec("lycoris") is not None
    ours = "ours"
    variants = [ours, "materialize", "musubi"] + (list(peers) if have_lycoris else [])
    sync = synchronizer(device)
    results = []
    for shape_name, shape in shapes.items():
        log(f"training lokr r{rank} {shape_name} tokens {tokens}")
        params = {"algorithm": "lokr", "rank": rank, "out": shape[0], "in": shape[1], "tokens": tokens,
                  "dtype": _dtype_name(dtype)}
        steps = {v: build_step(v, shape, rank, tokens, device, dtype) for v in variants}
        for step in steps.values():
            step()  # warm-up
        timings = interleaved(steps, runs, sync)
        del steps
        peaks, notes = {}, {}
        for v in variants:
            try:
                answer = run_worker("train_step", {"variant": v, "shape": list(shape), "rank": rank, "tokens": tokens,
                                                   "device": str(device), "dtype": _dtype_name(dtype)})
                peaks[v] = answer["peak_bytes"]
            except WorkerError as e:
                peaks[v], notes[v] = None, f"peak memory not measured ({e}); "
        name = f"training lokr r{rank} {shape_name} T{tokens}"
        target = "≥ 1.5× faster (ratio ≤ 0.67) and lower peak memory"
        pairs = [(ours, "materialize")] + [(ours, v) for v in variants[2:]] + [(v, "materialize") for v in variants[3:]]
        for a, b in pairs:
            r = Result("training", f"{name} {a} vs {b}", params, TITLES[a], TITLES[b],
                       seconds=timings[a].median, baseline_seconds=timings[b].median, runs=timings[a].runs,
                       peak_bytes=peaks[a], baseline_peak_bytes=peaks[b], note=notes.get(a, "") + notes.get(b, "")).finish()
            if a == ours and b == "materialize":
                r.target = target
                lower = None if peaks[a] is None or peaks[b] is None else peaks[a] < peaks[b]
                r.met = r.ratio <= 1 / 1.5 and lower is not False
                r.note += "peak memory = growth of RSS over one step in a fresh process; "
            results.append(r)
    return results


def worker(params: dict) -> dict:
    """Inside the subprocess: build one contender, then measure the memory growth of one step."""
    import gc

    from .harness import proc_status, reset_peak_rss

    device = torch.device(params["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[params["dtype"]]
    step = build_step(params["variant"], tuple(params["shape"]), params["rank"], params["tokens"], device, dtype)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - before}
    reset = reset_peak_rss()
    before = proc_status()["VmRSS"]
    step()
    return {"peak_bytes": proc_status()["VmHWM"] - before, "peak_reset": reset}
