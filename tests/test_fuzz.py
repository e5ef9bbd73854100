"""Fuzzing: mutated copies of the real fixture files through every public entry point.

Inputs are built by MUTATING small real adapter files of tests/fixtures/musubi and tests/fixtures/wild
(and bases built from their expectation files), at three levels:

- tensors (written with `safetensors.torch.save_file`): keys renamed (control characters, unicode,
  very long `a.a.a...` names), dropped, duplicated under a second spelling; shapes changed (0-D/1-D
  where 2-D belongs, rank mismatches, rank 0, empty tensors); modules rebuilt as another algorithm
  (LoRA with mid / DoRA, LoHa, LoKr, diff); alphas of 0, negative, NaN, Inf, 3e38; NaN/Inf/huge
  weights; other dtypes; many tiny tensors; `__metadata__` values (ss_network_dim, PEFT configs,
  comfyui_lycoris.merge records, ...) non-numeric, deep JSON, huge, with control characters;
- headers (raw bytes: 8-byte little-endian length + JSON + data): the length, dtypes, shapes (0,
  huge, negative, non-int, 5000-digit ints), data_offsets, missing/duplicate fields and keys,
  deeply nested JSON, `__metadata__` of the wrong type, damaged JSON text and data sections;
- the merge base and the strength text (nan, inf, 1e39, garbage).

Every input goes through `read_adapter` and the CLI (`inspect`, `inspect --json`, `convert --to
musubi|diffusers|comfyui`, `merge BASE OUT --adapter FILE[:STRENGTH]`), and every run must be either
a success (exit 0, every written tensor finite, JSON without bare NaN/Infinity) or a clean refusal
(exit 2, exactly one line on stderr without control characters, no output; `AdapterError` from
`read_adapter`), never leave a file behind or change an input, and finish within the profile's
deadline (quadratic stalls).

Profiles (tests/conftest.py): `ci` is the default (bounded, derandomized); `--hypothesis-profile=long`
runs the fuzz tests on over 100000 inputs in all. `python tests/test_fuzz.py --profile long` runs this
file alone and prints how many inputs each fuzz test saw.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import hashlib
import io
import json
import math
import os
import struct
import sys
import tempfile
import unicodedata
from pathlib import Path

import pytest
import torch
from comfyui_lycoris import cli
from comfyui_lycoris.lycoris_core import AdapterError, read_adapter
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures"

# (adapter file, base): a base is either an expectation file (its base/ and unadapted/ weights, in the
# original naming) or a ComfyUI-named base file of tests/fixtures/wild/bases.
ADAPTERS = {
    "musubi/wan_lokr_r3_a2.safetensors": ("expected", "musubi/wan_lokr_r3_a2.expected.safetensors"),
    "musubi/wan_loha_r4_a2.safetensors": ("expected", "musubi/wan_loha_r4_a2.expected.safetensors"),
    "musubi/z_image_lokr_r3_a2.diffusers_transformer.safetensors": ("expected", "musubi/z_image_lokr_r3_a2.expected.safetensors"),
    "wild/st_wan_lokr.safetensors": ("file", "wild/bases/wan.comfyui.safetensors"),
    "wild/comfy_wan_lokr.safetensors": ("file", "wild/bases/wan.comfyui.safetensors"),
    "wild/peft_wan_loha_r4.safetensors": ("file", "wild/bases/wan.comfyui.safetensors"),
    "wild/aitk_wan_lokr_fullrank_fp16.safetensors": ("file", "wild/bases/wan.comfyui.safetensors"),
}
ADAPTER_NAMES = sorted(ADAPTERS)

# Inputs each fuzz test saw in this process (`python tests/test_fuzz.py` prints them).
EXAMPLES_RUN: dict[str, int] = {}

FUZZ_SETTINGS = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# The scaling test builds files of thousands of tensors (up to seconds each): a fifteenth of the profile's inputs.
SCALING_SETTINGS = settings(FUZZ_SETTINGS, max_examples=max(10, settings.default.max_examples // 15))


# Tiny modules added by the scaling mutation. Reading costs ~0.3 ms per module (architecture detection),
# so thousands (seconds per entry point on a busy 2-core runner; a quadratic scan much more) only where
# the deadline is generous.
_GENEROUS = settings.default.deadline is None or settings.default.deadline.total_seconds() >= 20
TINY_MODULES = [4000, 16000, 1000] if _GENEROUS else [2000, 500]


def _count(name: str) -> None:
    EXAMPLES_RUN[name] = EXAMPLES_RUN.get(name, 0) + 1


# ---------------------------------------------------------------------------------------------
# The fixtures, read once (mutations always build new dicts and tensors)


@functools.cache
def fixture_tensors(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = str(FIXTURES / name)
    with safe_open(path, "pt") as f:
        metadata = dict(f.metadata() or {})
    return load_file(path), metadata


@functools.cache
def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@functools.cache
def base_tensors(adapter: str) -> dict[str, torch.Tensor]:
    kind, name = ADAPTERS[adapter]
    tensors, _ = fixture_tensors(name)
    if kind == "file":
        return tensors
    return {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(("base/", "unadapted/"))}


@functools.cache
def base_bytes(adapter: str) -> bytes:
    from safetensors.torch import save

    return save(base_tensors(adapter), metadata={"modelspec.title": "fuzz base"})


# The key suffixes of every algorithm (the test's own list, so a bug in the core's cannot hide here).
SUFFIXES = sorted(
    [
        "alpha", "dora_scale", "diff_b", "diff",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
        "lora.up.weight", "lora.down.weight", "lora_linear_layer.up.weight", "lora_linear_layer.down.weight",
    ],
    key=len,
    reverse=True,
)
LORA_SPELLINGS = [
    ("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"),
    ("lora.up.weight", "lora.down.weight"), ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight"),
]
STEM_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_", "base_model.model.", "model.diffusion_model.",
                 "diffusion_model.", "transformer.")


def split(key: str) -> tuple[str, str] | None:
    for suffix in SUFFIXES:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], suffix
    return None


def modules_of(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """stem -> {suffix: key}."""
    found: dict[str, dict[str, str]] = {}
    for key in tensors:
        parts = split(key)
        if parts:
            found.setdefault(parts[0], {})[parts[1]] = key
    return found


def _pair_shape(params, tensors, full, a, b):
    if full in params:
        return tuple(tensors[params[full]].shape)
    if a in params and b in params:
        sa, sb = tensors[params[a]].shape, tensors[params[b]].shape
        if len(sa) == 2 and len(sb) >= 2:
            return (sa[0], sb[1])
    return None


def module_shape(params: dict[str, str], tensors: dict[str, torch.Tensor]) -> tuple | None:
    """The 2-D weight shape a fixture module adapts, or None (also for one a mutation bent)."""
    try:
        shape = _module_shape(params, tensors)
    except IndexError:
        return None
    return shape if shape and len(shape) == 2 and all(n > 0 for n in shape) else None


def _module_shape(params: dict[str, str], tensors: dict[str, torch.Tensor]) -> tuple | None:
    if "diff" in params:
        shape = tuple(tensors[params["diff"]].shape)
        return shape if len(shape) == 2 else None
    if "hada_w1_a" in params and "hada_w1_b" in params:
        return (tensors[params["hada_w1_a"]].shape[0], tensors[params["hada_w1_b"]].shape[1])
    if any(s.startswith("lokr_") for s in params):
        w1 = _pair_shape(params, tensors, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
        w2 = _pair_shape(params, tensors, "lokr_w2", "lokr_w2_a", "lokr_w2_b")
        if w1 and w2 and len(w1) == 2 and len(w2) == 2:
            return (w1[0] * w2[0], w1[1] * w2[1])
    for up, down in LORA_SPELLINGS:
        if up in params and down in params:
            return (tensors[params[up]].shape[0], tensors[params[down]].shape[1])
    return None


def alternative_stems(stem: str, base_keys) -> list[str]:
    """Other spellings of the same module: other key families, dotted and flattened."""
    core = stem
    for prefix in STEM_PREFIXES:
        if stem.startswith(prefix):
            core = stem[len(prefix):]
            break
    flat = core.replace(".", "_")
    dotted = [k[: -len(".weight")] for k in base_keys if k.endswith(".weight") and k[: -len(".weight")].replace(".", "_") == flat]
    spellings = ["lora_unet_" + flat, "lycoris_" + flat, "lora_transformer_" + flat]
    for path in dotted or ([core] if "." in core else []):
        spellings += ["diffusion_model." + path, "transformer." + path, "base_model.model." + path, path]
    return [s for s in spellings if s != stem]


# ---------------------------------------------------------------------------------------------
# Building blocks of mutations

def rand(shape, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(tuple(shape), generator=gen) * 0.1
    return cast(t, dtype)


FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`; finite values stay finite (fp8/fp16 are clamped to their range first)."""
    if dtype.is_floating_point and dtype not in (torch.float32, torch.float64):
        limit = torch.finfo(dtype).max
        t = t.double()
        t = torch.where(torch.isfinite(t), t.clamp(-limit, limit), t)
    return t.to(dtype).contiguous()


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool, torch.int16]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

