"""`extract`: an adapter from BASE and TUNED, against references nobody here wrote.

TUNED is the tiny Musubi model of a fixture (tests/fixtures/musubi/) with Musubi's own merge of the
fixture at strength 1 in place of the adapted weights; BASE is the same model unmerged. So the
difference is each fixture module's s·ΔW as Musubi applies it, and the layers that differ are the ones
Musubi's trainer picked for that architecture. The reference side (ΔW from Musubi's merges, its
singular values from a dense `torch.linalg.svdvals`, the output's ΔW from its raw tensors by the
LyCORIS formulas) is computed in this file. Extract keeps ΔW in float32, so the errors it reports agree
with the float64 references to about 1e-7.

The Musubi set has LoHa and LoKr files only (no LoRA): "a LoRA at its rank" is checked on the LoKr
fixtures' differences, whose ranks are rank(w1)·rank(w2) (6 or 10 here, below full on the 40-wide
layers) and taken from `matrix_rank` of Musubi's ΔW.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from comfyui_lycoris.cli import main
from comfyui_lycoris.convert.extract import EXTRACT_KEY, extract_file
from comfyui_lycoris.lycoris_core import AdapterError, lowrank, read_adapter
from comfyui_lycoris.lycoris_core.algorithms.lokr import factorization
from comfyui_lycoris.lycoris_core.merge import merge
from helpers import (
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

SOURCES = [e for e in adapter_entries() if e["format"] == "musubi"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is many times faster than two contending on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
LOKR = [e for e in SOURCES if e["algorithm"] == "lokr"]
LOHA = [e for e in SOURCES if e["algorithm"] == "loha"]


def entry_named(name: str) -> dict:
    return next(e for e in SOURCES if e["file"] == name)


def stem(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def musubi_delta(expected, path: str) -> torch.Tensor:
    """s·ΔW of module `path` as Musubi's own merge applies it (float64)."""
    return expected[f"merged/1.0/{path}.weight"].double() - expected[f"base/{path}.weight"].double()


def write_pair(tmp_path, entry, prefix: str = "") -> tuple[str, str, dict]:
    """BASE (the tiny model) and TUNED (with Musubi's merge at strength 1); (base, tuned, expected)."""
    expected = expected_weights(entry)
    base = original_base(expected)
    tuned = dict(base)
    for path in module_paths(expected):
        tuned[f"{path}.weight"] = expected[f"merged/1.0/{path}.weight"]
    base_path, tuned_path = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_file({prefix + k: v for k, v in base.items()}, str(base_path))
    save_file(tuned, str(tuned_path))  # bare keys: matched to BASE's without their prefix
    return str(base_path), str(tuned_path), expected


