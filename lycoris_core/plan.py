"""The load plan: which weight of a model each adapter module changes, decided before anything is.

Both sides are resolved through `naming.py` to ComfyUI's whole weights. Each of the model's weight
keys holds some rows of one of them: all (a model in ComfyUI's or the original naming), one part
(a model that stores q, k and v of a fused `qkv` apart), or all in another order (Diffusers' final
AdaLN layer). Each adapter stem stands for some rows of one of them, the same way. A module then
lands on the keys that hold its rows, each `Target` saying which rows of the key take which rows of
the module's ΔW, so a q/k/v part lands on a slice of a fused weight, a fused module lands on split
weights, and swapped halves land swapped.

Block weights (`block_weights.py`), when asked for, give each module a factor from the block its weight
sits in: the patch carries it, and whoever applies the plan uses strength × factor. Modules at factor 0
are not planned at all (listed in `switched_off`), as a strength of 0 applies nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .adapter_file import AdapterFile
from .architectures import ARCHITECTURES, Part, describe_architecture, get_architecture
from .block_weights import BlockWeights, resolve_block_weights
from .detection import detect_model_architecture, explained_count
from .errors import AdapterError
from .module import ModuleAdapter
from .naming import AmbiguousName, Naming, Place, module_path, naming_for, stem_paths
from .rows import Rows


@dataclass(frozen=True)
class Target:
    key: str  # the model's weight key, exactly as the model names it
    rows: Rows | None  # the rows of that weight the module lands on, or None: all of them
    # The rows of the module's ΔW that land there (a fused module on split weights, swapped halves);
    # None: all of them, in order
    source_rows: Rows | None = None

    def where(self) -> str:
        return self.key + (f" rows {self.rows}" if self.rows else "")


@dataclass
class Patch:
    stem: str
    module: ModuleAdapter
    target: Target
    bias_key: str | None = None  # where the module's bias difference goes
    factor: float = 1.0  # the block weight of the module's place: it is applied at strength × factor


@dataclass
class LoadPlan:
    adapter: AdapterFile
    architecture: str | None
    model_architecture: str | None
    patches: list[Patch]
    unmatched: dict[str, str] = field(default_factory=dict)  # stem -> why
    block_weights: BlockWeights | None = None
    switched_off: list[str] = field(default_factory=list)  # stems matched but at block weight 0: not planned

    @property
    def modules_applied(self) -> int:
        """Modules of the file that were planned (a module over several weights counts once)."""
        return len({patch.stem for patch in self.patches})

    def landings(self) -> tuple[int, int, int]:
        """(modules on row slices of a fused weight, fused modules split over separate weights, modules
        whose rows land in another order), for reports."""
        keys: dict[str, set[str]] = {}
        for patch in self.patches:
            keys.setdefault(patch.stem, set()).add(patch.target.key)
        sliced = sum(p.target.rows is not None and p.target.source_rows is None for p in self.patches)
        split = sum(len(k) > 1 for k in keys.values())
        reordered = len({p.stem for p in self.patches if p.target.source_rows is not None and len(keys[p.stem]) == 1})
        return sliced, split, reordered

    def summary(self) -> str:
        algorithms: dict[str, int] = {}
        for patch in {p.stem: p for p in self.patches}.values():
            algorithms[patch.module.algorithm] = algorithms.get(patch.module.algorithm, 0) + 1
        counts = ", ".join(f"{n} {a}" for a, n in sorted(algorithms.items()))
        sliced, split, reordered = self.landings()
        text = (
            f"{self.modules_applied + len(self.switched_off)}/{len(self.adapter.modules)} modules matched ({counts}) on "
            f"{describe_architecture(self.architecture)}"
        )
        if sliced:
            text += f", {sliced} into slices of fused weights"
        if split:
            text += f", {split} fused modules split over separate weights"
        if reordered:
            text += f", {reordered} with their rows reordered"
        if self.switched_off:
            text += f", {len(self.switched_off)} at block weight 0 (not applied)"
        if self.unmatched:
            text += f"; {len(self.unmatched)} unmatched"
        return text


class _Unusable(AdapterError):
    """The model's pieces of a weight do not make the weight a name stands for: the module is unmatched."""


@dataclass(frozen=True)
class _Segment:
    """Rows of a ComfyUI weight held by one key of the model, from row `offset` of that key on."""

    key: str
    rows: Rows  # rows of the ComfyUI weight
    offset: int


