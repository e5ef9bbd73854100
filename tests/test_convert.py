"""`convert`: Musubi <-> Diffusers <-> ComfyUI layouts, exact and streamed.

References nobody here wrote: the Musubi fixtures (sources, the Diffusers copies Musubi's own
`convert_lora.py --target other` wrote, and Musubi's merge expectations) and ComfyUI core's real LoRA
key maps (tests/fixtures/comfyui_models/<arch>.lora_key_map.json, dumped from ComfyUI 0.28.0).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from comfyui_lycoris.cli import main
from comfyui_lycoris.convert import CONVERTED_FROM_KEY, convert_file, plan_conversion
from comfyui_lycoris.lycoris_core import AdapterError, read_adapter, safetensors_io
from comfyui_lycoris.lycoris_core.architectures import Architecture, same
from comfyui_lycoris.lycoris_core.naming import Naming
from helpers import (
    ARCH_OF_PREFIX,
    COMFY_MODELS,
    MUSUBI,
    adapter_entries,
    comfy_location,
    comfy_names,
    expected_weights,
    module_paths,
    rel_err,
)
from safetensors import safe_open
from safetensors.torch import save_file

ENTRIES = adapter_entries()
SOURCES = [e for e in ENTRIES if e["format"] == "musubi"]
COPIES = [e for e in ENTRIES if e["format"] == "diffusers"]
def IDS(entry):
    return entry["file"]

# The key suffixes ComfyUI core's `load_lora` consumes (comfy/lora.py, comfy/weight_adapter/*), by hand.
CORE_SUFFIXES = {
    "alpha", "dora_scale", "diff", "diff_b",
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
}


def arch_of(entry) -> str:
    return ARCH_OF_PREFIX[entry["file"].split("_loha_")[0].split("_lokr_")[0].split("_lora_")[0]]


def load(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 (not a dict)


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_file_content(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key, tensor in a.items():
        assert tensor.dtype == b[key].dtype and tensor.shape == b[key].shape, key
        assert raw(tensor) == raw(b[key]), key


def without_record(metadata: dict) -> dict:
    return {k: v for k, v in metadata.items() if k != CONVERTED_FROM_KEY}


def convert(tmp_path, source, to, name=None, **kwargs):
    out = tmp_path / (name or f"{to}_{os.path.basename(str(source))}")
    result = convert_file(source, out, to, **kwargs)
    return out, result


# ---------------------------------------------------------------------------------------------
# Round trips: bit-exact for LoHa/LoKr


@pytest.mark.parametrize("prefix", ["diffusion_model", "transformer"])
@pytest.mark.parametrize("entry", SOURCES, ids=IDS)
def test_musubi_diffusers_musubi_is_bit_exact(entry, prefix, tmp_path):
    source = MUSUBI / entry["file"]
    middle, _ = convert(tmp_path, source, "diffusers", prefix=prefix)
    back, result = convert(tmp_path, middle, "musubi")
    original, original_md = load(source)
    tensors, metadata = load(back)
    assert_same_file_content(tensors, original)
    assert without_record(metadata) == original_md
    assert result.counts["renamed"] == entry["module_count"]


# HunyuanVideo 1.5 LoKr has no exact ComfyUI layout: test_hunyuan_video_1_5_lokr_to_comfyui_is_refused
COMFY_REPRESENTABLE = [e for e in SOURCES if e["file"] != "hunyuan_video_1_5_lokr_r3_a2.safetensors"]


@pytest.mark.parametrize("entry", COMFY_REPRESENTABLE, ids=IDS)
def test_musubi_comfyui_musubi_is_bit_exact(entry, tmp_path):
    """Fused LoHa q/k/v comes back out of its block-diagonal form; LoKr slices keep their names."""
    source = MUSUBI / entry["file"]
    middle, forward = convert(tmp_path, source, "comfyui")
    back, backward = convert(tmp_path, middle, "musubi", arch=arch_of(entry))
    original, _ = load(source)
    assert_same_file_content(load(back)[0], original)
    assert backward.counts["split"] == 3 * forward.counts["fused"]


@pytest.mark.parametrize("name", ["z_image_loha_r4_a2.safetensors", "hunyuan_video_1_5_loha_r4_a2.safetensors"])
def test_bf16_fused_round_trip_keeps_dtypes(name, tmp_path, write_safetensors):
    tensors, metadata = load(MUSUBI / name)
    source = write_safetensors({k: v.to(torch.bfloat16) for k, v in tensors.items()}, metadata)
    middle, _ = convert(tmp_path, source, "comfyui")
    assert {t.dtype for t in load(middle)[0].values()} == {torch.bfloat16}  # 3 x alpha 2 = 6 fits bf16
    back, _ = convert(tmp_path, middle, "musubi")
    assert_same_file_content(load(back)[0], load(source)[0])


@pytest.mark.parametrize("entry", COPIES, ids=IDS)
def test_musubis_diffusers_copies_read_back_to_the_source_bytes(entry, tmp_path):
    """Musubi's `--target other` output, wrong dotted names included, converts back to the exact source."""
    back, _ = convert(tmp_path, MUSUBI / entry["file"], "musubi")
    assert_same_file_content(load(back)[0], load(MUSUBI / entry["source"])[0])


