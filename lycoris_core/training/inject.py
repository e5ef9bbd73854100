"""Put trainable adapters on the Linear layers of any torch module, the way Musubi Tuner picks them.

Selection (Musubi `LoRANetwork.create_modules`): every Linear inside the architecture's transformer
blocks (the architecture's `train_blocks`: Musubi's `target_replace_modules` as module paths), skipped only
if its Musubi module path fullmatches an exclude (the architecture's defaults plus the user's) and
no include. Without an architecture: every Linear, user excludes only.

Naming: each adapter is saved under Musubi's name for its layer (`lora_unet_` + the Musubi module
path with `.`→`_`). A model in ComfyUI's naming is renamed through the architecture's layer table,
and a fused q/k/v weight gets one adapter per row slice (as Musubi trains q, k and v separately),
so the file is the one Musubi would have written.

The adapters act through forward hooks on the frozen Linears (nothing in the model is replaced);
`AdapterSet.remove()` takes them off again.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..adapter_file import AdapterFile
from ..algorithms import ALGORITHMS
from ..architectures import ARCHITECTURES
from ..errors import AdapterError
from ..module import ModuleAdapter
from ..naming import MUSUBI_PREFIX, flatten, naming_for, template_regex
from ..rows import Rows
from ..safetensors_io import TensorEntry
from .checkpointing import checkpointed_forward
from .config import TrainingConfig
from .modules import TrainableAdapter, make_adapter

_MARK = "_comfyui_lycoris_trainable"  # set on a Linear while adapters are hooked into it

@dataclass(frozen=True)
class Target:
    """One adapter's place: a Linear of the model, optionally only some of its rows."""

    path: str  # the Linear's module path in the model
    musubi_path: str  # Musubi's module path for what the adapter changes (names the file's keys)
    out_features: int
    in_features: int
    rows: Rows | None = None

    @property
    def stem(self) -> str:
        return MUSUBI_PREFIX + flatten(self.musubi_path)


def musubi_names(arch_id: str | None, path: str, shape: tuple[int, int]) -> list[tuple[str, Rows | None]]:
    """Musubi's module path(s) for the Linear at `path`: [(name, None)] for a layer Musubi keeps
    whole, one (name, rows) per part for a weight ComfyUI fuses (q/k/v), the model's own path if
    Musubi has no name for it."""
    naming = naming_for(arch_id)
    place = naming.place(path)
    if place.rows is not None:  # the model keeps this part apart, as Musubi does
        return [(path, None)]
    names = naming.musubi_names(place.weight)
    if isinstance(names, str):
        return [(names, None)]
    return list(zip(names.names, names.rows(shape)))


def _block_regexes(arch_id: str | None) -> list[re.Pattern]:
    return [template_regex(t) for t in ARCHITECTURES[arch_id].train_blocks] if arch_id in ARCHITECTURES else []


def block_paths(model: nn.Module, arch_id: str | None) -> list[str]:
    """Paths of the modules that hold the trained Linears (and are checkpointed as a unit)."""
    regexes = _block_regexes(arch_id)
    if regexes:
        return [name for name, _ in model.named_modules() if any(r.fullmatch(name) for r in regexes)]
    # No architecture: the items of every ModuleList are the blocks.
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            found.extend(f"{name}.{child}" if name else child for child, _ in module.named_children())
    return found


