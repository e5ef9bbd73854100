"""The scale conventions writers follow: what multiplies ΔW at strength 1.

- LyCORIS's rule, which Musubi Tuner, kohya, SimpleTuner, ai-toolkit and ComfyUI share: alpha / rank;
  1 without alpha; 1 for modules without a rank (LoKr with both factors full: they then store
  alpha = network dim, or ai-toolkit's 9999999999; full differences).
- The same, but alpha / network dim for full-matrix LoKr: files from trainers that applied alpha
  there anyway. Chosen explicitly, never guessed.
- PEFT's: alpha / r, with r and alpha from the adapter's config (`adapter_config.json`, or the
  `lora_adapter_metadata` diffusers writes into the file), per module through `rank_pattern` and
  `alpha_pattern`, and for LoKr even with both factors full (r is then the config's, not a shape).
  LoRA: lora_alpha / r, or / √r with use_rslora. Without a config, alpha = r: scale 1.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

try:  # the regular-expression parser of the standard library (moved in Python 3.11)
    from re import _parser as _regex_parser
except ImportError:  # Python 3.10
    import sre_parse as _regex_parser
from dataclasses import dataclass, field

from .algorithms import Algorithm
from .errors import AdapterError

LYCORIS_RULE = "LyCORIS: alpha / rank (1 without alpha, and for LoKr with both factors full)"
FULL_MATRIX_RULE = "LyCORIS, with alpha / network dim for full-matrix LoKr (chosen)"


def lycoris_scale(algorithm: Algorithm, shapes: Mapping[str, tuple], alpha: float | None,
                  full_matrix_dim: float | None = None) -> float | None:
    """The LyCORIS rule (and its full-matrix override); None when alpha is needed but unusable."""
    rank = algorithm.rank(shapes)
    if alpha is None:
        return 1.0
    if rank is None:
        if full_matrix_dim and algorithm.variant(shapes) == "full":
            return alpha / full_matrix_dim if math.isfinite(alpha) else None
        return 1.0
    return alpha / rank if math.isfinite(alpha) and rank > 0 else None


@dataclass(frozen=True)
class PeftConfig:
    """The scale-setting fields of a PEFT adapter config."""

    where: str  # the file or metadata key it was read from, for reports
    r: float
    alpha: float
    rank_pattern: Mapping[str, float] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def scale(self, module_path: str) -> float:
        """alpha / r (LoRA with rsLoRA: alpha / √r) for the module at this path (no key prefix)."""
        r = float(_pattern_value(self.rank_pattern, module_path, self.r))
        alpha = float(_pattern_value(self.alpha_pattern, module_path, self.alpha))
        if not (math.isfinite(r) and r > 0 and math.isfinite(alpha)):
            raise AdapterError(f"{self.where}: r {r} and alpha {alpha} for {module_path} give no scale")
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def describe(self) -> str:
        text = f"PEFT: alpha / r from {os.path.basename(self.where)} (r {self.r:g}, alpha {self.alpha:g}"
        if self.rank_pattern or self.alpha_pattern:
            text += ", per-module patterns"
        return text + (", rsLoRA √r" if self.use_rslora else "") + ")"


# Patterns come from the file (or a config beside it): a regular expression can take exponential time
# (nested repeats such as `(.*.*)*z`) or a high power of the path's length, so only patterns whose cost
# is at most quadratic are evaluated, and only on paths of real layers' length.
MAX_PATTERN_PATH = 256
MAX_UNBOUNDED_REPEATS = 2


def _pattern_value(patterns: Mapping[str, float], module_path: str, default: float) -> float:
    """PEFT's rule: the first pattern that matches the end of the path at a '.' boundary wins."""
    if len(module_path) > MAX_PATTERN_PATH:
        return default
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def _check_pattern(where: str, name: str, pattern: str) -> None:
    """Refuse a pattern that does not compile, or that could take more than quadratic time."""
    try:
        parsed = _regex_parser.parse(pattern)
    except re.error as e:
        raise AdapterError(f"{where}: {name} key {pattern[:60]!r} is not a regular expression ({e})") from None
    unbounded = _repeats(parsed, inside_repeat=False)
    if unbounded is None or unbounded + 1 > MAX_UNBOUNDED_REPEATS:  # + 1: PEFT's own `(.*\.)?` in front
        raise AdapterError(f"{where}: {name} key {pattern[:60]!r} repeats too much to be matched in bounded time "
                           "(nested repeats, more than one unbounded repeat or a back-reference)")


