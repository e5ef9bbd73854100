"""`extract`: an adapter (LoRA, LoHa or LoKr) from the difference of two diffusion-model files.

The layers are those Musubi Tuner trains on the architecture (the trainer's own selection,
`training/inject.select_targets`, over BASE's 2-D weights: its blocks, its default excludes), named
as Musubi names them (`lora_unet_…`; a fused q/k/v weight gives one module per part), so the output
is the file Musubi would have written for that architecture. Each layer is streamed: its weight is
read from BASE and from TUNED a block of rows at a time (fp8 dequantized with its per-tensor scale),
ΔW = TUNED − BASE is taken in float64 and kept in float32, factored, and its factors parked until the
output is written. A layer whose difference is exactly zero is skipped and counted.

How each algorithm is fitted (the method is also stated in the output's record):
- LoRA: the truncated SVD of ΔW, the best approximation of its rank (Eckart–Young); up = U√Σ,
  down = √ΣVᵀ, alpha = rank. A full-size layer gets the randomized truncated SVD of `lowrank.py`
  (rank + 10 columns, 4 subspace iterations; for an error bound, widened until it is met): its error
  is measured on ΔW, at least the optimal one and equal to it where ΔW's rank is within the sketch.
- LoHa (`loha_fit.py`): the rank is the SVD's (fixed, or the smallest whose truncation is within the
  bound); the truncated SVD written as LoHa, hada_w1 = (U√Σ, √ΣVᵀ) and hada_w2 = all ones, is exactly
  the rank-r SVD approximation, and sweeps of alternating least squares over the four factors then
  lower the error, since a LoHa of rank r can express more (rank up to r²): each step is least squares
  over one factor with a small ridge that keeps the factors from growing into cancelling halves; the best
  iterate as stored is kept, and the SVD start where no sweep beats it.
- LoKr: the nearest Kronecker product (`nearest_kronecker.py`) with the dimensions split as LyCORIS
  and Musubi split them (`lokr.factorization`, `factor`); w1 full; w2 full, or at a lower rank r as
  lokr_w2_a·lokr_w2_b (its truncated SVD, the best w2 of that rank for that w1) where Musubi itself
  stores it so: r below max(w2 shape) / 2. Alpha = r for a low-rank w2 (scale 1); a LoKr of two full
  factors has scale 1 whatever alpha says, and gets alpha = the network dim as Musubi writes it.
Every module has scale 1.

Memory: ΔW of one layer in float32 (twice the layer in a bf16 file), blocks of 8 MB of its rows in
float64, and the sketch (rank + 10 columns on each side); neither file is mapped or held whole. The
full SVD (small layers; a rank or an error bound that needs more than a fifth of a layer's rank) takes
ΔW in float64 and its singular vectors besides.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch

from ..lycoris_core.adapter_file import split_key
from ..lycoris_core.algorithms.lokr import factorization
from ..lycoris_core.architectures import ARCHITECTURES, SUPPORTED, describe_architecture, get_architecture
from ..lycoris_core.detection import detect_model_architecture
from ..lycoris_core.errors import AdapterError
from ..lycoris_core.finite import count_nonfinite
from ..lycoris_core.loha_fit import RIDGE, fit_loha
from ..lycoris_core.lowrank import Dense, choose_rank, lora_factors
from ..lycoris_core.merge import SCALE_SUFFIXES
from ..lycoris_core.naming import MODEL_PREFIXES
from ..lycoris_core.nearest_kronecker import KroneckerFit, nearest_kronecker
from ..lycoris_core.safetensors_io import (
    SafetensorsReader,
    append_records,
    check_output_path,
    stale_temp_files,
)
from ..lycoris_core.spool import TensorSpool
from ..lycoris_core.training.inject import Target, select_targets
from ..lycoris_core.training.musubi_file import network_metadata
from ..lycoris_core.weight_rows import WeightRows, return_freed_memory
from .computed import ComputedModules, table_lines
from .converter import ConversionResult, _listing, plan_conversion, write_plan
from .progress import OnProgress, Progress
from .to_lora import DTYPES, RankRule

EXTRACT_KEY = "comfyui_lycoris.extract"  # the record extract writes into the output's metadata
ALGORITHMS = ("lora", "loha", "lokr")
# ΔW of a layer is kept in float32: the difference of two bf16/fp16 weights is exact in it unless their
# sizes are far apart (then within its rounding), and it is half of float64's memory on a full-size layer.
DELTA_DTYPE = torch.float32
LOHA_SWEEPS = 20  # LoHa: at most this many sweeps of alternating least squares after the SVD start
# Names of the tensors that quantize a weight rather than being one (the last segment of the key).
QUANTIZATION_NAMES = (*SCALE_SUFFIXES, "scale_input", "input_scale", "scaled_fp8")

METHODS = {
    "lora": "truncated SVD of ΔW (best approximation of its rank; randomized for large layers: rank + 10 columns, "
            "4 subspace iterations, error measured); up = U√Σ, down = √ΣVᵀ, alpha = rank (scale 1)",
    "loha": "the rank-r truncated SVD of ΔW written as LoHa (hada_w1 = (U√Σ, √ΣVᵀ), hada_w2 = ones: exactly the SVD's "
            "approximation and error, svd_error), then sweeps of alternating least squares over the four factors (ridge "
            f"{RIDGE:g} of each normal matrix's mean diagonal; the best iterate as stored is kept, the SVD start where no "
            "sweep beats it); rank = the SVD's rank for --rank / --max-error; alpha = rank (scale 1)",
    "lokr": "nearest Kronecker product (Van Loan–Pitsianis: the top singular pair of ΔW rearranged so that w1 ⊗ w2 "
            "is rank 1) with LyCORIS/Musubi's factor split; w1 full; w2 full, or its truncated SVD (lokr_w2_a·lokr_w2_b, "
            "alpha = rank) where Musubi stores it low-rank (rank < max(w2 shape) / 2); two full factors: scale 1, "
            "alpha = network dim",
}


@dataclass
class ExtractedModule:
    stem: str
    weight: str  # BASE's key, with the rows for a part of a fused weight
    rank: int | None = None  # LoRA / LoHa rank, LoKr w2 rank (None: w2 full)
    error: float = 0.0  # ‖ΔW − fitted‖_F / ‖ΔW‖_F (before the cast to the output dtype)
    zero: bool = False  # the difference is exactly zero: not written
    w1: tuple[int, int] | None = None  # LoKr factor shapes
    w2: tuple[int, int] | None = None
    svd_error: float | None = None  # LoHa: the error of its SVD start (the best rank-r approximation)
    sweeps: int | None = None  # LoHa: sweeps of alternating least squares run

    def record(self) -> dict:
        record = {"weight": self.weight, "rank": self.rank, "error": self.error}
        if self.svd_error is not None:
            record.update(svd_error=self.svd_error, sweeps=self.sweeps)
        if self.w1 is not None:
            record.update(w1=list(self.w1), w2=list(self.w2), w2_rank="full" if self.rank is None else self.rank)
            del record["rank"]
        return record

    def rank_text(self) -> str:
        if self.w1 is None:
            return str(self.rank)
        w2 = "full" if self.rank is None else f"rank {self.rank}"
        return f"w1 {self.w1[0]}x{self.w1[1]}, w2 {self.w2[0]}x{self.w2[1]} {w2}"


@dataclass
class ExtractResult:
    algorithm: str
    architecture: str
    rule: RankRule | None  # None: LoKr with w2 full
    conversion: ConversionResult
    modules: list[ExtractedModule]  # the written ones
    zero: list[ExtractedModule]  # layers whose difference is exactly zero (not written)
    notes: list[str] = field(default_factory=list)

    def summary(self, max_modules: int = 40) -> str:
        lines = self.conversion.summary().split("\n")
        lines.append(f"  method: {self.algorithm}, {METHODS[self.algorithm]}")
        lines += [f"  note: {note}" for note in self.notes]
        rows = [("module", "rank" if self.algorithm != "lokr" else "factors", "relative error")]
        rows += [(m.stem, m.rank_text(), f"{m.error:.3e}") for m in self.modules[:max_modules]]
        if self.algorithm == "loha":
            rows = [(*row, heading) for row, heading in zip(rows, ["SVD start's error", *(
                f"{m.svd_error:.3e} ({m.sweeps} sweeps)" for m in self.modules[:max_modules])])]
        lines += table_lines(rows)
        if len(self.modules) > max_modules:
            lines.append(f"  ... and {len(self.modules) - max_modules} more modules (all are in the metadata key {EXTRACT_KEY})")
        worst = max(self.modules, key=lambda m: m.error)
        lines.append(f"  {len(self.modules)} layers of {describe_architecture(self.architecture)} as {self.algorithm}; "
                     f"largest relative error {worst.error:.3e} ({worst.stem})")
        if self.zero:
            lines.append(f"  {len(self.zero)} layers unchanged (difference exactly 0), not written: "
                         + _listing([m.stem for m in self.zero]))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Public API


def extract_file(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    output: str | os.PathLike,
    algorithm: str,
    rank: int | None = None,
    max_error: float | None = None,
    factor: int = -1,
    loha_sweeps: int | None = None,
    to: str = "musubi",
    prefix: str | None = None,
    arch: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = False,
    on_progress: OnProgress | None = None,
) -> ExtractResult:
    """Write the adapter that takes the diffusion model `base` to `tuned` (module docstring) at `output`.

    `rank` or `max_error` (exactly one for LoRA and LoHa; at most one for LoKr, where they bound w2 and
    neither keeps w2 full): every module at that rank, or each at the smallest rank whose relative
    Frobenius error is at most `max_error`. `factor`: LoKr's split of the dimensions (-1: as balanced as
    possible), Musubi's `factor` network argument. `loha_sweeps`: LoHa's sweeps of alternating least
    squares after the SVD start (default `LOHA_SWEEPS`; 0: the SVD written as LoHa). `to` / `prefix`: the
    layout, as `convert` writes it. `arch`: the architecture (default: detected from BASE's weight names).
    `dtype`: of the factors.
    `progress`: a terminal bar; `on_progress(done, total)`: called after each layer fitted and each module
    written, and may raise to stop (nothing is written then).

    Raises AdapterError (nothing written) for bad options, BASE and TUNED with different keys or shapes,
    NaN/Inf in a weight read, no difference in any selected layer, or a layout that cannot hold the modules.
    """
    base, tuned, output = os.fspath(base), os.fspath(tuned), os.fspath(output)
    rule = _rank_rule(algorithm, rank, max_error, factor)
    if loha_sweeps is not None and (algorithm != "loha" or not (isinstance(loha_sweeps, int) and loha_sweeps >= 0)):
        raise AdapterError(f"loha_sweeps must be a whole number of at least 0, for LoHa only, not {loha_sweeps!r} for {algorithm}")
    if dtype not in DTYPES:
        raise AdapterError(f"unknown dtype {dtype!r} (choose one of: {', '.join(DTYPES)})")
    check_output_path(output, overwrite)
    for source, what in ((base, "BASE"), (tuned, "TUNED")):
        if os.path.exists(output) and os.path.exists(source) and os.path.samefile(source, output):
            raise AdapterError(f"{output}: output would replace {what}, which it is read from")
    stale = stale_temp_files(output)
    with contextlib.ExitStack() as stack:
        pair = _ModelPair(base, tuned)
        stack.callback(pair.close)
        arch_id = _architecture(pair, arch)
        targets = _targets(pair, arch_id)
        fitter = _Fitter(algorithm, rule, factor, LOHA_SWEEPS if loha_sweeps is None else loha_sweeps, DTYPES[dtype])

        # Whether the layout can hold such modules does not depend on their numbers: ask before any work.
        planned = ComputedModules()
        for target in targets:
            fitter.plan(planned, target)
        plan_conversion(planned.adapter_file(tuned, "musubi", arch_id, {}), to, prefix, arch_id)

        spool = stack.enter_context(TensorSpool(output))
        computed = ComputedModules(spool)
        counter = stack.enter_context(Progress(2 * len(targets), "extract", progress, on_progress))
        reports = _fit_all(pair, targets, fitter, computed, counter)
        written = [r for r in reports if not r.zero]
        counter.set_total(len(targets) + len(written))
        if not written:
            raise AdapterError(f"{tuned}: no layer Musubi trains on {describe_architecture(arch_id)} differs from {base}; "
                               "nothing written")
        dim = rank if rank is not None else max(fitter.dims[r.stem] for r in written)
        for report in written:
            fitter.record(computed, report, dim)

        notes = []
        if algorithm == "lokr" and max_error is not None:
            over = [r.stem for r in written if r.error > max_error]
            if over:
                notes.append(f"{len(over)} modules stay above the maximum error {max_error:g} even with w2 full (the nearest "
                             f"Kronecker product's own error): {_listing(over)}")
        metadata = network_metadata(
            algorithm, arch_id, dim, dim, {"factor": str(factor)} if algorithm == "lokr" else {},
            ARCHITECTURES[arch_id].musubi_versions[0], os.path.splitext(os.path.basename(output))[0], time.time(),
        )
        record = {"command": "extract", "base": os.path.basename(base), "tuned": os.path.basename(tuned),
                  "architecture": arch_id, "algorithm": algorithm, "method": METHODS[algorithm],
                  **(rule.describe() if rule else {"w2": "full"}), "dtype": dtype, "unchanged_layers": len(reports) - len(written),
                  "modules": {r.stem: r.record() for r in written}}
        if algorithm == "lokr":
            record["factor"] = factor
        if algorithm == "loha":
            record["loha_sweeps"] = fitter.sweeps
        append_records(metadata, EXTRACT_KEY, [record])
        plan = plan_conversion(computed.adapter_file(tuned, "musubi", arch_id, metadata, counter), to, prefix, arch_id)
        conversion = write_plan(plan, output, overwrite=overwrite)
    conversion.stale = stale
    return ExtractResult(algorithm, arch_id, rule, conversion, written, [r for r in reports if r.zero], notes)


def _rank_rule(algorithm: str, rank: int | None, max_error: float | None, factor: int) -> RankRule | None:
    if algorithm not in ALGORITHMS:
        raise AdapterError(f"unknown algorithm {algorithm!r} (choose one of: {', '.join(ALGORITHMS)})")
    if not (isinstance(factor, int) and (factor == -1 or factor >= 1)):
        raise AdapterError(f"factor must be -1 or a whole number of at least 1, not {factor!r}")
    if algorithm != "lokr" and factor != -1:
        raise AdapterError("--factor is LoKr's split of the dimensions: it does not apply to " + algorithm)
    if algorithm == "lokr" and rank is None and max_error is None:
        return None  # w2 full: the nearest Kronecker product itself
    if algorithm != "lokr" and rank is None and max_error is None:
        raise AdapterError(f"{algorithm} needs a rank or a maximum error (--rank or --max-error)")
    return RankRule(rank, max_error)


# ---------------------------------------------------------------------------------------------
# The two model files


def _bare_keys(reader: SafetensorsReader) -> dict[str, str]:
    """{key without the model's container prefix: the file's key}, for every key but those of fp8
    quantization (scales, ComfyUI's `scaled_fp8` marker): a scaled-fp8 BASE and a bf16 TUNED are the
    same model."""
    found: dict[str, str] = {}
    for key in reader.header.tensors:
        if key.rsplit(".", 1)[-1] in QUANTIZATION_NAMES:
            continue
        bare = next((key[len(p) :] for p in MODEL_PREFIXES if key.startswith(p)), key)
        if bare in found:
            raise AdapterError(f"{reader.path}: keys {found[bare]} and {key} name the same weight")
        found[bare] = key
    return found


class _ModelPair:
    """BASE and TUNED: the same weights (keys matched without their container prefixes, shapes equal),
    read one weight at a time."""

    def __init__(self, base: str, tuned: str):
        self.base, self.tuned = SafetensorsReader(base), SafetensorsReader(tuned)
        try:
            self._check()
        except BaseException:
            self.close()
            raise

    def _check(self) -> None:
        for reader in (self.base, self.tuned):
            parts = [split_key(key) for key in reader.header.tensors]
            if parts and all(parts) and any(p[1] for p in parts):
                raise AdapterError(f"{reader.path}: this is an adapter file, not a diffusion model")
        self.base_keys, self.tuned_keys = _bare_keys(self.base), _bare_keys(self.tuned)
        only_base = [k for k in self.base_keys if k not in self.tuned_keys]
        only_tuned = [k for k in self.tuned_keys if k not in self.base_keys]
        if only_base or only_tuned:
            what = [f"{len(found)} only in {path} ({_listing(found, 3)})"
                    for found, path in ((only_base, self.base.path), (only_tuned, self.tuned.path)) if found]
            raise AdapterError(f"{self.base.path} and {self.tuned.path} are not the same model: keys {'; '.join(what)}")
        shapes = self.base.header.tensors, self.tuned.header.tensors
        different = [
            f"{bare} {list(shapes[0][key].shape)} vs {list(shapes[1][self.tuned_keys[bare]].shape)}"
            for bare, key in self.base_keys.items() if shapes[0][key].shape != shapes[1][self.tuned_keys[bare]].shape
        ]
        if different:
            raise AdapterError(f"{self.base.path} and {self.tuned.path} are not the same model: shapes differ for "
                               f"{len(different)} weights ({_listing(different, 3)})")

    @property
    def shapes(self) -> dict[str, tuple]:
        """{bare key: shape}, in BASE's order."""
        return {bare: self.base.header.tensors[key].shape for bare, key in self.base_keys.items()}

    def dtype(self, bare: str) -> torch.dtype:
        return self.base.header.tensors[self.base_keys[bare]].dtype

    def difference(self, bare: str) -> torch.Tensor:
        """TUNED − BASE of one weight in DELTA_DTYPE, each side dequantized with its fp8 scale and the
        difference taken in float64, a block of rows at a time (nothing of either file stays resident)."""
        sides = [(reader, keys[bare]) for reader, keys in ((self.base, self.base_keys), (self.tuned, self.tuned_keys))]
        base, tuned = (WeightRows(reader, key) for reader, key in sides)
        out = torch.empty(base.shape, dtype=DELTA_DTYPE)
        bad = [0, 0]
        for (start, stop, base_rows), (_, _, tuned_rows) in zip(base.blocks(), tuned.blocks()):
            bad[0] += count_nonfinite(base_rows)
            bad[1] += count_nonfinite(tuned_rows)
            out[start:stop] = tuned_rows.sub_(base_rows)
        for (reader, key), count in zip(sides, bad):
            if count:
                raise AdapterError(f"{reader.path}: {key} holds {count} NaN/Inf values; nothing written")
        return out

    def close(self) -> None:
        self.base.close()
        self.tuned.close()


def _architecture(pair: _ModelPair, arch: str | None) -> str:
    if arch not in (None, "", "auto"):
        return get_architecture(arch).id
    found = detect_model_architecture(pair.base_keys)
    if found is None:
        raise AdapterError(f"{pair.base.path}: cannot tell the architecture from its weight names; pass --arch "
                           f"(one of: {', '.join(a.id for a in SUPPORTED)})")
    return found


def _targets(pair: _ModelPair, arch_id: str) -> list[tuple[str, Target]]:
    """(BASE's bare key, target) of every layer Musubi trains, in BASE's order."""
    linears = {bare[: -len(".weight")]: tuple(shape) for bare, shape in pair.shapes.items()
               if bare.endswith(".weight") and len(shape) == 2}
    targets, _ = select_targets(linears, arch_id)
    if not targets:
        raise AdapterError(f"{pair.base.path}: no weight of the layers Musubi trains on {describe_architecture(arch_id)} "
                           f"({', '.join(ARCHITECTURES[arch_id].train_blocks)}); is it that model?")
    return [(t.path + ".weight", t) for t in targets]


# ---------------------------------------------------------------------------------------------
# Fitting one layer


class _Fitter:
    """One algorithm's fit of a layer's ΔW, its tensors and its alpha."""

    def __init__(self, algorithm: str, rule: RankRule | None, factor: int, sweeps: int, dtype: torch.dtype):
        self.algorithm, self.rule, self.factor, self.sweeps, self.dtype = algorithm, rule, factor, sweeps, dtype
        self.params: dict[str, dict] = {}  # stem -> parked tensor entries
        self.dims: dict[str, int] = {}  # stem -> the network dim it asks for (its rank; a full w2: max(w2 shape))
        self.full: set[str] = set()  # LoKr modules of two full factors

    def splits(self, shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """LoKr: ((a, b), (c, d)): w1 is (a, c), w2 (b, d)."""
        return factorization(shape[0], self.factor), factorization(shape[1], self.factor)

    def plan(self, planned: ComputedModules, item: tuple[str, Target]) -> None:
        """The module's tensors by dtype and shape only, at rank 1 (LoKr: both factors full)."""
        _, target = item
        out, inp = target.out_features, target.in_features
        meta = {"dtype": self.dtype, "device": "meta"}
        if self.algorithm == "lokr":
            (a, b), (c, d) = self.splits((out, inp))
            shapes = {"lokr_w1": (a, c), "lokr_w2": (b, d)}
        elif self.algorithm == "loha":
            shapes = {"hada_w1_a": (out, 1), "hada_w1_b": (1, inp), "hada_w2_a": (out, 1), "hada_w2_b": (1, inp)}
        else:
            shapes = {"up": (out, 1), "down": (1, inp)}
        params = {name: planned.put(target.stem, name, torch.empty(shape, **meta)) for name, shape in shapes.items()}
        planned.record(target.stem, self.algorithm, params, 1.0 if self.algorithm != "lokr" else None)

    def fit(self, computed: ComputedModules, report: ExtractedModule, delta: torch.Tensor) -> None:
        """Fit ΔW (2-D, DELTA_DTYPE), park the tensors, fill in the report's rank and error."""
        if self.algorithm == "lokr":
            tensors = self._lokr(report, delta)
        else:
            form = Dense(delta)
            choice = choose_rank(form, self.rule.rank, self.rule.max_error)
            self.dims[report.stem] = report.rank = choice.rank
            if self.algorithm == "lora":
                report.error = choice.error
                up, down = lora_factors(form, choice.rank, choice.width)
                tensors = {"up": up, "down": down}
            else:
                fit = fit_loha(form, choice, self.sweeps, self.dtype)
                report.error, report.svd_error, report.sweeps = fit.error, fit.svd_error, fit.sweeps
                tensors = {"hada_w1_a": fit.w1_a, "hada_w1_b": fit.w1_b, "hada_w2_a": fit.w2_a, "hada_w2_b": fit.w2_b}
        self.params[report.stem] = {name: computed.put(report.stem, name, t.to(self.dtype)) for name, t in tensors.items()}

    def _lokr(self, report: ExtractedModule, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        rows, columns = self.splits(tuple(delta.shape))
        fit: KroneckerFit = nearest_kronecker(delta, rows, columns)
        report.w1, report.w2 = tuple(fit.w1.shape), tuple(fit.w2.shape)
        threshold = max(fit.w2.shape) / 2  # Musubi's: a w2 of rank at least this is stored full
        if self.rule is None:
            rank = None
        elif self.rule.rank is not None:
            rank = None if self.rule.rank >= threshold else min(self.rule.rank, fit.w2_max_rank)
        else:
            rank = fit.w2_rank_for_error(self.rule.max_error)
            rank = None if rank >= threshold else rank
        report.rank, report.error = rank, fit.error(rank)
        if rank is None:
            self.full.add(report.stem)
            self.dims[report.stem] = max(fit.w2.shape)  # the dim Musubi's loader gives a full w2
            return {"lokr_w1": fit.w1, "lokr_w2": fit.w2}
        self.dims[report.stem] = rank
        w2_a, w2_b = fit.w2_factors(rank)
        return {"lokr_w1": fit.w1, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b}

    def record(self, computed: ComputedModules, report: ExtractedModule, network_dim: int) -> None:
        """The module's record: alpha = its rank (scale 1), a LoKr of two full factors alpha = the network dim."""
        alpha = float(network_dim) if report.stem in self.full else float(report.rank)
        computed.record(report.stem, self.algorithm, self.params.pop(report.stem), alpha)


def _fit_all(pair: _ModelPair, targets: list[tuple[str, Target]], fitter: _Fitter, computed: ComputedModules,
             progress: Progress) -> list[ExtractedModule]:
    """Every target's difference, fitted and parked (one BASE weight at a time; a fused weight's parts
    share one read)."""
    by_key: dict[str, list[Target]] = {}
    for key, target in targets:
        by_key.setdefault(key, []).append(target)
    reports = []
    for key, parts in by_key.items():
        reports += _fit_weight(pair, key, parts, fitter, computed, progress)
        return_freed_memory()
    return reports


def _fit_weight(pair: _ModelPair, key: str, parts: list[Target], fitter: _Fitter, computed: ComputedModules,
                progress: Progress) -> list[ExtractedModule]:
    """The modules of one BASE weight (its difference is freed on return, before the next one is read)."""
    delta = pair.difference(key)
    reports = []
    for target in parts:
        part = target.rows.of(delta) if target.rows is not None else delta
        where = pair.base_keys[key] + (f" rows {target.rows}" if target.rows is not None else "")
        report = ExtractedModule(target.stem, where)
        if not part.any():
            report.zero = True
        else:
            try:
                fitter.fit(computed, report, part)
            except torch.linalg.LinAlgError as e:
                raise AdapterError(f"{pair.tuned.path}: {where}: the SVD failed ({e})") from None
        reports.append(report)
        progress.step()
    return reports
