"""The built-in main job (`comfyui-lycoris demo`): train a LoKr and a LoHa on a small Wan-shaped
model, save them as Musubi files, reload them with `read_adapter`, bake them into the model's
weights file with `merge`, and check that every path gives the same numbers. Nothing is downloaded.

The model is a two-block DiT whose Linear layers are named as Wan's (`blocks.N.self_attn.q/k/v/o`,
`cross_attn.q/k/v/o`, `ffn.0/2`, with `patch_embedding`, `text_embedding`, `time_embedding`,
`time_projection`, `head.head` outside the blocks), so the architecture registry detects it as
`wan`, Musubi's default excludes apply and the load plan maps the files onto it. The task: match a
teacher, the same model whose block Linears carry a hidden low-rank Kronecker change, on random
inputs; both LoKr and LoHa can represent that change, so the loss falls towards zero.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lycoris_core.adapter_file import read_adapter
from .lycoris_core.algorithms.lokr import factorization
from .lycoris_core.detection import detect_model_architecture
from .lycoris_core.errors import AdapterError
from .lycoris_core.merge import merge
from .lycoris_core.plan import make_plan
from .lycoris_core.safetensors_io import SafetensorsReader, save_tensors
from .lycoris_core.training.config import TrainingConfig
from .lycoris_core.training.inject import AdapterSet, inject_adapters
from .lycoris_core.training.loop import TrainProgress, train
from .lycoris_core.training.musubi_file import save_musubi
from .lycoris_core.training.plot import loss_chart


@dataclass(frozen=True)
class DemoSize:
    dim: int = 96  # 96 = 8·12: LoKr rank 8 makes attention layers full-matrix and the FFN low-rank
    ffn: int = 384
    heads: int = 4
    blocks: int = 2
    in_dim: int = 16  # latent channels per token
    text_dim: int = 32
    freq_dim: int = 32
    tokens: int = 24
    text_tokens: int = 8
    batch: int = 4


# ---------------------------------------------------------------------------------------------
# The model (Wan's structure in miniature: modulated self-attention, cross-attention, FFN)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = _RMSNorm(dim), _RMSNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.norm_q(self.q(x))), split(self.norm_k(self.k(context))), split(self.v(context))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, size: DemoSize):
        super().__init__()
        self.norm1 = nn.LayerNorm(size.dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = _Attention(size.dim, size.heads)
        self.norm3 = nn.LayerNorm(size.dim, eps=1e-6)
        self.cross_attn = _Attention(size.dim, size.heads)
        self.norm2 = nn.LayerNorm(size.dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(size.dim, size.ffn), nn.GELU(approximate="tanh"), nn.Linear(size.ffn, size.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, size.dim) / size.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).chunk(6, dim=1)
        x = x + gate1 * self.self_attn(self.norm1(x) * (1 + scale1) + shift1)
        x = x + self.cross_attn(self.norm3(x), context)
        return x + gate2 * self.ffn(self.norm2(x) * (1 + scale2) + shift2)


class _Head(nn.Module):
    def __init__(self, size: DemoSize):
        super().__init__()
        self.norm = nn.LayerNorm(size.dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(size.dim, size.in_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, size.dim) / size.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation + e[:, None]).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + scale) + shift)


class DemoDiT(nn.Module):
    """A tiny Wan-shaped diffusion transformer: (latents, timestep, text) -> prediction."""

    def __init__(self, size: DemoSize = DemoSize()):
        super().__init__()
        self.size = size
        self.patch_embedding = nn.Linear(size.in_dim, size.dim)
        self.text_embedding = nn.Sequential(nn.Linear(size.text_dim, size.dim), nn.GELU(approximate="tanh"), nn.Linear(size.dim, size.dim))
        self.time_embedding = nn.Sequential(nn.Linear(size.freq_dim, size.dim), nn.SiLU(), nn.Linear(size.dim, size.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(size.dim, 6 * size.dim))
        self.blocks = nn.ModuleList(_Block(size) for _ in range(size.blocks))
        self.head = _Head(size)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        half = self.size.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = timestep[:, None].float() * freqs[None]
        e = self.time_embedding(torch.cat([angles.cos(), angles.sin()], dim=1))
        e0 = self.time_projection(e).unflatten(1, (6, self.size.dim))
        x, context = self.patch_embedding(latents), self.text_embedding(text)
        for block in self.blocks:
            x = block(x, e0, context)
        return self.head(x, e)


def build_models(seed: int, size: DemoSize = DemoSize()) -> tuple[DemoDiT, DemoDiT]:
    """(base, teacher): the teacher's block Linears carry a hidden kron(A, B), A and B of rank 2,
    shaped by Musubi's factorization, about half the size of the weight it is added to."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = DemoDiT(size)
    teacher = DemoDiT(size)
    teacher.load_state_dict(base.state_dict())
    with torch.no_grad():
        for module in teacher.blocks.modules():
            if isinstance(module, nn.Linear):
                (out_l, out_k), (in_m, in_n) = factorization(module.out_features), factorization(module.in_features)

                def low_rank(rows: int, cols: int) -> torch.Tensor:
                    return torch.randn(rows, 2, generator=generator) @ torch.randn(2, cols, generator=generator)

                change = torch.kron(low_rank(out_l, in_m), low_rank(out_k, in_n))
                module.weight += change * (0.5 * module.weight.norm() / change.norm())
    return base.eval(), teacher.eval()