class Long(str):
    """A string that a falsifying example (and the example log) shows by its length and start."""

    def __repr__(self) -> str:
        return f"<{len(self)} chars: {str.__repr__(self[:24])}...>" if len(self) > 80 else str.__repr__(self)

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis's printer
        p.text(repr(self))


def longs(values) -> list[Long]:
    return [Long(v) for v in values]


# Key text: random short text, or a piece repeated to a length, with a prefix and a kept suffix.
PIECES = ["a_", "a.", "0.", "_", ".", "a", "lora_unet_", "diffusion_model.", "blocks.0.", "\n", "\r\n", "\x1b[31m",
          "\x00", "\x7f", "\x85", "\u2028", "\t", "é", "🙂", "\u202e", " ", "..", "lora_up.weight", ".alpha", "{block}",
          "%s", "\\", '"', "/", "(", "[", "lokr_w1", "__metadata__", "\ufffd"]
LENGTHS = [1, 2, 7, 100, 3000, 30000]


def repeated(piece: str, length: int) -> str:
    return piece * max(1, length // len(piece))


key_text = st.one_of(
    st.text(max_size=12),
    st.tuples(st.sampled_from(PIECES), st.sampled_from(LENGTHS)).map(lambda pl: Long(repeated(*pl))),
    st.tuples(st.sampled_from(["", "lora_unet_", "diffusion_model.", "lycoris_", "transformer."]),
              st.sampled_from(PIECES), st.sampled_from(LENGTHS), st.sampled_from(["", ".", "_"]))
    .map(lambda t: Long(t[0] + repeated(t[1], t[2]) + t[3])),
)

SPECIAL_FLOATS = [0.0, -0.0, -1.0, -2.5, 1.0, 2.0, 0.5, math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-45, 65504.0,
                  9999999999.0, 1e30, 1e20, 3.0]

# __metadata__ values: numbers as text, nonsense, deep and invalid JSON, huge, control characters.
META_KEYS = ["ss_network_dim", "ss_network_alpha", "ss_base_model_version", "comfyui_lycoris.merge",
             "comfyui_lycoris.converted_from", "modelspec.architecture", "lora_adapter_metadata", "lycoris_config",
             "format", "ss_network_module", "ss_network_args", "modelspec.title", "ss_output_name"]
META_VALUES = longs([
    "", "0", "-1", "4", "3", "2.0", "nan", "NaN", "inf", "-inf", "Infinity", "1e400", "3e38", "1e-320", "0x10", "1_0",
    "9" * 5000, "-" + "9" * 5000, "9" * 100000, "[" * 100000, "[" * 1000 + "]" * 1000, '{"a":' * 5000 + "1" + "}" * 5000,
    "[1,2", "{}", "[]", '{"a": 1}', '"x"', "null", "true", "5", "[5]", '[{"adapter": 5}]', '[{"adapter": "x", "strength": NaN}]',
    "wan", "flux", "z_image", "qwen_image", "wan2.1/lora", "Z-Image/lora", "flux-1-dev/lora", "hunyuan_video", "bogus/lora",
    "networks.lokr", "networks.loha", "networks.lora", "lycoris.kohya", "pt",
    "\x1b[31mred\x1b[0m", "a\nb", "\x00", "\r", "é🙂\u2028\u202e", "x" * 1_000_000,
    '{"algo": "lokr", "factor": -1, "linear_dim": 1e400}', '{"algo": ' * 3000,
    '{"r": 4, "lora_alpha": 8}', '{"r": 0, "lora_alpha": 8}', '{"r": "x"}', '{"r": -4, "lora_alpha": 8}',
    '{"r": 1e-320, "lora_alpha": 8}', '{"r": 1e-300, "lora_alpha": 1e300}', '{"r": 4, "lora_alpha": 1e308}',
    '{"transformer.r": 4, "transformer.lora_alpha": 1e400}', '{"r": 4, "use_rslora": true, "lora_alpha": 2}',
    '{"r": 4, "rank_pattern": {"(": 2}}', '{"r": 4, "alpha_pattern": {"[": 2}}', '{"r": 4, "rank_pattern": [1]}',
    '{"r": 4, "alpha_pattern": {"(a*)*b": 2}}', '{"r": 4, "rank_pattern": {"blocks.0.*": 0}}',
    '{"r": 4, "alpha_pattern": {"": NaN}}', '{"r": 4, "rank_pattern": {"x": true}}', '{"peft_type": "LORA", "r": 8}',
    '{"converted_from": ' + "[" * 5000 + "]" * 5000 + "}",
])
# PEFT adapter configs (diffusers' `lora_adapter_metadata`, or a JSON file beside the adapter): they set
# the scale of files without alphas, and their patterns are regular expressions.
PEFT_CONFIGS = longs([
    '{"r": 4, "lora_alpha": 8}', '{"r": 4, "alpha": 2}', '{"r": 0, "lora_alpha": 8}', '{"r": -4, "lora_alpha": 8}',
    '{"r": 1e-320, "lora_alpha": 8}', '{"r": 1e-300, "lora_alpha": 1e300}', '{"r": 4, "lora_alpha": 1e308}',
    '{"r": 4, "lora_alpha": -8}', '{"r": 4, "lora_alpha": NaN}', '{"r": 4, "lora_alpha": Infinity}', '{"r": "4"}',
    '{"r": true}', '{"r": [4]}', '{"r": 4, "use_rslora": true, "lora_alpha": 1e300}', '{"r": 4, "use_rslora": "no"}',
    '{"r": 4, "rank_pattern": {"(": 2}}', '{"r": 4, "alpha_pattern": {"[": 2}}', '{"r": 4, "alpha_pattern": {"(a*)*b": 2}}',
    '{"r": 4, "alpha_pattern": {"(.*)*x": 2}}', '{"r": 4, "alpha_pattern": {"(.*.*)*\\\\.z": 2}}',
    '{"r": 4, "rank_pattern": {"blocks.0.*": 0}}', '{"r": 4, "rank_pattern": {"blocks.0.*": 1e-320}}',
    '{"r": 4, "rank_pattern": {"to_k": -1}}', '{"r": 4, "rank_pattern": [1]}', '{"r": 4, "alpha_pattern": {"x": "y"}}',
    '{"r": 4, "alpha_pattern": {"to_q": 1e300}}', '{"r": 4, "rank_pattern": {"' + "a" * 30000 + '": 2}}',
    '{"transformer.r": 4, "transformer.lora_alpha": 1e400}', '{"transformer.r": 0}', '{"unet.r": 4, "unet.lora_alpha": 2}',
    "[]", '"x"', "null", "5", "[" * 100000, '{"r": ' + "9" * 5000 + "}", '{"r": 4, "lora_alpha": 2, "rank_pattern": ' + "[" * 5000 + "]" * 5000 + "}",
])
meta_value = st.one_of(st.sampled_from(META_VALUES), st.text(max_size=16), st.floats().map(repr))


def _choose_key(data, keys, label):
    return data.draw(st.sampled_from(keys), label=label) if keys else None


class TensorMutator:
    """Tensor-level and metadata mutations of an adapter (or base) state dict."""

    def __init__(self, data, tensors: dict[str, torch.Tensor], metadata: dict[str, str], base_keys):
        self.data = data
        self.tensors = dict(tensors)
        self.metadata = dict(metadata)
        self.base_keys = list(base_keys)
        self.side_files: dict[str, str] = {}  # files written beside the adapter (PEFT configs)
        self.seed = 0

    def draw(self, strategy, label):
        return self.data.draw(strategy, label=label)

    def new_seed(self) -> int:
        self.seed += 1
        return self.seed

    # -- keys
    def rename(self):
        key = _choose_key(self.data, list(self.tensors), "rename key")
        if key is None:
            return
        text = str(self.draw(key_text, "new text"))
        how = self.draw(st.sampled_from(["whole", "stem", "append", "prefix", "suffix"]), "rename how")
        parts = split(key)
        if how == "whole" or parts is None:
            new = text
        elif how == "stem":
            new = text + "." + parts[1]
        elif how == "append":
            new = parts[0] + text + "." + parts[1]
        elif how == "prefix":
            new = text + key
        else:
            new = parts[0] + "." + self.draw(st.sampled_from(SUFFIXES + ["weight", "lora_up", "LOKR_W1", ""]), "suffix")
        self.tensors = {(new if k == key else k): v for k, v in self.tensors.items()}

    def drop(self):
        how = self.draw(st.sampled_from(["key", "module", "alphas"]), "drop how")
        if how == "alphas":
            self.tensors = {k: v for k, v in self.tensors.items() if not k.endswith(".alpha")}
            return
        key = _choose_key(self.data, list(self.tensors), "drop key")
        if key is None:
            return
        stem = split(key)[0] if how == "module" and split(key) else None
        self.tensors = {k: v for k, v in self.tensors.items() if k != key and not (stem and split(k) and split(k)[0] == stem)}

    def duplicate(self):
        modules = modules_of(self.tensors)
        stem = _choose_key(self.data, sorted(modules), "duplicate module")
        if stem is None:
            return
        params = modules[stem]
        lora = [(u, d) for u, d in LORA_SPELLINGS if u in params]
        if lora and self.draw(st.booleans(), "duplicate: respell up inside the module"):
            other = self.draw(st.sampled_from([s for s in LORA_SPELLINGS if s[0] not in params]), "second spelling")
            self.tensors[stem + "." + other[0]] = self.tensors[params[lora[0][0]]].clone()
            return
        spellings = alternative_stems(stem, self.base_keys)
        if not spellings:
            return
        new_stem = self.draw(st.sampled_from(spellings), "second stem")
        for suffix, key in params.items():
            self.tensors[new_stem + "." + suffix] = self.tensors[key].clone()

    # -- shapes, values, dtypes
    def reshape(self, key=None):
        key = key or _choose_key(self.data, list(self.tensors), "reshape key")
        if key is None:
            return
        old = tuple(self.tensors[key].shape)
        dtype = self.tensors[key].dtype
        how = self.draw(st.sampled_from(["0-D", "1-D", "flatten", "transpose", "dim+1", "dim-1", "zero", "unsqueeze",
                                         "random"]), "reshape how")
        if how == "0-D":
            shape = ()
        elif how == "1-D":
            shape = (old[0] if old else 4,)
        elif how == "flatten":
            shape = (math.prod(old),)
        elif how == "transpose":
            shape = old[::-1]
        elif how in ("dim+1", "dim-1", "zero"):
            if not old:
                shape = (1,) if how != "zero" else (0,)
            else:
                i = self.draw(st.integers(0, len(old) - 1), "dim")
                value = {"dim+1": old[i] + 1, "dim-1": max(0, old[i] - 1), "zero": 0}[how]
                shape = old[:i] + (value,) + old[i + 1:]
        elif how == "unsqueeze":
            shape = old + (1,)
        else:
            shape = tuple(self.draw(st.lists(st.integers(0, 12), max_size=4), "random shape"))
        self.tensors[key] = rand(shape, dtype if dtype.is_floating_point else torch.float32, self.new_seed())

    def values(self, key=None):
        key = key or _choose_key(self.data, list(self.tensors), "values key")
        if key is None:
            return
        t = self.tensors[key]
        if not t.dtype.is_floating_point or t.numel() == 0:
            return
        kind = self.draw(st.sampled_from(["nan", "inf", "-inf", "max", "huge", "1e20", "tiny", "zero", "1e10"]), "values")
        work = t.double().clone().reshape(-1)
        finfo_max = torch.finfo(t.dtype).max
        value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "max": finfo_max, "huge": 3e38, "1e20": 1e20,
                 "tiny": 1e-45, "zero": 0.0, "1e10": 1e10}[kind]
        if kind in ("nan", "inf", "-inf"):
            work[self.draw(st.integers(0, work.numel() - 1), "position")] = value
        else:
            work.fill_(value)
        self.tensors[key] = work.reshape(t.shape).to(t.dtype)  # huge values may overflow to inf on purpose

    def dtype(self, key=None):
        key = key or _choose_key(self.data, list(self.tensors), "dtype key")
        if key is None:
            return
        self.tensors[key] = cast(self.tensors[key], self.draw(st.sampled_from(DTYPES), "dtype"))

    def alpha(self):
        modules = modules_of(self.tensors)
        stem = _choose_key(self.data, sorted(modules), "alpha module")
        if stem is None:
            return
        value = self.draw(st.sampled_from(SPECIAL_FLOATS), "alpha value")
        dtype = self.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32,
                                           torch.int64, torch.int8, torch.bool, torch.float8_e4m3fn]), "alpha dtype")
        shape = self.draw(st.sampled_from([(), (1,), (1, 1), (2,), (0,)]), "alpha shape")
        t = torch.full(shape, value, dtype=torch.float64)
        if not dtype.is_floating_point:
            t = torch.nan_to_num(t).clamp(-100, 100)
        self.tensors[stem + ".alpha"] = t.to(dtype)

    ALGORITHMS = ["lora", "lora_mid", "lora_dora", "loha", "lokr_full", "lokr_low_rank", "lokr_w1_low_rank", "diff",
                  "diff_b", "diff_dora", "diff_1d"]
    RANKS = [1, 2, 4, 0, 3]

    def _rebuild(self, stem, shape, kind, r, dtype, alpha, spelling, dora_shape) -> list[str]:
        """Replace module `stem` by a `kind` module of rank `r` for a weight of `shape`; its new keys."""
        out, inp = shape
        up, down = spelling
        if kind == "lora_mid":
            new = {up: (out, r, 1, 1), down: (r, inp, 1, 1), "lora_mid.weight": (r, r, 1, 1)}
        elif kind.startswith("lora"):
            new = {up: (out, r), down: (r, inp)}
        elif kind == "loha":
            new = {"hada_w1_a": (out, r), "hada_w1_b": (r, inp), "hada_w2_a": (out, r), "hada_w2_b": (r, inp)}
        elif kind.startswith("lokr"):
            a = next(d for d in (2, 4, 1) if out % d == 0)
            c = next(d for d in (2, 4, 1) if inp % d == 0)
            b, d = out // a, inp // c
            new = {"lokr_full": {"lokr_w1": (a, c), "lokr_w2": (b, d)},
                   "lokr_low_rank": {"lokr_w1": (a, c), "lokr_w2_a": (b, r), "lokr_w2_b": (r, d)},
                   "lokr_w1_low_rank": {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c), "lokr_w2": (b, d)}}[kind]
        elif kind == "diff_1d":
            new = {"diff": (out,)}
        else:
            new = {"diff": (out, inp)}
            if kind == "diff_b":
                new["diff_b"] = (out,)
        if kind.endswith("_dora"):
            new["dora_scale"] = {"out": (out, 1), "in": (1, inp), "flat": (out,), "one": (1, 1)}[dora_shape]
        self.tensors = {k: v for k, v in self.tensors.items() if not (split(k) and split(k)[0] == stem)}
        for suffix, size in new.items():
            self.tensors[f"{stem}.{suffix}"] = rand(size, dtype, self.new_seed())
        if alpha is not None:
            self.tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
        return [f"{stem}.{suffix}" for suffix in new]

    def _draw_module_kind(self):
        return (self.draw(st.sampled_from(self.ALGORITHMS), "algorithm"), self.draw(st.sampled_from(self.RANKS), "rank"),
                self.draw(st.sampled_from(FLOAT_DTYPES), "module dtype"),
                self.draw(st.one_of(st.none(), st.sampled_from(SPECIAL_FLOATS)), "alpha"),
                self.draw(st.sampled_from(LORA_SPELLINGS), "lora spelling"),
                self.draw(st.sampled_from(["out", "in", "flat", "one"]), "dora_scale shape"))

    def algorithm(self):
        """Rebuild one module as another algorithm for the same weight (LoRA, LoRA+mid, DoRA, diff, ...),
        maybe with one of its tensors bent out of shape."""
        modules = modules_of(self.tensors)
        stems = [s for s in sorted(modules) if module_shape(modules[s], self.tensors)]
        stem = _choose_key(self.data, stems, "rebuild module")
        if stem is None:
            return
        keys = self._rebuild(stem, module_shape(modules[stem], self.tensors), *self._draw_module_kind())
        if self.draw(st.booleans(), "bend one tensor"):
            self.reshape(self.draw(st.sampled_from(keys), "bent tensor"))

    def rebuild_all(self):
        """Every module rebuilt as one algorithm, rank and alpha: a LoRA (DoRA, diff, ...) copy of the fixture."""
        modules = modules_of(self.tensors)
        kind = self._draw_module_kind()
        for stem in sorted(modules):
            shape = module_shape(modules[stem], self.tensors)
            if shape:
                self._rebuild(stem, shape, *kind)

    def many(self):
        """Thousands of tiny tensors: the per-tensor cost must stay linear."""
        n = self.draw(st.sampled_from(TINY_MODULES), "tiny modules")
        kind = self.draw(st.sampled_from(["lokr", "diff", "lora", "unknown", "alpha_only"]), "tiny kind")
        one = torch.ones(1, 1)
        for i in range(n):
            stem = f"lora_unet_blocks_{i}_tiny"
            if kind == "unknown":
                self.tensors[f"extra.{i}.weight"] = one
            elif kind == "alpha_only":
                self.tensors[f"{stem}.alpha"] = one[0, 0]
            elif kind == "lokr":
                self.tensors[f"{stem}.lokr_w1"] = one
                self.tensors[f"{stem}.lokr_w2"] = one
            elif kind == "lora":
                self.tensors[f"{stem}.lora_up.weight"] = one
                self.tensors[f"{stem}.lora_down.weight"] = one
            else:
                self.tensors[f"{stem}.diff"] = one

    # -- metadata
    def meta(self):
        how = self.draw(st.sampled_from(["set", "set", "set", "delete", "clear"]), "metadata how")
        if how == "clear":
            self.metadata = {}
            return
        key = str(self.draw(st.one_of(st.sampled_from(META_KEYS), key_text), "metadata key"))
        if how == "delete":
            self.metadata.pop(key, None)
        else:
            self.metadata[str(key)] = str(self.draw(meta_value, "metadata value"))

    def peft(self):
        """A PEFT config (in the metadata or in a file beside the adapter) and no alphas: PEFT's scale rule."""
        self.tensors = {k: v for k, v in self.tensors.items() if not k.endswith(".alpha")}
        config = self.draw(st.sampled_from(PEFT_CONFIGS), "PEFT config")
        where = self.draw(st.sampled_from(["lora_adapter_metadata", "adapter.json", "adapter.adapter_config.json"]),
                          "PEFT config in")
        if where == "lora_adapter_metadata":
            self.metadata[where] = str(config)
        else:  # a config file counts when it names a PEFT type
            self.side_files[where] = config.replace("{", '{"peft_type": "LOHA", ', 1) if config.startswith('{"') else config

    OPS = ("rename", "drop", "duplicate", "reshape", "values", "dtype", "alpha", "algorithm", "meta", "peft")

    def mutate(self, ops=OPS, max_ops=4):
        for op in self.draw(st.lists(st.sampled_from(ops), min_size=1, max_size=max_ops), "operations"):
            getattr(self, op)()

    def write(self, path) -> None:
        save_file({k: v.contiguous().clone() for k, v in self.tensors.items()}, str(path), metadata=self.metadata or None)
        for name, text in self.side_files.items():
            (Path(path).parent / name).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Header-level mutations (raw bytes)