# ---------------------------------------------------------------------------------------------
# The diffusers layout against Musubi's own converter


@pytest.mark.parametrize("entry", [e for e in COPIES if e["names_correct"]], ids=IDS)
def test_diffusers_output_equals_musubis_convert_lora(entry, tmp_path):
    out, _ = convert(tmp_path, MUSUBI / entry["source"], "diffusers", prefix=entry["diffusers_prefix"])
    ours, our_md = load(out)
    musubis, musubi_md = load(MUSUBI / entry["file"])
    assert_same_file_content(ours, musubis)
    assert without_record(our_md) == musubi_md


@pytest.mark.parametrize("entry", [e for e in COPIES if not e["names_correct"]], ids=IDS)
def test_diffusers_output_fixes_musubis_wrong_names(entry, tmp_path):
    """FLUX double-block attention and FramePack: Musubi's names are wrong; ours are the model's."""
    prefix = entry["diffusers_prefix"]
    out, _ = convert(tmp_path, MUSUBI / entry["source"], "diffusers", prefix=prefix)
    ours, _ = load(out)
    fixed = {f"{prefix}.{w['converted_as']}.": f"{prefix}.{w['module']}." for w in entry["wrong_names"]}
    musubis = {}
    for key, tensor in load(MUSUBI / entry["file"])[0].items():
        wrong = next((w for w in fixed if key.startswith(w)), None)
        musubis[key if wrong is None else fixed[wrong] + key[len(wrong):]] = tensor
    assert_same_file_content(ours, musubis)  # same numbers, right names

    expected = expected_weights(entry)
    paths = module_paths(expected)
    adapter = read_adapter(out)
    assert sorted(adapter.modules) == sorted(f"{prefix}.{p}" for p in paths)  # the real module paths
    for path in paths:
        for strength in (1.0, 0.5):
            weight = expected[f"base/{path}.weight"].clone()
            adapter.modules[f"{prefix}.{path}"].bind().apply_(weight, strength)
            assert rel_err(weight, expected[f"merged/{strength}/{path}.weight"]) <= 1e-5, path


# ---------------------------------------------------------------------------------------------
# The comfyui layout against ComfyUI core's real key maps


def assert_core_loads_completely(path, arch: str, base: dict, merged: dict) -> None:
    """Apply every module of `path` where ComfyUI core's key map sends it, on a model with ComfyUI's
    real weight names (fixture weights where adapted), and compare with the expected merged weights."""
    key_map = json.loads((COMFY_MODELS / f"{arch}.lora_key_map.json").read_text())
    gen = torch.Generator().manual_seed(3)
    weights = {f"diffusion_model.{k}": torch.randn(s, generator=gen) for k, s in comfy_names(arch).items()}
    where = {}
    for p, w in base.items():
        name, part = comfy_location(arch, p)
        key = f"diffusion_model.{name}"
        rows = slice(None) if part is None else slice(part * w.shape[0], (part + 1) * w.shape[0])
        weights[key][rows] = w
        where[p] = (key, rows)
    untouched = {k: v.clone() for k, v in weights.items()}

    adapter = read_adapter(path)
    assert adapter.unknown_keys == []
    for key in adapter.tensors:
        stem = next(key[: -len(s) - 1] for s in CORE_SUFFIXES if key.endswith("." + s))
        assert stem in adapter.modules, key
    for stem, module in adapter.modules.items():
        assert stem in key_map, f"ComfyUI core maps no weight to {stem}"
        target = key_map[stem]
        if isinstance(target, str):
            view = weights[target]
        else:
            key, (dim, offset, size) = target[0], target[1]
            assert dim == 0 and len(target) == 2, target
            view = weights[key][offset : offset + size]
        module.bind().apply_(view, 1.0)
    for p, want in merged.items():
        key, rows = where[p]
        assert rel_err(weights[key][rows], want) <= 1e-5, p
    changed = {where[p][0] for p in merged}
    for key, tensor in untouched.items():
        if key not in changed:
            assert torch.equal(weights[key], tensor), f"{key} must stay untouched"


