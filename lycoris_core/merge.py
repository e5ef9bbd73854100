"""Offline merge (bake): BASE + adapters -> OUT, streamed one tensor at a time.

OUT keeps BASE's keys, order, dtypes and metadata, plus a record of the merge under
`comfyui_lycoris.merge`. Every adapter is planned against BASE's names and shapes before anything is
written, so a wrong or broken adapter costs nothing. Each patched tensor is worked on in blocks of
rows: dequantized to fp32 (fp8 with its per-tensor scale), every adapter applied, cast (or
requantized) once and written out, so memory stays near one tensor of BASE (mapped from the file)
plus a block and the adapters.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import dora
from .adapter_file import read_adapter, split_key
from .errors import AdapterError
from .experts import select_expert
from .finite import FLOAT32_MAX, check_strength, count_nonfinite
from .plan import LoadPlan, Patch, make_plan
from .rows import Rows
from .safetensors_io import (
    SafetensorsReader,
    SafetensorsWriter,
    TensorEntry,
    append_records,
    check_output_path,
    describe_stale,
    dtype_name,
    stale_temp_files,
)

MERGE_METADATA_KEY = "comfyui_lycoris.merge"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SCALE_SUFFIXES = ("scale_weight", "weight_scale")  # ComfyUI's legacy scaled fp8, and the current format
BLOCK_ELEMENTS = 1 << 22  # rows worked on at once: 16 MB of fp32


# An adapter to merge: (file, strength) or (file, strength, block weights text), as parse_adapter_arg gives.
AdapterArg = tuple[str | os.PathLike, float] | tuple[str | os.PathLike, float, str]


@dataclass
class MergeResult:
    output: str
    plans: list[LoadPlan]
    strengths: list[float]
    tensors_changed: int = 0
    saturated: dict[str, int] = field(default_factory=dict)  # fp8 key -> values clipped to the fp8 range
    stale: list[str] = field(default_factory=list)  # temporary files beside OUT that killed runs left

    def summary(self) -> str:
        lines = [f"wrote {self.output}: {self.tensors_changed} tensors changed"]
        for plan, strength in zip(self.plans, self.strengths):
            lines.append(f"  {os.path.basename(plan.adapter.path)} @ {strength:g}: {plan.summary()}")
            if plan.block_weights:
                lines.append(f"    block weights {plan.block_weights.source}: {plan.block_weights.describe()}; "
                             "outside the blocks: 1")
            for stem, why in list(plan.unmatched.items())[:20]:
                lines.append(f"    unmatched {stem}: {why}")
            if len(plan.unmatched) > 20:
                lines.append(f"    ... and {len(plan.unmatched) - 20} more unmatched")
        for key, count in self.saturated.items():
            lines.append(f"  warning: {count} values of {key} exceed the fp8 range at its scale and were clipped")
        lines += describe_stale(self.stale)
        return "\n".join(lines)


def parse_adapter_arg(text: str) -> tuple[str, float, str]:
    """'FILE', 'FILE:STRENGTH' or 'FILE:STRENGTH:BLOCKS' -> (file, strength, block weights text or '').

    Read from the right: a trailing ':number' is the strength; a trailing ':BLOCKS' that is not a number
    counts as block weights only after a ':number' (a preset, a comma-separated vector or
    pattern=value entries, none of which holds a colon). Colons elsewhere stay in the path (Windows
    drives, file names with colons), and an existing file is taken whole.
    """
    head, sep, tail = text.rpartition(":")
    if not sep:
        return text, 1.0, ""
    try:
        return head, float(tail), ""
    except ValueError:
        pass
    path, sep, strength = head.rpartition(":")
    if sep and not os.path.exists(text):
        try:
            return path, float(strength), tail
        except ValueError:
            pass
    if not os.path.exists(text) and os.path.exists(head):  # FILE:typo, not a file with a colon in its name
        raise AdapterError(f"{text}: strength {tail!r} is not a number (write FILE, FILE:STRENGTH or "
                           f"FILE:STRENGTH:BLOCKS, e.g. {head}:0.8 or {head}:1:attn_only)")
    return text, 1.0, ""


def _quant_scale(key: str, entries: dict[str, TensorEntry], reader: SafetensorsReader) -> torch.Tensor | None:
    """The per-tensor scale of an fp8 weight (`X.scale_weight` or `X.weight_scale`), if it has one."""
    module = key[: -len(".weight")] if key.endswith(".weight") else key
    for suffix in SCALE_SUFFIXES:
        scale_key = f"{module}.{suffix}"
        if scale_key in entries:
            if entries[scale_key].numel != 1:
                raise AdapterError(
                    f"{reader.path}: {key} is block-scaled ({scale_key} has shape {list(entries[scale_key].shape)}); "
                    "merge onto a dequantized base instead"
                )
            scale = reader.get(scale_key).float().reshape(())
            if not (torch.isfinite(scale) and scale > 0):
                raise AdapterError(f"{reader.path}: {scale_key} is {scale.item():g}, so {key} cannot be dequantized")
            return scale
    return None


def _check_mergeable(key: str, entry: TensorEntry, path: str) -> None:
    if entry.dtype not in FLOAT_DTYPES + FP8_DTYPES:
        raise AdapterError(f"{path}: cannot merge into {key}: dtype {dtype_name(entry.dtype)} is not a float or fp8 type")


def _merge_tensor(
    weight: torch.Tensor,
    patches: list[tuple[Patch, float]],
    scale: torch.Tensor | None,
    emit: Callable[[torch.Tensor], None],
) -> int:
    """Apply every patch to `weight` block by block of rows, handing each finished block (in the
    weight's dtype) to `emit`; returns how many fp8 values had to be clipped.

    `weight` itself is never written: it is usually mapped from BASE, and writing into it would turn
    every page into a private copy.
    """
    rows = weight.shape[0]
    bound = {id(p): p.module.bind() for p, _ in patches}
    needs_whole = any(
        p.module.has_dora and not dora.on_output_axis(bound[id(p)].tensors["dora_scale"], p.module.shape)
        for p, _ in patches
    )
    step = rows if needs_whole else max(1, BLOCK_ELEMENTS // max(1, math.prod(weight.shape[1:])))
    quantized = weight.dtype in FP8_DTYPES
    clipped = 0
    for start in range(0, rows, step):
        block_rows = Rows(start, min(rows, start + step))
        block = block_rows.of(weight).to(torch.float64 if weight.dtype == torch.float64 else torch.float32, copy=True)
        if quantized and scale is not None:
            block.mul_(scale)
        nonfinite_before = count_nonfinite(block)
        for patch, strength in patches:
            target = patch.target.rows or Rows(0, rows)
            source = patch.target.source_rows.start if patch.target.source_rows else 0  # this weight's row 0 in ΔW
            part = block_rows.overlap(target)
            if part is not None:
                bound[id(patch)].apply_(part.shifted(-start).of(block), strength,
                                        rows=part.shifted(source - target.start))
        if quantized:
            if scale is not None:
                block.div_(scale)
            limit = torch.finfo(weight.dtype).max
            clipped += int((block.abs() > limit).sum())
            block.clamp_(-limit, limit)
        out = block.to(weight.dtype)
        # What the adapters add must stay finite in the output's dtype (fp8: clipped above; NaN stays NaN).
        made = count_nonfinite(block if quantized else out) - nonfinite_before
        if made > 0:
            raise Overflow(made, weight.dtype, patches)
        emit(out)
        del block, out  # before the next block is made: one fp32 block at a time
    return clipped


class Overflow(Exception):
    """Merging made NaN/Inf values that BASE did not have (strength × scale × ΔW beyond the dtype)."""

    def __init__(self, count: int, dtype: torch.dtype, patches: list[tuple[Patch, float]]):
        self.count, self.dtype = count, dtype
        self.modules = ", ".join(f"{p.module.stem} @ {s:g}" for p, s in patches)

    def message(self, base: str, key: str) -> str:
        return (
            f"{base}: merging into {key} gives {self.count} non-finite values (NaN/Inf) in "
            f"{dtype_name(self.dtype)}: the change from {self.modules} is beyond its range; nothing written"
        )


Planned = dict[str, list[tuple[Patch, float]]]  # BASE key -> (patch, strength) of every adapter landing there


def _plan_all(base: str, entries: dict[str, TensorEntry], adapters, architecture: str, lokr_full_matrix_alpha: bool):
    """Read, check and plan every adapter against BASE before anything is written:
    (plans, strengths, weight targets, bias targets)."""
    shapes = {key: entry.shape for key, entry in entries.items()}
    plans, strengths = [], []
    targets: Planned = {}
    bias_targets: Planned = {}
    for path, strength, block_weights in adapters:
        strength = check_strength(strength, os.fspath(path))
        # a file holding both Wan 2.2 experts is refused: one model file would get the sum of both halves
        adapter = select_expert(read_adapter(path, lokr_full_matrix_alpha=lokr_full_matrix_alpha), None)
        adapter.check_finite()
        plan = make_plan(adapter, shapes, architecture, block_weights)
        for patch in plan.patches:
            applied = strength * patch.factor
            if not abs(patch.module.scale * applied) <= FLOAT32_MAX:
                raise AdapterError(
                    f"{adapter.path}: module {patch.module.stem}: scale {patch.module.scale:g} × strength "
                    f"{applied:g} is beyond the float32 range"
                )
            _check_mergeable(patch.target.key, entries[patch.target.key], base)
            targets.setdefault(patch.target.key, []).append((patch, applied))
            if patch.bias_key:
                _check_mergeable(patch.bias_key, entries[patch.bias_key], base)
                bias_targets.setdefault(patch.bias_key, []).append((patch, applied))
        plans.append(plan)
        strengths.append(strength)
    return plans, strengths, targets, bias_targets


def merge(
    base: str | os.PathLike,
    output: str | os.PathLike,
    adapters: Sequence[AdapterArg],
    architecture: str = "auto",
    overwrite: bool = False,
    lokr_full_matrix_alpha: bool = False,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Bake `adapters` [(file, strength) or (file, strength, block weights), ...] into the diffusion-model
    file `base`, writing `output`. Block weights (block_weights.py) scale each module's strength by its block.

    `progress`: a terminal progress bar. `on_progress(done_bytes, total_bytes)` is called after each
    tensor; an exception it raises (a host's cancel) stops the merge and nothing is written.
    """
    base, output = os.fspath(base), os.fspath(output)
    check_output_path(output, overwrite)
    if not adapters:
        raise AdapterError("merge needs at least one --adapter")
    adapters = [(arg[0], arg[1], arg[2] if len(arg) > 2 else "") for arg in adapters]
    if os.path.exists(output):
        for source, what in [(base, "the base model"), *((path, "an adapter") for path, _, _ in adapters)]:
            if os.path.exists(source) and os.path.samefile(source, output):
                raise AdapterError(f"{output}: output would replace {what} it is read from")
    stale = stale_temp_files(output)
    reader = SafetensorsReader(base)
    entries = reader.header.tensors
    parts = [split_key(key) for key in entries]
    if parts and all(parts) and any(p[1] for p in parts):  # every key an adapter tensor
        raise AdapterError(f"{base}: this is an adapter file, not a diffusion model: pass it with --adapter and the model as BASE")
    plans, strengths, targets, bias_targets = _plan_all(base, entries, adapters, architecture, lokr_full_matrix_alpha)
    metadata = dict(reader.header.metadata)
    append_records(metadata, MERGE_METADATA_KEY, [
        {
            "adapter": os.path.basename(plan.adapter.path),
            "strength": strength,
            **({"block_weights": plan.block_weights.describe()} if plan.block_weights else {}),
            "architecture": plan.architecture,
            "format": plan.adapter.format,
            "modules_applied": plan.modules_applied,
            "modules_unmatched": len(plan.unmatched),
        }
        for plan, strength in zip(plans, strengths)
    ])

    result = MergeResult(output, plans, strengths, stale=stale)
    try:
        _write(reader, output, metadata, targets, bias_targets, overwrite, result, _progress_bar(
            sum(e.nbytes for e in entries.values()), progress), on_progress)
    finally:
        reader.close()
    return result


def _write(reader, output, metadata, targets: Planned, bias_targets: Planned, overwrite, result: MergeResult,
           bar, on_progress) -> None:
    """Stream BASE into OUT tensor by tensor, merging the planned ones."""
    entries = reader.header.tensors
    layout = list(entries.values())
    total, done = sum(e.nbytes for e in layout), 0
    try:
        with SafetensorsWriter(output, layout, metadata, overwrite) as writer:
            for entry in layout:
                tensor = reader.get(entry.name)
                if entry.name in targets:
                    try:
                        clipped = _merge_tensor(
                            tensor, targets[entry.name], _quant_scale(entry.name, entries, reader),
                            emit=lambda rows, name=entry.name: writer.write_rows(name, rows),
                        )
                    except Overflow as e:
                        raise AdapterError(e.message(reader.path, entry.name)) from None
                    result.tensors_changed += 1
                    if clipped:
                        result.saturated[entry.name] = clipped
                elif entry.name in bias_targets:
                    try:
                        writer.write(entry.name, _merge_bias(tensor, bias_targets[entry.name]))
                    except Overflow as e:
                        raise AdapterError(e.message(reader.path, entry.name)) from None
                    result.tensors_changed += 1
                else:
                    writer.write(entry.name, tensor)
                del tensor  # before the next read: one tensor of BASE in memory at a time
                bar.update(entry.nbytes)
                done += entry.nbytes
                if on_progress is not None:
                    on_progress(done, total)
    finally:
        bar.close()


def _merge_bias(bias: torch.Tensor, patches: list[tuple[Patch, float]]) -> torch.Tensor:
    work = bias.to(torch.float32, copy=True)  # never into `bias` itself: it is BASE's, and is checked against
    for patch, strength in patches:
        target = patch.target.rows or Rows(0, bias.shape[0])
        source = patch.target.source_rows.start if patch.target.source_rows else 0
        delta = patch.module.bind().delta_bias()
        target.of(work).add_(target.shifted(source - target.start).of(delta), alpha=strength)
    out = work.to(bias.dtype)
    made = count_nonfinite(out) - count_nonfinite(bias)
    if made > 0:
        raise Overflow(made, bias.dtype, patches)
    return out


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=None if enabled else True, leave=False)