class Raw(Long):
    """A JSON fragment written verbatim (deep nesting, 5000-digit numbers, NaN)."""


def dump(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + dump(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


class Pair:
    """One `"key": value` of the header object (a list of them may repeat a key)."""

    def __init__(self, key, value):
        self.key, self.value = key, value


ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "C64": 8, "F4": 1}
DEEP = [Raw("[" * n + "]" * n) for n in (50, 5000, 200000)] + [Raw('{"a":' * 5000 + "1" + "}" * 5000)]
BIG = [Raw("9" * 5000), Raw("1" + "0" * 400), Raw("-" + "9" * 5000), Raw("1e400"), Raw("NaN"), Raw("-Infinity"),
       Raw("1" + "0" * 4301)]
DTYPE_VALUES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0",
                "U16", "U32", "U64", "F33", "f32", "", "C64", "F4", "F32\x00", "F32 ", None, 5, ["F32"], {"a": 1}] + DEEP[:2]
SHAPE_VALUES = [[], [0], [1], [2, 2], [0, 2**62, 2**62], [2**62, 2**62, 0], [0, 2**64 + 1], [0, 2**63], [2**63, 0],
                [2**31, 2**31, 0, 2**40], [0] * 64, [1] * 64, [1] * 5000, [-1, 4], [4, -1], [2.0, 2], ["2"], [True, 2],
                [[2]], None, 4, {}, [None], [2**64], [2**32, 2**32]] + [[b] for b in BIG] + [[0, b] for b in BIG[:3]] + DEEP[:2]