@pytest.mark.parametrize("entry", [e for e in COMFY_REPRESENTABLE if e["arch_id"] != "framepack"], ids=IDS)
def test_comfyui_output_is_what_core_loads(entry, tmp_path):
    arch = arch_of(entry)
    out, result = convert(tmp_path, MUSUBI / entry["file"], "comfyui")
    expected = expected_weights(entry)
    paths = module_paths(expected)
    assert_core_loads_completely(
        out, arch, {p: expected[f"base/{p}.weight"] for p in paths}, {p: expected[f"merged/1.0/{p}.weight"] for p in paths}
    )
    if arch in ("hunyuan_video_1_5", "z_image") and entry["algorithm"] == "loha":
        assert result.counts["fused"] > 0  # q/k/v fused exactly, as ComfyUI's weight is
    if arch == "z_image" and entry["algorithm"] == "lokr":
        assert result.counts["kept as slices"] == 6  # core maps layers.N.attention.to_q/k/v onto slices


def test_hunyuan_video_1_5_lokr_to_comfyui_is_refused(tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(AdapterError) as info:
        convert_file(MUSUBI / "hunyuan_video_1_5_lokr_r3_a2.safetensors", out, "comfyui")
    message = str(info.value)
    assert "\n" not in message
    assert "lora_unet_double_blocks_0_img_attn_q" in message and "double_blocks.0.img_attn.qkv" in message
    assert "LoKr" in message and "nothing written" in message
    assert os.listdir(tmp_path) == []


def test_framepack_comfyui_layout_uses_musubis_module_paths(tmp_path):
    """ComfyUI core has no FramePack model; the wrappers' models use Musubi's names."""
    entry = next(e for e in SOURCES if e["arch_id"] == "framepack")
    out, result = convert(tmp_path, MUSUBI / entry["file"], "comfyui")
    paths = module_paths(expected_weights(entry))
    assert sorted(read_adapter(out).modules) == sorted(f"diffusion_model.{p}" for p in paths)
    assert any("no FramePack model" in note for note in result.notes)


# ---------------------------------------------------------------------------------------------
# LoRA (made here: random factors on every fixture architecture's layers)


def lora_file(tmp_path, entry, dtype=torch.float32, alpha=2.0, rank=4) -> tuple[str, dict, dict]:
    """A Musubi-layout LoRA on the layers of a fixture; returns (path, base {P: W}, merged {P: W'})."""
    expected = expected_weights(entry)
    gen = torch.Generator().manual_seed(11)
    tensors, base, merged = {}, {}, {}
    for path in module_paths(expected):
        weight = expected[f"base/{path}.weight"]
        stem = "lora_unet_" + path.replace(".", "_")
        down = torch.randn(rank, weight.shape[1], generator=gen).to(dtype)
        up = torch.randn(weight.shape[0], rank, generator=gen).to(dtype)
        tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha, dtype=dtype)})
        base[path] = weight
        merged[path] = (weight.double() + alpha / rank * (up.double() @ down.double())).float()
    path = tmp_path / f"{entry['file'].split('_lo')[0]}_lora_r{rank}.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": entry["ss_base_model_version"], "ss_network_module": "networks.lora"})
    return str(path), base, merged


LORA_ARCHS = [e for e in SOURCES if e["algorithm"] == "loha"]  # one per architecture


def delta(module) -> torch.Tensor:
    return module.delta_weight().double()