class ModelWeights:
    """The model's weights by the ComfyUI weight they hold: key -> segments of rows."""

    def __init__(self, weight_shapes: Mapping[str, tuple], naming: Naming):
        self.shapes = {k: tuple(s) for k, s in weight_shapes.items()}
        self._held: dict[str, list[tuple[str, Place]]] = {}
        for key, shape in self.shapes.items():
            if (key.endswith(".weight") and shape) or (key.endswith(".scale") and len(shape) == 1):  # not 0-D numbers
                path = module_path(key)
                try:
                    place = naming.place(path)
                except AmbiguousName:
                    place = Place(path)
                self._held.setdefault(place.weight, []).append((key, place))
        self._max_segments = max((weight.count(".") + 1 for weight in self._held), default=1)

    @property
    def weights(self) -> list[str]:
        """The ComfyUI weights the model holds (whole, in parts or reordered)."""
        return list(self._held)

    def __contains__(self, weight: str) -> bool:
        return weight in self._held

    def shape_and_segments(self, weight: str) -> tuple[tuple, list[_Segment]]:
        """The whole ComfyUI weight's shape and where the model keeps its rows. Raises AdapterError
        when the model's pieces of it do not make one weight."""
        held = self._held[weight]
        parts = {place.rows.index: (key, place.rows) for key, place in held if isinstance(place.rows, Part)}
        whole = [(key, place) for key, place in held if not isinstance(place.rows, Part)]
        if whole:  # a weight the model has whole is used whole, whatever parts sit beside it
            key, place = whole[0]
            shape = self.shapes[key]
            if place.rows is None:
                return shape, [_Segment(key, Rows(0, shape[0]), 0)]
            return shape, [_Segment(key, dest, source.start if source else 0) for dest, source in place.rows.pieces(shape)]
        rule = next(iter(parts.values()))[1]
        tails = {self.shapes[key][1:] for key, _ in parts.values()}
        listed = ", ".join(parts[i][0] for i in sorted(parts))
        if sorted(parts) != list(range(len(rule.sizes))) or len(tails) != 1:
            raise _Unusable(f"the model stores {weight} in parts that do not make one weight ({listed})")
        fused = (sum(self.shapes[parts[i][0]][0] for i in parts), *tails.pop())
        segments, start = [], 0
        for i in range(len(rule.sizes)):
            key = parts[i][0]
            rows = Rows(start, start + self.shapes[key][0])
            try:
                fits = Part(i, rule.sizes).rows(fused) == rows
            except AdapterError:
                fits = False
            if not fits:
                raise _Unusable(f"the model's {listed} are not the parts of one {weight} of shape {list(fused)}")
            segments.append(_Segment(key, rows, 0))
            start = rows.stop
        return fused, segments

    def find(self, stem: str, naming: Naming) -> Place | None:
        """The place of an adapter stem in this model: by the architecture's names, else by the
        model's own module paths (names no record knows). Raises AmbiguousName."""
        place = naming.place_of_stem(stem)
        if place is not None:
            return place
        for path, flat in stem_paths(stem, flatten_dotted=False, max_segments=self._max_segments):
            if not flat and path in self._held:
                return Place(path)
        return None


def _targets(place: Place, module: ModuleAdapter, model: ModelWeights) -> tuple[list[Target], str]:
    """Where a module with this place lands in the model, and a description for messages.
    Raises AdapterError when its shape does not fit."""
    shape, segments = model.shape_and_segments(place.weight)
    pieces = [(Rows(0, shape[0]), None)] if place.rows is None else place.rows.pieces(shape)
    module_rows = sum(dest.size for dest, _ in pieces)
    expected = (module_rows, *shape[1:])
    keys = list(dict.fromkeys(s.key for s in segments))
    if len(keys) > 1:
        where = f"{place.weight} (split as {', '.join(keys)})"
    else:
        where = keys[0] + ("" if place.rows is None else f" rows {', '.join(str(d) for d, _ in pieces)}")
    if not module.fits(expected):
        raise AdapterError(f"module {module.stem} ({module.algorithm}) produces {list(module.shape)} but {where} is {list(expected)}")
    targets = []
    for dest, source in pieces:
        source = source or Rows(0, dest.size)
        for segment in segments:
            overlap = dest.overlap(segment.rows)
            if overlap is None:
                continue
            key_rows = overlap.shifted(segment.offset - segment.rows.start)
            module_part = overlap.shifted(source.start - dest.start)
            whole_key = key_rows == Rows(0, model.shapes[segment.key][0])
            targets.append(Target(segment.key, None if whole_key else key_rows,
                                  None if module_part == Rows(0, module_rows) else module_part))
    return targets, where