OFFSET_VALUES = ["swap", [0, 2**64], [-1, 0], [0.0, 4.0], [0], [0, 1, 2], None, "x", [0, 2**63 - 1], [2**64, 2**64 + 4],
                 [0, BIG[0]], [BIG[0], BIG[0]], [0, BIG[3]], [BIG[4], 0], [True, 4]] + DEEP[:2]
METADATA_VALUES = [[], "str", None, 5, DEEP[1], {"k": 5}, {"k": None}, {"k": []}, {"k": {"a": "b"}}, {"k": BIG[0]},
                   {"k": BIG[4]}, {5: "x"}]


def _edit_text(text: bytes, how: str, at: float, byte: bytes) -> bytes:
    i = int(at * len(text))
    if how == "insert":
        return text[:i] + byte + text[i:]
    if how == "delete":
        return text[:i] + text[i + 1:]
    if how == "truncate":
        return text[:i]
    if how == "bom":
        return b"\xef\xbb\xbf" + text
    if how == "utf16":
        return text.decode("utf-8", "replace").encode("utf-16")
    if how == "latin1":
        return text.replace(b"e", b"\xe9", 3)
    return text + {"trailing": b" x", "spaces": b" " * 7, "nul": b"\x00" * 3}[how]


def _edit_body(body: bytes, how: str, at: float) -> bytes:
    i = int(at * len(body))
    if how == "append":
        return body + b"\x00" * 8
    if how == "chop":
        return body[: max(0, len(body) - 4)]
    if how == "flip" and i < len(body):
        return body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
    if how == "nan" and i + 4 <= len(body):
        return body[:i] + b"\xff\xff\xff\xff" + body[i + 4:]
    return b"" if how == "empty" else body


