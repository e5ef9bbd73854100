"""`ema`: post-hoc EMA of adapter checkpoints, taken over each module's s·ΔW, never over its factors.

The weighting is that of Musubi Tuner's `lora_post_hoc_ema.py`, over the checkpoints in the order
given (oldest first): the running average starts as the first checkpoint and takes in checkpoint i
(i = 1 … n−1) as avg ← β_i·avg + (1 − β_i)·X_i, with
- a fixed β, or β moving linearly from β to β₂ over the n−1 steps (β_i = β + (β₂ − β)·(i−1)/(n−2));
- power-function EMA (Karras et al., "Analyzing and improving the training dynamics of diffusion
  models"): β_i = (1 − 1/i)^(γ+1), where γ ≥ 0 solves σ_rel² = (γ+1) / ((γ+2)²(γ+3)). β_1 = 0 there,
  so the first checkpoint gets weight 0, as in Musubi's script.
Unrolled, checkpoint k gets the weight (1 − β_k)·Π_{i>k} β_i (β_0 = 0); the weights sum to 1.

Musubi's script averages every tensor of the files (lora_down, lokr_w1, ...; alphas must be equal).
Products of averages are not averages of products: the EMA of ΔW is what it means to average
adapters, and the factor average's error against it is reported per module and overall.

The result is written as a LoRA at a rank or an error bound (a truncated SVD, `lowrank.py`: when every
checkpoint's module is a product (LoRA, LoHa), the average is the product of the stacked factors and
ΔW is never built), or with `exact` as full differences (`diff`, scale 1). 1-D differences (norms) and
bias differences are averaged and kept as they are. The musubi layout holds no full differences, so
with `exact` the default layout is comfyui when the input is in the musubi layout.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import torch

from ..lycoris_core.adapter_file import AdapterFile, read_adapter
from ..lycoris_core.errors import AdapterError
from ..lycoris_core.lowrank import Dense, Factored, Product, choose_rank, frobenius_squared, lora_factors
from ..lycoris_core.module import BIAS, BoundModule, ModuleAdapter
from ..lycoris_core.safetensors_io import append_records, check_output_path, stale_temp_files
from ..lycoris_core.spool import TensorSpool
from ..lycoris_core.training.musubi_file import network_description
from .computed import ComputedModules, table_lines
from .converter import ConversionResult, _listing, plan_conversion, write_plan
from .progress import OnProgress, Progress
from .to_lora import DTYPES, NETWORK_METADATA_PREFIX, RankRule, _module_dtype, _target

EMA_KEY = "comfyui_lycoris.ema"  # the record ema writes into the output's metadata
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")  # Musubi's hashes of the tensors: not true of the output
MAX_SIGMA_REL = math.sqrt(1 / 12)  # γ = 0; larger σ_rel needs γ < 0, which the power-function EMA excludes


# ---------------------------------------------------------------------------------------------
# The weights


def power_ema_gamma(sigma_rel: float) -> float:
    """γ ≥ 0 with σ_rel² = (γ+1) / ((γ+2)²(γ+3)) (the right side falls from 1/12 at γ = 0 towards 0)."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise AdapterError(f"sigma_rel must be above 0 and at most {MAX_SIGMA_REL:.4f} (γ ≥ 0), not {sigma_rel!r}")
    target = sigma_rel**2

    def width(gamma: float) -> float:
        return (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))

    low, high = 0.0, 1.0
    while width(high) > target:
        low, high = high, high * 2
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if width(middle) > target else (low, middle)
    return (low + high) / 2


def ema_betas(count: int, beta: float | None = None, beta2: float | None = None, sigma_rel: float | None = None) -> list[float]:
    """β_1 … β_{count−1}: the decay with which checkpoint i is taken into the running average."""
    steps = count - 1
    if sigma_rel is not None:
        gamma = power_ema_gamma(sigma_rel)
        return [(1 - 1 / t) ** (gamma + 1) for t in range(1, steps + 1)]
    end = beta if beta2 is None else beta2
    return [beta + (end - beta) * (i / (steps - 1)) if steps > 1 else beta for i in range(steps)]


