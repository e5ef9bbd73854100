"""Hostile and unlucky input, one regression test per root cause: nothing non-finite is ever written,
every refusal is one line naming the file, no temporary file is left behind, and reading and name
matching stay linear in the input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from comfyui_lycoris import cli
from comfyui_lycoris.lycoris_core import AdapterError, read_adapter, safetensors_io, save_tensors
from comfyui_lycoris.lycoris_core import naming as naming_module
from comfyui_lycoris.lycoris_core.merge import merge, parse_adapter_arg
from comfyui_lycoris.lycoris_core.naming import naming_for
from comfyui_lycoris.lycoris_core.safetensors_io import check_output_path, stale_temp_files
from safetensors.torch import load_file, save_file

STEM = "lora_unet_blocks_0_self_attn_q"
WEIGHT = "blocks.0.self_attn.q.weight"


def lora(**replace) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA for Wan's blocks.0.self_attn.q (16x16); `replace` swaps or (None) drops tensors."""
    gen = torch.Generator().manual_seed(3)
    tensors = {
        f"{STEM}.lora_down.weight": torch.randn(4, 16, generator=gen),
        f"{STEM}.lora_up.weight": torch.randn(16, 4, generator=gen),
        f"{STEM}.alpha": torch.tensor(4.0),
    }
    tensors.update({f"{STEM}.{k}": v for k, v in replace.items()})
    return {k: v for k, v in tensors.items() if v is not None}


@pytest.fixture
def folder(tmp_path):
    return tmp_path


def write(folder, name: str, tensors: dict, metadata: dict | None = None) -> str:
    path = str(folder / name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def raw(folder, name: str, header: bytes, data: bytes = b"") -> str:
    path = folder / name
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def base(folder, dtype=torch.float32, extra: dict | None = None) -> str:
    gen = torch.Generator().manual_seed(5)
    tensors = {WEIGHT: torch.randn(16, 16, generator=gen).to(dtype), "blocks.0.self_attn.k.weight": torch.randn(16, 16, generator=gen)}
    return write(folder, "base.safetensors", {**tensors, **(extra or {})})


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def refused(folder, *argv: str, names: str) -> str:
    """Run the CLI, expecting a refusal: exit 2, one line on stderr naming `names`, no new file."""
    before = set(os.listdir(folder))
    code, _, err = run(*argv)
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert all(c >= " " for c in err[:-1]), err
    assert names in err, err
    assert set(os.listdir(folder)) == before, set(os.listdir(folder)) - before
    return err


def all_finite(path: str) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in load_file(path).values())


# ---------------------------------------------------------------------------------------------
# 1. Nothing non-finite written


@pytest.mark.parametrize("strength", ["nan", "inf", "-inf", "1e39", "-1e39", "1e308"])
def test_merge_refuses_strengths_beyond_float32(folder, strength):
    adapter = write(folder, "a.safetensors", lora())
    err = refused(folder, "merge", base(folder), str(folder / "out.safetensors"), "--adapter", f"{adapter}:{strength}",
                  names=adapter)
    assert "strength" in err


def test_merge_core_refuses_the_same_strengths_from_any_caller(folder):
    """The Merge node's text list reaches the core without the strength widget's bounds."""
    adapter = write(folder, "a.safetensors", lora())
    for strength in (float("nan"), float("inf"), 1e39):
        with pytest.raises(AdapterError, match="strength"):
            merge(base(folder), folder / "out.safetensors", [(adapter, strength)], progress=False)
    assert sorted(os.listdir(folder)) == ["a.safetensors", "base.safetensors"]


def test_strength_typo_names_the_syntax(folder):
    adapter = write(folder, "a.safetensors", lora())
    with pytest.raises(AdapterError, match=r"strength 'abc' is not a number \(write FILE, FILE:STRENGTH or FILE:STRENGTH:BLOCKS"):
        parse_adapter_arg(f"{adapter}:abc")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_that_overflows_the_base_dtype_writes_nothing(folder, dtype):
    """alpha 3e38 is a finite fp32 scale, but scale x ΔW is not: the output is checked as it is made."""
    adapter = write(folder, "a.safetensors", lora(alpha=torch.tensor(3e38)))
    err = refused(folder, "merge", base(folder, dtype), str(folder / "out.safetensors"), "--adapter", adapter,
                  "--arch", "wan", names="base.safetensors")
    assert f"merging into {WEIGHT} gives" in err and "non-finite" in err and STEM in err