class HeaderMutator:
    """Mutations of a safetensors file at the byte level: the header JSON (as a list of Pairs whose
    offsets are recomputed unless a mutation set them) and the raw bytes."""

    def __init__(self, data, raw: bytes):
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        body = raw[8 + n :]
        self.data = data
        self.pairs: list[Pair] = []
        self.blobs: dict[int, bytes] = {}
        for key, value in header.items():
            pair = Pair(key, dict(value) if isinstance(value, dict) else value)
            if key != "__metadata__":
                begin, end = value["data_offsets"]
                self.blobs[id(pair)] = body[begin:end]
            self.pairs.append(pair)
        self.fixed_offsets: set[int] = set()  # pairs whose data_offsets a mutation wrote
        self.text_ops: list = []

    def draw(self, strategy, label):
        return self.data.draw(strategy, label=label)

    def tensors(self) -> list[Pair]:
        return [p for p in self.pairs if p.key != "__metadata__" and isinstance(p.value, dict)]

    def pick(self) -> Pair | None:
        pairs = self.tensors()
        return pairs[self.draw(st.integers(0, len(pairs) - 1), "entry")] if pairs else None

    # -- structure
    def dtype(self):
        if p := self.pick():
            p.value["dtype"] = self.draw(st.sampled_from(DTYPE_VALUES), "dtype value")

    def shape(self):
        if p := self.pick():
            p.value["shape"] = self.draw(st.sampled_from(SHAPE_VALUES), "shape value")

    def offsets(self):
        if p := self.pick():
            value = self.draw(st.sampled_from(OFFSET_VALUES), "offsets value")
            p.value["data_offsets"] = value
            self.fixed_offsets.add(id(p))

    def field(self):
        if p := self.pick():
            how = self.draw(st.sampled_from(["delete", "extra", "not an object"]), "field how")
            if how == "delete":
                p.value.pop(self.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), "field"), None)
                self.fixed_offsets.add(id(p))
            elif how == "extra":
                p.value[self.draw(st.sampled_from(["extra", "dtype ", ""]), "extra field")] = self.draw(
                    st.sampled_from([1, "x", None, DEEP[0], DEEP[2], BIG[0]]), "extra value")
            else:
                p.value = self.draw(st.sampled_from([[], "x", None, 5, DEEP[1], BIG[0]]), "entry value")

    def key(self):
        if p := self.pick():
            how = self.draw(st.sampled_from(["rename", "duplicate", "duplicate other"]), "key how")
            if how == "rename":
                p.key = self.draw(st.one_of(key_text, st.just("__metadata__")), "key text")
            else:
                copy = Pair(p.key, dict(p.value))
                if how == "duplicate other" and len(self.tensors()) > 1:
                    other = self.tensors()[-1] if self.tensors()[-1] is not p else self.tensors()[0]
                    copy = Pair(p.key, dict(other.value))
                    self.blobs[id(copy)] = self.blobs.get(id(other), b"")
                else:
                    self.blobs[id(copy)] = self.blobs.get(id(p), b"")
                self.pairs.insert(self.pairs.index(p) + 1, copy)

    def drop(self):
        if p := self.pick():
            self.pairs.remove(p)

    def metadata(self):
        meta = next((p for p in self.pairs if p.key == "__metadata__"), None)
        if meta is None:
            meta = Pair("__metadata__", {})
            self.pairs.insert(0, meta)
        how = self.draw(st.sampled_from(["value", "value", "replace", "duplicate", "last", "delete"]), "metadata how")
        if how == "value":
            if not isinstance(meta.value, dict):
                meta.value = {}
            meta.value[self.draw(st.one_of(st.sampled_from(META_KEYS), key_text), "metadata key")] = self.draw(
                st.one_of(meta_value, st.sampled_from([5, None, [], {}, True, 1.5] + BIG + DEEP[:2])), "metadata value")
        elif how == "replace":
            meta.value = self.draw(st.sampled_from(METADATA_VALUES), "metadata")
        elif how == "duplicate":
            self.pairs.append(Pair("__metadata__", {"ss_network_dim": "4"}))
        elif how == "last":
            self.pairs.remove(meta)
            self.pairs.append(meta)
        else:
            self.pairs.remove(meta)

    def top_level(self):
        value = self.draw(st.sampled_from(DEEP + BIG + [None, 5, "x", [], {}]), "top-level value")
        self.pairs.insert(self.draw(st.integers(0, len(self.pairs)), "where"), Pair(self.draw(key_text, "top-level key"), value))

    def reorder(self):
        if len(self.pairs) > 1:
            i = self.draw(st.integers(0, len(self.pairs) - 1), "move from")
            self.pairs.append(self.pairs.pop(i))

    # -- bytes
    def length(self):
        self.text_ops.append(("length", self.draw(
            st.sampled_from(["+1", "-1", "0", "1", "file", "file-8", "2**63", "2**64-1", "100000001", "99999999"]), "length")))

    def text(self):
        how = self.draw(st.sampled_from(["insert", "delete", "truncate", "bom", "trailing", "spaces", "nul", "utf16",
                                         "latin1"]), "text how")
        self.text_ops.append(("text", how, self.draw(st.floats(0, 1), "at"),
                              self.draw(st.sampled_from([b"\x00", b"\xff", b'"', b"{", b"}", b"\\", b"\n", b",", b"]"]), "byte")))

    def body(self):
        self.text_ops.append(("body", self.draw(st.sampled_from(["append", "chop", "flip", "nan", "empty"]), "body how"),
                              self.draw(st.floats(0, 1), "at")))

    def file(self):
        self.text_ops.append(("file", self.draw(st.sampled_from([0, 4, 7, 8, 9, "half", "-1"]), "file size")))

    STRUCTURE = ("dtype", "shape", "offsets", "field", "key", "drop", "metadata", "top_level", "reorder")
    BYTES = ("length", "text", "body", "file")

    def mutate(self):
        for op in self.draw(st.lists(st.sampled_from(self.STRUCTURE + self.BYTES), min_size=1, max_size=3), "operations"):
            getattr(self, op)()

    # -- writing
    def _nbytes(self, value: dict, old: bytes) -> int | None:
        shape, dtype = value.get("shape"), value.get("dtype")
        if (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape) and isinstance(dtype, str)
                and dtype in ITEMSIZE):
            n = math.prod(shape) * ITEMSIZE[dtype]
            return n if n <= 1 << 20 else None
        return None

    def build(self) -> bytes:
        body = b""
        pairs = []
        for p in self.pairs:
            value = p.value
            if isinstance(value, dict) and p.key != "__metadata__" and id(p) not in self.fixed_offsets:
                old = self.blobs.get(id(p), b"")
                n = self._nbytes(value, old)
                blob = old if n is None else (old + bytes(n))[:n]
                value = dict(value, data_offsets=[len(body), len(body) + len(blob)])
                body += blob
            elif isinstance(value, dict) and p.key != "__metadata__":
                if value.get("data_offsets") == "swap":
                    value = dict(value, data_offsets=[len(body) + 8, len(body)])
                body += self.blobs.get(id(p), b"")
            pairs.append(Pair(p.key, value))
        text = ("{" + ",".join(json.dumps(p.key) + ":" + dump(p.value) for p in pairs) + "}").encode("utf-8", "surrogatepass")
        length = len(text)
        for op in self.text_ops:
            if op[0] == "text":
                text = _edit_text(text, *op[1:])
                length = len(text)
            elif op[0] == "body":
                body = _edit_body(body, *op[1:])
        for op in self.text_ops:
            if op[0] == "length":
                length = {"+1": length + 1, "-1": max(0, length - 1), "0": 0, "1": 1, "file": len(text) + len(body) + 8,
                          "file-8": len(text) + len(body), "2**63": 2**63, "2**64-1": 2**64 - 1,
                          "100000001": 100_000_001, "99999999": 99_999_999}[op[1]]
        raw = struct.pack("<Q", length % 2**64) + text + body
        for op in self.text_ops:
            if op[0] == "file":
                size = {"half": len(raw) // 2, "-1": len(raw) - 1}.get(op[1], op[1])
                raw = raw[:size]
        return raw


# ---------------------------------------------------------------------------------------------
# Running the entry points and checking the outcome


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _refuse_constant(name):
    raise ValueError(f"bare {name} in JSON output")


_EXAMPLE_LOG: list = [None]  # the running example's log file (example.txt in its folder)


def log(text: str) -> None:
    """Note `text` for hypothesis's report and in the example's folder (what is left of a hard timeout)."""
    note(text)
    if _EXAMPLE_LOG[0] is not None:
        _EXAMPLE_LOG[0].write(text + "\n")
        _EXAMPLE_LOG[0].flush()


class Recorder:
    """`data` that also logs every draw (a hard timeout leaves no hypothesis report)."""

    def __init__(self, data):
        self._data = data

    def draw(self, strategy, label=None):
        value = self._data.draw(strategy, label=label)
        text = repr(value)
        if _EXAMPLE_LOG[0] is not None:
            _EXAMPLE_LOG[0].write(f"draw {label}: {text if len(text) < 300 else text[:300] + f'... ({len(text)} chars)'}\n")
        return value


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    log(f"comfyui-lycoris {' '.join(repr(a) if not a.isprintable() or ' ' in a else a for a in argv)}")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse; a usage error is not one line
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_clean_refusal(code: int, stderr: str, what: str) -> None:
    assert code == 2, f"{what}: exit {code!r}, expected 0 or 2; stderr: {stderr[-2000:]!r}"
    assert stderr.endswith("\n") and len(stderr.splitlines()) == 1, f"{what}: stderr is not one line: {stderr[:3000]!r}"
    bad = [c for c in stderr[:-1] if unicodedata.category(c) == "Cc"]
    assert not bad, f"{what}: control characters {bad[:5]!r} in the error line: {stderr[:3000]!r}"
    assert "Traceback" not in stderr, f"{what}: traceback on stderr"


def nonfinite_keys(path) -> set[str]:
    """Keys of the tensors of a (base) file that hold NaN/Inf already; empty when it does not load."""
    try:
        tensors = load_file(str(path))
        return {k for k, t in tensors.items()
                if t.dtype.is_floating_point and t.numel() and not torch.isfinite(t.float()).all()}
    except Exception:  # a base torch cannot even hold (the merge must refuse it)
        return set()


def assert_finite_file(path: str, what: str, inherited: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of `path` is finite, but those `inherited` from an input that held NaN/Inf."""
    tensors = load_file(path)
    for key, t in tensors.items():
        if t.dtype.is_floating_point and t.numel() and key not in inherited:
            bad = int((~torch.isfinite(t.float())).sum())
            assert bad == 0, f"{what}: output tensor {key!r} holds {bad} non-finite values"
    return tensors


class Run:
    """One example's folder: inputs in `in/`, each command's output in a fresh `out<N>/`."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.inputs = self.root / "in"
        self.inputs.mkdir()
        self.n = 0

    def input(self, name: str) -> Path:
        return self.inputs / name

    def out_dir(self) -> Path:
        self.n += 1
        folder = self.root / f"out{self.n}"
        folder.mkdir()
        return folder

    def hashes(self) -> dict[str, str]:
        return {p.name: _sha(p) for p in sorted(self.inputs.iterdir())}

    def check_read(self, path: Path, full_matrix_alpha: bool = False) -> bool:
        log(f"read_adapter({str(path)!r}, lokr_full_matrix_alpha={full_matrix_alpha})")
        try:
            read_adapter(path, lokr_full_matrix_alpha=full_matrix_alpha)
        except AdapterError:
            return False
        return True

    def check_inspect(self, path: Path, as_json: bool, full_matrix_alpha: bool = False) -> None:
        before = self.hashes()
        argv = ["inspect", *(["--json"] if as_json else []), *(["--lokr-full-matrix-alpha"] if full_matrix_alpha else []), str(path)]
        code, stdout, stderr = run_cli(argv)
        if code == 0:
            if as_json:
                report = json.loads(stdout, parse_constant=_refuse_constant)
                assert isinstance(report, dict)
        else:
            assert_clean_refusal(code, stderr, "inspect")
        assert self.hashes() == before, "inspect changed an input file"

    def check_writer(self, argv_of, what: str, existing: bytes | None = None, convert_output: bool = False,
                     base: Path | None = None) -> bool:
        """Run a command that writes OUT (argv_of(out path)); True when it succeeded. A merge may copy
        NaN/Inf that its `base` held already (a mutated header can reinterpret bytes); it adds none."""
        inherited = nonfinite_keys(base) if base is not None else set()
        before = self.hashes()
        folder = self.out_dir()
        out = folder / "out.safetensors"
        if existing is not None:
            out.write_bytes(existing)
        code, stdout, stderr = run_cli(argv_of(str(out)))
        assert self.hashes() == before, f"{what} changed an input file"
        if code == 0:
            assert sorted(os.listdir(folder)) == ["out.safetensors"], f"{what}: left {sorted(os.listdir(folder))}"
            assert_finite_file(str(out), what, inherited)
            if convert_output:  # what convert writes, the pack reads back
                read_adapter(out)
            return True
        assert_clean_refusal(code, stderr, what)
        left = sorted(os.listdir(folder))
        if existing is None:
            assert left == [], f"{what} refused but left {left}"
        else:
            assert left == ["out.safetensors"] and out.read_bytes() == existing, f"{what} refused but touched OUT: {left}"
        return False


STRENGTHS = longs([
    "", "1", "1.0", "0.5", "0", "-1", "2", "nan", "NaN", "inf", "-inf", "+inf", "Infinity", "1e39", "1e38", "3e38", "-1e39",
    "1e308", "1e400", "1e-400", "garbage", "0x10", "1_000", " 2 ", "1e", "∞", "١", "9" * 5000, "-0", "1e30", "a\nb",
    "\x1b[2J", "1\x00",
])
# Mostly numbers: a strength that is no number makes `FILE:TEXT` a path that does not exist.
strength_text = st.one_of(st.sampled_from(STRENGTHS), st.floats().map(repr),
                          st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), max_size=6))