SUFFIXES = ("lora_up.weight", "lora_down.weight", "alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
            "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def raw(path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """{stem: {suffix: tensor (float64)}} of a Musubi-layout file and its metadata, read with safetensors alone."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (not a dict)
            suffix = next(s for s in SUFFIXES if key.endswith("." + s))
            modules.setdefault(key[: -len(suffix) - 1], {})[suffix] = f.get_tensor(key).double()
        return modules, f.metadata()


def lycoris_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """s·ΔW of a Musubi-layout module by the LyCORIS formulas and scale rule (alpha / rank; a LoKr of two
    full factors has scale 1)."""
    if "lora_up.weight" in t:
        return t["lora_up.weight"] @ t["lora_down.weight"] * (float(t["alpha"]) / t["lora_down.weight"].shape[0])
    if "hada_w1_a" in t:
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return delta * (float(t["alpha"]) / t["hada_w1_b"].shape[0])
    if "lokr_w2" in t:
        return torch.kron(t["lokr_w1"], t["lokr_w2"])
    return torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * (float(t["alpha"]) / t["lokr_w2_b"].shape[0])


def optimal_errors(delta: torch.Tensor) -> list[float]:
    """Eckart–Young: the relative Frobenius error of the best rank-r approximation, r = 0, 1, …"""
    s = torch.linalg.svdvals(delta)
    total = float(s.square().sum())
    return [math.sqrt(float(s[r:].square().sum()) / total) for r in range(len(s) + 1)]


def the_record(path) -> dict:
    return json.loads(raw(path)[1][EXTRACT_KEY])[-1]


# ---------------------------------------------------------------------------------------------
# Which layers, under which names


@pytest.mark.parametrize("entry", SOURCES, ids=[e["file"] for e in SOURCES])
def test_the_layers_and_names_are_musubis(entry, tmp_path):
    """Only the layers Musubi adapted differ, so the output has exactly the fixture's modules: a layer
    Musubi's selection left out (excluded in-block layers, layers outside the blocks) would show up."""
    base, tuned, expected = write_pair(tmp_path, entry, prefix="model.diffusion_model.")
    out = tmp_path / "out.safetensors"
    result = extract_file(base, tuned, out, "lokr")
    assert result.architecture == entry["arch_id"] and not result.zero
    with safe_open(str(MUSUBI / entry["file"]), "pt") as f:
        fixture_stems = {key.split(".")[0] for key in f.keys()}  # noqa: SIM118
    assert set(raw(out)[0]) == fixture_stems
    adapter = read_adapter(out)
    assert adapter.format == "musubi" and adapter.architecture == entry["arch_id"]


# ---------------------------------------------------------------------------------------------
# LoKr: the fixtures' factors, exactly


@pytest.mark.parametrize("entry", LOKR, ids=[e["file"] for e in LOKR])
def test_lokr_at_the_fixtures_rank_recovers_musubis_factors(entry, tmp_path):
    """With the fixture's own rank, every module comes out as Musubi stored it (w2 full or low-rank,
    the same shapes), and w1 ⊗ w2 · scale is Musubi's ΔW (the factors themselves are fixed
    only up to w1·c ⊗ w2/c)."""
    base, tuned, expected = write_pair(tmp_path, entry)
    out = tmp_path / "out.safetensors"
    result = extract_file(base, tuned, out, "lokr", rank=entry["rank"])
    ours, metadata = raw(out)
    theirs, _ = raw(MUSUBI / entry["file"])
    for path in module_paths(expected):
        mine, fixture = ours[stem(path)], theirs[stem(path)]
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in fixture.items()}, path
        # alpha: the dim (3) for two full factors, as Musubi stores it; else the rank (3): scale 1 where Musubi's is 2/3
        assert float(mine["alpha"]) == 3.0, path
        assert rel_err(lycoris_delta(mine), musubi_delta(expected, path)) <= 1e-5, path
        assert rel_err(lycoris_delta(mine), lycoris_delta(fixture)) <= 1e-5, path
        # the factors themselves: ours w1 = c·Musubi's, ours w2 = Musubi's scale · w2 / c for one number c
        w1, w2 = mine["lokr_w1"], _w2(mine)
        c = float((w1 * fixture["lokr_w1"]).sum() / fixture["lokr_w1"].square().sum())
        assert rel_err(w1, c * fixture["lokr_w1"]) <= 1e-5, path
        scale = 1.0 if "lokr_w2" in fixture else float(fixture["alpha"]) / fixture["lokr_w2_b"].shape[0]
        assert rel_err(w2, scale / c * _w2(fixture)) <= 1e-5, path
    assert max(m.error for m in result.modules) <= 1e-6
    assert metadata["ss_network_module"] == "networks.lokr" and json.loads(metadata["ss_network_args"]) == {"factor": "-1"}
    assert metadata["ss_network_dim"] == "3"


def _w2(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]


@pytest.mark.parametrize("entry", LOKR[:3], ids=[e["file"] for e in LOKR[:3]])
def test_lokr_without_a_rank_keeps_w2_full_and_exact(entry, tmp_path):
    base, tuned, expected = write_pair(tmp_path, entry)
    out = tmp_path / "out.safetensors"
    extract_file(base, tuned, out, "lokr")
    ours, _ = raw(out)
    for path in module_paths(expected):
        assert "lokr_w2" in ours[stem(path)]
        assert rel_err(lycoris_delta(ours[stem(path)]), musubi_delta(expected, path)) <= 1e-5, path
    # what a reader that applies alpha / dim to full-matrix LoKr computes is the same (alpha = dim)
    for module in read_adapter(out, lokr_full_matrix_alpha=True).modules.values():
        assert module.scale == 1.0