@pytest.mark.parametrize("entry", LORA_ARCHS, ids=lambda e: e["arch_id"])
def test_lora_diffusers_folds_alpha_and_comes_back(entry, tmp_path):
    source, _, _ = lora_file(tmp_path, entry)
    paths = module_paths(expected_weights(entry))
    middle, result = convert(tmp_path, source, "diffusers")
    assert result.counts["LoRA alphas folded"] == len(paths)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in load(middle)[0])  # no alpha keys
    original, folded = read_adapter(source), read_adapter(middle)
    for path in paths:
        module, twin = original.modules["lora_unet_" + path.replace(".", "_")], folded.modules[f"diffusion_model.{path}"]
        assert twin.alpha is None and twin.scale == 1.0
        assert rel_err(delta(twin), delta(module)) <= 1e-6, path
        # each factor carries sqrt(alpha / rank), Musubi's convention
        up, folded_up = (m.source(m.params["up"].name) for m in (module, twin))
        assert torch.allclose(folded_up, up * 0.5**0.5, rtol=1e-6, atol=0)

    back, result = convert(tmp_path, middle, "musubi")
    assert result.counts["LoRA alphas set to rank"] == len(paths)
    returned = read_adapter(back)
    assert sorted(returned.modules) == sorted(original.modules)
    for stem, module in returned.modules.items():
        assert module.alpha == module.rank == 4 and module.scale == 1.0
        assert rel_err(delta(module), delta(original.modules[stem])) <= 1e-6, stem


@pytest.mark.parametrize("entry", [e for e in LORA_ARCHS if e["arch_id"] != "framepack"], ids=lambda e: e["arch_id"])
def test_lora_comfyui_output_is_what_core_loads(entry, tmp_path):
    source, base, merged = lora_file(tmp_path, entry)
    out, _ = convert(tmp_path, source, "comfyui")
    assert_core_loads_completely(out, arch_of(entry), base, merged)
    back, _ = convert(tmp_path, out, "musubi", arch=arch_of(entry))
    assert_same_file_content(load(back)[0], load(source)[0])  # fused q/k/v LoRA comes apart exactly


def test_lora_bf16_keeps_dtype_and_folds_like_musubi(tmp_path):
    entry = next(e for e in LORA_ARCHS if e["arch_id"] == "wan")
    source, _, _ = lora_file(tmp_path, entry, dtype=torch.bfloat16, alpha=8.0, rank=4)
    out, _ = convert(tmp_path, source, "diffusers", prefix="transformer")
    src, _ = load(source)
    ours, _ = load(out)
    stem = "lora_unet_blocks_0_self_attn_q"
    scale = (src[f"{stem}.alpha"] / 4).sqrt()  # Musubi's arithmetic, in the alpha's dtype
    assert ours["transformer.blocks.0.self_attn.q.lora_A.weight"].dtype == torch.bfloat16
    assert torch.equal(ours["transformer.blocks.0.self_attn.q.lora_A.weight"], src[f"{stem}.lora_down.weight"] * scale)
    assert torch.equal(ours["transformer.blocks.0.self_attn.q.lora_B.weight"], src[f"{stem}.lora_up.weight"] * scale)


# ---------------------------------------------------------------------------------------------
# Fusing and splitting files made elsewhere


def test_fused_comfyui_loha_from_another_trainer_splits_exactly(tmp_path, write_safetensors):
    """A ComfyUI-layout Z-Image LoHa on the fused qkv (not block-diagonal) becomes Musubi's to_q/k/v."""
    gen = torch.Generator().manual_seed(2)
    stem = "diffusion_model.layers.1.attention.qkv"
    t = {f"{stem}.hada_w1_a": torch.randn(30, 4, generator=gen), f"{stem}.hada_w1_b": torch.randn(4, 10, generator=gen),
         f"{stem}.hada_w2_a": torch.randn(30, 4, generator=gen), f"{stem}.hada_w2_b": torch.randn(4, 10, generator=gen),
         f"{stem}.alpha": torch.tensor(3.0)}
    source = write_safetensors(t)
    out, result = convert(tmp_path, source, "musubi", arch="z_image")
    fused = read_adapter(source).modules[stem].delta_weight()
    parts = read_adapter(out).modules
    assert result.counts["split"] == 3
    for i, p in enumerate("qkv"):
        module = parts[f"lora_unet_layers_1_attention_to_{p}"]
        assert module.rank == 4 and module.alpha == 3.0
        assert torch.equal(module.delta_weight(), fused[10 * i : 10 * (i + 1)])