def resolve_architecture(adapter: AdapterFile, weight_names, architecture: str = "auto") -> tuple[str | None, str | None]:
    """(architecture to map with, the model's detected architecture); raises on a mismatch."""
    model_arch = detect_model_architecture(weight_names)
    if architecture != "auto":
        chosen = get_architecture(architecture).id
        if model_arch and model_arch != chosen:
            raise AdapterError(
                f"{adapter.path}: architecture {describe_architecture(chosen)} was asked for, but the model is "
                f"{describe_architecture(model_arch)}"
            )
        return chosen, model_arch
    file_arch = adapter.architecture
    if file_arch and ARCHITECTURES[file_arch].refused:
        raise AdapterError(f"{adapter.path}: {ARCHITECTURES[file_arch].refused}")
    if file_arch and model_arch and file_arch != model_arch:
        stems = list(adapter.modules)
        # Some names are shared (FLUX.1 and HunyuanVideo in ComfyUI naming, HunyuanVideo's Diffusers
        # names and FramePack's): the model decides when its architecture names the file's modules
        # as well as the file's own guess does.
        if explained_count(model_arch, stems) < explained_count(file_arch, stems):
            raise AdapterError(
                f"{adapter.path} is an adapter for {describe_architecture(file_arch)}, but the model is "
                f"{describe_architecture(model_arch)}"
            )
    return model_arch or file_arch, model_arch


def make_plan(adapter: AdapterFile, weight_shapes: Mapping[str, tuple], architecture: str = "auto",
              block_weights: str = "") -> LoadPlan:
    """Map every module of `adapter` onto the model whose weights have these names and shapes, each with
    its factor from `block_weights` (block_weights.py; empty: 1 everywhere).

    Raises AdapterError (nothing applied yet) for another architecture's file, a module whose shape
    does not fit its target, a file of which no module matches, or block weights that do not fit the
    model. Modules with no counterpart in the model are listed in `unmatched`.
    """
    chosen, model_arch = resolve_architecture(adapter, weight_shapes.keys(), architecture)
    naming = naming_for(chosen)
    model = ModelWeights(weight_shapes, naming)
    blocks = resolve_block_weights(block_weights, chosen, model.weights)
    patches: list[Patch] = []
    unmatched: dict[str, str] = {}
    switched_off: list[str] = []
    misfits: list[str] = []
    for stem, module in adapter.modules.items():
        try:
            place = model.find(stem, naming)
        except AmbiguousName as e:
            unmatched[stem] = f"ambiguous: {e}"
            continue
        if place is None or place.weight not in model:
            unmatched[stem] = "no weight of the model has this name"
            continue
        try:
            targets, where = _targets(place, module, model)
        except _Unusable as e:
            unmatched[stem] = str(e)
            continue
        except AdapterError as e:
            misfits.append(str(e))
            continue
        if module.has_dora and (len(targets) > 1 or targets[0].source_rows is not None):
            # Its magnitude is defined on rows the model keeps in several places.
            unmatched[stem] = f"DoRA module on {where}, whose rows the model keeps apart"
            continue
        factor = blocks.factor(place.weight) if blocks else 1.0
        if factor == 0:
            switched_off.append(stem)
            continue
        planned = []
        for target in targets:
            bias_key = None
            if module.has_bias_delta:
                bias_key = target.key.rsplit(".", 1)[0] + ".bias"
                if bias_key not in model.shapes:
                    misfits.append(f"module {stem} carries a bias difference but the model has no {bias_key}")
                    break
                if tuple(model.shapes[bias_key]) != tuple(model.shapes[target.key][:1]):
                    misfits.append(f"module {stem} carries a bias difference but the model's {bias_key} is "
                                   f"{list(model.shapes[bias_key])}, not one value per row of {target.key}")
                    break
            planned.append(Patch(stem, module, target, bias_key, factor))
        else:
            patches.extend(planned)

    if misfits:
        more = f" (and {len(misfits) - 1} more)" if len(misfits) > 1 else ""
        raise AdapterError(f"{adapter.path}: shape mismatch: {misfits[0]}{more}")
    if not patches and not switched_off:
        example = next(iter(adapter.modules))
        raise AdapterError(
            f"{adapter.path}: none of its {len(adapter.modules)} modules matches a weight of the model "
            f"({describe_architecture(chosen)}), e.g. {example}"
        )
    return LoadPlan(adapter, chosen, model_arch, patches, unmatched, blocks, switched_off)