def test_lokr_error_is_that_of_the_nearest_kronecker_product(tmp_path):
    """On a LoHa's difference (no Kronecker product): the reported error is the one the written factors
    have, the Kronecker part of it is √(Σ_{i≥2} σ_i²)/‖ΔW‖ of the rearranged ΔW, and a lower w2 rank only
    adds to it."""
    entry = entry_named("wan_loha_r4_a2.safetensors")
    base, tuned, expected = write_pair(tmp_path, entry)
    full = extract_file(base, tuned, tmp_path / "full.safetensors", "lokr")
    low = extract_file(base, tuned, tmp_path / "low.safetensors", "lokr", rank=1)
    full_modules, low_modules = raw(tmp_path / "full.safetensors")[0], raw(tmp_path / "low.safetensors")[0]
    by_stem = {m.stem: m for m in low.modules}
    for report in full.modules:
        path = next(p for p in module_paths(expected) if stem(p) == report.stem)
        delta = musubi_delta(expected, path)
        (a, c), (b, d) = report.w1, report.w2
        rearranged = delta.reshape(a, b, c, d).permute(0, 2, 1, 3).reshape(a * c, b * d)
        s = torch.linalg.svdvals(rearranged)
        assert abs(report.error - float(s[1:].norm() / s.norm())) <= 1e-6, report.stem
        assert abs(rel_err(lycoris_delta(full_modules[report.stem]), delta) - report.error) <= 1e-6, report.stem
        lowered = by_stem[report.stem]
        assert lowered.rank == 1 and lowered.error > report.error
        assert abs(rel_err(lycoris_delta(low_modules[report.stem]), delta) - lowered.error) <= 1e-6, report.stem


# ---------------------------------------------------------------------------------------------
# LoRA and LoHa: Eckart–Young


@pytest.mark.parametrize("entry", LOKR[:4], ids=[e["file"] for e in LOKR[:4]])
def test_lora_at_the_rank_of_the_difference_is_exact(entry, tmp_path):
    """Each module's ΔW has rank rank(w1)·rank(w2) (matrix_rank of Musubi's ΔW): a LoRA of that rank holds it
    exactly, and an error bound of 1e-5 picks that rank."""
    base, tuned, expected = write_pair(tmp_path, entry)
    out = tmp_path / "out.safetensors"
    result = extract_file(base, tuned, out, "lora", max_error=1e-5)
    ours, metadata = raw(out)
    ranks = {m.stem: m.rank for m in result.modules}
    for path in module_paths(expected):
        delta = musubi_delta(expected, path)
        assert ranks[stem(path)] == int(torch.linalg.matrix_rank(delta.float())), path
        assert rel_err(lycoris_delta(ours[stem(path)]), delta) <= 1e-5, path
    # the lowest of those ranks given as --rank: exactly the modules whose ΔW has it come out exact
    rank = min(ranks.values())
    at_rank = extract_file(base, tuned, tmp_path / "at_rank.safetensors", "lora", rank=rank)
    for report in at_rank.modules:
        assert report.rank == rank and (report.error <= 1e-6) == (ranks[report.stem] <= rank), report.stem
    assert metadata["ss_network_module"] == {"wan": "networks.lora_wan", "hunyuan_video": "networks.lora",
                                             "hunyuan_video_1_5": "networks.lora_hv_1_5", "framepack": "networks.lora_framepack",
                                             }[entry["arch_id"]]


@pytest.mark.parametrize(("algorithm", "sweeps"), [("lora", None), ("loha", 0)])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("entry", [entry_named("wan_loha_r4_a2.safetensors"), entry_named("flux_kontext_lokr_r3_a2.safetensors")],
                         ids=["wan_loha", "flux_kontext_lokr"])
def test_error_at_a_rank_is_eckart_youngs(entry, rank, algorithm, sweeps, tmp_path):
    """LoRA, and LoHa written from the same SVD with hada_w2 = ones (no sweeps): the reported error is the
    optimal rank-r error, and the written factors have it."""
    base, tuned, expected = write_pair(tmp_path, entry)
    out = tmp_path / "out.safetensors"
    result = extract_file(base, tuned, out, algorithm, rank=rank, loha_sweeps=sweeps)
    ours, _ = raw(out)
    reports = {m.stem: m for m in result.modules}
    for path in module_paths(expected):
        delta = musubi_delta(expected, path)
        optimal = optimal_errors(delta)[rank]
        report = reports[stem(path)]
        assert report.rank == rank and abs(report.error - optimal) <= 1e-6, path
        assert abs(rel_err(lycoris_delta(ours[stem(path)]), delta) - optimal) <= 1e-6, path
        if algorithm == "loha":
            t = ours[stem(path)]
            assert torch.equal(t["hada_w2_a"] @ t["hada_w2_b"], torch.ones(delta.shape, dtype=torch.float64))


