"""LoHa / LoKr / full differences -> plain LoRA, and LoRA rank resizing, streamed module by module.

Every module's s·ΔW (scale included, conv kernels flattened into the columns) is replaced by its best
approximation of some rank r, a truncated SVD (`lycoris_core/lowrank.py`) taken from the algorithm's
factored form, so that a ΔW that is low-rank in its stored form is never built: at a fixed rank, or at
the smallest rank whose relative Frobenius error ‖ΔW − ΔW_r‖ / ‖ΔW‖ is within a bound. Each result is
a LoRA module with alpha = rank (scale exactly 1) and every singular value split as √σ into up and
down; a conv module gets down (r, in, *kernel) and up (out, r, 1, …), as kohya and Musubi store LoCon.

The LoRA modules are handed to the converter (`converter.py`) as the records of a file, so their key
names, alphas and the fusing or splitting of q/k/v in every layout are exactly what `convert` writes.

- DoRA modules rescale W + s·ΔW by a norm of it, so they depend on the base weight W: with a base
  file, the weight the module lands on is found through the same plan a merge makes, and the module's
  change W' − W at strength 1 is decomposed (a plain LoRA has no rescaling: at other strengths the
  two differ). Without one they are refused.
- 1-D full differences (norm weights) have no LoRA form and are kept as they are, and bias
  differences (`diff_b`) stay beside their module; the layout decides whether it can hold them.

Two passes over the modules, one module at a time: the first finds every module's singular values
(the ranks and errors, which the output's header and metadata need before any tensor is written),
the second computes the factors as the writer asks for them, keeping the last few modules' factors.
A DoRA module's change is a full-size matrix: at a rank well below its size it is decomposed by the
seeded randomized SVD of `lowrank.py` (its error measured), which gives the same factors in both passes.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..lycoris_core import dora
from ..lycoris_core.adapter_file import AdapterFile, read_adapter
from ..lycoris_core.algorithms import ALGORITHMS
from ..lycoris_core.errors import AdapterError
from ..lycoris_core.finite import count_nonfinite
from ..lycoris_core.lowrank import Choice, Dense, Factored, choose_rank, lora_factors
from ..lycoris_core.module import ALPHA, BIAS, DORA, BoundModule, ModuleAdapter
from ..lycoris_core.plan import Target, make_plan
from ..lycoris_core.report import printable
from ..lycoris_core.rows import Rows
from ..lycoris_core.safetensors_io import (
    SafetensorsReader,
    TensorEntry,
    append_records,
    check_output_path,
    stale_temp_files,
)
from ..lycoris_core.weight_rows import WeightRows, return_freed_memory
from .converter import DIFFUSERS_PREFIXES, TARGETS, ConversionResult, _listing, plan_conversion, write_plan
from .progress import OnProgress, Progress

LOW_RANK_KEY = "comfyui_lycoris.low_rank"  # the records to-lora and resize append to a file's metadata
NETWORK_METADATA_PREFIX = "ss_network_"  # kohya / Musubi: the trained network's module, dim, alpha and args
LORA = ALGORITHMS["lora"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KEPT_MODULES = 4  # modules whose output factors stay computed: a fused q/k/v(/mlp) reads its parts at once


@dataclass(frozen=True)
class RankRule:
    """A fixed rank (at most each module's own), or the smallest rank within a relative error."""

    rank: int | None = None
    max_error: float | None = None

    def __post_init__(self):
        if (self.rank is None) == (self.max_error is None):
            raise AdapterError("give exactly one of a rank and a maximum error")
        if self.rank is not None and not (isinstance(self.rank, int) and self.rank >= 1):
            raise AdapterError(f"rank must be a whole number of at least 1, not {self.rank!r}")
        if self.max_error is not None and not (0 <= self.max_error < math.inf):
            raise AdapterError(f"maximum error must be a number of at least 0, not {self.max_error!r}")

    def choose(self, form: Factored) -> Choice:
        """The rank, error and decomposition of one module's ΔW (`lowrank.choose_rank`)."""
        return choose_rank(form, self.rank, self.max_error)

    def describe(self) -> dict:
        return {"rank": self.rank} if self.rank is not None else {"max_error": self.max_error}


@dataclass
class ModuleReport:
    stem: str
    algorithm: str  # what the module was (lora, loha, lokr, diff; `+dora` when it carried DoRA)
    rank: int | None  # the LoRA's rank; None: kept as it was (a 1-D difference has no LoRA form)
    error: float  # ‖s·ΔW − up·down‖_F / ‖s·ΔW‖_F of the truncation (before the cast to the output dtype)

    def record(self) -> dict:
        if self.rank is None:
            return {"algorithm": self.algorithm, "kept": True}
        return {"algorithm": self.algorithm, "rank": self.rank, "error": self.error}


@dataclass
class LowRankResult:
    command: str
    rule: RankRule
    conversion: ConversionResult
    modules: list[ModuleReport]
    notes: list[str] = field(default_factory=list)

    @property
    def converted(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.rank is not None]

    def summary(self, max_modules: int = 40) -> str:
        lines = self.conversion.summary().split("\n")
        lines += [f"  note: {note}" for note in self.notes]
        rows = [("module", "algorithm", "rank", "relative error")]
        for m in self.modules[:max_modules]:
            rows.append((m.stem, m.algorithm, "-" if m.rank is None else str(m.rank),
                         "kept as it is (no LoRA form)" if m.rank is None else f"{m.error:.3e}"))
        rows = [tuple(printable(c) for c in row) for row in rows]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        if len(self.modules) > max_modules:
            lines.append(f"  ... and {len(self.modules) - max_modules} more modules (all are in the metadata key {LOW_RANK_KEY})")
        converted = self.converted
        if converted:
            worst = max(converted, key=lambda m: m.error)
            ranks = sorted(m.rank for m in converted)
            lines.append(
                f"  {len(converted)} modules as LoRA, rank {ranks[0]}" + (f" to {ranks[-1]}" if ranks[-1] != ranks[0] else "")
                + f"; largest relative error {worst.error:.3e} ({printable(worst.stem)})"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Public API


def to_lora_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    rank: int | None = None,
    max_error: float | None = None,
    to: str | None = None,
    prefix: str | None = None,
    arch: str | None = None,
    base: str | os.PathLike | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    lokr_full_matrix_alpha: bool = False,
    progress: bool = False,
    on_progress: OnProgress | None = None,
) -> LowRankResult:
    """Write every module of the adapter file `input` as a LoRA of `rank`, or of the smallest rank whose
    relative Frobenius error is at most `max_error`, in the `to` layout (default: the input's layout
    when it is musubi, diffusers or comfyui, else comfyui) at `output`.

    `base`: a diffusion-model file, needed for DoRA modules. `dtype`: float32, float16 or bfloat16
    (default: each module's own). `progress`: a terminal bar; `on_progress(done, total)`: called after
    each module decomposed and each written, and may raise to stop (nothing is written then). Raises AdapterError (nothing written) for DoRA without a base, an
    existing output without `overwrite`, an output that is the input, NaN/Inf values, or anything
    `convert` refuses.
    """
    return _low_rank_file("to-lora", input, output, RankRule(rank, max_error), to, prefix, arch, base, dtype,
                          overwrite, lokr_full_matrix_alpha, progress, on_progress)


def resize_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    rank: int | None = None,
    max_error: float | None = None,
    to: str | None = None,
    prefix: str | None = None,
    arch: str | None = None,
    base: str | os.PathLike | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    on_progress: OnProgress | None = None,
) -> LowRankResult:
    """`to_lora_file` for a LoRA file: its modules at another rank. A file with LoHa, LoKr or full
    weight differences is refused (to_lora_file takes those)."""
    return _low_rank_file("resize", input, output, RankRule(rank, max_error), to, prefix, arch, base, dtype,
                          overwrite, False, progress, on_progress)