def ema_weights(count: int, beta: float | None = None, beta2: float | None = None, sigma_rel: float | None = None) -> list[float]:
    """Each checkpoint's weight in the final average (oldest first; they sum to 1)."""
    weights = [1.0]
    for b in ema_betas(count, beta, beta2, sigma_rel):
        weights = [w * b for w in weights] + [1 - b]
    return weights


def _check_schedule(beta, beta2, sigma_rel) -> None:
    if (beta is None) == (sigma_rel is None):
        raise AdapterError("give exactly one of a beta and a sigma_rel (power-function EMA)")
    if beta2 is not None and beta is None:
        raise AdapterError("beta2 moves beta linearly over the checkpoints: it needs a beta")
    for name, value in (("beta", beta), ("beta2", beta2)):
        if value is not None and not 0 <= value <= 1:
            raise AdapterError(f"{name} must be between 0 and 1, not {value!r}")


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class EmaModule:
    stem: str
    rank: int | None  # the LoRA's rank; None: a full difference (exact, or a 1-D one kept as it is)
    error: float  # ‖avg − written‖_F / ‖avg‖_F before the cast to the output dtype
    factor_error: float | None  # ‖factor average's s·ΔW − avg‖_F / ‖avg‖_F; None: it has none (see why)
    factor_why: str | None = None
    squares: tuple[float, float] = (0.0, 0.0)  # (‖factor average − avg‖², ‖avg‖²), for the overall error

    def record(self) -> dict:
        record = {"rank": self.rank, "error": self.error, "factor_average_error": self.factor_error}
        if self.factor_why:
            record["factor_average"] = self.factor_why
        return record


