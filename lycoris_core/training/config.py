"""Training options: one dataclass shared by the CLI, the ComfyUI nodes, checkpoints and the saved
file's metadata (PEFT style). Every option is named and documented here, once.

Names and defaults follow Musubi Tuner's command line where it has the option (`network_dim` is
`rank`, `network_alpha` is `alpha`, `--network_args factor=N` is `factor`), so a file trained here
carries the same `ss_*` metadata a Musubi run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

import torch

from ..architectures import ARCHITECTURES, get_architecture
from ..errors import AdapterError

ALGORITHMS = ("lokr", "loha")
LR_SCHEDULERS = ("constant", "linear", "cosine")
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# torch optimizers that need something train() does not give them (a closure, sparse gradients).
UNSUPPORTED_OPTIMIZERS = ("LBFGS", "SparseAdam")


@dataclass
class TrainingConfig:
    # --- the adapter (what Musubi calls the network) ---
    algorithm: str = "lokr"
    """`lokr` (Musubi `networks.lokr`) or `loha` (`networks.loha`)."""
    rank: int = 16
    """`network_dim`. LoKr: rank of w2 (w2 is stored full, scale 1, when rank ≥ max(w2 shape)/2)."""
    alpha: float = 1.0
    """`network_alpha`; scale = alpha / rank (0 means alpha = rank). Musubi's default is 1."""
    factor: int = -1
    """LoKr only: Kronecker factor (-1 = as balanced as possible), Musubi `--network_args factor=N`."""
    rank_dropout: float = 0.0
    """Probability of dropping each output row of ΔW per step (kept rows are scaled by 1/(1-p))."""
    module_dropout: float = 0.0
    """Probability of skipping a whole adapted layer per step."""
    architecture: str | None = None
    """Architecture id (lycoris_core.architectures): picks the blocks trained, Musubi's default
    excludes, the Musubi names in the file and its metadata. None: every Linear, no default excludes."""
    include: tuple[str, ...] = ()
    """Regexes fullmatched on Musubi module paths; they only re-admit excluded layers (Musubi semantics)."""
    exclude: tuple[str, ...] = ()
    """Regexes fullmatched on Musubi module paths, added to the architecture's default excludes."""

    # --- optimisation ---
    optimizer: str = "AdamW"
    """Any optimizer class in torch.optim (except LBFGS and SparseAdam)."""
    optimizer_args: dict = field(default_factory=dict)
    """Extra keyword arguments for the optimizer (JSON values), e.g. {"weight_decay": 0.01}."""
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    """`constant`, `linear` (to 0 at max_steps) or `cosine` (to 0 at max_steps), after the warmup."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to learning_rate."""
    max_steps: int = 1000
    """Optimizer steps to train (each step is gradient_accumulation_steps batches)."""
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    """Clip the adapter's gradient norm to this (0 = no clipping). Musubi's default is 1."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, about 30% slower)."""
    seed: int = 42
    """Seeds the adapter's initialisation, the batch order and the dropout draws."""
    shuffle: bool = True
    """Visit a sequence of batches in a new random order each epoch."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N optimizer steps (0 = only when stopped early)."""

    # --- the saved file ---
    save_dtype: str = "float32"
    """dtype of every tensor in the saved adapter (alpha included), as Musubi's --save_precision."""
    base_model_version: str | None = None
    """`ss_base_model_version`; default: the architecture's first Musubi name (e.g. `wan`)."""

    def __post_init__(self) -> None:
        # Lists from JSON or a node's text field become tuples, so configs compare and hash simply.
        self.include = tuple(self.include or ())
        self.exclude = tuple(self.exclude or ())
        self.optimizer_args = dict(self.optimizer_args or {})

    # ------------------------------------------------------------------------------------------

    @property
    def torch_save_dtype(self) -> torch.dtype:
        return SAVE_DTYPES[self.save_dtype]

    def resolved_base_model_version(self) -> str | None:
        if self.base_model_version:
            return self.base_model_version
        if self.architecture:
            return ARCHITECTURES[self.architecture].musubi_versions[0]
        return None

    def network_args(self) -> dict[str, str]:
        """Musubi's `ss_network_args`: the `--network_args` a Musubi run with these options would
        take, as strings (LoKr always records its factor)."""
        args: dict[str, str] = {}
        if self.algorithm == "lokr":
            args["factor"] = str(self.factor)
        if self.rank_dropout:
            args["rank_dropout"] = str(self.rank_dropout)
        if self.module_dropout:
            args["module_dropout"] = str(self.module_dropout)
        if self.include:
            args["include_patterns"] = str(list(self.include))
        if self.exclude:
            args["exclude_patterns"] = str(list(self.exclude))
        return args

    def validate(self) -> TrainingConfig:
        """Raise AdapterError naming the first bad option; returns self."""

        def bad(option: str, why: str) -> AdapterError:
            return AdapterError(f"training option {option}={getattr(self, option)!r}: {why}")

        if self.algorithm not in ALGORITHMS:
            raise bad("algorithm", f"must be one of {', '.join(ALGORITHMS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise bad("rank", "must be a positive integer")
        if not math.isfinite(self.alpha or 0.0) or (self.alpha or 0.0) < 0:
            raise bad("alpha", "must be a finite number ≥ 0")
        if not isinstance(self.factor, int) or self.factor == 0 or self.factor < -1:
            raise bad("factor", "must be -1 or a positive integer")
        for option in ("rank_dropout", "module_dropout"):
            p = getattr(self, option)
            if not 0.0 <= p < 1.0:
                raise bad(option, "must be in [0, 1)")
        if self.architecture is not None:
            get_architecture(self.architecture)  # raises for unknown or refused architectures
        for option in ("include", "exclude"):
            for pattern in getattr(self, option):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise AdapterError(f"training option {option}: bad regex {pattern!r} ({e})") from None
        if self.optimizer in UNSUPPORTED_OPTIMIZERS or not isinstance(getattr(torch.optim, self.optimizer, None), type):
            raise bad("optimizer", "must name an optimizer class in torch.optim (not LBFGS or SparseAdam)")
        try:
            json.dumps(self.optimizer_args)
        except TypeError:
            raise bad("optimizer_args", "must hold JSON values only") from None
        if not self.learning_rate > 0:
            raise bad("learning_rate", "must be > 0")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise bad("lr_scheduler", f"must be one of {', '.join(LR_SCHEDULERS)}")
        for option in ("warmup_steps", "checkpoint_every"):
            if not isinstance(getattr(self, option), int) or getattr(self, option) < 0:
                raise bad(option, "must be an integer ≥ 0")
        for option in ("max_steps", "gradient_accumulation_steps"):
            if not isinstance(getattr(self, option), int) or getattr(self, option) < 1:
                raise bad(option, "must be a positive integer")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", "must be ≥ 0")
        if self.save_dtype not in SAVE_DTYPES:
            raise bad("save_dtype", f"must be one of {', '.join(SAVE_DTYPES)}")
        version = self.base_model_version
        if version is not None and self.architecture is not None:
            known = ARCHITECTURES[self.architecture].musubi_versions
            if version not in known:
                raise bad("base_model_version", f"is not a Musubi name of {self.architecture} ({', '.join(known)})")
        return self

    # ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        """From `to_dict()` output (e.g. a checkpoint); unknown keys are an error, not ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise AdapterError(f"unknown training options: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> TrainingConfig:
        return dataclasses.replace(self, **changes)


# Options that decide which adapter tensors exist and what they mean (fixed by inject_adapters).
ADAPTER_OPTIONS = ("algorithm", "rank", "alpha", "factor", "architecture", "include", "exclude")
# A checkpoint resumes only under a config that agrees on these (steps, learning rate etc. may change).
STRUCTURAL_OPTIONS = (*ADAPTER_OPTIONS, "optimizer")


def split_patterns(text: str) -> tuple[str, ...]:
    """Regexes from a text field: one per line, or separated by commas outside (), [] and {} (so
    `a{1,3}` stays one pattern); blanks dropped."""
    patterns, current, depth, escaped = [], [], 0, False
    for ch in text + "\n":
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch == "\n" or (ch == "," and depth == 0):
            patterns.append("".join(current).strip())
            current, depth = [], 0
            continue
        current.append(ch)
    return tuple(p for p in patterns if p)