def test_loha_sweeps_lower_the_error_below_the_svds(tmp_path):
    """On LoHa fixtures at their own rank (4; its ΔW has rank up to 16, full on these 10-wide layers):
    the SVD start has the optimal rank-4 error; the sweeps never leave a module above it, the written
    factors have the reported error, and the largest error falls well below the SVD's (measured on all
    eight, per fixture: SVD 0.37–0.49, after 20 sweeps 0.08–0.16)."""
    svd_worst, worst = {}, {}
    for entry in LOHA[::2]:
        base, tuned, expected = write_pair(tmp_path, entry)
        out = tmp_path / "out.safetensors"
        result = extract_file(base, tuned, out, "loha", rank=4, overwrite=True)
        ours, _ = raw(out)
        reports = {m.stem: m for m in result.modules}
        for path in module_paths(expected):
            delta, report = musubi_delta(expected, path), reports[stem(path)]
            assert abs(report.svd_error - optimal_errors(delta)[4]) <= 1e-6, path
            assert report.error <= report.svd_error and 1 <= report.sweeps <= 20, path
            assert abs(rel_err(lycoris_delta(ours[stem(path)]), delta) - report.error) <= 1e-6, path
        record = the_record(out)
        assert record["loha_sweeps"] == 20
        assert record["modules"][result.modules[0].stem]["svd_error"] == result.modules[0].svd_error
        svd_worst[entry["arch_id"]] = max(m.svd_error for m in result.modules)
        worst[entry["arch_id"]] = max(m.error for m in result.modules)
    assert all(0.3 < error < 0.5 for error in svd_worst.values()), svd_worst
    assert all(error < 0.2 for error in worst.values()), worst


def test_loha_factors_survive_a_bfloat16_cast(tmp_path):
    """The sweeps keep the halves near ΔW's size (no cancelling giants): stored in bfloat16, the factors
    still have about the reported error, below the SVD's."""
    base, tuned, expected = write_pair(tmp_path, entry_named("flux_2_loha_r4_a2.safetensors"))
    out = tmp_path / "out.safetensors"
    result = extract_file(base, tuned, out, "loha", rank=4, dtype="bfloat16")
    ours, _ = raw(out)
    for report in result.modules:
        path = next(p for p in module_paths(expected) if stem(p) == report.stem)
        written = rel_err(lycoris_delta(ours[report.stem]), musubi_delta(expected, path))
        assert written <= report.error + 0.01 and written < report.svd_error, report.stem


def test_max_error_picks_the_smallest_rank(tmp_path):
    entry = entry_named("qwen_image_loha_r4_a2.safetensors")
    base, tuned, expected = write_pair(tmp_path, entry)
    result = extract_file(base, tuned, tmp_path / "out.safetensors", "lora", max_error=0.1)
    ranks = {m.stem: m.rank for m in result.modules}
    for path in module_paths(expected):
        optimal = optimal_errors(musubi_delta(expected, path))
        assert ranks[stem(path)] == next(r for r in range(1, len(optimal)) if optimal[r] <= 0.1), path
    metadata = raw(tmp_path / "out.safetensors")[1]
    assert metadata["ss_network_dim"] == str(max(ranks.values()))


# ---------------------------------------------------------------------------------------------
# Merged back onto BASE with the pack's merge


@pytest.mark.parametrize(("name", "algorithm", "rank", "to"), [
    ("wan_lokr_r3_a2.safetensors", "lokr", None, "musubi"),
    ("hunyuan_video_lokr_r3_a2.safetensors", "lokr", 1, "diffusers"),
    ("z_image_loha_r4_a2.safetensors", "lora", 2, "comfyui"),  # q/k/v fused for ComfyUI, split again by the merge
    ("flux_2_loha_r4_a2.safetensors", "loha", 3, "musubi"),
])
def test_merged_back_it_gives_tuned_within_the_reported_error(name, algorithm, rank, to, tmp_path):
    entry = entry_named(name)
    base, tuned, expected = write_pair(tmp_path, entry)
    out = tmp_path / "out.safetensors"
    result = extract_file(base, tuned, out, algorithm, rank=rank, to=to)
    assert read_adapter(out).format == to
    merged_path = tmp_path / "merged.safetensors"
    merge(base, merged_path, [(out, 1.0)], progress=False)
    merged = load_file(str(merged_path))
    errors = {m.stem: m.error for m in result.modules}
    for path in module_paths(expected):
        want = expected[f"merged/1.0/{path}.weight"].double()
        change = rel_err(merged[f"{path}.weight"].double() - expected[f"base/{path}.weight"].double(), want - expected[f"base/{path}.weight"].double())
        assert abs(change - errors[stem(path)]) <= 1e-5, path  # the error reported is the error merged