def _repeats(parsed, inside_repeat: bool) -> int | None:
    """Unbounded repeats in a parsed pattern; None when a repeat holds a repeat or an alternative."""
    count = 0
    for op, arg in parsed:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = arg
            if inside_repeat:
                return None
            inner = _repeats(sub, inside_repeat=True)
            if inner is None:
                return None
            count += 1 if high == _regex_parser.MAXREPEAT else 0
        elif name == "BRANCH":
            if inside_repeat:
                return None
            for branch in arg[1]:
                inner = _repeats(branch, inside_repeat)
                if inner is None:
                    return None
                count += inner
        elif name in ("SUBPATTERN", "ATOMIC_GROUP", "ASSERT", "ASSERT_NOT"):
            sub = arg[-1]
            inner = _repeats(sub, inside_repeat)
            if inner is None:
                return None
            count += inner
        elif name in ("GROUPREF", "GROUPREF_EXISTS"):
            return None  # backreferences: no bound at all
    return count


PEFT_CONFIG_NAMES = ("{stem}.adapter_config.json", "{stem}.json")
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers writes the PEFT config into the file under this key


def find_peft_config(path: str, metadata: Mapping[str, str]) -> PeftConfig | None:
    """The PEFT config of an adapter file, if it has one: diffusers' `lora_adapter_metadata` in the
    file, `<name>.adapter_config.json` or `<name>.json` beside it, or PEFT's own `adapter_config.json`
    beside an `adapter_model.safetensors`."""
    if PEFT_METADATA_KEY in metadata:
        return _config_from_metadata(path, metadata[PEFT_METADATA_KEY])
    folder, name = os.path.split(path)
    stem = name.rsplit(".", 1)[0]
    candidates = [os.path.join(folder, pattern.format(stem=stem)) for pattern in PEFT_CONFIG_NAMES]
    if name == "adapter_model.safetensors":
        candidates.append(os.path.join(folder, "adapter_config.json"))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return _config_from_json(candidate)
    return None


def _config_from_json(path: str) -> PeftConfig | None:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise AdapterError(f"{path}: not a readable PEFT adapter config ({type(e).__name__})") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() not in ("LORA", "LOHA", "LOKR"):
        return None  # a JSON file of something else
    return _make_config(path, config)


def _config_from_metadata(path: str, text: str) -> PeftConfig | None:
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        raise AdapterError(f"{path}: its lora_adapter_metadata is not JSON") from None
    if not isinstance(config, dict):
        return None
    # diffusers prefixes every field with its component ("transformer.r"): keep the denoiser's.
    fields = {k.split(".", 1)[1]: v for k, v in config.items() if "." in k and k.split(".", 1)[0] in ("transformer", "unet")}
    return _make_config(f"{path} (lora_adapter_metadata)", fields or config)


def _make_config(where: str, config: Mapping) -> PeftConfig:
    def number(value, what) -> float:
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:  # an integer of hundreds of digits
            number = math.nan
        if not math.isfinite(number):
            raise AdapterError(f"{where}: {what} is {str(value)[:40]!r}, not a finite number")
        return number

    def patterns(name) -> dict[str, float]:
        value = config.get(name) or {}
        if not isinstance(value, dict):
            raise AdapterError(f"{where}: {name} is not a mapping")
        for pattern in value:
            _check_pattern(where, name, str(pattern))
        return {str(k): number(v, f"{name}[{k!r}]") for k, v in value.items()}

    r = number(config.get("r", 8), "r")  # PEFT's defaults: r 8, alpha 8
    alpha = number(config.get("lora_alpha", config.get("alpha", 8)), "alpha")
    return PeftConfig(where, r, alpha, patterns("rank_pattern"), patterns("alpha_pattern"), bool(config.get("use_rslora")))