# Real architecture ids only: an unknown one is argparse's usage error (`--arch` has choices), not input.
CONVERT_ARCHS = [None, None, None, "wan", "z_image", "flux", "hunyuan_video_1_5"]
MERGE_ARCHS = [None, None, None, "auto", "wan", "z_image", "flux"]
PREFIX_VALUES = [None, None, "transformer", "diffusion_model.", "", ".", "a b", "x\ny", "\x1b", "lora_unet_", "é"]


def adapter_arg(path: Path, strength: str | None) -> str:
    return str(path) if strength is None else f"{path}:{strength}"


def check_all(data, run: Run, adapter: Path, base: Path) -> None:
    """read_adapter, inspect, inspect --json, convert and merge on one adapter file."""
    full_matrix = data.draw(st.booleans(), label="--lokr-full-matrix-alpha")
    run.check_read(adapter)
    if full_matrix:
        run.check_read(adapter, full_matrix_alpha=True)
    run.check_inspect(adapter, as_json=True, full_matrix_alpha=full_matrix)
    run.check_inspect(adapter, as_json=False)
    target = data.draw(st.sampled_from(["musubi", "diffusers", "comfyui"]), label="convert --to")
    arch = data.draw(st.sampled_from(CONVERT_ARCHS), label="--arch")
    prefix = data.draw(st.sampled_from(PREFIX_VALUES), label="--prefix") if target == "diffusers" else None
    run.check_writer(lambda out: ["convert", str(adapter), out, "--to", target,
                                  *(["--arch", arch] if arch is not None else []),
                                  *(["--prefix", prefix] if prefix is not None else [])], "convert", convert_output=True)
    strength = data.draw(st.one_of(st.none(), st.sampled_from(["1", "0.5", "-1"]), strength_text), label="strength")
    run.check_writer(lambda out: ["merge", str(base), out, "--adapter", adapter_arg(adapter, strength),
                                  *(["--lokr-full-matrix-alpha"] if full_matrix else [])], "merge", base=base)


