"""Case 1: patch a weight in place, `W += m·s·ΔW`, for LoKr (low-rank and full `w2`) and LoHa.

Contenders, all starting from the same fp32 factor tensors already in memory:
  ours     `ModuleAdapter.apply_` (the algorithm's `apply_`: LoKr through a strided view, no kron;
           LoHa by blocks of rows)
  naive    build ΔW in fp32, scale it, cast it to W's dtype, add it
  lycoris  `lycoris.functional.{lokr,loha}.diff_weight` (lycoris-lora), then the same add; note
           that lokr's `gamma` is alpha (it divides by the rank itself) and loha's is the scale
  comfyui  ComfyUI's own `LoKrAdapter` / `LoHaAdapter.calculate_weight` (when ComfyUI imports)
  floor    the memory-bandwidth floor: one `W.add_(X)` with X of W's size and dtype
Before timing, every contender patches a zero weight once (the warm-up) and is checked against
`naive`, so a baseline that computes something else is reported, not timed silently.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from . import synthetic
from .harness import Result, WorkerError, interleaved, run_worker, synchronizer, unavailable

STRENGTH = 0.8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KINDS = ("lokr_lowrank", "lokr_full", "loha")
TITLES = {
    "ours": "ModuleAdapter.apply_",
    "naive": "naive: build ΔW, add",
    "lycoris": "lycoris-lora diff_weight + add",
    "comfyui": "ComfyUI calculate_weight",
    "floor": "bandwidth floor W.add_(X)",
}


@dataclass(frozen=True)
class Config:
    kind: str
    shape: str  # a name for (out, in), e.g. a key of synthetic.SHAPES
    out: int
    in_: int
    dtype: str  # a key of DTYPES
    rank: int = 16

    @property
    def algorithm(self) -> str:
        return "loha" if self.kind == "loha" else "lokr"

    @property
    def name(self) -> str:
        return f"apply {self.kind} r{self.rank} {self.shape} {self.dtype}"

    def params(self) -> dict:
        return {"algorithm": self.algorithm, "kind": self.kind, "rank": self.rank, "out": self.out, "in": self.in_,
                "dtype": self.dtype, "strength": STRENGTH}

    def factors(self) -> tuple[dict[str, torch.Tensor], float]:
        """(fp32 factor tensors, alpha)."""
        generator = torch.Generator().manual_seed(0)
        shape = (self.out, self.in_)
        if self.kind == "loha":
            return synthetic.loha_tensors(shape, self.rank, generator), self.rank / 2
        return synthetic.lokr_tensors(shape, self.rank, self.kind == "lokr_full", generator), self.rank / 2


def comfy_adapters(device: torch.device):
    """ComfyUI's (LoHaAdapter, LoKrAdapter), imported the way ComfyUI's own scripts do."""
    import comfy.cli_args

    if device.type == "cpu":
        comfy.cli_args.args.cpu = True  # must be set before comfy.model_management is imported
    import comfy.model_management  # noqa: F401  (the adapters use it)
    from comfy.weight_adapter import LoHaAdapter, LoKrAdapter

    return LoHaAdapter, LoKrAdapter


def _naive_delta(kind: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    if kind == "loha":
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return torch.kron(t["lokr_w1"], w2)


def contenders(config: Config, weight: torch.Tensor, methods: list[str], device: torch.device) -> dict:
    """Callables patching `weight` in place, one per method (each closes over its own inputs)."""
    tensors, alpha = config.factors()
    t = {k: v.to(device) for k, v in tensors.items()}
    mod = synthetic.module(config.algorithm, t, alpha)
    factor = STRENGTH * mod.record.scale
    fns = {}
    for method in methods:
        if method == "ours":
            fns[method] = lambda w, mod=mod: mod.apply_(w, STRENGTH)
        elif method == "naive":
            fns[method] = lambda w, t=t: w.add_(_naive_delta(config.kind, t).mul_(factor).to(w.dtype))
        elif method == "lycoris":
            fns[method] = _lycoris_fn(config, t, alpha, mod.record.scale)
        elif method == "comfyui":
            fns[method] = _comfy_fn(config, t, alpha, device)
        elif method == "floor":
            x = synthetic.fill(tuple(weight.shape), weight.dtype, device)
            fns[method] = lambda w, x=x: w.add_(x)
        else:
            raise ValueError(method)
    return fns


def _lycoris_fn(config: Config, t: dict, alpha: float, scale: float):
    if config.algorithm == "lokr":
        from lycoris.functional import lokr as lycoris_lokr

        weights = (t.get("lokr_w1"), None, None, t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), None)
        # lokr.diff_weight takes alpha as gamma and divides by the rank itself (scale 1 when full)
        return lambda w: w.add_(lycoris_lokr.diff_weight(*weights, gamma=alpha).mul_(STRENGTH).to(w.dtype))
    from lycoris.functional import loha as lycoris_loha

    weights = (t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None)
    return lambda w: w.add_(lycoris_loha.diff_weight(*weights, gamma=scale).mul_(STRENGTH).to(w.dtype))


def _comfy_fn(config: Config, t: dict, alpha: float, device: torch.device):
    loha_cls, lokr_cls = comfy_adapters(device)
    if config.algorithm == "lokr":
        adapter = lokr_cls(set(), (t.get("lokr_w1"), t.get("lokr_w2"), alpha, None, None,
                                   t.get("lokr_w2_a"), t.get("lokr_w2_b"), None, None))
    else:
        adapter = loha_cls(set(), (t["hada_w1_a"], t["hada_w1_b"], alpha, t["hada_w2_a"], t["hada_w2_b"], None, None, None))
    return lambda w: adapter.calculate_weight(w, "bench.weight", STRENGTH, 1.0, None, lambda a: a, torch.float32)


def measure(config: Config, methods: list[str], runs: int, device: torch.device) -> dict:
    """{method: {"seconds", "runs", "samples", "error"}} for one config; `naive` is the reference."""
    shape = (config.out, config.in_)
    dtype = DTYPES[config.dtype]
    weight = synthetic.fill(shape, dtype, device)
    fns = contenders(config, weight, methods, device)
    sync = synchronizer(device)
    # Warm-up and check: each method patches a zero weight once; compared with the naive result.
    reference = torch.zeros(shape, dtype=dtype, device=device)
    contenders(config, reference, ["naive"], device)["naive"](reference)
    scale = reference.float().abs().max().item() or 1.0
    errors = {}
    for method, fn in fns.items():
        if method == "floor":
            fn(torch.zeros_like(weight))
            continue
        zero = torch.zeros_like(reference)
        fn(zero)
        errors[method] = (zero.float() - reference.float()).abs().max().item() / scale
        del zero
    del reference
    timings = interleaved({m: (lambda fn=fn: fn(weight)) for m, fn in fns.items()}, runs, sync)
    return {m: {"seconds": timings[m].median, "runs": timings[m].runs, "samples": timings[m].samples,
                "error": errors.get(m)} for m in methods}


TARGETS = {
    # (algorithm, baseline) -> (text, limit on ours/baseline)
    ("lokr", "floor"): ("ratio ≤ 1.5", 1.5),
    ("loha", "naive"): ("ratio ≤ 1.0", 1.0),
    ("lokr", "lycoris"): ("ratio ≤ 1.0", 1.0),
    ("loha", "lycoris"): ("ratio ≤ 1.0", 1.0),
    ("lokr", "comfyui"): ("ratio ≤ 1.0", 1.0),
    ("loha", "comfyui"): ("ratio ≤ 1.0", 1.0),
}


def _records(config: Config, measured: dict, baselines: list[str]) -> list[Result]:
    ours = measured["ours"]
    out = []
    for baseline in baselines:
        base = measured[baseline]
        text, limit = TARGETS.get((config.algorithm, baseline), (None, None))
        r = Result("apply", f"{config.name} vs {baseline}", config.params(), TITLES["ours"], TITLES[baseline],
                   seconds=ours["seconds"], baseline_seconds=base["seconds"], runs=ours["runs"], target=text).finish()
        if limit is not None:
            r.met = r.ratio <= limit
        tol = 2e-2 if config.dtype == "bf16" else 1e-4
        for who in ("ours", baseline):
            err = measured[who]["error"]
            if err is not None and err > tol:
                r.note += f"{who} differs from naive ΔW by {err:.2g} (relative); "
        out.append(r)
    return out


def configs(shapes: dict[str, tuple[int, int]], dtypes: list[str], kinds=KINDS, rank: int = 16) -> list[Config]:
    return [Config(kind, name, *shape, dtype, rank) for name, shape in shapes.items() for dtype in dtypes for kind in kinds]


def run(shapes: dict[str, tuple[int, int]], dtypes: list[str], runs: int, device: torch.device, log) -> list[Result]:
    have_lycoris = importlib.util.find_spec("lycoris") is not None
    comfy_here = importlib.util.find_spec("comfy") is not None
    methods = ["ours", "naive", "floor"] + (["lycoris"] if have_lycoris else [])
    results = []
    all_configs = configs(shapes, dtypes)
    comfy_measured = _comfy_elsewhere(all_configs, runs, device, log) if not comfy_here else None
    for config in all_configs:
        log(f"{config.name}")
        measured = measure(config, methods + (["comfyui"] if comfy_here else []), runs, device)
        results += _records(config, measured, ["floor", "naive"] + (["lycoris"] if have_lycoris else []))
        if not have_lycoris:
            results.append(unavailable("apply", f"{config.name} vs lycoris", config.params(), TITLES["ours"],
                                       TITLES["lycoris"], "lycoris-lora is not installed", status="skipped"))
        if comfy_here:
            results += _records(config, measured, ["comfyui"])
        elif isinstance(comfy_measured, dict):
            results += _records(config, comfy_measured[config.name], ["comfyui"])
            results[-1].note += "measured in a ComfyUI subprocess (ours re-timed there); "
        else:
            results.append(unavailable("apply", f"{config.name} vs comfyui", config.params(), TITLES["ours"],
                                       TITLES["comfyui"], comfy_measured, status="skipped"))
    return results


def _comfy_elsewhere(all_configs: list[Config], runs: int, device: torch.device, log) -> dict | str:
    """ComfyUI columns from a subprocess with COMFYUI_PATH on its import path, or why not."""
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        return "ComfyUI is not importable here; set COMFYUI_PATH to a ComfyUI checkout (and run with its Python)"
    if not os.path.isdir(os.path.join(root, "comfy")):
        return f"COMFYUI_PATH={root} holds no comfy/ package"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    log(f"ComfyUI adapters from {root} (subprocess)")
    try:
        answer = run_worker("comfy_apply", {"configs": [c.__dict__ for c in all_configs], "runs": runs,
                                            "device": str(device)}, env=env)
    except WorkerError as e:
        return f"ComfyUI at {root} does not import with this Python ({e}); run the bench with ComfyUI's Python"
    return answer["measured"]


def comfy_worker(params: dict) -> dict:
    """Inside the subprocess: ours and ComfyUI's adapters, interleaved, for every config."""
    device = torch.device(params["device"])
    measured = {}
    for fields in params["configs"]:
        config = Config(**fields)
        measured[config.name] = measure(config, ["ours", "comfyui"], params["runs"], device)
    return {"measured": measured}