# ---------------------------------------------------------------------------------------------
# One module


@dataclass
class _Job:
    path: str  # the input file, for messages
    module: ModuleAdapter
    dtype: torch.dtype  # of the output factors
    base_weight: Callable[[], WeightRows] | None = None  # DoRA: the weight it lands on, read by rows
    rank: int | None = None
    error: float = 0.0
    width: int | None = None  # the sketch the rank was chosen on (lowrank.Choice), None: the exact SVD

    @property
    def kept(self) -> bool:
        """A 1-D difference: no LoRA form, written as it is."""
        return len(self.module.shape) < 2

    @property
    def algorithm(self) -> str:
        return self.module.algorithm + ("+dora" if self.module.has_dora else "")

    def form(self) -> Factored:
        """s·ΔW as a 2-D factored form, float64 (the change W' − W for DoRA)."""
        module = self.module
        bound = BoundModule(module, module.read(), dtype=torch.float64)
        if module.has_dora:
            return Dense(_dora_change(bound, self.base_weight()))
        if module.math.factored_delta is not None:
            form = module.math.factored_delta(bound.tensors)
        else:
            form = Dense(module.math.delta_weight(bound.tensors).reshape(module.shape[0], -1))
        return form.scaled(module.scale)

    def factors(self) -> dict[str, torch.Tensor]:
        """The LoRA's up and down, in the output dtype (cast once) and the kohya/Musubi conv shapes."""
        up, down = lora_factors(self.form(), self.rank, self.width)
        shape = self.module.shape
        return {
            "up": up.to(self.dtype).reshape(shape[0], self.rank, *[1] * (len(shape) - 2)),
            "down": down.to(self.dtype).reshape(self.rank, *shape[1:]),
        }