def test_merge_keeps_what_the_base_already_had(folder):
    """NaN/Inf the base holds are not the merge's doing: it goes through, adding no new ones."""
    weights = torch.randn(16, 16)
    weights[0, 0] = float("inf")
    path = write(folder, "base.safetensors", {WEIGHT: weights})
    adapter = write(folder, "a.safetensors", lora())
    code, _, err = run("merge", path, str(folder / "out.safetensors"), "--adapter", adapter, "--arch", "wan")
    assert code == 0, err
    merged = load_file(str(folder / "out.safetensors"))[WEIGHT]
    assert int((~torch.isfinite(merged)).sum()) == 1


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -1.0])
def test_fp8_base_with_an_unusable_scale_is_refused(folder, scale):
    fp8 = {WEIGHT: torch.randn(16, 16).to(torch.float8_e4m3fn), "blocks.0.self_attn.q.scale_weight": torch.tensor(scale)}
    path = write(folder, "fp8.safetensors", fp8)
    adapter = write(folder, "a.safetensors", lora())
    err = refused(folder, "merge", path, str(folder / "out.safetensors"), "--adapter", adapter, "--arch", "wan",
                  names="fp8.safetensors")
    assert "scale_weight" in err and "cannot be dequantized" in err


def test_full_matrix_alpha_needs_a_finite_network_dim(folder):
    full = {f"{STEM}.lokr_w1": torch.randn(4, 4), f"{STEM}.lokr_w2": torch.randn(4, 4), f"{STEM}.alpha": torch.tensor(1.0)}
    adapter = write(folder, "a.safetensors", full, metadata={"ss_network_dim": "nan"})
    refused(folder, "merge", base(folder), str(folder / "out.safetensors"), "--adapter", adapter, "--arch", "wan",
            "--lokr-full-matrix-alpha", names="ss_network_dim")


@pytest.mark.parametrize("to", ["musubi", "diffusers", "comfyui"])
def test_negative_alpha_converts_exactly(folder, to):
    """A negative alpha flips ΔW; folding it (Diffusers) takes √|alpha/rank| into both factors and the
    sign into up, never √ of a negative."""
    source = write(folder, "neg.safetensors", lora(alpha=torch.tensor(-3.0)))
    out = str(folder / f"neg_{to}.safetensors")
    code, _, err = run("convert", source, out, "--to", to, "--arch", "wan")
    assert code == 0, err
    assert all_finite(out)
    want = read_adapter(source).modules[STEM].delta_weight()
    got = next(iter(read_adapter(out).modules.values())).delta_weight()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert float(want.flatten()[0]) != 0 and torch.equal(torch.sign(got), torch.sign(want))


def test_fold_that_overflows_fp16_is_refused(folder):
    """Diffusers keeps no alpha: folding alpha/rank = 15000 into fp16 factors of 300 goes past 65504."""
    tensors = {k: (v.half() * 300 if v.dim() == 2 else v) for k, v in lora(alpha=torch.tensor(60000.0)).items()}
    source = write(folder, "big.safetensors", tensors)
    err = refused(folder, "convert", source, str(folder / "out.safetensors"), "--to", "diffusers", "--arch", "wan",
                  names="big.safetensors")
    assert "non-finite" in err and "F16" in err
    for to in ("musubi", "comfyui"):  # these keep alpha: nothing to fold, nothing to overflow
        code, _, err = run("convert", source, str(folder / f"{to}.safetensors"), "--to", to, "--arch", "wan")
        assert code == 0 and all_finite(str(folder / f"{to}.safetensors")), err


# ---------------------------------------------------------------------------------------------
# 2. One line, never a traceback