def test_fused_lokr_splits_only_on_kron_row_blocks(tmp_path, write_safetensors):
    gen = torch.Generator().manual_seed(4)
    stem = "diffusion_model.layers.0.attention.qkv"
    aligned = write_safetensors({f"{stem}.lokr_w1": torch.randn(3, 2, generator=gen), f"{stem}.lokr_w2": torch.randn(10, 5, generator=gen)})
    out, _ = convert(tmp_path, aligned, "musubi", arch="z_image")
    fused = read_adapter(aligned).modules[stem].delta_weight()
    parts = read_adapter(out).modules
    for i, p in enumerate("qkv"):
        assert torch.equal(parts[f"lora_unet_layers_0_attention_to_{p}"].delta_weight(), fused[10 * i : 10 * (i + 1)])

    misaligned = write_safetensors({f"{stem}.lokr_w1": torch.randn(5, 2, generator=gen), f"{stem}.lokr_w2": torch.randn(6, 5, generator=gen)})
    with pytest.raises(AdapterError, match=r"blocks of 6 rows.*nothing written"):
        convert(tmp_path, misaligned, "musubi", name="misaligned.safetensors", arch="z_image")
    assert not (tmp_path / "misaligned.safetensors").exists()


def flux_split_file(write_safetensors, algorithm: str, parts=("to_q", "to_k", "to_v"), family="transformer."):
    """A FLUX adapter in Diffusers naming: separate q/k/v where FLUX fuses them (as SimpleTuner writes)."""
    gen = torch.Generator().manual_seed(6)
    t = {}
    for p in parts:
        stem = f"{family}transformer_blocks.0.attn.{p}" if family.endswith(".") else f"{family}transformer_blocks_0_attn_{p}"
        if algorithm == "loha":
            for k in ("1", "2"):
                t[f"{stem}.hada_w{k}_a"] = torch.randn(10, 2, generator=gen)
                t[f"{stem}.hada_w{k}_b"] = torch.randn(2, 10, generator=gen)
            t[f"{stem}.alpha"] = torch.tensor(1.0)
        else:
            t[f"{stem}.lokr_w1"] = torch.randn(2, 2, generator=gen)
            t[f"{stem}.lokr_w2"] = torch.randn(5, 5, generator=gen)
    return write_safetensors(t)


def test_flux_diffusers_qkv_loha_fuses_into_musubis_qkv(tmp_path, write_safetensors):
    source = flux_split_file(write_safetensors, "loha", parts=("to_q", "to_v"))  # to_k absent: zero rows
    out, result = convert(tmp_path, source, "musubi", arch="flux")
    (stem, module), = read_adapter(out).modules.items()
    assert stem == "lora_unet_double_blocks_0_img_attn_qkv" and result.counts["fused"] == 1
    parts = read_adapter(source).modules
    fused = module.delta_weight()
    assert torch.allclose(fused[0:10], parts["transformer.transformer_blocks.0.attn.to_q"].delta_weight(), atol=1e-6)
    assert torch.equal(fused[10:20], torch.zeros(10, 10))
    assert torch.allclose(fused[20:30], parts["transformer.transformer_blocks.0.attn.to_v"].delta_weight(), atol=1e-6)


def test_flux_diffusers_qkv_lokr_keeps_core_slice_names(tmp_path, write_safetensors):
    source = flux_split_file(write_safetensors, "lokr", family="lycoris_")
    with pytest.raises(AdapterError, match=r"lycoris_transformer_blocks_0_attn_to_q.*LoKr"):
        convert(tmp_path, source, "musubi", arch="flux")
    out, _ = convert(tmp_path, source, "comfyui", arch="flux")
    key_map = json.loads((COMFY_MODELS / "flux.lora_key_map.json").read_text())
    stems = sorted(read_adapter(out).modules)
    assert stems == [f"transformer.transformer_blocks.0.attn.to_{p}" for p in "kqv"]
    assert [key_map[s] for s in stems] == [
        ["diffusion_model.double_blocks.0.img_attn.qkv.weight", [0, offset, 10]] for offset in (10, 0, 20)
    ]


