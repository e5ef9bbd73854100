"""Files from the other trainers (tests/fixtures/wild/: SimpleTuner's LyCORIS, ai-toolkit, PEFT,
ComfyUI's own trainer, each made by that tool's own code), against their expected merges in
ComfyUI's naming: detection, the source and scale convention named, the merge, conversions.

The real-ComfyUI loader runs of the same files are in tests/integration/test_wild_files.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from comfyui_lycoris.convert import convert_file
from comfyui_lycoris.lycoris_core import AdapterError, read_adapter
from comfyui_lycoris.lycoris_core.detection import detect_adapter_architecture
from comfyui_lycoris.lycoris_core.merge import merge
from comfyui_lycoris.lycoris_core.naming import naming_for
from comfyui_lycoris.lycoris_core.plan import make_plan
from helpers import WILD, change_err, wild_changed_keys, wild_entries, wild_expected
from safetensors.torch import load_file, save_file

ENTRIES = wild_entries()
IDS = [e["file"] for e in ENTRIES]
SOURCE_WORDS = {"simpletuner": "SimpleTuner", "ai-toolkit": "ai-toolkit", "peft": "PEFT", "comfyui": "ComfyUI trainer"}


def base_path(entry):
    return WILD / entry["base"]


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_architecture_source_and_scale_convention(entry):
    adapter = read_adapter(WILD / entry["file"])
    assert adapter.architecture == entry["architecture"]
    shapes = {stem: m.shape for stem, m in adapter.modules.items()}
    assert detect_adapter_architecture(shapes, {}) == entry["architecture"]  # from keys (and shapes) alone
    assert SOURCE_WORDS[entry["source"]] in adapter.source
    assert not adapter.unknown_keys and not adapter.problems


@pytest.mark.parametrize("strength", ["1.0", "0.5"])
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_merge_onto_the_comfyui_base_is_exact(entry, strength, tmp_path):
    expected = wild_expected(entry)
    out = tmp_path / "merged.safetensors"
    result = merge(base_path(entry), out, [(WILD / entry["file"], float(strength))], progress=False)
    assert not result.plans[0].unmatched
    merged, base = load_file(str(out)), load_file(str(base_path(entry)))
    changed = wild_changed_keys(expected, strength)
    for key in changed:
        assert change_err(merged[key], expected[f"merged/{strength}/{key}"], expected[f"base/{key}"]) <= 1e-5, key
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in changed)


# What each conversion does with each file: exact, or refused for a reason the target cannot hold.
# Musubi's layout has no full differences (ComfyUI's trainer writes them for norms and biases), keeps
# FLUX / HunyuanVideo single-block linear1 and token-refiner qkv whole (separate q/k/v parts must be
# stacked: LoKr cannot be, a missing MLP part has no known size), and splits HunyuanVideo 1.5 q/k/v
# (a fused LoKr only splits on its kron row blocks). ComfyUI core maps no name onto slices of
# HunyuanVideo's fused weights.
REFUSED = {
    "musubi": {
        "comfy_wan_lokr": "holds no full differences", "comfy_hunyuan_video_loha": "holds no full differences",
        "comfy_hunyuan_video_1_5_lokr": "holds no full differences", "comfy_flux_loha": "holds no full differences",
        "comfy_flux2_lokr": "holds no full differences", "comfy_qwen_image_loha": "holds no full differences",
        "st_hunyuan_video_loha": "missing part", "st_flux_loha": "missing part",
        "peft_hunyuan_video_lokr_r4": "cannot be stacked", "aitk_flux_lokr_fullrank_fp16": "cannot be stacked",
        "peft_flux_lokr_r4": "cannot be stacked", "st_hunyuan_video_1_5_lokr": "cannot be stacked",
        "st_flux2_lokr": "cannot be stacked",
    },
    "comfyui": {
        "st_hunyuan_video_loha": "maps no name onto their row slices",
        "peft_hunyuan_video_lokr_r4": "maps no name onto their row slices",
        "st_hunyuan_video_1_5_lokr": "maps no name onto their row slices",
    },
}
REFUSED["diffusers"] = {  # Musubi's names again, but full differences are kept
    **{k: v for k, v in REFUSED["musubi"].items() if "full differences" not in v},
    "comfy_hunyuan_video_1_5_lokr": "do not line up",
}


@pytest.mark.parametrize("target", ["musubi", "diffusers", "comfyui"])
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_conversion_is_exact_or_refused_with_the_reason(entry, target, tmp_path):
    name = entry["file"].removesuffix(".safetensors")
    out = tmp_path / f"{name}.{target}.safetensors"
    reason = REFUSED[target].get(name)
    if reason:
        with pytest.raises(AdapterError, match=f"{reason}.*nothing written"):
            convert_file(WILD / entry["file"], out, target)
        assert not out.exists() and list(tmp_path.iterdir()) == []
        return
    convert_file(WILD / entry["file"], out, target)
    expected = wild_expected(entry)
    merged_path = tmp_path / "merged.safetensors"
    result = merge(base_path(entry), merged_path, [(out, 0.5)], progress=False)
    assert not result.plans[0].unmatched
    merged = load_file(str(merged_path))
    for key in wild_changed_keys(expected, "0.5"):
        assert change_err(merged[key], expected[f"merged/0.5/{key}"], expected[f"base/{key}"]) <= 1e-5, key


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["file"].removesuffix(".safetensors") not in REFUSED["musubi"]],
                         ids=lambda e: e["file"])
def test_round_trip_through_musubis_layout_loads_the_same_weights(entry, tmp_path):
    """wild file -> musubi layout -> the loader's plan and math on ComfyUI's model: the expected weights."""
    musubi_file = tmp_path / "musubi.safetensors"
    convert_file(WILD / entry["file"], musubi_file, "musubi")
    adapter = read_adapter(musubi_file)
    assert adapter.format == "musubi" and adapter.architecture == entry["architecture"]
    base = load_file(str(base_path(entry)))
    plan = make_plan(adapter, {k: tuple(v.shape) for k, v in base.items()})
    assert not plan.unmatched
    weights = {k: v.clone() for k, v in base.items()}
    for patch in plan.patches:
        target = weights[patch.target.key]
        rows = patch.target.rows
        patch.module.bind().apply_(target if rows is None else rows.of(target), 1.0, rows=patch.target.source_rows)
    expected = wild_expected(entry)
    for key in wild_changed_keys(expected):
        assert change_err(weights[key], expected[f"merged/1.0/{key}"], expected[f"base/{key}"]) <= 1e-5, key


# ---------------------------------------------------------------------------------------------
# PEFT's own scale convention: alpha / r from the adapter config, per module through its patterns


PEFT_LOHA = next(e for e in ENTRIES if e["file"] == "peft_wan_loha_r4.safetensors")


def _peft_copy(tmp_path, name="adapter.safetensors", metadata=None):
    path = tmp_path / name
    if metadata is None:
        shutil.copy(WILD / PEFT_LOHA["file"], path)
    else:
        save_file(load_file(str(WILD / PEFT_LOHA["file"])), str(path), metadata=metadata)
    return path


def _scaled_expectation(scale_of):
    """The reference merge at alpha = r (scale 1) gives ΔW; PEFT's merge at another scale is base + s·ΔW."""
    expected = wild_expected(PEFT_LOHA)
    return {k: (expected[f"base/{k}"], expected[f"base/{k}"] + scale_of(k) * (expected[f"merged/1.0/{k}"] - expected[f"base/{k}"]))
            for k in wild_changed_keys(expected)}


