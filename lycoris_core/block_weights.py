"""Block weights: a strength multiplier for each module, chosen by where it sits in the model.

An architecture lists the blocks that block weights address, in order (`Architecture.weighted_blocks`),
and the kinds of layer inside them (`layer_kinds`). How many blocks each list has is counted in the
model at hand, from its weights as ComfyUI names them, never assumed. A module's block is the block of
the ComfyUI weight its name lands on (`Place.weight`), so every naming of a layer gets the same factor;
modules outside the blocks keep factor 1. The factor multiplies the strength the module is applied
with: m·factor·s·ΔW, exact for every algorithm (alpha and the file's scale are left as they are).

The text (items separated by commas or new lines; `#` starts a comment):
- empty: no block weights;
- numbers only: one per block, in block order (`1, 1, 0.5, ...`);
- otherwise presets and `pattern=value` entries, applied in order; where two match a layer, the later
  one wins. A pattern selects blocks, a kind of layer, or both:
      all, first_half, second_half      every block, the first ⌊N/2⌋ blocks in block order, the rest
      LIST, LIST.I, LIST.I-J            a list of blocks (`double_blocks`), one block, blocks I to J inclusive
      KIND                              that kind of layer (`attn`) in every block
      BLOCKS.KIND                       that kind in those blocks (`double_blocks.0-9.attn`, `first_half.ffn`)
  A preset stands for the entries it lists (`attn_only` is `all=0, attn=1`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .architectures import ARCHITECTURES, Architecture, BlockList, LayerKind, describe_architecture
from .errors import AdapterError
from .finite import FLOAT32_MAX

# Selectors of blocks by their place in the block order, whatever the architecture.
ALL, FIRST_HALF, SECOND_HALF = "all", "first_half", "second_half"


@dataclass(frozen=True)
class Preset:
    name: str
    entries: tuple[str, ...]  # pattern=value entries, in order
    needs: tuple[str, ...] = ()  # block lists and layer kinds the architecture must have


PRESETS = (
    Preset("all", ("all=1",)),
    Preset("none", ("all=0",)),
    Preset("attn_only", ("all=0", "attn=1"), needs=("attn",)),
    Preset("ffn_only", ("all=0", "ffn=1"), needs=("ffn",)),
    Preset("first_half", ("all=0", "first_half=1")),
    Preset("second_half", ("all=0", "second_half=1")),
    Preset("double_only", ("all=0", "double_blocks=1"), needs=("double_blocks", "single_blocks")),
    Preset("single_only", ("all=0", "single_blocks=1"), needs=("double_blocks", "single_blocks")),
)


def presets_for(arch: Architecture) -> tuple[Preset, ...]:
    """The presets an architecture has: those whose block lists and layer kinds it has."""
    names = {b.name for b in arch.weighted_blocks} | {k.name for k in arch.layer_kinds}
    return tuple(p for p in PRESETS if set(p.needs) <= names)


# -- the text --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    pattern: str
    value: float


@dataclass(frozen=True)
class BlockWeightsText:
    """Block weights as written, not yet read against a model: one number per block, or presets
    (their names) and entries in order."""

    vector: tuple[float, ...] | None = None
    items: tuple[str | Entry, ...] = ()


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _value(text: str, item: str) -> float:
    value = _number(text)
    if value is None:
        raise AdapterError(f"block weights: {item!r}: {text!r} is not a number")
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise AdapterError(f"block weights: {item!r}: {text} is not a finite number within the float32 range")
    return value


def parse_block_weights(text: str) -> BlockWeightsText | None:
    """The block weights a text says (module docstring), or None for an empty text. Raises AdapterError
    for what is wrong whatever the model; presets and patterns are checked against the model's blocks."""
    items = [item.strip() for line in text.splitlines() for item in line.split("#", 1)[0].split(",")]
    items = [item for item in items if item]
    if not items:
        return None
    if all(_number(item) is not None for item in items):
        return BlockWeightsText(vector=tuple(_value(item, item) for item in items))
    parsed: list[str | Entry] = []
    for item in items:
        pattern, equals, value = item.partition("=")
        if equals:
            if not pattern.strip():
                raise AdapterError(f"block weights: {item!r} has no pattern before '='")
            parsed.append(Entry(pattern.strip(), _value(value.strip(), item)))
        elif _number(item) is not None:
            raise AdapterError(f"block weights: {item!r} is a bare number among pattern entries: write numbers "
                               "only (one per block), or presets and pattern=value entries")
        else:
            parsed.append(item)
    return BlockWeightsText(items=tuple(parsed))