def test_peft_lora_in_diffusers_naming_becomes_musubi(tmp_path, write_safetensors):
    """PEFT keys on Diffusers' Wan names (attn1.to_q, ffn.net.0.proj) land on Musubi's layers."""
    gen = torch.Generator().manual_seed(9)
    t = {"base_model.model.blocks.0.attn1.to_q.lora_A.default.weight": torch.randn(4, 10, generator=gen),
         "base_model.model.blocks.0.attn1.to_q.lora_B.default.weight": torch.randn(10, 4, generator=gen),
         "base_model.model.blocks.1.ffn.net.0.proj.lora_A.weight": torch.randn(4, 10, generator=gen),
         "base_model.model.blocks.1.ffn.net.0.proj.lora_B.weight": torch.randn(40, 4, generator=gen)}
    source = write_safetensors(t)
    out, _ = convert(tmp_path, source, "musubi", arch="wan")
    written, _ = load(out)
    assert sorted(written) == sorted(
        f"lora_unet_{m}.{p}" for m in ("blocks_0_self_attn_q", "blocks_1_ffn_0") for p in ("alpha", "lora_down.weight", "lora_up.weight")
    )
    assert torch.equal(written["lora_unet_blocks_1_ffn_0.lora_up.weight"], t["base_model.model.blocks.1.ffn.net.0.proj.lora_B.weight"])
    assert written["lora_unet_blocks_0_self_attn_q.alpha"].item() == 4.0  # PEFT stores no alpha: scale 1


def test_fusing_needs_one_scale(tmp_path, write_safetensors):
    entry = next(e for e in SOURCES if e["file"] == "hunyuan_video_1_5_loha_r4_a2.safetensors")
    tensors, metadata = load(MUSUBI / entry["file"])
    tensors["lora_unet_double_blocks_0_img_attn_k.alpha"] = torch.tensor(4.0)
    source = write_safetensors(tensors, metadata)
    with pytest.raises(AdapterError, match=r"scales differ.*lora_unet_double_blocks_0_img_attn_k: 1"):
        convert(tmp_path, source, "comfyui")


# ---------------------------------------------------------------------------------------------
# Metadata, streaming


def test_metadata_is_kept_and_each_conversion_recorded(tmp_path):
    entry = SOURCES[0]
    first, _ = convert(tmp_path, MUSUBI / entry["file"], "diffusers", prefix="transformer")
    second, _ = convert(tmp_path, first, "comfyui")
    _, metadata = load(second)
    assert without_record(metadata) == entry["metadata"]
    assert json.loads(metadata[CONVERTED_FROM_KEY]) == [
        {"source": entry["file"], "source_format": "musubi", "target": "diffusers", "architecture": "wan", "prefix": "transformer"},
        {"source": first.name, "source_format": "diffusers", "target": "comfyui", "architecture": "wan"},
    ]


def test_conversion_streams_each_tensor_once_in_file_order(tmp_path, monkeypatch):
    reads = []
    real_get = safetensors_io.SafetensorsReader.get
    monkeypatch.setattr(safetensors_io.SafetensorsReader, "get", lambda self, name: reads.append(name) or real_get(self, name))
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("the whole file was loaded"))
    source = MUSUBI / "qwen_image_lokr_r3_a2.safetensors"
    adapter = read_adapter(source)
    plan = plan_conversion(adapter, "diffusers")
    order = list(adapter.tensors)
    assert [order.index(k) for k in reads] == sorted(order.index(k) for k in reads)  # alphas, read while reading
    reads.clear()
    out, _ = convert(tmp_path, source, "diffusers")
    tensor_reads = [k for k in reads if not k.endswith(".alpha")]
    assert sorted(tensor_reads) == sorted(k for k in order if not k.endswith(".alpha"))  # each once
    assert [order.index(k) for k in tensor_reads] == sorted(order.index(k) for k in tensor_reads)
    assert [e.name for e in plan.layout] == list(load(out)[0])  # written as planned, front to back