def _dora_change(bound: BoundModule, weight: WeightRows) -> torch.Tensor:
    """W' − W at strength 1 for a DoRA module on the weight `weight` reads: (W + s·ΔW)·(magnitude / its norm) − W,
    as LyCORIS's module forward applies it (dora.py); 2-D, float32. Built a block of rows at a time, so that
    it is the only full-size matrix held: s·ΔW and the norms of W + s·ΔW first, then W·(f − 1) + s·ΔW·f with
    the factor f of those norms (the change itself is stored, never W + s·ΔW, whose rounding would swamp it)."""
    record = bound.record
    shape, out_rows = record.shape, dora.on_output_axis(bound.tensors[DORA], record.shape)
    change = torch.empty(shape, dtype=torch.float32)
    squares = torch.zeros(shape[0] if out_rows else shape[1], dtype=torch.float64)
    buffer, bad = None, 0
    for start, stop, w in weight.blocks():
        bad += count_nonfinite(w)
        buffer = torch.empty_like(w) if buffer is None else buffer  # one block's room, reused
        adapted = buffer[: stop - start].zero_()
        record.math.apply_(adapted, bound.tensors, record.scale, Rows(start, stop))
        change[start:stop] = adapted  # s·ΔW for now
        adapted += w
        if out_rows:
            squares[start:stop] = torch.linalg.vector_norm(adapted.reshape(stop - start, -1), dim=1).square()
        else:
            squares += torch.linalg.vector_norm(adapted.transpose(0, 1).reshape(shape[1], -1), dim=1).square()
    if bad:
        raise AdapterError(f"{weight.reader.path}: {weight.key} holds {bad} NaN/Inf values (the base weight of DoRA module "
                           f"{record.stem})")
    # the factor by dora.py's own formula, given a matrix whose row (or column) norms are those norms
    norms = squares.sqrt()
    norms = norms.reshape(shape[0], *[1] * (len(shape) - 1)) if out_rows else norms.reshape(1, shape[1], *[1] * (len(shape) - 2))
    factor = dora.rescale_factor(norms, bound.tensors[DORA], 1.0).double()
    for start, stop, w in weight.blocks():
        f = factor[start:stop] if out_rows else factor
        change[start:stop] = w.mul_(f - 1).addcmul_(change[start:stop], f)
    return change.reshape(shape[0], -1)


def _module_dtype(module: ModuleAdapter) -> torch.dtype:
    """The dtype of the module's own weight tensors (alpha, DoRA's magnitude and diff_b aside)."""
    dtypes = [entry.dtype for name, entry in module.params.items() if name not in (ALPHA, DORA, BIAS)]
    return functools.reduce(torch.promote_types, dtypes)


def _lora_keys(stem: str) -> dict[str, str]:
    """Names of a LoRA module's tensors inside the records handed to the converter (which names the
    output keys itself)."""
    return {"down": f"{stem}.lora_down.weight", "up": f"{stem}.lora_up.weight", ALPHA: f"{stem}.alpha"}


# ---------------------------------------------------------------------------------------------
# The base weights of DoRA modules


class _BaseWeights:
    """The weights DoRA modules land on, from a diffusion-model file, found through a merge's plan."""

    def __init__(self, path: str, adapter: AdapterFile, arch: str | None):
        self.path, self.adapter = path, adapter
        self.reader = SafetensorsReader(path)
        shapes = {key: entry.shape for key, entry in self.reader.header.tensors.items()}
        plan = make_plan(adapter, shapes, arch or "auto")
        self.targets: dict[str, list[Target]] = {}
        for patch in plan.patches:
            self.targets.setdefault(patch.stem, []).append(patch.target)
        self.unmatched = plan.unmatched

    def getter(self, module: ModuleAdapter) -> Callable[[], WeightRows]:
        targets = self.targets.get(module.stem)
        if not targets:
            why = self.unmatched.get(module.stem, "no weight of the model has this name")
            raise AdapterError(
                f"{self.adapter.path}: module {module.stem}: DoRA needs the base weight it rescales, but {self.path} "
                f"gives none ({why})"
            )
        (target,) = targets  # the plan leaves a DoRA module on rows kept in several places unmatched
        first, rows = (target.rows.start, target.rows.size) if target.rows is not None else (0, None)
        return lambda: WeightRows(self.reader, target.key, first, rows)

    def close(self) -> None:
        self.reader.close()