# ---------------------------------------------------------------------------------------------
# Other bases: ComfyUI's names (fused q/k/v), fp8, unchanged layers


@pytest.mark.parametrize("arch", ["z_image", "hunyuan_video_1_5"])
def test_a_comfyui_named_base_gives_musubis_split_modules(arch, tmp_path):
    entry = next(e for e in LOKR if e["arch_id"] == arch)
    expected = expected_weights(entry)
    base, where = comfy_base(arch, expected)
    tuned = {k: v.clone() for k, v in base.items()}
    for path, (key, rows) in where.items():
        tuned[key][rows] = expected[f"merged/1.0/{path}.weight"]
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    extract_file(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "out.safetensors", "lokr")
    ours, _ = raw(tmp_path / "out.safetensors")
    assert set(ours) == {stem(path) for path in module_paths(expected)}
    for path in module_paths(expected):
        assert rel_err(lycoris_delta(ours[stem(path)]), musubi_delta(expected, path)) <= 1e-5, path


@pytest.mark.parametrize("scale_key", ["scale_weight", "weight_scale"])
def test_an_fp8_base_is_dequantized_with_its_scale(scale_key, tmp_path):
    """BASE in scaled fp8 (ComfyUI's: a per-tensor scale and the `scaled_fp8` marker), TUNED = its
    dequantized weights + Musubi's ΔW, in fp32 without scales: the difference is Musubi's ΔW again only if
    BASE is read as fp8 value × scale."""
    entry = entry_named("qwen_image_lokr_r3_a2.safetensors")
    expected = expected_weights(entry)
    base = original_base(expected)
    tuned = dict(base)
    for path in module_paths(expected):
        key = f"{path}.weight"
        scale = base[key].abs().max() / 64
        base[key] = (base[key] / scale).to(torch.float8_e4m3fn)
        base[f"{path}.{scale_key}"] = scale.reshape(())
        tuned[key] = (base[key].double() * scale + musubi_delta(expected, path)).float()
    base["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    extract_file(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "out.safetensors", "lokr")
    ours, _ = raw(tmp_path / "out.safetensors")
    for path in module_paths(expected):
        assert rel_err(lycoris_delta(ours[stem(path)]), musubi_delta(expected, path)) <= 1e-5, path


def test_unchanged_layers_are_skipped_and_counted(tmp_path):
    entry = entry_named("wan_lokr_r3_a2.safetensors")
    expected = expected_weights(entry)
    base = original_base(expected)
    tuned = dict(base)
    kept = ["blocks.0.self_attn.q", "blocks.1.ffn.2"]
    for path in module_paths(expected):
        if path not in kept:
            tuned[f"{path}.weight"] = expected[f"merged/1.0/{path}.weight"]
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "out.safetensors"
    result = extract_file(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out, "lora", rank=2)
    assert sorted(m.stem for m in result.zero) == sorted(stem(p) for p in kept)
    assert set(raw(out)[0]) == {stem(p) for p in module_paths(expected) if p not in kept}
    record = the_record(out)
    assert record["unchanged_layers"] == 2 and len(record["modules"]) == len(module_paths(expected)) - 2
    assert "2 layers unchanged (difference exactly 0), not written" in result.summary()


def test_the_record_says_what_was_made(tmp_path):
    base, tuned, expected = write_pair(tmp_path, entry_named("framepack_lokr_r3_a2.safetensors"))
    out = tmp_path / "out.safetensors"
    result = extract_file(base, tuned, out, "loha", max_error=0.2, dtype="bfloat16")
    record = the_record(out)
    assert record["command"] == "extract" and record["algorithm"] == "loha" and record["max_error"] == 0.2
    assert record["method"].startswith("the rank-r truncated SVD of ΔW written as LoHa") and record["architecture"] == "framepack"
    assert record["modules"] == {m.stem: {"weight": m.weight, "rank": m.rank, "error": m.error, "svd_error": m.svd_error,
                                          "sweeps": m.sweeps} for m in result.modules}
    assert all(m.error <= 0.2 for m in result.modules)
    with safe_open(str(out), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16", "F32"}  # noqa: SIM118 (alpha stays F32)


# ---------------------------------------------------------------------------------------------
# Full-size layers: the randomized SVD, against singular values known by construction

WIDE = 200  # wide enough that ranks up to 30 take the sketch (lowrank.SKETCH_FRACTION of 200 = 40 columns)
WIDE_LAYERS = {"blocks.0.self_attn.q": (WIDE, WIDE), "blocks.0.self_attn.k": (WIDE, WIDE),
               "blocks.0.ffn.0": (2 * WIDE, WIDE), "blocks.0.ffn.2": (WIDE, 2 * WIDE)}


def known_spectrum(shape, values, seed) -> torch.Tensor:
    """U·diag(values)·Vᵀ with random orthonormal U and V: a matrix whose singular values are `values`."""
    gen = torch.Generator().manual_seed(seed)
    k = len(values)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=gen, dtype=torch.float64)).Q
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