def make_batches(teacher: DemoDiT, count: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """Random (latents, timestep, text, teacher output) batches."""
    size = teacher.size
    generator = torch.Generator().manual_seed(seed)
    batches = []
    with torch.no_grad():
        for _ in range(count):
            latents = torch.randn(size.batch, size.tokens, size.in_dim, generator=generator)
            timestep = torch.rand(size.batch, generator=generator) * 1000
            text = torch.randn(size.batch, size.text_tokens, size.text_dim, generator=generator)
            batches.append((latents, timestep, text, teacher(latents, timestep, text)))
    return batches


# ---------------------------------------------------------------------------------------------
# The job


DEMO_CONFIGS = {
    "lokr": TrainingConfig(algorithm="lokr", rank=8, alpha=4.0, architecture="wan", learning_rate=1e-2,
                           warmup_steps=10, lr_scheduler="cosine", seed=1),
    "loha": TrainingConfig(algorithm="loha", rank=8, alpha=4.0, architecture="wan", learning_rate=1e-2,
                           warmup_steps=10, lr_scheduler="cosine", seed=1),
}
BASE_FILE = "base_model.safetensors"
REPORT_FILE = "report.json"
CHART_FILE = "loss_curve.png"


CONVERT_TO = "comfyui"  # the layout ComfyUI core's own LoraLoader reads


def output_files(algorithms=tuple(DEMO_CONFIGS), convert: bool = True) -> list[str]:
    files = [BASE_FILE, REPORT_FILE, CHART_FILE]
    for name in algorithms:
        files += [f"demo_{name}.safetensors", f"demo_{name}.merged.safetensors"]
        if convert:
            files.append(f"demo_{name}.{CONVERT_TO}.safetensors")
    return files


@dataclass
class AlgorithmReport:
    algorithm: str
    layers: str
    losses: list[float]
    seconds: float
    file: str
    merged_file: str
    reload_max_abs_err: float  # read_adapter delta vs the trained adapter's s·ΔW
    merge_max_rel_err: float  # merged weights vs W + s·ΔW of the trained adapters
    output_max_rel_err: float  # merged model output vs adapted model output
    full_matrix_layers: int
    low_rank_layers: int
    converted_file: str | None = None
    convert_max_abs_err: float | None = None  # converted file's ΔW per model weight vs the trained one


@dataclass
class DemoReport:
    out_dir: str
    architecture: str | None
    reports: list[AlgorithmReport] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self, tolerance: float = 1e-5) -> bool:
        return all(
            r.reload_max_abs_err <= tolerance and r.merge_max_rel_err <= tolerance and r.output_max_rel_err <= tolerance
            and (r.convert_max_abs_err is None or r.convert_max_abs_err <= tolerance)
            for r in self.reports
        )

    def format(self) -> str:
        lines = [f"demo: model detected as {self.architecture}; outputs in {self.out_dir}"]
        for r in self.reports:
            first, last = r.losses[0], r.losses[-1]
            kinds = f", {r.full_matrix_layers} full-matrix + {r.low_rank_layers} low-rank" if r.algorithm == "lokr" else ""
            lines += [
                f"  {r.algorithm}: {r.layers}",
                f"    loss {first:.4g} -> {last:.4g} ({first / max(last, 1e-30):.0f}x lower) in {len(r.losses)} steps, {r.seconds:.1f} s",
                f"    saved {os.path.basename(r.file)} (Musubi format{kinds}), baked into {os.path.basename(r.merged_file)}"
                + (f", converted to {os.path.basename(r.converted_file)}" if r.converted_file else ""),
                f"    reload max |err| {r.reload_max_abs_err:.2e}, merged weights max rel err {r.merge_max_rel_err:.2e}, "
                f"merged model output max rel err {r.output_max_rel_err:.2e}"
                + (f", converted max |err| {r.convert_max_abs_err:.2e}" if r.converted_file else ""),
            ]
        lines.append(f"  {'verified' if self.ok() else 'VERIFICATION FAILED'}; loss curves in {CHART_FILE}; total {self.seconds:.1f} s")
        return "\n".join(lines)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _check_outputs_free(out_dir: str, names: list[str]) -> None:
    taken = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
    if taken:
        raise AdapterError(f"{out_dir}: demo output {taken[0]} exists (choose another --out; nothing is overwritten)")