def plan_targets(
    model: nn.Module,
    architecture: str | None = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> tuple[list[Target], list[str]]:
    """(targets, skipped Musubi paths) for `model`, by Musubi's rules (module docstring)."""
    linears = {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return select_targets(linears, architecture, include, exclude)


def select_targets(
    linears: Mapping[str, tuple[int, int]],
    architecture: str | None = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> tuple[list[Target], list[str]]:
    """(targets, skipped Musubi paths) among a model's Linear layers, given as {module path: (out, in)}
    in the model's order (a model, or the 2-D weights of a model file), by Musubi's rules (module
    docstring)."""
    arch = ARCHITECTURES[architecture] if architecture else None
    excludes = [re.compile(p) for p in (*exclude, *(arch.default_excludes if arch else ()))]
    includes = [re.compile(p) for p in include]
    blocks = _block_regexes(architecture)
    targets, skipped = [], []
    for path, shape in linears.items():
        if blocks and not _in_block(path, blocks):
            continue
        for musubi_path, rows in musubi_names(architecture, path, shape):
            excluded = any(p.fullmatch(musubi_path) for p in excludes)
            if excluded and not any(p.fullmatch(musubi_path) for p in includes):
                skipped.append(musubi_path)
                continue
            out_features = rows.size if rows else shape[0]
            targets.append(Target(path, musubi_path, out_features, shape[1], rows))
    stems = [t.stem for t in targets]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise AdapterError(f"two layers of the model map to the same Musubi name {dup}")
    return targets, skipped


def _in_block(path: str, blocks: list[re.Pattern]) -> bool:
    """Whether the module at `path` is one of the blocks or inside one."""
    parts = path.split(".")
    return any(r.fullmatch(".".join(parts[:i])) for i in range(1, len(parts) + 1) for r in blocks)


class AdapterSet(nn.Module):
    """The trainable adapters of one model, keyed by their Musubi stem, and the hooks that apply
    them. `parameters()` are what the optimizer trains; `remove()` restores the model."""

    def __init__(self, config: TrainingConfig, targets: list[Target], adapters: dict[str, TrainableAdapter]):
        super().__init__()
        self.config = config
        self.targets = {t.stem: t for t in targets}
        self.adapters = nn.ModuleDict(adapters)
        self._hooks: list = []
        self._checkpointed: list[tuple[nn.Module, object]] = []
        self.skipped: list[str] = []

    # --- applying ---------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        by_linear: dict[str, list[str]] = {}
        for stem, target in self.targets.items():
            by_linear.setdefault(target.path, []).append(stem)
        linears = {path: model.get_submodule(path) for path in by_linear}
        taken = [path for path, linear in linears.items() if getattr(linear, _MARK, False)]
        if taken:
            raise AdapterError(f"layer {taken[0]} already carries trainable adapters; remove() those first")
        for path, stems in by_linear.items():
            parts = [(self.adapters[s], self.targets[s].rows) for s in stems]
            parts.sort(key=lambda p: p[1].start if p[1] else 0)
            linear = linears[path]
            self._hooks.append((linear, linear.register_forward_hook(functools.partial(_add_delta, parts=parts))))
            setattr(linear, _MARK, True)

    def checkpoint_blocks(self, model: nn.Module, arch_id: str | None) -> int:
        """Checkpoint each block's forward (checkpointing.py); returns how many."""
        paths = block_paths(model, arch_id)
        for path in paths:
            block = model.get_submodule(path)
            own = block.__dict__.get("forward")  # an instance-level forward someone else set
            inside = [self.adapters[s] for s, t in self.targets.items() if t.path.startswith(path + ".")]
            block.forward = checkpointed_forward(own or block.forward, functools.partial(_trainable, block, inside))
            self._checkpointed.append((block, own))
        return len(paths)

    def remove(self) -> None:
        """Take the adapters off the model (hooks, checkpoint wrappers); the adapters stay usable."""
        for linear, hook in self._hooks:
            hook.remove()
            linear.__dict__.pop(_MARK, None)
        self._hooks.clear()
        for block, own in self._checkpointed:
            if own is None:
                del block.forward
            else:
                block.forward = own
        self._checkpointed.clear()

    def __enter__(self) -> AdapterSet:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # --- reading out --------------------------------------------------------------------------

    def musubi_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """`{stem}.{param}` -> tensor as Musubi's save_weights writes them: every tensor (alpha
        included, a 0-dim tensor) in `dtype` (default: the config's save_dtype), on CPU."""
        dtype = dtype or self.config.torch_save_dtype
        tensors = {}
        for stem in sorted(self.adapters):
            adapter = self.adapters[stem]
            tensors[f"{stem}.alpha"] = adapter.alpha.detach().to("cpu", dtype).clone()
            for name, p in adapter.factors().items():
                tensors[f"{stem}.{name}"] = p.detach().to("cpu", dtype).clone()
        return tensors

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """stem -> s·ΔW (fp32): the change a merge at strength 1 makes (to `rows` of a fused weight)."""
        return {stem: adapter.delta_weight() for stem, adapter in self.adapters.items()}

    def to_adapter_file(self, metadata: dict[str, str] | None = None, name: str = "<trained>") -> AdapterFile:
        """A snapshot of the adapters as the core's file model (what `read_adapter` returns for the
        saved file), for loading onto a model without writing a file."""
        tensors = self.musubi_tensors()
        entries = {k: TensorEntry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        modules = {}
        for stem, adapter in self.adapters.items():
            params = {"alpha": entries[f"{stem}.alpha"]}
            params.update({n: entries[f"{stem}.{n}"] for n in adapter.factors()})
            shapes = {n: e.shape for n, e in params.items()}
            math = ALGORITHMS[adapter.algorithm]
            modules[stem] = ModuleAdapter(
                stem, math, params, float(tensors[f"{stem}.alpha"].item()), adapter.scale,
                tuple(math.weight_shape(shapes)), math.rank(shapes), tensors.__getitem__,
            )
        return AdapterFile(
            path=name,
            format="musubi",
            architecture=self.config.architecture,
            metadata=dict(metadata or {}),
            modules=modules,
            unknown_keys=[],
            tensors=entries,
            size=sum(e.nbytes for e in entries.values()),
            load=tensors.__getitem__,
        )

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for adapter in self.adapters.values():
            kind = adapter.algorithm + (" full-matrix" if adapter.full_matrix else "")
            kinds[kind] = kinds.get(kind, 0) + 1
        params = sum(p.numel() for p in self.parameters())
        text = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        return f"{len(self.adapters)} layers ({text}), {params:,} trainable parameters, {len(self.skipped)} excluded"


def _trainable(block: nn.Module, adapters: list[nn.Module]) -> list[torch.Tensor]:
    """The tensors a checkpointed block's recomputation takes gradients for: its own and its adapters' that need one."""
    return [p for module in (block, *adapters) for p in module.parameters() if p.requires_grad]


def _add_delta(linear: nn.Module, args, output, parts):
    """Forward hook: the Linear's output plus each adapter's s·ΔW·x (in its rows)."""
    x = args[0]
    if len(parts) == 1 and parts[0][1] is None:
        delta = parts[0][0](x)
        return output if delta is None else output + delta.to(output.dtype)
    pieces, position = [], 0
    for adapter, rows in parts:
        offset, size = (rows.start, rows.size) if rows else (0, output.shape[-1])
        delta = adapter(x)
        if delta is None:
            continue
        if offset > position:
            pieces.append(output.new_zeros(*output.shape[:-1], offset - position))
        pieces.append(delta.to(output.dtype))
        position = offset + size
    if not pieces:
        return output
    if position < output.shape[-1]:
        pieces.append(output.new_zeros(*output.shape[:-1], output.shape[-1] - position))
    return output + torch.cat(pieces, dim=-1)


def inject_adapters(model: nn.Module, config: TrainingConfig, freeze: bool = True) -> AdapterSet:
    """Create Musubi-initialised adapters (ΔW = 0) on the model's target Linears and hook them in.

    The adapters are made in fp32 from `config.seed` (the global RNG is left as it was) and live on
    each Linear's device. `freeze` turns off gradients for every parameter of `model`. Raises
    AdapterError when the options are bad or no layer is selected.
    """
    config.validate()
    targets, skipped = plan_targets(model, config.architecture, config.include, config.exclude)
    if not targets:
        linears = sum(isinstance(m, nn.Linear) for m in model.modules())
        where = f"the {config.architecture} blocks ({', '.join(ARCHITECTURES[config.architecture].train_blocks)})" if config.architecture else "the model"
        raise AdapterError(
            f"no layer to train: {where} hold no Linear that the excludes leave in "
            f"({linears} Linear layers in the model, {len(skipped)} excluded; pass the diffusion model "
            f"itself, e.g. ComfyUI's model.model.diffusion_model)"
        )
    adapters = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for target in targets:
            linear = model.get_submodule(target.path)
            adapter = make_adapter(
                config.algorithm,
                target.out_features,
                target.in_features,
                config.rank,
                config.alpha,
                config.factor,
                rank_dropout=config.rank_dropout,
                module_dropout=config.module_dropout,
            )
            device = linear.weight.device
            adapters[target.stem] = adapter if device.type == "cpu" else adapter.to(device)
    result = AdapterSet(config, targets, adapters)
    result.skipped = skipped
    result.attach(model)
    if config.gradient_checkpointing and not result.checkpoint_blocks(model, config.architecture):
        result.remove()
        raise AdapterError("gradient checkpointing asked for, but the model has no blocks to checkpoint")
    if freeze:
        model.requires_grad_(False)
    return result