def wide_pair(tmp_path, deltas: dict[str, torch.Tensor]) -> tuple[str, str]:
    """A Wan-shaped BASE with WIDE-wide layers (float32, small enough that TUNED's rounding is far below the
    errors checked) and TUNED = BASE + the given ΔW per layer."""
    gen = torch.Generator().manual_seed(11)
    base = {f"{path}.weight": 1e-3 * torch.randn(shape, generator=gen) for path, shape in WIDE_LAYERS.items()}
    tuned = {key: (weight.double() + deltas[key[: -len(".weight")]]).float() for key, weight in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    # ΔW as the files hold it: TUNED − BASE of the stored float32 values
    for path in deltas:
        deltas[path] = tuned[f"{path}.weight"].double() - base[f"{path}.weight"].double()
    return str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")


@pytest.fixture
def sketches(monkeypatch):
    """The widths of every randomized SVD taken."""
    widths = []
    original = lowrank.sketched_svd

    def recording(matrix, width):
        widths.append(width)
        return original(matrix, width)

    monkeypatch.setattr(lowrank, "sketched_svd", recording)
    return widths


def test_a_full_size_layer_of_low_rank_is_recovered_exactly(tmp_path, sketches):
    """ΔW of rank 8 in every layer (singular values 1 … 0.3): LoRA at rank 8 recovers it through the sketch."""
    values = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    deltas = {path: known_spectrum(shape, values, seed) for seed, (path, shape) in enumerate(WIDE_LAYERS.items())}
    base, tuned = wide_pair(tmp_path, deltas)
    out = tmp_path / "out.safetensors"
    result = extract_file(base, tuned, out, "lora", rank=8, arch="wan")
    assert sketches == [18] * len(WIDE_LAYERS)
    ours = raw(out)[0]
    for path, delta in deltas.items():
        assert rel_err(lycoris_delta(ours[stem(path)]), delta) <= 1e-6, path
    assert max(m.error for m in result.modules) <= 1e-6


def test_a_full_size_layer_at_a_rank_below_its_own_is_near_optimal(tmp_path, sketches):
    """Singular values 0.9^i (full rank): at rank 8 the sketch's error is the one the written factors have, and
    within 0.1 % of the optimal √(Σ_{i≥8} σ_i²) / √(Σ σ_i²) computed from the known values."""
    deltas, optimal = {}, {}
    for seed, (path, shape) in enumerate(WIDE_LAYERS.items()):
        values = [0.9**i for i in range(min(shape))]
        deltas[path] = known_spectrum(shape, values, seed)
        optimal[path] = math.sqrt(sum(v * v for v in values[8:]) / sum(v * v for v in values))
    base, tuned = wide_pair(tmp_path, deltas)
    out = tmp_path / "out.safetensors"
    result = extract_file(base, tuned, out, "lora", rank=8, arch="wan")
    assert len(sketches) == len(WIDE_LAYERS)
    ours = raw(out)[0]
    for report in result.modules:
        path = next(p for p in deltas if stem(p) == report.stem)
        assert abs(rel_err(lycoris_delta(ours[report.stem]), deltas[path]) - report.error) <= 1e-6, path
        assert optimal[path] * (1 - 1e-6) <= report.error <= optimal[path] * 1.001, path


def test_a_full_size_layer_within_an_error_bound_gets_the_smallest_rank(tmp_path, sketches):
    """Singular values 0.8^i: the smallest rank within 5 % is read off the known values; the sketch is widened
    (32 columns first) until a rank within it meets the bound."""
    deltas, smallest = {}, {}
    for seed, (path, shape) in enumerate(WIDE_LAYERS.items()):
        values = [0.8**i for i in range(min(shape))]
        deltas[path] = known_spectrum(shape, values, seed)
        total = sum(v * v for v in values)
        smallest[path] = next(r for r in range(1, len(values)) if math.sqrt(sum(v * v for v in values[r:]) / total) <= 0.05)
    base, tuned = wide_pair(tmp_path, deltas)
    result = extract_file(base, tuned, tmp_path / "out.safetensors", "lora", max_error=0.05, arch="wan")
    assert sketches and set(sketches) == {32}
    for report in result.modules:
        path = next(p for p in deltas if stem(p) == report.stem)
        assert report.rank == smallest[path] and report.error <= 0.05, path


def test_lokr_of_a_full_size_layer(tmp_path, sketches):
    """Two layers are exact Kronecker products (recovered through the sketch of R), two are not: their error is
    the one written, and the optimal √(1 − σ₁(R)²/‖R‖²) from a dense SVD of R to 0.1 %."""
    deltas = {}
    for seed, (path, (out_features, in_features)) in enumerate(WIDE_LAYERS.items()):
        (a, b), (c, d) = factorization(out_features, -1), factorization(in_features, -1)
        gen = torch.Generator().manual_seed(seed)
        deltas[path] = torch.kron(torch.randn(a, c, generator=gen, dtype=torch.float64),
                                  torch.randn(b, d, generator=gen, dtype=torch.float64))
        if seed % 2:
            deltas[path] += 40 * known_spectrum((out_features, in_features), [0.9**i for i in range(40)], seed)
    base, tuned = wide_pair(tmp_path, deltas)
    out = tmp_path / "out.safetensors"
    result = extract_file(base, tuned, out, "lokr", arch="wan")
    assert sketches == [11] * len(WIDE_LAYERS)
    ours = raw(out)[0]
    for report in result.modules:
        path = next(p for p in deltas if stem(p) == report.stem)
        seed = list(WIDE_LAYERS).index(path)
        delta, written = deltas[path], lycoris_delta(ours[report.stem])
        (a, c), (b, d) = report.w1, report.w2
        s = torch.linalg.svdvals(delta.reshape(a, b, c, d).permute(0, 2, 1, 3).reshape(a * c, b * d))
        optimal = float(s[1:].norm() / s.norm())
        assert abs(rel_err(written, delta) - report.error) <= 1e-6, path
        if seed % 2:
            assert optimal * (1 - 1e-6) <= report.error <= optimal * 1.001 and optimal > 0.05, path
        else:
            assert report.error <= 1e-6, path


# ---------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def bad_pair(tmp_path, change) -> tuple[str, str]:
    base, tuned, _ = write_pair(tmp_path, entry_named("wan_lokr_r3_a2.safetensors"))
    tensors = load_file(tuned)
    change(tensors)
    save_file(tensors, tuned)
    return base, tuned


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.pop("blocks.1.ffn.0.weight"), r"not the same model: keys 1 only in .*base.safetensors \(blocks.1.ffn.0.weight\)"),
    (lambda t: t.update({"extra.weight": torch.ones(2, 2)}), r"not the same model: keys 1 only in .*tuned.safetensors \(extra.weight\)"),
    (lambda t: t.update({"blocks.0.ffn.2.weight": torch.ones(10, 41)}), r"shapes differ for 1 weights \(blocks.0.ffn.2.weight \[10, 40\] vs \[10, 41\]\)"),
    (lambda t: t["blocks.1.self_attn.k.weight"].__setitem__((0, 3), float("nan")),
     r"tuned.safetensors: blocks.1.self_attn.k.weight holds 1 NaN/Inf values; nothing written"),
])
def test_bad_pairs_are_refused_and_nothing_is_written(change, message, tmp_path):
    base, tuned = bad_pair(tmp_path, change)
    with pytest.raises(AdapterError, match=message):
        extract_file(base, tuned, tmp_path / "out.safetensors", "lokr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "tuned.safetensors"]  # no temporary files


@pytest.mark.parametrize(("options", "message"), [
    ({"algorithm": "lora"}, "lora needs a rank or a maximum error"),
    ({"algorithm": "loha", "rank": 2, "factor": 4}, "--factor is LoKr's split"),
    ({"algorithm": "lokr", "factor": 0}, "factor must be -1 or a whole number"),
    ({"algorithm": "dora", "rank": 2}, "unknown algorithm"),
    ({"algorithm": "lora", "rank": 2, "max_error": 0.1}, "exactly one of a rank and a maximum error"),
    ({"algorithm": "lora", "rank": 2, "loha_sweeps": 3}, "loha_sweeps must be .* for LoHa only"),
    ({"algorithm": "loha", "rank": 2, "loha_sweeps": -1}, "loha_sweeps must be a whole number of at least 0"),
])
def test_bad_options_are_refused(options, message, tmp_path):
    base, tuned, _ = write_pair(tmp_path, entry_named("wan_lokr_r3_a2.safetensors"))
    with pytest.raises(AdapterError, match=message):
        extract_file(base, tuned, tmp_path / "out.safetensors", **options)


def test_identical_files_and_adapter_files_are_refused(tmp_path):
    base, _, _ = write_pair(tmp_path, entry_named("wan_lokr_r3_a2.safetensors"))
    with pytest.raises(AdapterError, match="no layer Musubi trains on Wan 2.1/2.2 \\(wan\\) differs"):
        extract_file(base, base, tmp_path / "out.safetensors", "lokr")
    with pytest.raises(AdapterError, match="this is an adapter file, not a diffusion model"):
        extract_file(MUSUBI / "wan_lokr_r3_a2.safetensors", base, tmp_path / "out.safetensors", "lokr")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_layout_that_cannot_hold_the_modules_is_refused_before_any_work(tmp_path, monkeypatch):
    """HunyuanVideo 1.5's LoKr q/k/v have no ComfyUI-layout names: refused before any weight is read."""
    base, tuned, _ = write_pair(tmp_path, entry_named("hunyuan_video_1_5_lokr_r3_a2.safetensors"))

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    with pytest.raises(AdapterError, match="cannot write the comfyui layout exactly.*nothing written"):
        extract_file(base, tuned, tmp_path / "out.safetensors", "lokr", to="comfyui")


class Stop(Exception):
    pass


def test_progress_counts_every_layer_and_a_stop_leaves_nothing(tmp_path):
    """`on_progress(done, total)` after each layer fitted and each module written; raising from it (ComfyUI's
    Cancel) at the first call (fitting) or the last (writing the output) leaves no output and no temporary file."""
    base, tuned, expected = write_pair(tmp_path, entry_named("wan_lokr_r3_a2.safetensors"))
    calls = []
    extract_file(base, tuned, tmp_path / "out.safetensors", "lora", rank=2, on_progress=lambda *c: calls.append(c))
    modules = len(module_paths(expected))
    assert calls == [(i, 2 * modules) for i in range(1, 2 * modules + 1)]
    for stop_at in (1, modules + 1, len(calls)):
        def stop(done, total, stop_at=stop_at):
            if done == stop_at:
                raise Stop

        with pytest.raises(Stop):
            extract_file(base, tuned, tmp_path / "stopped.safetensors", "lora", rank=2, on_progress=stop)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "out.safetensors", "tuned.safetensors"]


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_prints_the_table_and_errors_are_one_line(tmp_path, capsys):
    base, tuned, expected = write_pair(tmp_path, entry_named("wan_loha_r4_a2.safetensors"))
    out = tmp_path / "out.safetensors"
    assert main(["extract", base, tuned, str(out), "--algorithm", "lora", "--rank", "2", "--max-modules", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["module", "rank", "relative", "error"])
    rows = lines[header + 1 : header + 4]
    assert all(row.split()[1] == "2" and 0 < float(row.split()[2]) < 1 for row in rows)
    assert lines[header + 4].strip().startswith("... and 21 more modules")
    assert "24 layers of Wan 2.1/2.2 (wan) as lora; largest relative error" in lines[-1]

    assert main(["extract", base, tuned, str(out), "--algorithm", "lora", "--rank", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("comfyui-lycoris extract: error: ") and "output file exists" in err
    assert main(["extract", base, tuned, str(tmp_path / "o2.safetensors"), "--algorithm", "lora"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a rank or a maximum error" in err
    with pytest.raises(SystemExit):
        main(["extract", base, tuned, str(tmp_path / "o3.safetensors"), "--algorithm", "lora", "--rank", "2", "--max-error", "0.1"])
    assert not (tmp_path / "o2.safetensors").exists() and not (tmp_path / "o3.safetensors").exists()