# -- the model's blocks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    list: BlockList
    index: int

    def __str__(self) -> str:
        return f"{self.list.name}.{self.index}"


class BlockLayout:
    """An architecture's blocks as one model has them (from its weights in ComfyUI's names), in block order."""

    def __init__(self, arch: Architecture, weights: Iterable[str]):
        self.arch = arch
        self._paths = [(blocks, re.compile(re.escape(blocks.path) + r"\.(\d+)\.(.+)")) for blocks in arch.weighted_blocks]
        self._kinds = [(kind, re.compile(kind.pattern)) for kind in arch.layer_kinds]
        inner: dict[Block, set[str]] = {}
        for weight in weights:
            located = self.locate(weight)
            if located is not None:
                inner.setdefault(located[0], set()).add(located[1])
        order = {blocks: i for i, blocks in enumerate(arch.weighted_blocks)}
        self.blocks = sorted(inner, key=lambda b: (order[b.list], b.index))
        self.inner = {block: sorted(inner[block]) for block in self.blocks}  # weights inside each block

    def locate(self, weight: str) -> tuple[Block, str] | None:
        """(the block a ComfyUI weight is in, its path inside the block), or None outside the blocks."""
        for blocks, pattern in self._paths:
            found = pattern.fullmatch(weight)
            if found:
                return Block(blocks, int(found[1])), found[2]
        return None

    def kinds_of(self, inner: str) -> set[str]:
        return {kind.name for kind, pattern in self._kinds if pattern.fullmatch(inner)}

    def of_list(self, blocks: BlockList) -> list[Block]:
        return [b for b in self.blocks if b.list == blocks]

    def extent(self) -> str:
        """`double_blocks.0-18, single_blocks.0-37`: the lists and indices the model has."""
        return ", ".join(_runs(self.blocks, lambda block: None, lambda name, _: name))


def _runs(blocks: list[Block], key, show) -> list[str]:
    """Consecutive blocks of one list with equal `key`, each run shown as show('LIST.I-J', key)."""
    runs: list[tuple[list[Block], object]] = []
    for block in blocks:
        value = key(block)
        last = runs[-1] if runs else None
        if last and last[0][-1].list == block.list and last[0][-1].index + 1 == block.index and last[1] == value:
            last[0].append(block)
        else:
            runs.append(([block], value))
    return [show(f"{run[0]}" + (f"-{run[-1].index}" if len(run) > 1 else ""), value) for run, value in runs]


# -- read against a model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    blocks: frozenset[Block]
    kind: LayerKind | None
    value: float


class BlockWeights:
    """Block weights read against one model: the factor of each of its weights, and what it is per block."""

    def __init__(self, layout: BlockLayout, rules: list[Rule], source: str):
        self.layout = layout
        self.rules = rules
        self.source = source  # what was asked for, in a few words

    def factor(self, weight: str) -> float:
        """The multiplier of a module landing on ComfyUI's weight `weight` (1 outside the blocks)."""
        located = self.layout.locate(weight)
        if located is None:
            return 1.0
        block, inner = located
        kinds = self.layout.kinds_of(inner)
        value = 1.0
        for rule in self.rules:
            if block in rule.blocks and (rule.kind is None or rule.kind.name in kinds):
                value = rule.value
        return value

    def _profile(self, block: Block) -> tuple[float, tuple[tuple[str, float], ...]]:
        """(the block's factor, then the kinds set after it that its layers have, in order: later wins)."""
        present = set().union(*(self.layout.kinds_of(inner) for inner in self.layout.inner[block]))
        base, kinds = 1.0, {}
        for rule in self.rules:
            if block not in rule.blocks:
                continue
            if rule.kind is None:
                base, kinds = rule.value, {}
            elif rule.kind.name in present:
                kinds.pop(rule.kind.name, None)
                kinds[rule.kind.name] = rule.value
        return base, tuple(kinds.items())

    def describe(self) -> str:
        """The multipliers per block, runs of equal ones together: `blocks.0-19: 1; blocks.20-39: 0, attn 0.5`
        (after a block's own factor, the kinds of layer that take another, later ones winning)."""

        def show(blocks: str, profile) -> str:
            base, kinds = profile
            return f"{blocks}: {base:g}" + "".join(f", {kind} {value:g}" for kind, value in kinds)

        return "; ".join(_runs(self.layout.blocks, self._profile, show))