# ---------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def test_existing_output_needs_overwrite(tmp_path):
    source = MUSUBI / SOURCES[0]["file"]
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(AdapterError, match="exists.*--overwrite"):
        convert_file(source, out, "diffusers")
    assert out.read_bytes() == b"keep me"
    convert_file(source, out, "diffusers", overwrite=True)
    assert len(load(out)[0]) == 120


def test_unknown_modules_are_listed_not_dropped(tmp_path, write_safetensors):
    tensors, metadata = load(MUSUBI / "wan_loha_r4_a2.safetensors")
    ffn = "lora_unet_blocks_0_ffn_0."
    tensors.update({"lora_unet_blocks_0_mystery_proj." + k[len(ffn):]: v.clone() for k, v in tensors.items() if k.startswith(ffn)})
    source = write_safetensors(tensors, metadata)
    with pytest.raises(AdapterError, match=r"1 modules match no layer of Wan.*lora_unet_blocks_0_mystery_proj"):
        convert(tmp_path, source, "comfyui", name="out.safetensors")
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(source)]


def test_keys_of_no_module_are_refused(tmp_path, write_safetensors):
    tensors, metadata = load(MUSUBI / "wan_loha_r4_a2.safetensors")
    tensors["lora_unet_blocks_0_ffn_0.reshape_weight"] = torch.ones(2)
    with pytest.raises(AdapterError, match="reshape_weight"):
        convert(tmp_path, write_safetensors(tensors, metadata), "diffusers")


def test_nonfinite_values_are_refused_with_counts(tmp_path, write_safetensors):
    tensors, metadata = load(MUSUBI / "z_image_loha_r4_a2.safetensors")
    tensors["lora_unet_layers_1_feed_forward_w2.hada_w1_a"][0, :3] = float("nan")
    tensors["lora_unet_layers_0_attention_to_k.hada_w2_b"][1, 1] = float("inf")
    source = write_safetensors(tensors, metadata)
    for to in ("musubi", "comfyui"):
        with pytest.raises(AdapterError, match=r"4 non-finite values.*hada_w1_a \(3\).*hada_w2_b \(1\)|4 non-finite values.*hada_w2_b \(1\).*hada_w1_a \(3\)"):
            convert(tmp_path, source, to, name="out.safetensors")
        assert sorted(os.listdir(tmp_path)) == [os.path.basename(source)]


def test_architecture_must_be_known(tmp_path, write_safetensors):
    # FLUX.1 and HunyuanVideo share ComfyUI's names for these layers: the file alone cannot tell
    gen = torch.Generator().manual_seed(8)
    source = write_safetensors({
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": torch.randn(3, 2, generator=gen),
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": torch.randn(10, 5, generator=gen),
        "diffusion_model.single_blocks.0.linear1.lokr_w1": torch.randn(7, 2, generator=gen),
        "diffusion_model.single_blocks.0.linear1.lokr_w2": torch.randn(10, 5, generator=gen),
    })
    assert read_adapter(source).architecture is None
    with pytest.raises(AdapterError, match=r"cannot tell the architecture.*pass --arch \(one of: wan, "):
        convert(tmp_path, source, "musubi")
    out, result = convert(tmp_path, source, "musubi", arch="flux")
    assert result.architecture == "flux"
    assert sorted(read_adapter(out).modules) == ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"]
    with pytest.raises(AdapterError, match="unknown architecture 'sdxl'"):
        convert(tmp_path, source, "musubi", name="x.safetensors", arch="sdxl")
    with pytest.raises(AdapterError, match="Kandinsky 5 is not supported"):
        convert(tmp_path, source, "musubi", name="x.safetensors", arch="kandinsky5")


def test_wrong_arch_override_lists_the_modules(tmp_path):
    with pytest.raises(AdapterError, match=r"20 modules match no layer of Wan 2.1/2.2.*lora_unet_double_blocks_0_img_attn_proj, .*\(and 14 more\)"):
        convert(tmp_path, MUSUBI / "flux_kontext_loha_r4_a2.safetensors", "diffusers", arch="wan")
    assert os.listdir(tmp_path) == []