BROKEN_MODULES = {
    "rank 0": lora(**{"lora_down.weight": torch.zeros(0, 16), "lora_up.weight": torch.zeros(16, 0)}),
    "0-D lokr_w2": {f"{STEM}.lokr_w1": torch.randn(4, 4), f"{STEM}.lokr_w2": torch.tensor(1.0)},
    "1-D lokr_w2": {f"{STEM}.lokr_w1": torch.randn(4, 4), f"{STEM}.lokr_w2": torch.randn(4)},
    "1-D lora_up beside lora_mid": lora(**{"lora_up.weight": torch.randn(16), "lora_mid.weight": torch.randn(4, 4, 1, 1)}),
    "1-D diff with dora_scale": {f"{STEM}.diff": torch.randn(16), f"{STEM}.dora_scale": torch.randn(16)},
    "alpha beyond fp32 (f64)": lora(alpha=torch.tensor(1e300, dtype=torch.float64)),
    "alpha inf": lora(alpha=torch.tensor(float("inf"))),
    "no rows": lora(**{"lora_up.weight": torch.zeros(0, 4)}),
}


@pytest.mark.parametrize("case", BROKEN_MODULES)
def test_broken_modules_are_one_line_everywhere(folder, case):
    adapter = write(folder, "broken.safetensors", BROKEN_MODULES[case])
    with pytest.raises(AdapterError, match=STEM):
        read_adapter(adapter)
    refused(folder, "inspect", adapter, names=STEM)
    refused(folder, "merge", base(folder), str(folder / "out.safetensors"), "--adapter", adapter, "--arch", "wan", names=STEM)
    for to in ("musubi", "diffusers", "comfyui"):
        refused(folder, "convert", adapter, str(folder / "out.safetensors"), "--to", to, names=STEM)


BROKEN_HEADERS = {
    "dims overflow int64 with no elements": json.dumps(
        {"x.lora_down.weight": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}).encode(),
    "dims beyond int64": json.dumps({"x.lora_down.weight": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}).encode(),
    "a bool as a dim": b'{"x.lora_down.weight": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}',
    "nested 100000 deep": b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}",
    "5000-digit dim": b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}',
    "5000-digit offset": b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"9" * 5000 + b"]}}",
    "dtype not a string": b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
    "not an object": b"[[[[]]]]",
}


@pytest.mark.parametrize("case", BROKEN_HEADERS)
def test_broken_headers_are_one_line(folder, case):
    path = raw(folder, "broken.safetensors", BROKEN_HEADERS[case])
    with pytest.raises(AdapterError, match="broken.safetensors"):
        read_adapter(path)
    refused(folder, "inspect", path, names="broken.safetensors")
    refused(folder, "merge", path, str(folder / "out.safetensors"), "--adapter", path, names="broken.safetensors")


@pytest.mark.parametrize("value", ['{"a": 1}', "5", "not json", "[" * 10000])
def test_odd_merge_records_are_kept_not_fatal(folder, value):
    """A base whose `comfyui_lycoris.merge` is not a JSON list still merges; the old value is kept."""
    path = write(folder, "base.safetensors", {WEIGHT: torch.randn(16, 16)}, metadata={"comfyui_lycoris.merge": value})
    adapter = write(folder, "a.safetensors", lora())
    code, _, err = run("merge", path, str(folder / "out.safetensors"), "--adapter", adapter, "--arch", "wan")
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(folder / "out.safetensors"), "pt") as f:
        records = json.loads(f.metadata()["comfyui_lycoris.merge"])
    assert len(records) == 2 and records[1]["adapter"] == "a.safetensors"