# ---------------------------------------------------------------------------------------------
# The file


class _Factors:
    """The tensor loader of the LoRA records: computes a module's factors when the writer first asks
    for one of them, keeps the last few modules', and reads everything else from the input."""

    def __init__(self, jobs: list[_Job], load_input: Callable[[str], torch.Tensor], progress: Progress):
        self.load_input, self.progress = load_input, progress
        self.counted: set[str] = set()  # modules whose writing was counted
        self.keys = {key: (job, name) for job in jobs if not job.kept for name, key in _lora_keys(job.module.stem).items()}
        self.made: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def __call__(self, key: str) -> torch.Tensor:
        found = self.keys.get(key)
        if found is None:
            return self.load_input(key)
        job, name = found
        if name == ALPHA:
            return torch.tensor(float(job.rank), dtype=torch.float32)
        stem = job.module.stem
        if stem in self.made:
            self.made.move_to_end(stem)
        else:
            self.made[stem] = _naming_the_module(job, job.factors)
            while len(self.made) > KEPT_MODULES:
                self.made.popitem(last=False)
            if job.base_weight is not None:
                return_freed_memory()
            if stem not in self.counted:
                self.counted.add(stem)
                self.progress.step()
        return self.made[stem][name]


def _naming_the_module(job: _Job, compute):
    """compute(), with a failed SVD turned into the pack's one-line error naming the file and module."""
    try:
        return compute()
    except torch.linalg.LinAlgError as e:
        raise AdapterError(f"{job.path}: module {job.module.stem}: the SVD failed ({e})") from None


def _zeros(tensors: dict[str, TensorEntry]) -> Callable[[str], torch.Tensor]:
    return lambda key: torch.zeros(tensors[key].shape, dtype=tensors[key].dtype)


def _lora_file(adapter: AdapterFile, jobs: list[_Job], metadata: dict[str, str], load, rank_of: Callable[[_Job], int]) -> AdapterFile:
    """The records of the output: every module as a LoRA of its rank (scale 1), kept ones as they are.
    `load` None: every tensor reads as zeros (for planning only)."""
    modules: dict[str, ModuleAdapter] = {}
    tensors: dict[str, TensorEntry] = {}
    load = load or _zeros(tensors)
    for job in jobs:
        module = job.module
        if job.kept:
            record = module
        else:
            rank, shape, keys = rank_of(job), module.shape, _lora_keys(module.stem)
            params = {
                "down": TensorEntry(keys["down"], job.dtype, (rank, *shape[1:])),
                "up": TensorEntry(keys["up"], job.dtype, (shape[0], rank, *[1] * (len(shape) - 2))),
                ALPHA: TensorEntry(keys[ALPHA], torch.float32, ()),
            }
            if module.has_bias_delta:
                params[BIAS] = module.params[BIAS]
            record = ModuleAdapter(module.stem, LORA, params, float(rank), 1.0, shape, rank, load)
        modules[module.stem] = record
        tensors.update({entry.name: entry for entry in record.params.values()})
    return AdapterFile(
        path=adapter.path, format=adapter.format, architecture=adapter.architecture, metadata=metadata,
        modules=modules, unknown_keys=adapter.unknown_keys, tensors=tensors, size=adapter.size,
        load=load, scale_rule="LyCORIS: alpha / rank = 1", source=adapter.source,
    )


def _target(adapter: AdapterFile, to: str | None, prefix: str | None) -> tuple[str, str | None]:
    """The layout and key prefix to write: as asked, else the input's own (comfyui for layouts the
    converter does not write)."""
    if to is not None:
        return to, prefix  # the converter checks them
    if adapter.format not in TARGETS:
        return "comfyui", prefix
    if adapter.format == "diffusers" and prefix is None:
        prefixes = {stem.split(".", 1)[0] for stem in adapter.modules}
        if len(prefixes) == 1 and prefixes <= set(DIFFUSERS_PREFIXES):
            prefix = prefixes.pop()
    return adapter.format, prefix