def run_demo(
    out_dir: str | os.PathLike,
    steps: int = 300,
    progress: Callable[[str, TrainProgress], None] | None = None,
    algorithms: tuple[str, ...] = tuple(DEMO_CONFIGS),
    seed: int = 0,
    convert: Callable[[str, str, str], object] | None = None,
) -> DemoReport:
    """Run the whole job into `out_dir` (created if missing; existing outputs are never replaced).

    `convert(input, output, to)` is the key-layout converter (`comfyui_lycoris.convert.convert_file`;
    passed in by the caller, so the core does not depend on convert/); without it that step is skipped.
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise AdapterError(f"{out_dir}: exists and is not a folder")
    if steps < 1:
        raise AdapterError(f"--steps must be at least 1, got {steps}")
    _check_outputs_free(out_dir, output_files(algorithms, convert is not None))
    os.makedirs(out_dir, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo's tensors are tiny: one thread beats several contending for them
    try:
        return _run(out_dir, steps, progress, algorithms, seed, convert)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, steps, progress, algorithms, seed, convert) -> DemoReport:
    start = time.perf_counter()

    base, teacher = build_models(seed)
    batches = make_batches(teacher, 32, seed + 1)
    held_out = make_batches(teacher, 1, seed + 2)[0]
    base_path = os.path.join(out_dir, BASE_FILE)
    save_tensors(base_path, {k: v.contiguous() for k, v in base.state_dict().items()})
    report = DemoReport(out_dir, detect_model_architecture(base.state_dict().keys()))
    if report.architecture != "wan":
        raise AdapterError(f"demo model detected as {report.architecture}, expected wan")

    series = {}
    for name in algorithms:
        config = DEMO_CONFIGS[name].replace(max_steps=steps)
        adapters = inject_adapters(base, config)
        try:

            def loss_fn(batch, model=base):
                latents, timestep, text, target = batch
                return F.mse_loss(model(latents, timestep, text), target)

            result = train(adapters, loss_fn, batches, progress=(lambda p, n=name: progress(n, p)) if progress else None)
            series[name] = result.losses
            report.reports.append(_save_and_verify(name, adapters, base, base_path, out_dir, held_out, result, convert))
        finally:
            adapters.remove()
    loss_chart(os.path.join(out_dir, CHART_FILE), series)
    report.seconds = time.perf_counter() - start
    with open(os.path.join(out_dir, REPORT_FILE), "x") as f:
        json.dump({"architecture": report.architecture, "seconds": report.seconds, "ok": report.ok(),
                   "algorithms": [r.__dict__ for r in report.reports]}, f, indent=1)
    return report


def _save_and_verify(name, adapters: AdapterSet, model: DemoDiT, base_path, out_dir, held_out, result, convert) -> AlgorithmReport:
    path = os.path.join(out_dir, f"demo_{name}.safetensors")
    save_musubi(path, adapters, steps=result.steps)
    trained = adapters.delta_weights()

    # 1. The file reads back as Musubi format for Wan, with the trained ΔW in every module.
    adapter_file = read_adapter(path)
    if adapter_file.format != "musubi" or adapter_file.architecture != "wan" or set(adapter_file.modules) != set(trained):
        raise AdapterError(f"{path}: read back as {adapter_file.format}/{adapter_file.architecture} with {len(adapter_file.modules)} modules")
    reload_err = max(float((adapter_file.modules[s].delta_weight() - d).abs().max()) for s, d in trained.items())

    # 2. Baked into the base file, every weight is W + s·ΔW of the trained adapters.
    merged_path = os.path.join(out_dir, f"demo_{name}.merged.safetensors")
    merge(base_path, merged_path, [(path, 1.0)], progress=False)
    base_state = model.state_dict()
    with SafetensorsReader(merged_path) as reader:
        merged = {k: reader.get(k) for k in reader.header.tensors}
    merge_err = max(
        _rel(merged[f"{t.path}.weight"], base_state[f"{t.path}.weight"] + trained[stem]) for stem, t in adapters.targets.items()
    )
    untouched = [k for k in merged if not any(k == f"{t.path}.weight" for t in adapters.targets.values())]
    if any(not torch.equal(merged[k], base_state[k]) for k in untouched):
        raise AdapterError(f"{merged_path}: a weight outside the adapted layers changed")

    # 3. The merged model computes what the adapted model computes.
    latents, timestep, text, _ = held_out
    with torch.no_grad():
        adapted_out = model(latents, timestep, text)
        merged_model = DemoDiT(model.size)
        merged_model.load_state_dict(merged)
        merged_out = merged_model.eval()(latents, timestep, text)
    # 4. Converted to ComfyUI's layout, every module still lands on its weight with the same ΔW.
    converted_path = convert_err = None
    if convert is not None:
        converted_path = os.path.join(out_dir, f"demo_{name}.{CONVERT_TO}.safetensors")
        convert(path, converted_path, CONVERT_TO)
        plan = make_plan(read_adapter(converted_path), {k: tuple(v.shape) for k, v in base_state.items()})
        by_key = {f"{t.path}.weight": stem for stem, t in adapters.targets.items()}
        if len(plan.patches) != len(trained) or plan.unmatched:
            raise AdapterError(f"{converted_path}: {plan.summary()}")
        convert_err = max(float((p.module.delta_weight() - trained[by_key[p.target.key]]).abs().max()) for p in plan.patches)

    kinds = [a.full_matrix for a in adapters.adapters.values()]
    return AlgorithmReport(
        algorithm=name,
        layers=adapters.summary(),
        losses=result.losses,
        seconds=result.elapsed,
        file=path,
        merged_file=merged_path,
        reload_max_abs_err=reload_err,
        merge_max_rel_err=merge_err,
        output_max_rel_err=_rel(merged_out, adapted_out),
        full_matrix_layers=sum(kinds),
        low_rank_layers=len(kinds) - sum(kinds),
        converted_file=converted_path,
        convert_max_abs_err=convert_err,
    )