def test_peft_config_with_hostile_values(folder):
    tensors = {"base_model.model.blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 16),
               "base_model.model.blocks.0.self_attn.q.lora_B.weight": torch.randn(16, 4)}
    path = write(folder, "adapter_model.safetensors", tensors)
    for config in ({"peft_type": "LORA", "r": 4, "lora_alpha": 10**400},
                   {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "rank_pattern": {"(": 2}}):
        (folder / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(AdapterError, match="adapter_config.json"):
            read_adapter(path)


# ---------------------------------------------------------------------------------------------
# 3. Linear reading and name matching (counted, not timed)


def test_a_file_is_parsed_once_however_many_tensors_are_read(folder, monkeypatch):
    tensors = {}
    for i in range(300):
        tensors.update({f"lora_unet_blocks_{i}_self_attn_q.{k}": v for k, v in
                        {"lora_down.weight": torch.randn(1, 2), "lora_up.weight": torch.randn(2, 1), "alpha": torch.tensor(1.0)}.items()})
    path = write(folder, "many.safetensors", tensors)
    parses = []
    real = safetensors_io._header_json
    monkeypatch.setattr(safetensors_io, "_header_json", lambda *a: parses.append(1) or real(*a))
    adapter = read_adapter(path)
    assert adapter.nonfinite_counts() == {}
    for key in adapter.tensors:
        adapter.load(key)
    assert len(parses) == 1


def test_scan_finds_every_bad_value_in_long_runs(folder):
    """The NaN/Inf scan reads adjacent tensors together: every count must still land on its tensor."""
    tensors = {}
    for i in range(50):
        down, up = torch.randn(1, 3), torch.randn(3, 1).bfloat16()
        if i % 7 == 0:
            down[0, i % 3] = float("nan")
        if i % 11 == 0:
            up[:2] = float("inf")
        tensors.update({f"lora_unet_blocks_{i}_self_attn_q.lora_down.weight": down,
                        f"lora_unet_blocks_{i}_self_attn_q.lora_up.weight": up})
    adapter = read_adapter(write(folder, "bad.safetensors", tensors))
    want = {k: int((~torch.isfinite(v.float())).sum()) for k, v in tensors.items()}
    assert adapter.nonfinite_counts() == {k: n for k, n in want.items() if n}


@pytest.mark.parametrize("segments", [100, 10000])
def test_name_matching_does_not_grow_with_the_stem(monkeypatch, segments):
    """A stem of thousands of dotted segments is tried as no more paths than a template has segments."""
    naming = naming_for("wan")
    calls = []
    real = naming_module.Naming.places
    monkeypatch.setattr(naming_module.Naming, "places", lambda self, *a: calls.append(1) or real(self, *a))
    assert naming.place_of_stem("x." * segments + "blocks.0.self_attn.q").weight == "blocks.0.self_attn.q"
    assert len(calls) <= naming.max_segments
    calls.clear()
    assert naming.place_of_stem("a." * segments + "a") is None
    assert len(calls) <= 2 * naming.max_segments


def test_megabyte_keys_read(folder):
    for key in ("a_" * 500_000, "a." * 500_000, "lora_unet_" + "a_" * 500_000):
        path = write(folder, "long.safetensors", {f"{key}.lora_down.weight": torch.randn(2, 4), f"{key}.lora_up.weight": torch.randn(4, 2)})
        assert list(read_adapter(path).modules) == [key]


# ---------------------------------------------------------------------------------------------
# 4. No temporary file left behind

WRITE_THEN = """
import os, signal, sys
from comfyui_lycoris import cli
from comfyui_lycoris.lycoris_core import safetensors_io
{setup}
sys.exit(cli.main(sys.argv[1:]))
"""


def run_python(code: str, *argv: str, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, preexec_fn=preexec)


def temp_files(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="resource limits need POSIX")
def test_a_full_disk_leaves_no_temp_file_and_names_the_output(folder):
    """RLIMIT_FSIZE makes writes fail with EFBIG, as a full disk makes them fail with ENOSPC: both
    on a write and again when close() flushes the buffer."""
    import resource

    big = write(folder, "base.safetensors", {WEIGHT: torch.randn(16, 16), "big": torch.randn(256, 1024)})
    adapter = write(folder, "a.safetensors", lora())
    big_adapter = write(folder, "big_adapter.safetensors", lora(**{"lora_down.weight": torch.randn(64, 1024),
                                                                     "lora_up.weight": torch.randn(1024, 64)}))
    out = str(folder / "out.safetensors")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    for argv in (["merge", big, out, "--adapter", adapter, "--arch", "wan"], ["convert", big_adapter, out, "--to", "diffusers"]):
        result = run_python(WRITE_THEN.format(setup=""), *argv, preexec=limit)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and f"{out}: cannot write" in result.stderr, result.stderr
        assert temp_files(folder) == [] and not os.path.exists(out)


def test_sigterm_while_writing_removes_the_temp_file(folder):
    big = write(folder, "base.safetensors", {WEIGHT: torch.randn(16, 16), "z": torch.randn(64, 64)})
    adapter = write(folder, "a.safetensors", lora())
    setup = textwrap.dedent("""
        real = safetensors_io.SafetensorsWriter.write
        def write(self, name, tensor):
            real(self, name, tensor)
            os.kill(os.getpid(), signal.SIGTERM)  # what kill, timeout and docker stop send
        safetensors_io.SafetensorsWriter.write = write
    """)
    result = run_python(WRITE_THEN.format(setup=setup), "merge", big, str(folder / "out.safetensors"), "--adapter", adapter)
    assert result.returncode == 143 and result.stderr.strip() == "comfyui-lycoris merge: terminated", result.stderr
    assert temp_files(folder) == [] and not os.path.exists(folder / "out.safetensors")


def test_stale_temp_files_are_named_not_piled_up(folder):
    adapter = write(folder, "a.safetensors", lora())
    out = folder / "out.safetensors"
    stale = folder / ".out.safetensors.999999999.k3j2h1.tmp"  # a pid no process has
    stale.write_bytes(b"x" * 1000)
    live = folder / f".out.safetensors.{os.getpid()}.a1b2c3.tmp"  # a writer still at work
    live.write_bytes(b"y")
    assert stale_temp_files(out) == [str(stale)]
    code, stdout, err = run("merge", base(folder), str(out), "--adapter", adapter, "--arch", "wan")
    assert code == 0, err
    assert f"note: {stale} (0.00 GB) is left from an interrupted write; delete it" in stdout
    assert str(live) not in stdout


# ---------------------------------------------------------------------------------------------
# 5. The smaller ones


def test_output_may_not_replace_an_adapter(folder):
    adapter = write(folder, "a.safetensors", lora())
    refused(folder, "merge", base(folder), adapter, "--adapter", adapter, "--overwrite", "--arch", "wan",
            names="would replace an adapter")
    assert set(read_adapter(adapter).modules) == {STEM}


def test_an_adapter_as_base_is_named(folder):
    adapter = write(folder, "a.safetensors", lora())
    refused(folder, "merge", adapter, str(folder / "out.safetensors"), "--adapter", adapter, names="this is an adapter file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_without_blocking(folder):
    fifo = str(folder / "fifo.safetensors")
    os.mkfifo(fifo)
    adapter = write(folder, "a.safetensors", lora())
    out = str(folder / "out.safetensors")
    for argv in (["inspect", fifo], ["merge", fifo, out, "--adapter", adapter], ["convert", fifo, out, "--to", "musubi"]):
        result = run_python(WRITE_THEN.format(setup=""), *argv)  # a subprocess: a regression hangs it, not the suite
        assert result.returncode == 2 and "fifo.safetensors: not a regular file" in result.stderr, result.stderr


def test_key_and_metadata_text_cannot_drive_the_terminal(folder):
    forged = "evil\ncomfyui-lycoris merge: error: forged"
    path = write(folder, "nl.safetensors", {f"{forged}.lora_down.weight": torch.randn(4, 16),
                                            f"{forged}.lora_up.weight": torch.randn(16, 5)})
    err = refused(folder, "inspect", path, names="evil\\ncomfyui-lycoris")
    assert err.count("error:") == 2  # ours, and the forged text, escaped on the same line
    ok = write(folder, "esc.safetensors", lora(), metadata={"ss_output_name": "\x1b[31mred\x1b[0m\u202e", "x\x07": "bell"})
    code, stdout, _ = run("inspect", ok)
    assert code == 0 and "\x1b" not in stdout and "\x07" not in stdout and "\u202e" not in stdout
    assert "\\x1b[31mred" in stdout


def test_inspect_json_is_always_valid_json(folder):
    """A full-matrix LoKr's alpha is ignored by the scale, so a NaN there is legal, but JSON has no NaN."""
    path = write(folder, "nan.safetensors", {f"{STEM}.lokr_w1": torch.randn(4, 4), f"{STEM}.lokr_w2": torch.randn(4, 4),
                                             f"{STEM}.alpha": torch.tensor(float("nan"))})
    code, stdout, err = run("inspect", "--json", path)
    assert code == 0, err

    def no_constants(name):
        raise ValueError(f"bare {name} in the JSON")

    report = json.loads(stdout, parse_constant=no_constants)
    assert report["modules"][0]["alpha"] == "nan"


@pytest.mark.parametrize("name", ["a\0b.safetensors", "x" * 250 + ".safetensors"])
def test_output_names_that_cannot_be_files(folder, name):
    with pytest.raises(AdapterError, match="output"):
        check_output_path(str(folder / name), overwrite=False)
    with pytest.raises(AdapterError):
        save_tensors(str(folder / name), {"a": torch.zeros(1)})
    assert os.listdir(folder) == []


# ---------------------------------------------------------------------------------------------
# What the fuzzer found (tests/test_fuzz.py), kept as plain cases

WILD = os.path.join(os.path.dirname(__file__), "fixtures", "wild")


def test_a_bias_merge_that_overflows_is_caught(folder):
    """The bias is worked on in a copy: merging into an fp32 bias in place once hid its own overflow."""
    tensors = load_file(os.path.join(WILD, "comfy_wan_lokr.safetensors"))
    tensors["diffusion_model.blocks.0.cross_attn.k.diff_b"] = torch.full((16,), 3e38, dtype=torch.bfloat16)
    adapter = write(folder, "a.safetensors", tensors)
    base_file = os.path.join(WILD, "bases", "wan.comfyui.safetensors")
    refused(folder, "merge", base_file, str(folder / "out.safetensors"), "--adapter", f"{adapter}:1e38",
            names="blocks.0.cross_attn.k.bias gives 16 non-finite")


@pytest.mark.parametrize("bias", [torch.tensor(1.0), torch.ones(16, 1)])
def test_a_base_bias_of_another_shape_is_named(folder, bias):
    tensors = load_file(os.path.join(WILD, "bases", "wan.comfyui.safetensors"))
    tensors["blocks.0.cross_attn.k.bias"] = bias
    base_file = write(folder, "base.safetensors", tensors)
    refused(folder, "merge", base_file, str(folder / "out.safetensors"), "--adapter",
            os.path.join(WILD, "comfy_wan_lokr.safetensors"), names="not one value per row of blocks.0.cross_attn.k.weight")


@pytest.mark.parametrize("name", ["hada_w1_b", "hada_w2_a"])
def test_loha_factors_must_be_2d(folder, name):
    """LyCORIS stores LoHa factors 2-D (a kernel folded into the columns): a 3-D one only looked like it fit."""
    gen = torch.Generator().manual_seed(1)
    tensors = {f"{STEM}.hada_w1_a": torch.randn(16, 4, generator=gen), f"{STEM}.hada_w1_b": torch.randn(4, 16, generator=gen),
               f"{STEM}.hada_w2_a": torch.randn(16, 4, generator=gen), f"{STEM}.hada_w2_b": torch.randn(4, 16, generator=gen)}
    tensors[f"{STEM}.{name}"] = tensors[f"{STEM}.{name}"].unsqueeze(-1)
    with pytest.raises(AdapterError, match=rf"{STEM} \(loha\): .* must be 2-D"):
        read_adapter(write(folder, "a.safetensors", tensors))


def test_float64_beyond_float32_counts_as_nonfinite(folder):
    """The math runs in float32, where 1e300 is Inf: convert and merge refuse it like Inf itself."""
    adapter = write(folder, "a.safetensors", lora(**{"lora_up.weight": torch.full((16, 4), 1e300, dtype=torch.float64)}))
    assert read_adapter(adapter).nonfinite_counts() == {f"{STEM}.lora_up.weight": 64}
    refused(folder, "convert", adapter, str(folder / "out.safetensors"), "--to", "comfyui", names="beyond float32")
    refused(folder, "merge", base(folder), str(folder / "out.safetensors"), "--adapter", adapter, "--arch", "wan",
            names="beyond float32")


def test_unicode_line_separators_are_escaped(folder):
    path = write(folder, "a.safetensors", {**lora(), "junk\u2028key\u2029": torch.zeros(1)})
    err = refused(folder, "convert", path, str(folder / "out.safetensors"), "--to", "comfyui", names="junk\\u2028key\\u2029")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("pattern", ["(.*.*)*\\.z", "(a+)+", "(a|aa)+b", ".*a.*", "(a)\\1"])
def test_peft_patterns_that_could_stall_are_refused(folder, pattern):
    """rank_pattern / alpha_pattern are regular expressions from the file: nested repeats take exponential
    time on a long name, so they are refused, at once."""
    tensors = load_file(os.path.join(WILD, "peft_wan_loha_r4.safetensors"))
    config = json.dumps({"r": 4, "alpha_pattern": {pattern: 2}})
    path = write(folder, "p.safetensors", tensors, metadata={"lora_adapter_metadata": config})
    with pytest.raises(AdapterError, match="bounded time"):
        read_adapter(path)


def test_peft_patterns_in_use_still_match(folder):
    tensors = load_file(os.path.join(WILD, "peft_wan_loha_r4.safetensors"))
    config = json.dumps({"r": 4, "lora_alpha": 4, "alpha_pattern": {r"blocks\.0\.attn1\.to_q": 8, "to_k": 2}})
    adapter = read_adapter(write(folder, "p.safetensors", tensors, metadata={"lora_adapter_metadata": config}))
    scales = {stem.split("blocks.", 1)[1]: m.scale for stem, m in adapter.modules.items()}
    assert scales["0.attn1.to_q"] == 2.0 and scales["0.attn1.to_k"] == 0.5 and scales["0.attn1.to_v"] == 1.0
    assert scales["0.attn2.to_q"] == 1.0  # the pattern matches a whole dotted suffix, not any end of the path


def test_a_full_matrix_conv_lokr_takes_a_config_scale(folder):
    """ComfyUI's Conv3d LoKr arrangement has no row blocks; a PEFT config's scale still folds into w1."""
    tensors = {k: v for k, v in load_file(os.path.join(WILD, "comfy_wan_lokr.safetensors")).items() if not k.endswith(".alpha")}
    source = write(folder, "c.safetensors", tensors, metadata={"lora_adapter_metadata": json.dumps({"r": 4, "alpha": 2})})
    out = str(folder / "out.safetensors")
    code, _, err = run("convert", source, out, "--to", "comfyui")
    assert code == 0, err
    before, after = read_adapter(source), read_adapter(out)
    for stem, module in before.modules.items():
        assert torch.allclose(after.modules[stem].delta_weight(), module.delta_weight(), rtol=1e-3, atol=1e-6), stem


@pytest.mark.parametrize("layout, accepted", [((32, 1), True), ((32,), True), ((1, 16), True), ((16,), True),
                                              ((1, 32), False), ((2, 16), False), ((16, 2), False)])
def test_dora_scale_must_lie_along_its_axis(folder, layout, accepted):
    """Found by the long fuzz run: a magnitude with one value per output row but laid out as a row ([1, out])
    passed the count check and then failed inside the merge; it is refused when the file is read."""
    down, up = torch.randn(4, 16), torch.randn(32, 4)
    tensors = {"lora_unet_blocks_0_ffn_0.lora_down.weight": down, "lora_unet_blocks_0_ffn_0.lora_up.weight": up,
               "lora_unet_blocks_0_ffn_0.alpha": torch.tensor(4.0),
               "lora_unet_blocks_0_ffn_0.dora_scale": torch.rand(layout) + 0.5}
    path = write(folder, "d.safetensors", tensors)
    if accepted:
        module = read_adapter(path).modules["lora_unet_blocks_0_ffn_0"]
        weight = torch.randn(32, 16)
        module.bind().apply_(weight, 1.0)  # the math takes every layout the reader takes
        assert torch.isfinite(weight).all()
    else:
        with pytest.raises(AdapterError, match=r"dora_scale \[\d+, \d+\] is neither one value per output row"):
            read_adapter(path)


@pytest.mark.parametrize("extra", [',"__metadata__":{"a":"b"}', ',"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'])
def test_a_header_key_given_twice_is_refused(folder, extra):
    """Found by the long fuzz run: a second `__metadata__` (or a tensor named twice) makes the header mean two
    things; Python's json kept the last one, the safetensors library refuses the file. It is refused here too."""
    header = '{"__metadata__":{"x":"y"},"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}' + extra + "}"
    header += " " * (-len(header) % 8)
    path = folder / "dup.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\0\0\0\0")
    with pytest.raises(AdapterError, match=r"corrupt safetensors header \('(__metadata__|t)' appears twice\)"):
        read_adapter(str(path))