def _fail(layout: BlockLayout, what: str) -> AdapterError:
    arch, count = layout.arch, len(layout.blocks)
    presets = ", ".join(p.name for p in presets_for(arch))
    return AdapterError(
        f"block weights: {what}; this {describe_architecture(arch.id)} model has {count} blocks ({layout.extent()}): "
        f"write {count} numbers, a preset ({presets}) or pattern=value entries"
    )


def _select(segments: list[str], layout: BlockLayout, pattern: str) -> list[Block]:
    blocks = layout.blocks
    if not segments or segments == [ALL]:
        return blocks
    if segments == [FIRST_HALF]:
        return blocks[: len(blocks) // 2]
    if segments == [SECOND_HALF]:
        return blocks[len(blocks) // 2 :]
    named = next((b for b in layout.arch.weighted_blocks if segments[0] in (b.name, b.path)), None)
    if named is None or len(segments) > 2:
        kinds = ", ".join(k.name for k in layout.arch.layer_kinds)
        lists = ", ".join(b.name for b in layout.arch.weighted_blocks)
        raise _fail(layout, f"unknown pattern {pattern!r} (blocks: all, first_half, second_half, {lists}; kinds: {kinds})")
    members = layout.of_list(named)
    if not members:
        raise _fail(layout, f"{pattern!r}: the model has no {named.name}")
    if len(segments) == 1:
        return members
    found = re.fullmatch(r"(\d+)(?:-(\d+))?", segments[1])
    indices = {b.index: b for b in members}
    first, last = (int(found[1]), int(found[2] or found[1])) if found else (None, None)
    if first not in indices or last not in indices or last < first:
        raise _fail(layout, f"{pattern!r} names no block of the model ({named.name} holds "
                            f"{min(indices)}-{max(indices)}; write {named.name}.I or {named.name}.I-J)")
    return [b for b in members if first <= b.index <= last]


def _rule(entry: Entry, layout: BlockLayout) -> Rule:
    segments = entry.pattern.split(".")
    kind = next((k for k in layout.arch.layer_kinds if k.name == segments[-1]), None)
    if kind is not None:
        segments = segments[:-1]
    return Rule(frozenset(_select(segments, layout, entry.pattern)), kind, entry.value)


def _rules(parsed: BlockWeightsText, layout: BlockLayout) -> list[Rule]:
    if parsed.vector is not None:
        if len(parsed.vector) != len(layout.blocks):
            raise _fail(layout, f"{len(parsed.vector)} numbers given")
        return [Rule(frozenset([block]), None, value) for block, value in zip(layout.blocks, parsed.vector)]
    presets = {p.name: p for p in presets_for(layout.arch)}
    rules = []
    for item in parsed.items:
        if isinstance(item, Entry):
            rules.append(_rule(item, layout))
        elif item in presets:
            rules += _rules(parse_block_weights(", ".join(presets[item].entries)), layout)
        else:
            raise _fail(layout, f"unknown preset {item!r}")
    return rules


def resolve_block_weights(text: str, arch_id: str | None, weights: Iterable[str]) -> BlockWeights | None:
    """Block weights `text` read against the model whose ComfyUI weights are `weights` (None: no block
    weights). Raises AdapterError, in one line naming the architecture and its blocks, when the text does
    not fit the model."""
    parsed = parse_block_weights(text)
    if parsed is None:
        return None
    arch = ARCHITECTURES.get(arch_id) if arch_id else None
    if arch is None or not arch.weighted_blocks:
        raise AdapterError(f"block weights: {describe_architecture(arch_id)} has no blocks this pack knows to weigh")
    layout = BlockLayout(arch, weights)
    if not layout.blocks:
        lists = ", ".join(b.path for b in arch.weighted_blocks)
        raise AdapterError(f"block weights: the model has none of {describe_architecture(arch.id)}'s blocks ({lists})")
    rules = _rules(parsed, layout)
    if parsed.vector is not None:
        source = f"{len(parsed.vector)} numbers"
    else:
        source = ", ".join(item if isinstance(item, str) else f"{item.pattern}={item.value:g}" for item in parsed.items)
    return BlockWeights(layout, rules, source)