def test_two_modules_for_one_layer_are_refused(tmp_path, write_safetensors):
    tensors, metadata = load(MUSUBI / "wan_lokr_r3_a2.safetensors")
    tensors.update({"diffusion_model.blocks.0.self_attn.q." + k.split(".", 1)[1]: v.clone() for k, v in tensors.items()
                    if k.startswith("lora_unet_blocks_0_self_attn_q.")})
    with pytest.raises(AdapterError, match=r"both adapt blocks\.0\.self_attn\.q"):
        convert(tmp_path, write_safetensors(tensors, metadata), "musubi")


def test_options_are_checked(tmp_path):
    source = MUSUBI / SOURCES[0]["file"]
    with pytest.raises(AdapterError, match="--prefix only applies to the diffusers layout"):
        convert_file(source, tmp_path / "a.safetensors", "musubi", prefix="transformer")
    with pytest.raises(AdapterError, match="unknown target layout"):
        convert_file(source, tmp_path / "a.safetensors", "kohya")
    with pytest.raises(AdapterError, match="would replace the input"):
        convert_file(source, source, "musubi", overwrite=True)
    assert os.listdir(tmp_path) == []


def test_a_name_that_fits_two_layers_is_an_error():
    arch = Architecture(id="toy", title="Toy", musubi_versions=(), default_excludes=(), names=same("a.b_c", "a_b.c"))
    names = Naming(arch)
    assert names.place_of_stem("diffusion_model.a.b_c").weight == "a.b_c"  # dotted names decide
    with pytest.raises(AdapterError, match=r"fits several layers of Toy \(a\.b_c, a_b\.c\)"):
        names.place_of_stem("lora_unet_a_b_c")


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_converts_and_reports(tmp_path, capsys):
    out = tmp_path / "z.safetensors"
    assert main(["convert", str(MUSUBI / "z_image_loha_r4_a2.safetensors"), str(out), "--to", "comfyui"]) == 0
    printed = capsys.readouterr().out
    assert "10 modules from 14" in printed and "6 fused" not in printed and "2 fused" in printed
    assert main(["convert", str(MUSUBI / "z_image_loha_r4_a2.safetensors"), str(out), "--to", "comfyui"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "output file exists" in err and "Traceback" not in err


def test_a_refusal_quotes_stems_with_braces_as_they_are(tmp_path, write_safetensors):
    """The refusal message names the modules even when their key prefix holds `{...}`."""
    gen = torch.Generator().manual_seed(3)
    prefix = "my{odd}.prefix"
    tensors = {}
    for p in "qk":  # HunyuanVideo 1.5 LoKr q/k: ComfyUI maps no name onto those slices
        tensors[f"{prefix}.double_blocks.0.img_attn_{p}.lokr_w1"] = torch.randn(2, 2, generator=gen)
        tensors[f"{prefix}.double_blocks.0.img_attn_{p}.lokr_w2"] = torch.randn(5, 5, generator=gen)
    source = write_safetensors(tensors, metadata={"ss_base_model_version": "hunyuan_video_1_5"})
    with pytest.raises(AdapterError, match=r"my\{odd\}\.prefix\.double_blocks\.0\.img_attn_q.*nothing written"):
        convert_file(source, tmp_path / "out.safetensors", "comfyui")


def test_the_slices_note_names_the_algorithm_kept_as_slices(tmp_path, write_safetensors):
    """LoHa parts with different scales cannot be fused into one module: kept as slices, said as LoHa."""
    gen = torch.Generator().manual_seed(4)
    tensors = {}
    for p, alpha in zip("qkv", (1.0, 2.0, 3.0)):
        stem = f"transformer.transformer_blocks.0.attn.to_{p}"
        tensors.update({f"{stem}.hada_w1_a": torch.randn(10, 2, generator=gen), f"{stem}.hada_w1_b": torch.randn(2, 10, generator=gen),
                        f"{stem}.hada_w2_a": torch.randn(10, 2, generator=gen), f"{stem}.hada_w2_b": torch.randn(2, 10, generator=gen),
                        f"{stem}.alpha": torch.tensor(alpha)})
    source = write_safetensors(tensors, metadata={"ss_base_model_version": "flux_kontext"})
    result = convert_file(source, tmp_path / "out.safetensors", "comfyui")
    assert result.counts["kept as slices"] == 3
    assert any(note.startswith("loha parts of fused weights") for note in result.notes)
    assert not any("LoKr" in note or "lokr" in note for note in result.notes)
