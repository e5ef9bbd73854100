"""`merge`: Musubi's expected merges reproduced on bases in ComfyUI naming and in the original naming."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from comfyui_lycoris.lycoris_core import AdapterError, read_adapter
from comfyui_lycoris.lycoris_core.merge import MERGE_METADATA_KEY, merge, parse_adapter_arg
from comfyui_lycoris.lycoris_core.rows import Rows
from helpers import (
    ARCH_OF_PREFIX,
    MUSUBI,
    adapter_entries,
    comfy_base,
    expected_weights,
    module_paths,
    original_base,
    rel_err,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ENTRIES = adapter_entries()
COMFY_ENTRIES = [e for e in ENTRIES if e["arch_id"] != "framepack"]  # ComfyUI core has no FramePack model


def prefix_of(entry) -> str:
    return entry["file"].split("_loha_")[0].split("_lokr_")[0]


def run_merge(tmp_path, base_tensors, adapters, name="out.safetensors", metadata=None, **kwargs):
    base = tmp_path / "base.safetensors"
    save_file(base_tensors, str(base), metadata=metadata or {"base_note": "kept"})
    out = tmp_path / name
    result = merge(base, out, adapters, progress=False, **kwargs)
    return base, out, result


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_merge_onto_original_naming(entry, strength, tmp_path):
    expected = expected_weights(entry)
    base_tensors = original_base(expected)
    _, out, result = run_merge(tmp_path, base_tensors, [(MUSUBI / entry["file"], strength)])
    merged = load_file(str(out))
    assert list(merged) == list(load_file(str(tmp_path / "base.safetensors")))  # same keys, same order
    paths = module_paths(expected)
    for path in paths:
        assert rel_err(merged[f"{path}.weight"], expected[f"merged/{strength}/{path}.weight"]) <= 1e-5, path
    for key, tensor in base_tensors.items():
        if key[: -len(".weight")] not in paths:
            assert torch.equal(merged[key], tensor), f"{key} must stay untouched"
    assert result.tensors_changed == len(paths) and not result.plans[0].unmatched


@pytest.mark.parametrize("entry", COMFY_ENTRIES, ids=[e["file"] for e in COMFY_ENTRIES])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_merge_onto_comfyui_naming(entry, strength, tmp_path):
    arch = ARCH_OF_PREFIX[prefix_of(entry)]
    expected = expected_weights(entry)
    base_tensors, where = comfy_base(arch, expected, key_prefix="model.diffusion_model.")
    _, out, result = run_merge(tmp_path, base_tensors, [(MUSUBI / entry["file"], strength)])
    merged = load_file(str(out))
    touched = set()
    for path, (key, rows) in where.items():
        assert rel_err(merged[key][rows], expected[f"merged/{strength}/{path}.weight"]) <= 1e-5, path
        touched.add(key)
    for key, tensor in base_tensors.items():
        if key not in touched:
            assert torch.equal(merged[key], tensor), f"{key} must stay untouched"
    fused = [p for p in result.plans[0].patches if p.target.rows is not None]
    if arch in ("hunyuan_video_1_5", "z_image"):
        assert fused, "split q/k/v must land on slices of the fused weight"
    assert result.plans[0].architecture == arch


@pytest.mark.parametrize("name", ["hunyuan_video_lokr_r3_a2.safetensors", "hunyuan_video_1_5_loha_r4_a2.safetensors"])
def test_merge_onto_a_model_saved_by_comfyui(name, tmp_path):
    """ComfyUI's ModelSave writes HunyuanVideo (1.5) under `model.model.` (tests/integration checks the real one)."""
    entry = next(e for e in ENTRIES if e["file"] == name)
    arch = ARCH_OF_PREFIX[prefix_of(entry)]
    expected = expected_weights(entry)
    base_tensors, where = comfy_base(arch, expected, key_prefix="model.model.")
    _, out, result = run_merge(tmp_path, base_tensors, [(MUSUBI / entry["file"], 1.0)])
    merged = load_file(str(out))
    for path, (key, rows) in where.items():
        assert rel_err(merged[key][rows], expected[f"merged/1.0/{path}.weight"]) <= 1e-5, path
    assert result.plans[0].architecture == arch and not result.plans[0].unmatched