def _check_lora_only(adapter: AdapterFile) -> None:
    others = [f"{stem} ({m.algorithm})" for stem, m in adapter.modules.items()
              if m.algorithm != "lora" and not (m.algorithm == "diff" and len(m.shape) < 2)]
    if others:
        raise AdapterError(
            f"{adapter.path}: resize takes LoRA files, but {len(others)} modules are not LoRA ({_listing(others)}); "
            "to-lora writes them as LoRA"
        )


def _choose_ranks(jobs: list[_Job], rule: RankRule, progress: Progress) -> None:
    """First pass: every module's rank under `rule`, the error there and the decomposition it comes from."""
    for job in jobs:
        if not job.kept:
            choice = _naming_the_module(job, lambda job=job: rule.choose(job.form()))
            job.rank, job.error, job.width = choice.rank, choice.error, choice.width
            if job.base_weight is not None:  # a full-size change was built: hand its scratch memory back
                return_freed_memory()
            progress.step()


def _low_rank_file(command, input, output, rule: RankRule, to, prefix, arch, base, dtype, overwrite,
                   lokr_full_matrix_alpha, progress, on_progress) -> LowRankResult:
    input, output = os.fspath(input), os.fspath(output)
    base = os.fspath(base) if base is not None else None
    if dtype is not None and dtype not in DTYPES:
        raise AdapterError(f"unknown dtype {dtype!r} (choose one of: {', '.join(DTYPES)})")
    check_output_path(output, overwrite)
    for source, what in ((input, "the input"), (base, "the base model")):
        if source is not None and os.path.exists(output) and os.path.exists(source) and os.path.samefile(source, output):
            raise AdapterError(f"{output}: output would replace {what} it is read from")
    stale = stale_temp_files(output)
    adapter = read_adapter(input, lokr_full_matrix_alpha=lokr_full_matrix_alpha)
    target, prefix = _target(adapter, to, prefix)
    if command == "resize":
        _check_lora_only(adapter)
    with_dora = [stem for stem, m in adapter.modules.items() if m.has_dora]
    if with_dora and base is None:
        raise AdapterError(
            f"{input}: {len(with_dora)} DoRA modules ({_listing(with_dora)}) rescale the base weight, which a "
            "plain LoRA cannot: pass the diffusion model with --base to write their change to it"
        )
    notes = []
    if base is not None and not with_dora:
        notes.append(f"{base} was not read: no module carries DoRA")
    if with_dora:
        notes.append(f"{len(with_dora)} DoRA modules are written as the change they make to {os.path.basename(base)} at "
                     "strength 1; at other strengths the LoRA scales that change, which DoRA does not exactly")
    adapter.check_finite()

    with contextlib.ExitStack() as stack:
        base_weights = None
        if with_dora and base is not None:
            base_weights = _BaseWeights(base, adapter, arch)
            stack.callback(base_weights.close)
        jobs = [
            _Job(input, m, DTYPES[dtype] if dtype else _module_dtype(m), base_weights.getter(m) if m.has_dora else None)
            for m in adapter.modules.values()
        ]
        # Whether the layout can hold these LoRA modules does not depend on their ranks: ask before any SVD.
        plan_conversion(_lora_file(adapter, jobs, dict(adapter.metadata), None, lambda job: 1), target, prefix, arch)

        counter = stack.enter_context(Progress(2 * sum(not job.kept for job in jobs), command, progress, on_progress))
        _choose_ranks(jobs, rule, counter)
        reports = [ModuleReport(job.module.stem, job.algorithm, None if job.kept else job.rank, job.error) for job in jobs]
        # The trainer's description of its network (module, dim, alpha, args such as algo=lokr) is no longer
        # true of the output: it moves into the record, so no tool takes the file for what it was.
        network = {k: v for k, v in adapter.metadata.items() if k.startswith(NETWORK_METADATA_PREFIX)}
        metadata = {k: v for k, v in adapter.metadata.items() if k not in network}
        record = {"command": command, "source": os.path.basename(input), "source_format": adapter.format, **rule.describe(),
                  "dtype": dtype or "as stored"}
        if network:
            record["source_network"] = network
        if base_weights is not None:
            record["base"] = os.path.basename(base)
        record["modules"] = {report.stem: report.record() for report in reports}
        append_records(metadata, LOW_RANK_KEY, [record])

        lora = _lora_file(adapter, jobs, metadata, _Factors(jobs, adapter.load, counter), lambda job: job.rank)
        plan = plan_conversion(lora, target, prefix, arch)
        result = write_plan(plan, output, overwrite=overwrite)
    result.stale = stale
    return LowRankResult(command, rule, result, reports, notes)