@dataclass
class EmaResult:
    checkpoints: list[str]
    weights: list[float]
    exact: bool
    rule: RankRule | None
    conversion: ConversionResult
    modules: list[EmaModule]
    notes: list[str] = field(default_factory=list)

    @property
    def factor_average_error(self) -> float | None:
        """Over every module the factor average has: ‖Σ differences‖ / ‖Σ averages‖ (Frobenius, all modules
        as one vector)."""
        counted = [m.squares for m in self.modules if m.factor_error is not None]
        total = sum(s[1] for s in counted)
        if not counted:
            return None
        return math.sqrt(sum(s[0] for s in counted) / total) if total > 0 else 0.0

    def summary(self, max_modules: int = 40) -> str:
        lines = self.conversion.summary().split("\n")
        lines.append("  weights (oldest first): " + ", ".join(
            f"{os.path.basename(path)} {weight:.4g}" for path, weight in zip(self.checkpoints, self.weights)))
        lines += [f"  note: {note}" for note in self.notes]
        rows = [("module", "written as", "relative error", "factor averaging's error")]
        for m in self.modules[:max_modules]:
            written = "diff" if m.rank is None else f"lora rank {m.rank}"
            rows.append((m.stem, written, f"{m.error:.3e}", "-" if m.factor_error is None else f"{m.factor_error:.3e}"))
        lines += table_lines(rows)
        if len(self.modules) > max_modules:
            lines.append(f"  ... and {len(self.modules) - max_modules} more modules (all are in the metadata key {EMA_KEY})")
        worst = max(self.modules, key=lambda m: m.error)
        lines.append(f"  {len(self.modules)} modules; largest relative error {worst.error:.3e} ({worst.stem})")
        overall = self.factor_average_error
        why = sorted({m.factor_why for m in self.modules if m.factor_why})
        if overall is not None:
            lines.append(f"  averaging the factors instead (Musubi's lora_post_hoc_ema.py) would be off by {overall:.3e} "
                         "overall (relative Frobenius error of every module's s·ΔW together)")
        if why:
            lines.append(f"  factor averaging is undefined for some modules: {'; '.join(why)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Public API


def ema_file(
    checkpoints: list[str | os.PathLike],
    output: str | os.PathLike,
    beta: float | None = None,
    beta2: float | None = None,
    sigma_rel: float | None = None,
    rank: int | None = None,
    max_error: float | None = None,
    exact: bool = False,
    to: str | None = None,
    prefix: str | None = None,
    arch: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    on_progress: OnProgress | None = None,
) -> EmaResult:
    """Write the post-hoc EMA of the adapter `checkpoints` (oldest first; the same modules and shapes
    in each) at `output` (module docstring): a fixed `beta` (moving linearly to `beta2` if given) or
    the power-function EMA of `sigma_rel`; written as LoRA at `rank` or within `max_error`, or `exact`
    as full differences. `to` / `prefix`: the layout, as `convert` writes it (default: the first
    checkpoint's, comfyui for `exact` on a musubi-layout input). `dtype`: of the written tensors
    (default: each module's own). The output's metadata is the last checkpoint's (as Musubi's script
    keeps it), with the network description made true of the output and a record under `EMA_KEY`.
    `progress`: a terminal bar; `on_progress(done, total)`: called after each module averaged and each
    written, and may raise to stop (nothing is written then).

    Raises AdapterError (nothing written) for bad options, checkpoints whose modules or shapes differ,
    NaN/Inf values, DoRA modules, or a layout that cannot hold the result.
    """
    paths = [os.fspath(p) for p in checkpoints]
    output = os.fspath(output)
    if not paths:
        raise AdapterError("ema needs at least one checkpoint")
    _check_schedule(beta, beta2, sigma_rel)
    if exact and (rank is not None or max_error is not None):
        raise AdapterError("give one of a rank, a maximum error and exact")
    rule = None if exact else RankRule(rank, max_error)
    if dtype is not None and dtype not in DTYPES:
        raise AdapterError(f"unknown dtype {dtype!r} (choose one of: {', '.join(DTYPES)})")
    weights = ema_weights(len(paths), beta, beta2, sigma_rel)
    check_output_path(output, overwrite)
    for path in paths:
        if os.path.exists(output) and os.path.exists(path) and os.path.samefile(path, output):
            raise AdapterError(f"{output}: output would replace the checkpoint {path}, which it is read from")
    stale = stale_temp_files(output)
    adapters = [read_adapter(path) for path in paths]
    _check_alike(adapters)
    for adapter in adapters:
        adapter.check_finite()
    first = adapters[0]
    target, prefix = _target(first, to, prefix)
    notes = []
    if exact and to is None and target == "musubi":
        target = "comfyui"
        notes.append("written in the comfyui layout: the musubi layout holds no full differences (diff); pass --to for another")
    arch_id = arch or first.architecture

    # Whether the layout can hold the modules does not depend on their numbers: ask before any work.
    planned = ComputedModules()
    for module in first.modules.values():
        _plan(planned, module, exact, DTYPES[dtype] if dtype else _module_dtype(module))
    plan_conversion(planned.adapter_file(paths[-1], first.format, arch_id, {}), target, prefix, arch_id)

    with contextlib.ExitStack() as stack:
        computed = ComputedModules(stack.enter_context(TensorSpool(output)))
        counter = stack.enter_context(Progress(2 * len(first.modules), "ema", progress, on_progress))
        reports = _average_all(adapters, weights, rule, computed, dtype, counter)
        metadata = _metadata(adapters[-1], arch_id, reports, exact, rank)
        record = {"command": "ema", "checkpoints": [os.path.basename(p) for p in paths], "weights": weights,
                  **({"sigma_rel": sigma_rel, "gamma": power_ema_gamma(sigma_rel)} if sigma_rel is not None
                     else {"beta": beta, "beta2": beta if beta2 is None else beta2}),
                  **({"exact": True} if exact else rule.describe()), "dtype": dtype or "as stored",
                  "modules": {m.stem: m.record() for m in reports}}
        network = {k: v for k, v in adapters[-1].metadata.items() if k.startswith(NETWORK_METADATA_PREFIX)}
        if network:
            record["source_network"] = network
        result = EmaResult(paths, weights, exact, rule, None, reports, notes)
        record["factor_average_error"] = result.factor_average_error
        append_records(metadata, EMA_KEY, [record])
        plan = plan_conversion(computed.adapter_file(paths[-1], first.format, arch_id, metadata, counter), target, prefix,
                               arch_id)
        result.conversion = write_plan(plan, output, overwrite=overwrite)
    result.conversion.stale = stale
    return result


def _check_alike(adapters: list[AdapterFile]) -> None:
    """The same modules, each of the same shape (with or without a bias difference) in every checkpoint;
    no DoRA (its ΔW depends on the base weight); no keys that would be lost."""
    first = adapters[0]
    for adapter in adapters:
        if adapter.unknown_keys:
            raise AdapterError(f"{adapter.path}: {len(adapter.unknown_keys)} keys belong to no adapter module and would be "
                               "lost: " + _listing(adapter.unknown_keys))
        dora = [stem for stem, m in adapter.modules.items() if m.has_dora]
        if dora:
            raise AdapterError(f"{adapter.path}: {len(dora)} DoRA modules ({_listing(dora)}) rescale the base weight: their "
                               "ΔW depends on it, and ema averages ΔW without a base")
    for adapter in adapters[1:]:
        missing = [s for s in first.modules if s not in adapter.modules]
        extra = [s for s in adapter.modules if s not in first.modules]
        if missing or extra:
            what = [f"{len(stems)} only in {path} ({_listing(stems, 3)})"
                    for stems, path in ((missing, first.path), (extra, adapter.path)) if stems]
            raise AdapterError(f"{adapter.path}: not a checkpoint of the same adapter as {first.path}: modules {'; '.join(what)}")
        for stem, module in first.modules.items():
            other = adapter.modules[stem]
            if other.shape != module.shape or other.has_bias_delta != module.has_bias_delta:
                raise AdapterError(f"{adapter.path}: module {stem} changes a weight of shape {list(other.shape)}"
                                   f"{' with a bias' if other.has_bias_delta else ''}, but in {first.path} one of "
                                   f"{list(module.shape)}{' with a bias' if module.has_bias_delta else ''}")


def _plan(planned: ComputedModules, module: ModuleAdapter, exact: bool, dtype: torch.dtype) -> None:
    """The module's output tensors by dtype and shape only (LoRA at rank 1)."""
    stem, shape = module.stem, module.shape
    meta = {"dtype": dtype, "device": "meta"}
    if exact or len(shape) < 2:
        params = {"diff": planned.put(stem, "diff", torch.empty(shape, **meta))}
        algorithm, alpha = "diff", None
    else:
        params = {"up": planned.put(stem, "up", torch.empty((shape[0], 1, *[1] * (len(shape) - 2)), **meta)),
                  "down": planned.put(stem, "down", torch.empty((1, *shape[1:]), **meta))}
        algorithm, alpha = "lora", 1.0
    if module.has_bias_delta:
        params[BIAS] = planned.put(stem, BIAS, torch.empty(module.params[BIAS].shape, **meta))
    planned.record(stem, algorithm, params, alpha)


def _metadata(last: AdapterFile, arch_id: str | None, reports: list[EmaModule], exact: bool, rank: int | None) -> dict[str, str]:
    """The last checkpoint's metadata, its network description (and Musubi's hashes of its tensors) replaced
    by what is true of the output: a LoRA for the architecture, or no network Musubi has (full differences)."""
    metadata = {k: v for k, v in last.metadata.items() if not k.startswith(NETWORK_METADATA_PREFIX) and k not in HASH_KEYS}
    ranks = [m.rank for m in reports if m.rank is not None]
    if not exact and ranks:
        dim = rank if rank is not None else max(ranks)
        metadata.update(network_description("lora", arch_id, dim, dim, {}))
    return metadata


# ---------------------------------------------------------------------------------------------
# One module


def _form(module: ModuleAdapter) -> Factored:
    """s·ΔW of a checkpoint's module, 2-D (conv kernels in the columns), float64, factored where it is."""
    bound = BoundModule(module, module.read(), dtype=torch.float64)
    if module.math.factored_delta is not None:
        form = module.math.factored_delta(bound.tensors)
    else:
        form = Dense(module.math.delta_weight(bound.tensors).reshape(module.shape[0], -1))
    return form.scaled(module.scale)


def _dense(form: Factored) -> torch.Tensor:
    if isinstance(form, Dense):
        return form.matrix
    if isinstance(form, Product):
        return form.left @ form.right
    return torch.kron(_dense(form.first), _dense(form.second))


def _weighted_sum(forms: list[Factored], weights: list[float]) -> Factored:
    """Σ w·form: the stacked factors when every form is a product (exact, never built), else the matrix."""
    terms = [(form, w) for form, w in zip(forms, weights) if w != 0]
    if all(isinstance(form, Product) for form, _ in terms):
        return Product(torch.cat([form.left * w for form, w in terms], dim=1), torch.cat([form.right for form, _ in terms]))
    total = torch.zeros(terms[0][0].shape, dtype=torch.float64)
    for form, w in terms:
        total.add_(_dense(form), alpha=w)
    return Dense(total)


def _factor_average(modules: list[ModuleAdapter], weights: list[float]) -> tuple[Factored | None, str | None]:
    """s·ΔW of the module whose every tensor is the weighted average of the checkpoints' (what Musubi's
    script writes), or (None, why) where it has none."""
    first = modules[0]
    if any(m.algorithm != first.algorithm for m in modules):
        return None, "the checkpoints' algorithms differ"
    shapes = {name: entry.shape for name, entry in first.params.items()}
    if any({name: entry.shape for name, entry in m.params.items()} != shapes for m in modules):
        return None, "the checkpoints' tensor shapes differ"
    if any(m.alpha != first.alpha or m.scale != first.scale for m in modules):
        return None, "the checkpoints' alphas differ (Musubi's script refuses such files)"
    tensors = [m.read() for m in modules]
    averaged = {name: sum(w * t[name].double() for w, t in zip(weights, tensors)) for name in first.tensor_names}
    averaged.pop(BIAS, None)
    if first.math.factored_delta is not None:
        form = first.math.factored_delta(averaged)
    else:
        form = Dense(first.math.delta_weight(averaged).reshape(first.shape[0], -1))
    return form.scaled(first.scale), None


def _average_module(modules: list[ModuleAdapter], weights: list[float], rule: RankRule | None, computed: ComputedModules,
                    dtype: torch.dtype) -> EmaModule:
    first = modules[0]
    stem, shape = first.stem, first.shape
    average = _weighted_sum([_form(m) for m in modules], weights)
    factor_form, why = _factor_average(modules, weights)
    squares = (0.0, 0.0)
    factor_error = None
    if factor_form is not None:
        squares = (frobenius_squared(_weighted_sum([factor_form, average], [1.0, -1.0])), frobenius_squared(average))
        if squares[1] > 0 or squares[0] == 0:
            factor_error = math.sqrt(squares[0] / squares[1]) if squares[1] > 0 else 0.0
        else:
            why, squares = "the EMA of ΔW is zero, so no error is relative to it", (0.0, 0.0)
    params = {}
    if rule is None or len(shape) < 2:
        params["diff"] = computed.put(stem, "diff", _dense(average).reshape(shape).to(dtype))
        report = EmaModule(stem, None, 0.0, factor_error, why, squares)
        algorithm, alpha = "diff", None
    else:
        choice = choose_rank(average, rule.rank, rule.max_error)
        rank = choice.rank
        up, down = lora_factors(average, rank, choice.width)
        params["up"] = computed.put(stem, "up", up.to(dtype).reshape(shape[0], rank, *[1] * (len(shape) - 2)))
        params["down"] = computed.put(stem, "down", down.to(dtype).reshape(rank, *shape[1:]))
        report = EmaModule(stem, rank, choice.error, factor_error, why, squares)
        algorithm, alpha = "lora", float(rank)
    if first.has_bias_delta:
        biases = [m.source(m.params[BIAS].name).double() for m in modules]
        params[BIAS] = computed.put(stem, BIAS, sum(w * b for w, b in zip(weights, biases)).to(first.params[BIAS].dtype))
    computed.record(stem, algorithm, params, alpha)
    return report


def _average_all(adapters: list[AdapterFile], weights: list[float], rule: RankRule | None, computed: ComputedModules,
                 dtype: str | None, progress: Progress) -> list[EmaModule]:
    reports = []
    first = adapters[0]
    for stem, module in first.modules.items():
        modules = [adapter.modules[stem] for adapter in adapters]
        try:
            reports.append(_average_module(modules, weights, rule, computed, DTYPES[dtype] if dtype else _module_dtype(module)))
        except torch.linalg.LinAlgError as e:
            raise AdapterError(f"{first.path}: module {stem}: the SVD failed ({e})") from None
        progress.step()
    return reports