@pytest.mark.parametrize("where", ["beside", "peft_dir", "metadata"])
def test_peft_config_sets_alpha_over_r(tmp_path, where):
    config = {"peft_type": "LOHA", "r": 4, "alpha": 8, "alpha_pattern": {"blocks.0.attn1.to_q": 2},
              "rank_pattern": {r"attn2\.to_(k|v)": 2}}
    if where == "beside":
        path = _peft_copy(tmp_path)
        (tmp_path / "adapter.adapter_config.json").write_text(json.dumps(config))
    elif where == "peft_dir":  # what PEFT's save_pretrained writes
        path = _peft_copy(tmp_path, "adapter_model.safetensors")
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    else:  # diffusers' save_lora_weights puts the config in the file, fields prefixed by component
        prefixed = {f"transformer.{k}": v for k, v in config.items()}
        path = _peft_copy(tmp_path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(prefixed)})
    adapter = read_adapter(path)
    assert adapter.format == "peft" and "alpha / r" in adapter.scale_rule

    def scale(key):
        if key.startswith("blocks.0.self_attn.q."):  # diffusers attn1.to_q: its own alpha
            return 2 / 4
        if key.startswith(("blocks.0.cross_attn.k.", "blocks.0.cross_attn.v.")):  # r from rank_pattern
            return 8 / 2
        return 8 / 4

    out = tmp_path / "merged.safetensors"
    merge(base_path(PEFT_LOHA), out, [(path, 1.0)], progress=False)
    merged = load_file(str(out))
    for key, (base, want) in _scaled_expectation(scale).items():
        assert change_err(merged[key], want, base) <= 1e-5, key