# ---------------------------------------------------------------------------------------------
# The fuzz tests

adapter_name = st.sampled_from(ADAPTER_NAMES)

# The deadline is checked when an example ends; one that never ends (a regular expression backtracking
# exponentially holds the interpreter in C) is stopped here instead: faulthandler prints every thread's
# stack to the real stderr and exits the process. The example's folder (its inputs and example.txt:
# every draw and command) is then left in the temp folder as comfyui-lycoris-fuzz-*.
_DEADLINE = settings.default.deadline
HARD_LIMIT_S = 600 if _DEADLINE is None else max(120, 20 * _DEADLINE.total_seconds())


@pytest.fixture(scope="module")
def watchdog(pytestconfig):
    """A stream on the real stderr (not pytest's capture, which dies with the process)."""
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        stream = os.fdopen(os.dup(2), "w")
    yield stream
    stream.close()


@contextlib.contextmanager
def fuzz_example(test: str, data, watchdog):
    """One example: its folder, its log, and the hard time limit. Counted once it ran to the end (an
    example hypothesis abandons while drawing is no input)."""
    with tempfile.TemporaryDirectory(prefix="comfyui-lycoris-fuzz-") as root:
        with open(os.path.join(root, "example.txt"), "w", encoding="utf-8", errors="backslashreplace") as example_log:
            _EXAMPLE_LOG[0] = example_log
            example_log.write(f"{test} (hard limit {HARD_LIMIT_S:.0f} s)\n")
            faulthandler.dump_traceback_later(HARD_LIMIT_S, exit=True, file=watchdog)
            try:
                yield Recorder(data), Run(root)
                _count(test)
            except Exception:
                _count(test)
                raise
            finally:
                faulthandler.cancel_dump_traceback_later()
                _EXAMPLE_LOG[0] = None


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_adapter_tensors(watchdog, data):
    """Tensor-level and metadata mutations of real adapter files, through every entry point."""
    with fuzz_example("test_fuzz_adapter_tensors", data, watchdog) as (data, run):
        name = data.draw(adapter_name, label="fixture")
        tensors, metadata = fixture_tensors(name)
        mutator = TensorMutator(data, tensors, metadata, base_tensors(name))
        if data.draw(st.booleans(), label="rebuild every module"):
            mutator.rebuild_all()
        mutator.mutate()
        adapter, base = run.input("adapter.safetensors"), run.input("base.safetensors")
        mutator.write(adapter)
        base.write_bytes(base_bytes(name))
        check_all(data, run, adapter, base)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_adapter_header(watchdog, data):
    """Byte-level mutations of real adapter files (header JSON, length field, data), through every entry point."""
    with fuzz_example("test_fuzz_adapter_header", data, watchdog) as (data, run):
        name = data.draw(adapter_name, label="fixture")
        mutator = HeaderMutator(data, fixture_bytes(name))
        mutator.mutate()
        adapter, base = run.input("adapter.safetensors"), run.input("base.safetensors")
        adapter.write_bytes(mutator.build())
        base.write_bytes(base_bytes(name))
        check_all(data, run, adapter, base)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_merge_base(watchdog, data):
    """Mutated merge bases (tensors, fp8 scales, metadata, header bytes), strength texts, existing outputs."""
    with fuzz_example("test_fuzz_merge_base", data, watchdog) as (data, run):
        name = data.draw(adapter_name, label="fixture")
        level = data.draw(st.sampled_from(["tensors", "tensors", "header", "none"]), label="base mutation")
        adapter, base = run.input("adapter.safetensors"), run.input("base.safetensors")
        adapter.write_bytes(fixture_bytes(name))
        if level == "tensors":
            mutator = TensorMutator(data, base_tensors(name), {"modelspec.title": "fuzz base"}, [])
            weights = [k for k in mutator.tensors if k.endswith(".weight")]
            for op in data.draw(st.lists(st.sampled_from(["prefix", "dtype", "fp8", "scale", "reshape", "drop", "rename",
                                                          "max", "meta", "merged_before"]), min_size=1, max_size=4),
                                label="base operations"):
                if op == "prefix":
                    prefix = data.draw(st.sampled_from(["model.diffusion_model.", "diffusion_model.", "model.model.",
                                                        "model.", "\x1b[0m", "a" * 3000 + "."]), label="prefix")
                    mutator.tensors = {prefix + k: v for k, v in mutator.tensors.items()}
                    weights = [prefix + k for k in weights]
                elif op in ("dtype", "fp8", "max") and weights:
                    key = data.draw(st.sampled_from(weights), label=f"{op} key")
                    if key not in mutator.tensors:
                        continue
                    if op == "dtype":
                        mutator.dtype(key)
                    elif op == "fp8":
                        mutator.tensors[key] = cast(mutator.tensors[key], data.draw(st.sampled_from(FP8), label="fp8"))
                    else:  # the dtype's largest finite values: ΔW may overflow them
                        t = mutator.tensors[key]
                        if t.dtype.is_floating_point:
                            sign = data.draw(st.sampled_from([1.0, -1.0]), label="sign")
                            mutator.tensors[key] = torch.full_like(t, sign * torch.finfo(t.dtype).max)
                elif op == "scale" and weights:
                    key = data.draw(st.sampled_from(weights), label="scale for")
                    suffix = data.draw(st.sampled_from(["scale_weight", "weight_scale"]), label="scale key")
                    value = data.draw(st.sampled_from([1.0, 0.0, -1.0, 1e-45, 3e38, 0.5, 1e-3, 448.0]), label="scale value")
                    shape = data.draw(st.sampled_from([(), (1,), (2,), (0,), (4, 1)]), label="scale shape")
                    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="scale dtype")
                    mutator.tensors[key[: -len("weight")] + suffix] = cast(torch.full(shape, value), dtype)
                elif op == "reshape":
                    mutator.reshape()
                elif op == "drop":
                    mutator.drop()
                elif op == "rename":
                    mutator.rename()
                elif op == "meta":
                    mutator.meta()
                elif op == "merged_before":
                    mutator.metadata["comfyui_lycoris.merge"] = str(data.draw(st.sampled_from(META_VALUES), label="earlier merges"))
            # bases hold finite values only: whatever is non-finite in OUT, the merge made
            for key, t in mutator.tensors.items():
                if t.dtype.is_floating_point and not torch.isfinite(t.float()).all():
                    mutator.tensors[key] = cast(torch.nan_to_num(t.float()), t.dtype)
            mutator.write(base)
        elif level == "header":
            mutator = HeaderMutator(data, base_bytes(name))
            mutator.mutate()
            raw = mutator.build()
            base.write_bytes(raw)
        else:
            base.write_bytes(base_bytes(name))
        strengths = data.draw(st.lists(st.one_of(st.none(), strength_text), min_size=1, max_size=2), label="strengths")
        args = []
        for i, strength in enumerate(strengths):
            path = adapter
            if i:
                path = run.input("second.safetensors")
                path.write_bytes(fixture_bytes(data.draw(adapter_name, label="second adapter")))
            args += ["--adapter", adapter_arg(path, strength)]
        arch = data.draw(st.sampled_from(MERGE_ARCHS), label="--arch")
        existing = data.draw(st.sampled_from([None, None, None, b"precious"]), label="existing OUT")
        overwrite = data.draw(st.booleans(), label="--overwrite")
        run.check_writer(lambda out: ["merge", str(base), out, *args, *(["--arch", arch] if arch is not None else []),
                                      *(["--overwrite"] if overwrite else [])], "merge", existing=existing, base=base)