def test_output_keeps_dtypes_and_metadata_and_records_the_merge(tmp_path):
    entry = next(e for e in ENTRIES if e["file"] == "wan_lokr_r3_a2.safetensors")
    expected = expected_weights(entry)
    base_tensors = {k: v.to(torch.bfloat16) if "ffn" in k else v for k, v in original_base(expected).items()}
    base_tensors["blocks.0.self_attn.q.bias"] = torch.ones(10, dtype=torch.float16)
    _, out, _ = run_merge(tmp_path, base_tensors, [(MUSUBI / entry["file"], 0.5)], metadata={"modelspec.title": "tiny wan"})
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
        assert {k: f.get_slice(k).get_dtype() for k in f.keys()} == {
            k: {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[v.dtype] for k, v in base_tensors.items()
        }
    assert metadata["modelspec.title"] == "tiny wan"
    record = json.loads(metadata[MERGE_METADATA_KEY])
    assert record == [{"adapter": "wan_lokr_r3_a2.safetensors", "strength": 0.5, "architecture": "wan",
                       "format": "musubi", "modules_applied": 24, "modules_unmatched": 0}]
    merged = load_file(str(out))
    ffn = "blocks.1.ffn.2.weight"
    want = (base_tensors[ffn].float() + (expected[f"merged/0.5/{ffn}"] - expected[f"base/{ffn}"]))
    # bf16 base: fp32 math, one rounding
    ulp = torch.finfo(torch.bfloat16).eps * want.abs()
    assert ((merged[ffn].float() - want).abs() <= ulp).all()


def test_two_adapters_add_up(tmp_path):
    loha = next(e for e in ENTRIES if e["file"] == "z_image_loha_r4_a2.safetensors")
    lokr = next(e for e in ENTRIES if e["file"] == "z_image_lokr_r3_a2.safetensors")
    e1, e2 = expected_weights(loha), expected_weights(lokr)
    assert all(torch.equal(e1[k], e2[k]) for k in e1 if k.startswith("base/"))  # same tiny model
    base_tensors, where = comfy_base("z_image", e1)
    _, out, _ = run_merge(tmp_path, base_tensors, [(MUSUBI / loha["file"], 1.0), (MUSUBI / lokr["file"], 0.5)])
    merged = load_file(str(out))
    for path, (key, rows) in where.items():
        base = e1[f"base/{path}.weight"]
        want = base + (e1[f"merged/1.0/{path}.weight"] - base) + (e2[f"merged/0.5/{path}.weight"] - base)
        assert rel_err(merged[key][rows], want) <= 1e-5


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scale_key", ["scale_weight", "weight_scale", None])
def test_fp8_base_is_dequantized_merged_and_requantized(fp8, scale_key, tmp_path):
    entry = next(e for e in ENTRIES if e["file"] == "qwen_image_loha_r4_a2.safetensors")
    expected = expected_weights(entry)
    base_tensors = original_base(expected)
    scales = {}
    for key in list(base_tensors):
        if key.endswith(".weight") and "transformer_blocks" in key:
            scale = base_tensors[key].abs().max() / 64 if scale_key else torch.tensor(1.0)
            base_tensors[key] = (base_tensors[key] / scale).to(fp8)
            if scale_key:
                base_tensors[key[: -len("weight")] + scale_key] = scale.reshape(())
            scales[key] = scale
    _, out, result = run_merge(tmp_path, base_tensors, [(MUSUBI / entry["file"], 1.0)])
    merged = load_file(str(out))
    for path in module_paths(expected):
        key = f"{path}.weight"
        s = scales[key]
        assert merged[key].dtype == fp8
        delta = expected[f"merged/1.0/{key}"] - expected[f"base/{key}"]
        want = ((base_tensors[key].float() * s + delta) / s).clamp(-torch.finfo(fp8).max, torch.finfo(fp8).max).to(fp8)
        assert torch.equal(merged[key].float(), want.float()), key
        dequantized = merged[key].float() * s
        assert rel_err(dequantized, expected[f"merged/1.0/{key}"]) < 0.15  # fp8 resolution
    if scale_key:
        for key in base_tensors:
            if key.endswith(scale_key):
                assert torch.equal(merged[key], base_tensors[key])
    assert result.saturated == {}


def test_block_scaled_fp8_is_refused(tmp_path):
    entry = next(e for e in ENTRIES if e["file"] == "wan_loha_r4_a2.safetensors")
    base_tensors = original_base(expected_weights(entry))
    key = "blocks.0.self_attn.q.weight"
    base_tensors[key] = base_tensors[key].to(torch.float8_e4m3fn)
    base_tensors["blocks.0.self_attn.q.weight_scale"] = torch.ones(10, 1)
    with pytest.raises(AdapterError, match="block-scaled"):
        run_merge(tmp_path, base_tensors, [(MUSUBI / entry["file"], 1.0)])
    assert not (tmp_path / "out.safetensors").exists()


def test_wrong_architecture_names_both_and_writes_nothing(tmp_path):
    wan = next(e for e in ENTRIES if e["file"] == "wan_loha_r4_a2.safetensors")
    flux = next(e for e in ENTRIES if e["file"] == "flux_kontext_loha_r4_a2.safetensors")
    base_tensors, _ = comfy_base("flux", expected_weights(flux))
    with pytest.raises(AdapterError) as info:
        run_merge(tmp_path, base_tensors, [(MUSUBI / wan["file"], 1.0)])
    message = str(info.value)
    assert "Wan 2.1/2.2 (wan)" in message and "FLUX.1 dev / Kontext (flux)" in message
    assert os.listdir(tmp_path) == ["base.safetensors"]


def test_a_file_that_matches_nothing_fails(tmp_path, write_safetensors):
    adapter = write_safetensors({"lora_unet_nothing_here.lokr_w1": torch.randn(2, 2), "lora_unet_nothing_here.lokr_w2": torch.randn(5, 5)})
    base_tensors = {"some.layer.weight": torch.randn(10, 10)}
    with pytest.raises(AdapterError, match="none of its 1 modules matches a weight of the model"):
        run_merge(tmp_path, base_tensors, [(adapter, 1.0)], name="nothing.safetensors")
    assert not (tmp_path / "nothing.safetensors").exists()


def test_partial_match_lists_exactly_the_unmatched_modules(tmp_path, write_safetensors):
    entry = next(e for e in ENTRIES if e["file"] == "wan_lokr_r3_a2.safetensors")
    source = load_file(str(MUSUBI / entry["file"]))
    extra = {k.replace("blocks_1_", "blocks_7_"): v.clone() for k, v in source.items() if "blocks_1_self_attn" in k}
    adapter = write_safetensors({**source, **extra}, metadata={"ss_base_model_version": "wan"})
    expected = expected_weights(entry)
    _, out, result = run_merge(tmp_path, original_base(expected), [(adapter, 1.0)])
    plan = result.plans[0]
    assert sorted(plan.unmatched) == [f"lora_unet_blocks_7_self_attn_{p}" for p in "koqv"]
    assert len(plan.patches) == 24
    assert "unmatched lora_unet_blocks_7_self_attn_q" in result.summary()


def test_shape_mismatch_is_an_error_naming_module_and_shapes(tmp_path):
    entry = next(e for e in ENTRIES if e["file"] == "wan_loha_r4_a2.safetensors")
    base_tensors = original_base(expected_weights(entry))
    base_tensors["blocks.0.ffn.0.weight"] = torch.randn(48, 10)
    with pytest.raises(AdapterError, match=r"lora_unet_blocks_0_ffn_0 \(loha\) produces \[40, 10\] but blocks.0.ffn.0.weight is \[48, 10\]"):
        run_merge(tmp_path, base_tensors, [(MUSUBI / entry["file"], 1.0)])


def test_nan_adapter_is_refused_before_writing(tmp_path, write_safetensors):
    entry = next(e for e in ENTRIES if e["file"] == "wan_loha_r4_a2.safetensors")
    source = load_file(str(MUSUBI / entry["file"]))
    source["lora_unet_blocks_0_ffn_0.hada_w1_a"][0, 0] = float("nan")
    adapter = write_safetensors(source)
    with pytest.raises(AdapterError, match="non-finite"):
        run_merge(tmp_path, original_base(expected_weights(entry)), [(adapter, 1.0)])
    assert not (tmp_path / "out.safetensors").exists()


def test_existing_output_needs_overwrite(tmp_path):
    entry = next(e for e in ENTRIES if e["file"] == "wan_loha_r4_a2.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(AdapterError, match="output file exists"):
        run_merge(tmp_path, original_base(expected_weights(entry)), [(MUSUBI / entry["file"], 1.0)])
    assert out.read_bytes() == b"keep me"
    run_merge(tmp_path, original_base(expected_weights(entry)), [(MUSUBI / entry["file"], 1.0)], overwrite=True)
    assert out.read_bytes() != b"keep me"


def test_parse_adapter_arg():
    assert parse_adapter_arg("a.safetensors") == ("a.safetensors", 1.0, "")
    assert parse_adapter_arg("a.safetensors:0.5") == ("a.safetensors", 0.5, "")
    assert parse_adapter_arg("C:\\loras\\a.safetensors:-1") == ("C:\\loras\\a.safetensors", -1.0, "")
    assert parse_adapter_arg("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0, "")


def test_cli_merge_and_its_errors(tmp_path):
    entry = next(e for e in ENTRIES if e["file"] == "hunyuan_video_1_5_lokr_r3_a2.safetensors")
    expected = expected_weights(entry)
    base_tensors, where = comfy_base("hunyuan_video_1_5", expected)
    base = tmp_path / "base.safetensors"
    save_file(base_tensors, str(base))
    out = tmp_path / "merged.safetensors"
    cmd = [sys.executable, "-m", "comfyui_lycoris", "merge", str(base), str(out), "--adapter", f"{MUSUBI / entry['file']}:0.5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "28/28 modules matched" in done.stdout and "12 into slices of fused weights" in done.stdout
    merged = load_file(str(out))
    for path, (key, rows) in where.items():
        assert rel_err(merged[key][rows], expected[f"merged/0.5/{path}.weight"]) <= 1e-5
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "output file exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr


# ---------------------------------------------------------------------------------------------
# A fused module (ComfyUI-layout qkv) onto a base that stores q, k and v as separate weights


FUSED_LOHA = [e for e in ENTRIES if e["format"] == "musubi" and e["algorithm"] == "loha"
              and e["arch_id"] in ("z_image", "hunyuan_video_1_5")]


@pytest.mark.parametrize("entry", FUSED_LOHA, ids=[e["file"] for e in FUSED_LOHA])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_fused_comfyui_loha_merges_onto_split_original_naming(entry, strength, tmp_path):
    from comfyui_lycoris.convert import convert_file

    fused_file = tmp_path / "comfyui.safetensors"
    convert_file(MUSUBI / entry["file"], fused_file, "comfyui")
    fused_stems = [s for s in read_adapter(fused_file).modules if s.endswith("qkv")]
    assert fused_stems, "the ComfyUI layout fuses q/k/v"
    expected = expected_weights(entry)
    base_tensors = original_base(expected)
    _, out, result = run_merge(tmp_path, base_tensors, [(fused_file, strength)])
    merged = load_file(str(out))
    for path in module_paths(expected):
        assert rel_err(merged[f"{path}.weight"], expected[f"merged/{strength}/{path}.weight"]) <= 1e-5, path
    plan = result.plans[0]
    assert not plan.unmatched
    split = {p.stem for p in plan.patches if p.target.source_rows is not None}
    assert split == set(fused_stems)
    assert plan.modules_applied == len(read_adapter(fused_file).modules)
    assert f"{len(split)} fused modules split over separate weights" in plan.summary()


def _split_zimage_base(gen, bias=False):
    base = {}
    for p in "qkv":
        base[f"layers.0.attention.to_{p}.weight"] = torch.randn(10, 10, generator=gen)
        if bias:
            base[f"layers.0.attention.to_{p}.bias"] = torch.randn(10, generator=gen)
    base["layers.0.attention.to_out.0.weight"] = torch.randn(10, 10, generator=gen)
    base["layers.0.feed_forward.w1.weight"] = torch.randn(20, 10, generator=gen)
    base["noise_refiner.0.attention.to_q.weight"] = torch.randn(10, 10, generator=gen)
    return base


@pytest.mark.parametrize("w2_rows", [6, 10, 15], ids=["blocks-straddle-parts", "blocks-align", "wide-blocks"])
def test_fused_lokr_onto_split_weights_takes_its_rows(w2_rows, tmp_path, write_safetensors):
    """A LoKr on ComfyUI's fused qkv: each split weight gets exactly its rows of kron(w1, w2),
    also where a kron row block straddles two parts."""
    gen = torch.Generator().manual_seed(5)
    stem = "diffusion_model.layers.0.attention.qkv"
    adapter = write_safetensors({f"{stem}.lokr_w1": torch.randn(30 // w2_rows, 2, generator=gen),
                                 f"{stem}.lokr_w2": torch.randn(w2_rows, 5, generator=gen)})
    base = _split_zimage_base(gen)
    _, out, result = run_merge(tmp_path, base, [(adapter, 0.7)], architecture="z_image")
    merged = load_file(str(out))
    delta = read_adapter(adapter).modules[stem].delta_weight()
    for i, p in enumerate("qkv"):
        key = f"layers.0.attention.to_{p}.weight"
        assert rel_err(merged[key], base[key] + 0.7 * delta[10 * i : 10 * (i + 1)]) <= 1e-6, key
    for key in set(base) - {f"layers.0.attention.to_{p}.weight" for p in "qkv"}:
        assert torch.equal(merged[key], base[key]), key
    assert [p.target.source_rows for p in result.plans[0].patches] == [Rows(0, 10), Rows(10, 20), Rows(20, 30)]


def test_fused_diff_with_bias_onto_split_weights(tmp_path, write_safetensors):
    gen = torch.Generator().manual_seed(6)
    stem = "diffusion_model.layers.0.attention.qkv"
    diff, diff_b = torch.randn(30, 10, generator=gen), torch.randn(30, generator=gen)
    adapter = write_safetensors({f"{stem}.diff": diff, f"{stem}.diff_b": diff_b})
    base = _split_zimage_base(gen, bias=True)
    _, out, _ = run_merge(tmp_path, base, [(adapter, 0.5)], architecture="z_image")
    merged = load_file(str(out))
    for i, p in enumerate("qkv"):
        rows = slice(10 * i, 10 * (i + 1))
        w, b = f"layers.0.attention.to_{p}.weight", f"layers.0.attention.to_{p}.bias"
        assert rel_err(merged[w], base[w] + 0.5 * diff[rows]) <= 1e-6
        assert rel_err(merged[b], base[b] + 0.5 * diff_b[rows]) <= 1e-6


def test_fused_dora_onto_split_weights_is_listed_unmatched(tmp_path, write_safetensors):
    gen = torch.Generator().manual_seed(8)
    fused, plain = "diffusion_model.layers.0.attention.qkv", "diffusion_model.layers.0.attention.out"
    t = {f"{fused}.lokr_w1": torch.randn(3, 2, generator=gen), f"{fused}.lokr_w2": torch.randn(10, 5, generator=gen),
         f"{fused}.dora_scale": torch.rand(30, 1, generator=gen) + 0.5,
         f"{plain}.lokr_w1": torch.randn(2, 2, generator=gen), f"{plain}.lokr_w2": torch.randn(5, 5, generator=gen)}
    adapter = write_safetensors(t)
    base = _split_zimage_base(gen)
    _, out, result = run_merge(tmp_path, base, [(adapter, 1.0)], architecture="z_image")
    plan = result.plans[0]
    assert list(plan.unmatched) == [fused]
    assert "DoRA" in plan.unmatched[fused] and "layers.0.attention.qkv" in plan.unmatched[fused]
    merged = load_file(str(out))
    for p in "qkv":
        key = f"layers.0.attention.to_{p}.weight"
        assert torch.equal(merged[key], base[key])


def test_parts_that_cannot_be_one_fused_weight_are_not_split(tmp_path, write_safetensors):
    """q, k, v of unequal heights are not the thirds of ComfyUI's qkv: the fused module matches nothing."""
    gen = torch.Generator().manual_seed(10)
    stem, other = "diffusion_model.layers.0.attention.qkv", "diffusion_model.layers.0.attention.out"
    adapter = write_safetensors({
        f"{stem}.lokr_w1": torch.randn(2, 2, generator=gen), f"{stem}.lokr_w2": torch.randn(14, 5, generator=gen),
        f"{other}.lokr_w1": torch.randn(2, 2, generator=gen), f"{other}.lokr_w2": torch.randn(5, 5, generator=gen),
    })
    base = _split_zimage_base(gen)
    base["layers.0.attention.to_k.weight"] = torch.randn(8, 10, generator=gen)
    _, _, result = run_merge(tmp_path, base, [(adapter, 1.0)], architecture="z_image")
    assert list(result.plans[0].unmatched) == [stem]


def test_a_fused_weight_the_model_has_is_not_split(tmp_path, write_safetensors):
    """Parts present next to their fused weight: the fused name means the fused weight."""
    gen = torch.Generator().manual_seed(9)
    stem = "diffusion_model.layers.0.attention.qkv"
    adapter = write_safetensors({f"{stem}.lokr_w1": torch.randn(3, 2, generator=gen),
                                 f"{stem}.lokr_w2": torch.randn(10, 5, generator=gen)})
    base = _split_zimage_base(gen)
    base["layers.0.attention.qkv.weight"] = torch.randn(30, 10, generator=gen)
    _, out, result = run_merge(tmp_path, base, [(adapter, 1.0)], architecture="z_image")
    (patch,) = result.plans[0].patches
    assert patch.target.key == "layers.0.attention.qkv.weight" and patch.target.source_rows is None


def test_progress_reaches_the_total_and_a_raising_callback_writes_nothing(tmp_path):
    entry = next(e for e in ENTRIES if e["file"] == "wan_lokr_r3_a2.safetensors")
    base_tensors = original_base(expected_weights(entry))
    seen = []
    run_merge(tmp_path, base_tensors, [(MUSUBI / entry["file"], 1.0)], on_progress=lambda done, total: seen.append((done, total)))
    total = sum(t.numel() * t.element_size() for t in base_tensors.values())
    assert len(seen) == len(base_tensors) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done > total // 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        run_merge(tmp_path, base_tensors, [(MUSUBI / entry["file"], 1.0)], name="cancelled.safetensors", on_progress=cancel)
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors", "out.safetensors"]  # no output, no temporary


@pytest.mark.parametrize("earlier, kept", [
    ("not json {", {"unreadable": "not json {"}), ("[1, 2", {"unreadable": "[1, 2"}), ('{"a dict": 1}', {"a dict": 1}),
])
def test_an_unreadable_merge_record_in_the_base_is_kept_not_fatal(earlier, kept, tmp_path):
    entry = next(e for e in ENTRIES if e["file"] == "wan_lokr_r3_a2.safetensors")
    base_tensors = original_base(expected_weights(entry))
    _, out, _ = run_merge(tmp_path, base_tensors, [(MUSUBI / entry["file"], 1.0)], metadata={MERGE_METADATA_KEY: earlier})
    with safe_open(str(out), "pt") as f:
        records = json.loads(f.metadata()[MERGE_METADATA_KEY])
    assert records[0] == kept
    assert records[1]["adapter"] == "wan_lokr_r3_a2.safetensors" and len(records) == 2
