"""Loading adapters onto a live model (the ComfyUI loader nodes, or any torch host).

read → plan → here → host: a host reads a file (once, through the cache below), plans it against its
model's weight names and shapes (`plan.make_plan`), then takes each matched module's tensors from
`load_tensors` and hands them to its own patch mechanism, either as merged weights
(`BoundModule.apply_`) or in the forward pass (`bypass.BypassSet`). `load_report` says in plain
words what was applied and what was not.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping

import torch

from .adapter_file import AdapterFile, read_adapter
from .algorithms import ALGORITHMS
from .architectures import describe_architecture
from .errors import AdapterError
from .finite import count_nonfinite, describe_nonfinite
from .module import ModuleAdapter
from .plan import LoadPlan
from .report import VARIANT_WORDS

CACHE_SIZE = 8  # parsed files kept; a parsed file is its header and alphas, not its tensors

_cache: OrderedDict[tuple, AdapterFile] = OrderedDict()
_cache_lock = threading.Lock()


def read_adapter_cached(path: str | os.PathLike, lokr_full_matrix_alpha: bool = False) -> AdapterFile:
    """`read_adapter`, remembered by (path, mtime, size, option): a re-run does not re-parse the file,
    a file replaced on disk is read again."""
    path = os.path.abspath(os.fspath(path))
    try:
        stat = os.stat(path)
    except OSError:
        raise AdapterError(f"{path}: no such file") from None
    key = (path, stat.st_mtime_ns, stat.st_size, bool(lokr_full_matrix_alpha))
    with _cache_lock:
        adapter = _cache.get(key)
        if adapter is not None:
            _cache.move_to_end(key)
            return adapter
    adapter = read_adapter(path, lokr_full_matrix_alpha=lokr_full_matrix_alpha)
    with _cache_lock:
        for old in [k for k in _cache if k[0] == path]:  # an older version of the same file
            del _cache[old]
        _cache[key] = adapter
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return adapter


def weight_shapes(named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> dict[str, tuple]:
    """{name: shape} of a state dict (no data is read or copied), the input `make_plan` wants."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    return {name: tuple(tensor.shape) for name, tensor in items}


def load_tensors(
    plan: LoadPlan, progress: Callable[[int, int], None] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """{stem: {canonical name: tensor}} for every planned module, as stored in the file (dtype kept,
    CPU). Raises AdapterError naming the tensors that hold NaN/Inf: applying them would ruin the model.

    `progress(done, total)` is called after each module.
    """
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    nonfinite: dict[str, int] = {}
    total = len(plan.patches)
    for i, patch in enumerate(plan.patches):
        if patch.stem not in loaded:
            tensors = patch.module.read()
            for name, tensor in tensors.items():
                bad = count_nonfinite(tensor)
                if bad:
                    nonfinite[patch.module.params[name].name] = bad
            loaded[patch.stem] = tensors
        if progress is not None:
            progress(i + 1, total)
    if nonfinite:
        raise AdapterError(f"{plan.adapter.path}: {describe_nonfinite(nonfinite)}; nothing was applied")
    return loaded


def _algorithm_counts(modules: Iterable[ModuleAdapter]) -> str:
    modules = list(modules)
    counts = Counter(m.algorithm for m in modules)
    parts = []
    for name, n in sorted(counts.items()):
        text = f"{n} {name}"
        variants = ALGORITHMS[name].variants
        if variants:
            found = Counter(m.variant for m in modules if m.algorithm == name)
            text += " (" + ", ".join(f"{found[v]} {VARIANT_WORDS[v]}" for v in variants) + ")"
        parts.append(text)
    dora = sum(m.has_dora for m in modules)
    if dora:
        parts.append(f"{dora} with DoRA")
    return ", ".join(parts) or "none"


def load_report(
    plan: LoadPlan,
    strength: float,
    mode: str,
    delegated: Mapping[str, str] | None = None,
    notes: Iterable[str] = (),
    max_listed: int = 20,
) -> str:
    """What a load did, for the user: file, format, architectures, what was applied and what not.

    `delegated` {stem: where}: unmatched modules the host applied some other way (e.g. text-encoder
    modules handed to ComfyUI's own loader); they are counted apart, not listed as unmatched.
    """
    adapter = plan.adapter
    delegated = dict(delegated or {})
    applied = list({p.stem: p.module for p in plan.patches}.values())
    sliced, split, reordered = plan.landings()
    targets = Counter(p.target for p in plan.patches)
    unmatched = {s: why for s, why in plan.unmatched.items() if s not in delegated}
    lines = [
        f"file          {os.path.basename(adapter.path)}",
        f"format        {adapter.format}",
        f"source        {adapter.source}",
        f"scale         {adapter.scale_rule}",
        f"architecture  {describe_architecture(plan.architecture)}"
        + (f" (file says {adapter.architecture})" if adapter.architecture and adapter.architecture != plan.architecture else ""),
        f"mode          {mode}, strength {strength:g}",
        f"applied       {plan.modules_applied} of {len(adapter.modules)} modules: {_algorithm_counts(applied)}",
    ]
    if plan.block_weights:
        lines.append(f"blocks        {plan.block_weights.source}: {plan.block_weights.describe()}; "
                     "outside the blocks: 1")
    if plan.switched_off:
        lines.append(f"zeroed        {len(plan.switched_off)} modules at block weight 0 (not applied)")
    if mode == "bypass":
        lines.append("weights       untouched: a model saved from here (e.g. by ModelSave) lacks this adapter; patch mode bakes it")
    if sliced:
        lines.append(f"fused         {sliced} of them into row slices of fused weights (split q/k/v)")
    if split:
        lines.append(f"split         {split} fused modules (q/k/v) over the model's separate weights")
    if reordered:
        lines.append(f"reordered     {reordered} with their rows in ComfyUI's order (Diffusers' scale/shift halves swapped)")
    doubled = sum(1 for n in targets.values() if n > 1)
    if doubled:
        lines.append(f"warning       {doubled} weights receive more than one module of this file")
    if delegated:
        where = Counter(delegated.values())
        lines += [f"delegated     {n} modules: {w}" for w, n in where.items()]
    lines.append(f"unmatched     {len(unmatched)}" + (" (listed below; they were not applied)" if unmatched else ""))
    for stem, why in list(unmatched.items())[:max_listed]:
        lines.append(f"  {stem}: {why}")
    if len(unmatched) > max_listed:
        lines.append(f"  ... and {len(unmatched) - max_listed} more")
    lines += [f"problem       {p}" for p in adapter.problems]
    if adapter.unknown_keys:
        example = adapter.unknown_keys[0]
        lines.append(f"ignored keys  {len(adapter.unknown_keys)} keys belong to no adapter module, e.g. {example}")
    lines += [f"note          {n}" for n in notes]
    return "\n".join(lines)