def test_peft_without_config_is_scale_one_and_says_so():
    adapter = read_adapter(WILD / PEFT_LOHA["file"])
    assert {m.scale for m in adapter.modules.values()} == {1.0}
    assert "without its adapter config" in adapter.scale_rule


def test_a_broken_peft_config_is_a_clear_error(tmp_path):
    path = _peft_copy(tmp_path)
    (tmp_path / "adapter.adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 0, "alpha": 8}))
    with pytest.raises(AdapterError, match=r"adapter\.adapter_config\.json: r 0\.0 and alpha 8\.0 .* give no scale"):
        read_adapter(path)
    (tmp_path / "adapter.adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not a readable PEFT adapter config"):
        read_adapter(path)


def test_alphas_in_the_file_win_over_a_config(tmp_path):
    """A config only applies to files without alpha tensors (PEFT never writes them)."""
    source = WILD / "st_wan_lokr.safetensors"
    path = tmp_path / "adapter.safetensors"
    shutil.copy(source, path)
    (tmp_path / "adapter.adapter_config.json").write_text(json.dumps({"peft_type": "LOKR", "r": 4, "alpha": 1}))
    assert [m.scale for m in read_adapter(path).modules.values()] == [m.scale for m in read_adapter(source).modules.values()]


PEFT_LOKR = next(e for e in ENTRIES if e["file"] == "peft_qwen_image_lokr_r4.safetensors")  # both factors full


@pytest.mark.parametrize("target", ["musubi", "diffusers", "comfyui"])
@pytest.mark.parametrize("entry", [PEFT_LOHA, PEFT_LOKR], ids=["loha", "lokr-full-matrix"])
def test_conversions_keep_a_peft_config_scale(entry, target, tmp_path):
    """No layout but PEFT's reads a config: the scale is written as alpha = scale × rank, or, for LoKr
    with both factors full (scale 1 whatever alpha says), folded into w1."""
    path = tmp_path / "adapter.safetensors"
    shutil.copy(WILD / entry["file"], path)
    peft_type = "LOHA" if entry is PEFT_LOHA else "LOKR"
    (tmp_path / "adapter.adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 4, "alpha": 6}))
    out = tmp_path / f"converted.{target}.safetensors"
    convert_file(path, out, target)
    converted = read_adapter(out)
    assert not converted.scale_rule.startswith("PEFT")
    merged_path = tmp_path / "merged.safetensors"
    merge(base_path(entry), merged_path, [(out, 1.0)], progress=False)
    merged = load_file(str(merged_path))
    expected = wild_expected(entry)
    for key in wild_changed_keys(expected):
        base = expected[f"base/{key}"]
        want = base + 1.5 * (expected[f"merged/1.0/{key}"] - base)
        assert change_err(merged[key], want, base) <= 1e-5, key


def original_named(base: dict[str, torch.Tensor], arch_id: str) -> tuple[dict[str, torch.Tensor], dict]:
    """ComfyUI's base state dict in the original checkpoint's (Musubi's) naming: renamed weights,
    fused q/k/v cut into Musubi's separate layers. Returns (tensors, {new key: (ComfyUI key, rows)})."""
    naming = naming_for(arch_id)
    out, where = {}, {}
    for key, tensor in base.items():
        path, _, param = key.rpartition(".")
        if param not in ("weight", "bias"):  # bare parameters (pad tokens, modulation tables) keep their names
            out[key], where[key] = tensor, (key, slice(None))
            continue
        names = naming.musubi_names(path)
        if isinstance(names, str):
            out[f"{names}.{param}"] = tensor
            where[f"{names}.{param}"] = (key, slice(None))
            continue
        for name, rows in zip(names.names, names.rows(base[f"{path}.weight"].shape)):
            out[f"{name}.{param}"] = tensor[rows.start : rows.stop].clone()
            where[f"{name}.{param}"] = (key, slice(rows.start, rows.stop))
    return out, where


ORIGINAL_NAMING = [e for e in ENTRIES if e["architecture"] in ("hunyuan_video", "hunyuan_video_1_5", "z_image")]


@pytest.mark.parametrize("entry", ORIGINAL_NAMING, ids=lambda e: e["file"])
def test_merge_onto_a_base_in_the_original_naming(entry, tmp_path):
    """The same files onto the original checkpoint's naming (renamed layers, q/k/v stored apart):
    every changed weight is the expected one, wherever the base keeps its rows."""
    comfy = load_file(str(base_path(entry)))
    tensors, where = original_named(comfy, entry["architecture"])
    base = tmp_path / "original.safetensors"
    save_file(tensors, str(base))
    out = tmp_path / "merged.safetensors"
    result = merge(base, out, [(WILD / entry["file"], 1.0)], progress=False)
    merged = load_file(str(out))
    expected = wild_expected(entry)
    changed = set(wild_changed_keys(expected))
    unmatched = result.plans[0].unmatched
    # ComfyUI's trainer adapts norms too, which have no original-naming names in the records: listed, not dropped
    assert all(entry["source"] == "comfyui" and ("norm" in stem or "modulation" in stem) for stem in unmatched), unmatched
    for key, (comfy_key, rows) in where.items():
        if comfy_key in changed and not any(stem.endswith(comfy_key.rsplit(".", 1)[0]) for stem in unmatched):
            want, was = expected[f"merged/1.0/{comfy_key}"][rows], expected[f"base/{comfy_key}"][rows]
            assert change_err(merged[key], want, was) <= 1e-5, key
        elif comfy_key not in changed:
            assert torch.equal(merged[key], tensors[key]), key


def test_norm_diffs_land_on_rmsnorm_scales(tmp_path):
    """The original FLUX checkpoints (and ComfyUI before 0.28) name their RMSNorm weights `.scale`:
    a ComfyUI-trainer file's `.diff` on those norms lands there."""
    entry = next(e for e in ENTRIES if e["file"] == "comfy_flux_loha.safetensors")
    comfy = load_file(str(base_path(entry)))
    renamed = {k[: -len("weight")] + "scale" if k.endswith("_norm.weight") else k: v for k, v in comfy.items()}
    assert len(renamed.keys() - comfy.keys()) == 6
    base = tmp_path / "bfl.safetensors"
    save_file(renamed, str(base))
    out = tmp_path / "merged.safetensors"
    result = merge(base, out, [(WILD / entry["file"], 1.0)], progress=False)
    assert not result.plans[0].unmatched
    merged, expected = load_file(str(out)), wild_expected(entry)
    for key in wild_changed_keys(expected):
        ours = key[: -len("weight")] + "scale" if key.endswith("_norm.weight") else key
        assert change_err(merged[ours], expected[f"merged/1.0/{key}"], expected[f"base/{key}"]) <= 1e-5, key
