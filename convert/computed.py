"""Adapter modules a command computes (extract, ema), handed to the converter as the records of a file.

The converter (`converter.py`) then names their keys, sets or folds their alphas and fuses or splits
q/k/v for the chosen layout exactly as `convert` writes any file. Every module here has scale 1 under
LyCORIS's rule (alpha = rank; a LoKr of two full factors and a full difference have scale 1 whatever
alpha says), so what is stored is s·ΔW itself.

The tensors wait in a `TensorSpool` between being computed and being written: the output's header
needs every shape, which is known only once every module has been computed.
"""

from __future__ import annotations

import torch

from ..lycoris_core.adapter_file import AdapterFile
from ..lycoris_core.algorithms import ALGORITHMS
from ..lycoris_core.module import ALPHA, ModuleAdapter
from ..lycoris_core.report import printable
from ..lycoris_core.safetensors_io import TensorEntry
from ..lycoris_core.scales import lycoris_scale
from ..lycoris_core.spool import TensorSpool
from .progress import Progress


class ComputedModules:
    """Computed tensors (in a spool) and the module records made of them. Without a spool, only the
    names, dtypes and shapes are kept and every tensor reads as zeros: for checking, before the work,
    that the chosen layout can hold such modules."""

    def __init__(self, spool: TensorSpool | None = None):
        self.spool = spool
        self.modules: dict[str, ModuleAdapter] = {}
        self.tensors: dict[str, TensorEntry] = {}
        self.alphas: dict[str, float] = {}

    def put(self, stem: str, name: str, tensor: torch.Tensor) -> TensorEntry:
        """Park tensor `name` (a canonical parameter name: `up`, `lokr_w2`, `diff`, ...) of module `stem`."""
        key = f"{stem}.{name}"
        entry = self.spool.put(key, tensor) if self.spool is not None else TensorEntry(key, tensor.dtype, tuple(tensor.shape))
        self.tensors[key] = entry
        return entry

    def record(self, stem: str, algorithm: str, params: dict[str, TensorEntry], alpha: float | None) -> ModuleAdapter:
        """The module of these parked tensors, with `alpha` (None: no alpha key, for a full difference)."""
        params = dict(params)
        if alpha is not None:
            params[ALPHA] = TensorEntry(f"{stem}.{ALPHA}", torch.float32, ())
            self.alphas[params[ALPHA].name] = alpha
        math = ALGORITHMS[algorithm]
        shapes = {name: entry.shape for name, entry in params.items()}
        scale = lycoris_scale(math, shapes, alpha)
        module = ModuleAdapter(stem, math, params, alpha, scale, tuple(math.weight_shape(shapes)), math.rank(shapes), self.load)
        self.modules[stem] = module
        return module

    def load(self, key: str) -> torch.Tensor:
        if key in self.alphas:
            return torch.tensor(self.alphas[key], dtype=torch.float32)
        if self.spool is None:
            entry = self.tensors[key]
            return torch.zeros(entry.shape, dtype=entry.dtype)
        return self.spool.get(key)

    def adapter_file(self, path: str, format: str, architecture: str, metadata: dict[str, str],
                     progress: Progress | None = None) -> AdapterFile:
        """The recorded modules as the records of a file, in the order they were recorded. `progress`
        counts a step the first time the writer reads a module's tensors."""
        tensors = {entry.name: entry for module in self.modules.values() for entry in module.params.values()}
        stems = {entry.name: stem for stem, module in self.modules.items() for entry in module.params.values()}
        seen: set[str] = set()

        def load(key: str) -> torch.Tensor:
            if progress is not None and stems.get(key, key) not in seen:
                seen.add(stems.get(key, key))
                progress.step()
            return self.load(key)

        return AdapterFile(
            path=path, format=format, architecture=architecture, metadata=metadata, modules=dict(self.modules),
            unknown_keys=[], tensors=tensors, size=sum(e.nbytes for e in tensors.values()), load=load,
            scale_rule="LyCORIS: every module at scale 1",
        )


def table_lines(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of text as aligned columns (the first row is the heading), names made printable."""
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