@SCALING_SETTINGS
@given(data=st.data())
def test_fuzz_scaling(watchdog, data):
    """Thousands of tiny modules, very long module names, every name long: the work per tensor and per
    name character stays linear, so one entry point finishes within the profile's deadline."""
    with fuzz_example("test_fuzz_scaling", data, watchdog) as (data, run):
        name = data.draw(adapter_name, label="fixture")
        tensors, metadata = fixture_tensors(name)
        mutator = TensorMutator(data, tensors, metadata, base_tensors(name))
        for op in data.draw(st.lists(st.sampled_from(["many", "long_module", "all_long"]), min_size=1, max_size=2),
                            label="operations"):
            if op == "many":
                mutator.many()
                continue
            piece = data.draw(st.sampled_from(["\\.", "0.", "blocks.0.", "a.", "a_", "a", "lora_unet_", "{", "\n"]),
                              label="piece")
            modules = modules_of(mutator.tensors)
            if op == "long_module":  # one module under a name of 30000+ characters
                stems = [data.draw(st.sampled_from(sorted(modules)), label="module")] if modules else []
                text = repeated(piece, data.draw(st.sampled_from([30000, 100000]), label="length"))
            else:  # every module's name made 1000+ characters longer
                stems = sorted(modules)
                text = repeated(piece, data.draw(st.sampled_from([1000, 3000]), label="length"))
            where = data.draw(st.sampled_from(["replace", "prefix", "append"]), label="where")
            renamed = {}
            for stem in stems:
                new_stem = {"replace": text + stem[-1:], "prefix": text + stem, "append": stem + text}[where]
                renamed.update({key: new_stem + "." + suffix for suffix, key in modules[stem].items()})
            mutator.tensors = {renamed.get(k, k): v for k, v in mutator.tensors.items()}
        entry_point = data.draw(st.sampled_from(["inspect", "read_adapter", "convert", "merge"]), label="entry point")
        adapter, base = run.input("adapter.safetensors"), run.input("base.safetensors")
        mutator.write(adapter)
        base.write_bytes(base_bytes(name))
        if entry_point == "read_adapter":
            run.check_read(adapter)
        elif entry_point == "inspect":
            run.check_inspect(adapter, as_json=True)
        elif entry_point == "convert":
            target = data.draw(st.sampled_from(["musubi", "diffusers", "comfyui"]), label="convert --to")
            run.check_writer(lambda out: ["convert", str(adapter), out, "--to", target], "convert", convert_output=True)
        else:
            run.check_writer(lambda out: ["merge", str(base), out, "--adapter", str(adapter)], "merge", base=base)


# ---------------------------------------------------------------------------------------------
# Standalone: `python tests/test_fuzz.py [--profile long] [pytest args]` runs this file's fuzz tests
# under a profile and prints how many inputs each test saw (hypothesis's own statistics too).


def _main(argv: list[str]) -> int:
    import pytest

    profile = "long"
    if argv[:1] == ["--profile"]:
        profile, argv = argv[1], argv[2:]
    seen: dict[str, int] = {}

    class Counter:
        def pytest_collection_modifyitems(self, items):
            self.modules = {item.module for item in items if item.name.startswith("test_fuzz")}

        def pytest_terminal_summary(self, terminalreporter):
            for module in getattr(self, "modules", ()):
                seen.update(module.EXAMPLES_RUN)
            terminalreporter.write_sep("=", f"fuzz inputs run under profile {profile!r}")
            for test, n in sorted(seen.items()):
                terminalreporter.write_line(f"{test}: {n}")
            terminalreporter.write_line(f"total: {sum(seen.values())}")

    args = [__file__, "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning",
            f"--hypothesis-profile={profile}", "--hypothesis-show-statistics", *argv]
    return pytest.main(args, plugins=[Counter()])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
