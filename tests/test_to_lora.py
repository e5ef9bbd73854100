"""`to-lora` and `resize`: LoHa / LoKr / full differences as plain LoRA, and LoRA at another rank.

References nobody here wrote: Musubi Tuner's own merges of its own files (tests/fixtures/musubi/), the
other trainers' own merges of theirs (tests/fixtures/wild/), and the singular values of each ΔW from a
dense `torch.linalg.svdvals`, with ΔW built in this file from the files' raw tensors (and checked
against Musubi's merges first). The produced LoRA files are applied by the pack's merge and, for the
"any LoRA reader" view, read with `safetensors` and multiplied out here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from comfyui_lycoris.cli import main
from comfyui_lycoris.convert.to_lora import LOW_RANK_KEY, resize_file, to_lora_file
from comfyui_lycoris.lycoris_core import AdapterError, lowrank, read_adapter
from comfyui_lycoris.lycoris_core.algorithms import ALGORITHMS
from comfyui_lycoris.lycoris_core.merge import merge
from helpers import (
    ARCH_OF_PREFIX,
    MUSUBI,
    WILD,
    adapter_entries,
    change_err,
    comfy_location,
    comfy_names,
    expected_weights,
    module_paths,
    rel_err,
    stem_of,
    wild_changed_keys,
    wild_entries,
    wild_expected,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ENTRIES = adapter_entries()
SOURCES = [e for e in ENTRIES if e["format"] == "musubi"]
WILD_ENTRIES = wild_entries()

# ---------------------------------------------------------------------------------------------
# The reference side, written here from the raw tensors (the LyCORIS math and scale rule)

SUFFIXES = (
    "lora_up.weight", "lora_down.weight", "lora_B.weight", "lora_A.weight", "lora_mid.weight", "alpha",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "dora_scale", "diff_b", "diff",
)


def raw_modules(path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """{stem: {suffix: tensor as float64}} and the metadata, read with safetensors alone."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (not a dict)
            suffix = next(s for s in SUFFIXES if key.endswith("." + s))
            modules.setdefault(key[: -len(suffix) - 1], {})[suffix] = f.get_tensor(key).double()
        return modules, f.metadata() or {}


def reference_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """s·ΔW (2-D) of a Linear module: LoRA up·down, LoHa (w1a w1b)⊙(w2a w2b), LoKr kron(w1, w2); scale
    alpha / rank, where LoKr's rank is that of its decomposed factor and a LoKr of two full factors has
    scale 1; no alpha: scale 1."""
    if "lora_up.weight" in t or "lora_B.weight" in t:
        up, down = (t["lora_up.weight"], t["lora_down.weight"]) if "lora_up.weight" in t else (t["lora_B.weight"], t["lora_A.weight"])
        up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        delta, rank = up @ down, down.shape[0]
    elif "hada_w1_a" in t:
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        rank = t["hada_w1_b"].shape[0]
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        delta = torch.kron(w1, w2)
        rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    scale = float(t["alpha"]) / rank if "alpha" in t and rank is not None else 1.0
    return delta * scale


def optimal_errors(delta: torch.Tensor) -> list[float]:
    """Eckart–Young: the relative Frobenius error of the best rank-r approximation, r = 0, 1, …"""
    s = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
    total = float(s.square().sum())
    return [math.sqrt(float(s[r:].square().sum()) / total) for r in range(len(s) + 1)]


def lora_reader_delta(path, stem: str) -> torch.Tensor:
    """What any LoRA reader computes for one module: up·down·(alpha / rank) (scale 1 without alpha)."""
    t = raw_modules(path)[0][stem]
    up, down = (t["lora_up.weight"], t["lora_down.weight"]) if "lora_up.weight" in t else (t["lora_B.weight"], t["lora_A.weight"])
    rank = down.shape[0]
    scale = float(t["alpha"]) / rank if "alpha" in t else 1.0
    return (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)) * scale


def original_base(expected) -> dict[str, torch.Tensor]:
    """The tiny Musubi model's weights in Musubi's (= the original checkpoint's) naming."""
    return {k.split("/", 1)[1]: v for k, v in expected.items() if k.startswith(("base/", "unadapted/"))}


def comfy_base(arch, expected) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """A base with ComfyUI's weight names, holding the fixture's weights where adapted:
    (tensors, {Musubi path: (key, rows)})."""
    gen = torch.Generator().manual_seed(7)
    tensors = {k: torch.randn(shape, generator=gen) for k, shape in comfy_names(arch).items()}
    where = {}
    for path in module_paths(expected):
        key, part = comfy_location(arch, path)
        weight = expected[f"base/{path}.weight"]
        rows = slice(None) if part is None else slice(part * weight.shape[0], (part + 1) * weight.shape[0])
        tensors[key][rows] = weight
        where[path] = (key, rows)
    return tensors, where


def merged_with(tmp_path, base_tensors: dict, adapter, strength: float = 1.0) -> dict[str, torch.Tensor]:
    base = tmp_path / "base.safetensors"
    if not base.exists():
        save_file(base_tensors, str(base))
    out = tmp_path / f"merged_{strength}.safetensors"
    result = merge(base, out, [(adapter, strength)], progress=False, overwrite=True)
    assert not result.plans[0].unmatched
    return load_file(str(out))


def prefix_of(entry) -> str:
    return entry["file"].split("_loha_")[0].split("_lokr_")[0]


# ---------------------------------------------------------------------------------------------
# Full rank: Musubi's own merges


def test_the_reference_delta_is_musubis():
    """The ΔW this file builds from raw tensors is the change Musubi's own merge makes."""
    for entry in SOURCES:
        expected = expected_weights(entry)
        modules = raw_modules(MUSUBI / entry["file"])[0]
        for path in module_paths(expected):
            change = expected[f"merged/1.0/{path}.weight"].double() - expected[f"base/{path}.weight"].double()
            assert rel_err(reference_delta(modules[stem_of(entry, path)]), change) <= 1e-5, (entry["file"], path)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_full_rank_lora_reproduces_musubis_merges(entry, tmp_path):
    """--max-error 0: each module at its exact rank; merged, the LoRA gives Musubi's merged weights."""
    out = tmp_path / "lora.safetensors"
    result = to_lora_file(MUSUBI / entry["file"], out, max_error=0)
    lora = read_adapter(out)
    assert lora.format == entry["format"] and {m.algorithm for m in lora.modules.values()} == {"lora"}
    assert lora.architecture == entry["arch_id"]

    expected = expected_weights(entry)
    modules = raw_modules(MUSUBI / entry["file"])[0]
    ranks = {m.stem: m.rank for m in result.modules}
    written = raw_modules(out)[0]
    for path in module_paths(expected):
        stem = stem_of(entry, path)
        delta = reference_delta(modules[stem])
        assert ranks[stem] == torch.linalg.matrix_rank(delta), stem
        if stem in written:  # (the converter writes the right names where Musubi's converter garbled them)
            assert rel_err(lora_reader_delta(out, stem), delta) <= 1e-6, stem
    base = original_base(expected)
    for strength in (1.0, 0.5):
        merged = merged_with(tmp_path, base, out, strength)
        for path in module_paths(expected):
            assert rel_err(merged[f"{path}.weight"], expected[f"merged/{strength}/{path}.weight"]) <= 1e-5, path


# ComfyUI core has no FramePack model, so no ComfyUI layout to name it in.
LAYOUT_CASES = [(e, to) for e in SOURCES for to in ("diffusers", "comfyui")
                if not (to == "comfyui" and ARCH_OF_PREFIX[prefix_of(e)] == "framepack")]


@pytest.mark.parametrize(("entry", "to"), LAYOUT_CASES, ids=[f"{e['file']}-{to}" for e, to in LAYOUT_CASES])
def test_full_rank_lora_in_every_layout(entry, to, tmp_path):
    arch = ARCH_OF_PREFIX[prefix_of(entry)]
    out = tmp_path / "lora.safetensors"
    result = to_lora_file(MUSUBI / entry["file"], out, max_error=0, to=to)
    lora = read_adapter(out)
    assert lora.format == to and {m.algorithm for m in lora.modules.values()} == {"lora"}
    expected = expected_weights(entry)
    if to == "diffusers":
        merged = merged_with(tmp_path, original_base(expected), out)
        for path in module_paths(expected):
            assert rel_err(merged[f"{path}.weight"], expected[f"merged/1.0/{path}.weight"]) <= 1e-5, path
        return
    base, where = comfy_base(arch, expected)
    merged = merged_with(tmp_path, base, out)
    for path, (key, rows) in where.items():
        assert rel_err(merged[key][rows], expected[f"merged/1.0/{path}.weight"]) <= 1e-5, path
    if arch in ("z_image", "hunyuan_video_1_5"):  # LoKr q/k/v cannot be stacked; as LoRA they are, exactly
        parts = [stem_of(entry, path) for path in module_paths(expected) if comfy_location(arch, path)[1] is not None]
        fused = [m for stem, m in lora.modules.items() if stem.endswith(".qkv")]
        assert len(fused) * 3 == len(parts)
        assert sum(m.rank for m in fused) == sum(m.rank for m in result.modules if m.stem in parts)


# ---------------------------------------------------------------------------------------------
# At a rank: Eckart–Young, through the report and through any LoRA reader

RANKED = [e for e in SOURCES if e["file"] in (
    "wan_lokr_r3_a2.safetensors", "flux_kontext_lokr_r3_a2.safetensors", "wan_loha_r4_a2.safetensors",
    "qwen_image_loha_r4_a2.safetensors",
)]


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("entry", RANKED, ids=[e["file"] for e in RANKED])
def test_error_at_a_rank_is_the_optimal_error(entry, rank, tmp_path):
    out = tmp_path / "lora.safetensors"
    result = to_lora_file(MUSUBI / entry["file"], out, rank=rank)
    modules = raw_modules(MUSUBI / entry["file"])[0]
    for report in result.modules:
        delta = reference_delta(modules[report.stem])
        optimal = optimal_errors(delta)
        assert report.rank == min(rank, int(torch.linalg.matrix_rank(delta)))
        assert abs(report.error - optimal[report.rank]) <= 1e-4 * optimal[report.rank] + 1e-12, report.stem
        written = rel_err(lora_reader_delta(out, report.stem), delta)  # fp32 factors: 1e-7 of ‖ΔW‖ on top
        assert abs(written - optimal[report.rank]) <= 1e-4 * optimal[report.rank] + 1e-6, report.stem


@pytest.mark.parametrize("max_error", [0.02, 0.1, 0.3])
@pytest.mark.parametrize("entry", RANKED, ids=[e["file"] for e in RANKED])
def test_max_error_picks_the_smallest_rank_within_it(entry, max_error, tmp_path):
    result = to_lora_file(MUSUBI / entry["file"], tmp_path / "lora.safetensors", max_error=max_error)
    modules = raw_modules(MUSUBI / entry["file"])[0]
    for report in result.modules:
        optimal = optimal_errors(reference_delta(modules[report.stem]))
        smallest = next(r for r in range(1, len(optimal)) if optimal[r] <= max_error)
        assert report.rank == smallest, report.stem
        assert report.error <= max_error and (report.rank == 1 or optimal[report.rank - 1] > max_error)


# ---------------------------------------------------------------------------------------------
# The factored SVDs equal the dense one (ΔW never built)


def dense_truncation(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double().reshape(delta.shape[0], -1), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.fixture
def dense_matrices(monkeypatch):
    """The shapes of every matrix the SVD code decomposes densely."""
    shapes = []
    original = lowrank.Dense.__init__

    def recording(self, matrix):
        shapes.append(tuple(matrix.shape))
        original(self, matrix)

    monkeypatch.setattr(lowrank.Dense, "__init__", recording)
    return shapes


def check_against_dense(path, stem, delta, ranks, tmp_path, **options):
    """The to-lora file at each rank: singular values and reconstruction equal the dense SVD's."""
    s_ref = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
    assert bool((s_ref[:-1] - s_ref[1:] > 1e-6 * s_ref[0])[: max(ranks)].all()), "needs distinct singular values"
    for rank in ranks:
        out = tmp_path / f"{stem}.rank{rank}.safetensors"
        result = to_lora_file(path, out, rank=rank, arch="wan", **options)
        report = next(m for m in result.modules if m.stem == stem)
        got = lora_reader_delta(out, stem)
        assert rel_err(got, dense_truncation(delta, rank)) <= 1e-6
        assert torch.allclose(torch.linalg.svdvals(got)[:rank], s_ref[:rank], rtol=1e-6, atol=0)
        assert abs(report.error - optimal_errors(delta)[rank]) <= 1e-9


def test_lokr_svd_from_its_factors_equals_the_dense_svd(write_safetensors, tmp_path, dense_matrices):
    stem = "lora_unet_blocks_0_ffn_0"
    t = {"lokr_w1": torch.randn(4, 3), "lokr_w2_a": torch.randn(24, 2), "lokr_w2_b": torch.randn(2, 20), "alpha": torch.tensor(1.0)}
    path = write_safetensors({f"{stem}.{k}": v for k, v in t.items()})
    delta = reference_delta({k: v.double() for k, v in t.items()})
    assert delta.shape == (96, 60)
    factored = ALGORITHMS["lokr"].factored_delta({k: v.double() for k, v in t.items() if k != "alpha"})
    s = factored.scaled(0.5).singular_values()  # scale alpha / rank = 1/2
    assert torch.allclose(s, torch.linalg.svdvals(delta)[: len(s)], rtol=1e-12, atol=0) and len(s) == 3 * 2
    check_against_dense(path, stem, delta, [1, 3, 6], tmp_path)
    assert max(math.prod(shape) for shape in dense_matrices) < delta.numel() // 100  # only w1 (4×3) was dense


def test_conv_lokr_is_flattened_as_its_delta(write_safetensors, tmp_path, dense_matrices):
    """w1's entries scale whole kernels of a conv w2: ΔW[(p,q), (r,s), k, l] = w1[p,r]·w2[q,s,k,l]."""
    stem = "lora_unet_blocks_0_ffn_0"
    w1, w2 = torch.randn(3, 2), torch.randn(4, 5, 3, 3)
    path = write_safetensors({f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2": w2})
    delta = torch.kron(w1.double()[:, :, None, None], w2.double())
    assert delta.shape == (12, 10, 3, 3)
    check_against_dense(path, stem, delta, [2, 5], tmp_path)
    lora = read_adapter(tmp_path / f"{stem}.rank5.safetensors").modules[stem]
    assert lora.params["down"].shape == (5, 10, 3, 3) and lora.params["up"].shape == (12, 5, 1, 1)
    assert rel_err(lora.delta_weight(), delta) == pytest.approx(optimal_errors(delta)[5], rel=1e-4)
    assert all(math.prod(shape) < delta.numel() for shape in dense_matrices)


def loha_reference(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """LoHa with conv Tucker cores, as LyCORIS defines it: each half einsum(t, w_b, w_a)."""
    def half(i):
        return torch.einsum("i j k l, j r, i p -> p r k l", t[f"hada_t{i}"], t[f"hada_w{i}_b"], t[f"hada_w{i}_a"])
    return half(1) * half(2)


def test_loha_svd_from_its_khatri_rao_factors_equals_the_dense_svd(write_safetensors, tmp_path, dense_matrices):
    stem = "lora_unet_blocks_0_ffn_0"
    t = {"hada_w1_a": torch.randn(40, 2), "hada_w1_b": torch.randn(2, 50), "hada_w2_a": torch.randn(40, 3),
         "hada_w2_b": torch.randn(3, 50), "alpha": torch.tensor(1.0)}
    path = write_safetensors({f"{stem}.{k}": v for k, v in t.items()})
    delta = reference_delta({k: v.double() for k, v in t.items()})  # rank r1·r2 = 6 < 40
    check_against_dense(path, stem, delta, [1, 4, 6], tmp_path)
    assert dense_matrices == []  # the Khatri-Rao product path: no matrix decomposed densely

    stem = "lora_unet_blocks_0_ffn_2"  # a conv LoHa with Tucker cores: (16, 8, 3, 3), rank 2·2
    t = {"hada_w1_a": torch.randn(2, 16), "hada_w1_b": torch.randn(2, 8), "hada_t1": torch.randn(2, 2, 3, 3),
         "hada_w2_a": torch.randn(2, 16), "hada_w2_b": torch.randn(2, 8), "hada_t2": torch.randn(2, 2, 3, 3)}
    path = write_safetensors({f"{stem}.{k}": v for k, v in t.items()})
    delta = loha_reference({k: v.double() for k, v in t.items()})
    check_against_dense(path, stem, delta, [1, 4], tmp_path)
    assert dense_matrices == []


# ---------------------------------------------------------------------------------------------
# Resize


@pytest.fixture
def musubi_lora(tmp_path):
    """A LoRA made from Musubi's Wan LoHa at full rank (checked against Musubi's merge above)."""
    path = tmp_path / "wan_lora.safetensors"
    to_lora_file(MUSUBI / "wan_loha_r4_a2.safetensors", path, max_error=0)
    return path


def test_resize_to_a_lower_rank_is_optimal(musubi_lora, tmp_path):
    out = tmp_path / "rank3.safetensors"
    result = resize_file(musubi_lora, out, rank=3)
    modules = raw_modules(musubi_lora)[0]
    for report in result.modules:
        delta = reference_delta(modules[report.stem])
        optimal = optimal_errors(delta)
        assert report.algorithm == "lora" and report.rank == 3
        assert abs(report.error - optimal[3]) <= 1e-4 * optimal[3]
        assert abs(rel_err(lora_reader_delta(out, report.stem), delta) - optimal[3]) <= 1e-4 * optimal[3] + 1e-6


def test_resize_to_its_own_rank_is_exact(musubi_lora, tmp_path):
    out = tmp_path / "same.safetensors"
    result = resize_file(musubi_lora, out, rank=1000)
    own = read_adapter(musubi_lora).modules
    assert all(m.rank == own[m.stem].rank and m.error == 0 for m in result.modules)
    entry = next(e for e in SOURCES if e["file"] == "wan_loha_r4_a2.safetensors")
    expected = expected_weights(entry)
    merged = merged_with(tmp_path, original_base(expected), out)
    for path in module_paths(expected):
        assert rel_err(merged[f"{path}.weight"], expected[f"merged/1.0/{path}.weight"]) <= 1e-5, path


def test_resize_of_a_conv_lora_with_a_tucker_core(write_safetensors, tmp_path):
    stem = "lora_unet_blocks_0_ffn_0"
    up, down, mid = torch.randn(12, 4, 1, 1), torch.randn(4, 6, 1, 1), torch.randn(4, 4, 3, 3)
    path = write_safetensors({f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down,
                              f"{stem}.lora_mid.weight": mid, f"{stem}.alpha": torch.tensor(2.0)})
    delta = torch.einsum("m n k l, i m, n j -> i j k l", mid.double(), up.double().flatten(1), down.double().flatten(1)) * 0.5
    optimal = optimal_errors(delta)
    result = resize_file(path, tmp_path / "out.safetensors", max_error=optimal[2] * 1.01, arch="wan")
    assert result.modules[0].rank == 2
    lora = read_adapter(tmp_path / "out.safetensors").modules[stem]
    assert lora.params["down"].shape == (2, 6, 3, 3) and "mid" not in lora.params
    assert rel_err(lora.delta_weight(), delta) == pytest.approx(optimal[2], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Files from the other trainers, their tools' own merges

# What each layout does with each file once it is LoRA: exact, or refused for a reason the layout
# cannot hold (LoKr q/k/v that convert refuses to stack are stacked once they are LoRA).
WILD_REFUSED = {
    "musubi": {**{e["file"].removesuffix(".safetensors"): "holds no full differences" for e in WILD_ENTRIES
                  if e["source"] == "comfyui"},
               "st_flux_loha": "missing part", "st_hunyuan_video_loha": "missing part"},
    "diffusers": {"st_flux_loha": "missing part", "st_hunyuan_video_loha": "missing part"},
    "comfyui": {"st_hunyuan_video_loha": "maps no name onto their row slices"},
}


@pytest.mark.parametrize("to", ["musubi", "diffusers", "comfyui"])
@pytest.mark.parametrize("entry", WILD_ENTRIES, ids=[e["file"] for e in WILD_ENTRIES])
def test_wild_files_at_full_rank_give_their_tools_merges(entry, to, tmp_path):
    name = entry["file"].removesuffix(".safetensors")
    out = tmp_path / "lora.safetensors"
    reason = WILD_REFUSED[to].get(name)
    if reason:
        with pytest.raises(AdapterError, match=f"{reason}.*nothing written"):
            to_lora_file(WILD / entry["file"], out, max_error=0, to=to, dtype="float32")
        assert list(tmp_path.iterdir()) == []
        return
    result = to_lora_file(WILD / entry["file"], out, max_error=0, to=to, dtype="float32")
    lora = read_adapter(out)
    assert lora.format == to and {m.algorithm for m in lora.modules.values()} <= {"lora", "diff"}
    assert all(m.rank is not None or m.algorithm == "diff" for m in result.modules)
    expected = wild_expected(entry)
    merged_path = tmp_path / "merged.safetensors"
    merge(WILD / entry["base"], merged_path, [(out, 1.0)], progress=False)
    merged, base = load_file(str(merged_path)), load_file(str(WILD / entry["base"]))
    changed = wild_changed_keys(expected)
    for key in changed:
        assert change_err(merged[key], expected[f"merged/1.0/{key}"], expected[f"base/{key}"]) <= 1e-5, key
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in changed)


def test_the_output_keeps_each_modules_dtype_by_default(tmp_path):
    out = tmp_path / "lora.safetensors"
    to_lora_file(WILD / "st_wan_lokr.safetensors", out, rank=4)
    with safe_open(str(out), "pt") as f:
        dtypes = {key.rsplit(".", 2)[-2] if key.endswith(".weight") else "alpha": f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118
    assert dtypes == {"lora_up": "BF16", "lora_down": "BF16", "alpha": "F32"}


# ---------------------------------------------------------------------------------------------
# DoRA: baked with the base weight


def dora_file(tmp_path, axis: str):
    """Musubi's Wan LoHa with a DoRA magnitude on every module (per output row or per input column),
    and the fixture's base in the original naming."""
    entry = next(e for e in SOURCES if e["file"] == "wan_loha_r4_a2.safetensors")
    expected = expected_weights(entry)
    tensors = load_file(str(MUSUBI / entry["file"]))
    for path in module_paths(expected):
        weight = expected[f"base/{path}.weight"]
        norms = weight.norm(dim=1, keepdim=True) if axis == "out" else weight.norm(dim=0, keepdim=True)
        tensors[f"{stem_of(entry, path)}.dora_scale"] = norms * (1 + 0.3 * torch.rand(norms.shape))
    path = tmp_path / f"dora_{axis}.safetensors"
    save_file(tensors, str(path))
    base = tmp_path / "base.safetensors"
    save_file(original_base(expected), str(base))
    return path, base, expected


def test_dora_without_a_base_is_refused_by_name(tmp_path):
    path, _, _ = dora_file(tmp_path, "out")
    out = tmp_path / "lora.safetensors"
    with pytest.raises(AdapterError, match=r"DoRA modules \(lora_unet_blocks_0_cross_attn_k.*--base"):
        to_lora_file(path, out, rank=4)
    assert not out.exists()


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_with_its_base_gives_the_dora_merge(tmp_path, axis):
    """At full rank the LoRA makes the change DoRA makes at strength 1 (the pack's DoRA merge follows
    LyCORIS's forward; tests/test_lycoris_reference.py)."""
    path, base, expected = dora_file(tmp_path, axis)
    out = tmp_path / "lora.safetensors"
    result = to_lora_file(path, out, max_error=0, base=base)
    assert {m.algorithm for m in result.modules} == {"loha+dora"}
    assert "dora_scale" not in raw_modules(out)[0][result.modules[0].stem]
    reference = tmp_path / "dora_merged.safetensors"
    merge(base, reference, [(path, 1.0)], progress=False)
    want = load_file(str(reference))
    merged_path = tmp_path / "lora_merged.safetensors"
    merge(base, merged_path, [(out, 1.0)], progress=False)
    got = load_file(str(merged_path))
    for p in module_paths(expected):
        key = f"{p}.weight"
        assert change_err(got[key], want[key], expected[f"base/{key}"]) <= 1e-5, key
    assert json.loads(read_adapter(out).metadata[LOW_RANK_KEY])[-1]["base"] == "base.safetensors"


def test_dora_on_an_fp8_base_reads_its_dequantized_weights(tmp_path):
    """An fp8 base with a per-tensor scale gives the same LoRA as the fp32 weights it stands for."""
    path, base, expected = dora_file(tmp_path, "out")
    fp8, dequantized = {}, {}
    for key, weight in load_file(str(base)).items():
        scale = weight.abs().max() / 448
        fp8[key] = (weight / scale).to(torch.float8_e4m3fn)
        fp8[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        dequantized[key] = fp8[key].float() * scale
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    save_file(dequantized, str(tmp_path / "dequantized.safetensors"))
    for name in ("fp8", "dequantized"):
        to_lora_file(path, tmp_path / f"lora_{name}.safetensors", rank=3, base=tmp_path / f"{name}.safetensors")
    got, want = raw_modules(tmp_path / "lora_fp8.safetensors")[0], raw_modules(tmp_path / "lora_dequantized.safetensors")[0]
    assert got.keys() == want.keys()
    for stem in want:
        assert rel_err(lora_reader_delta(tmp_path / "lora_fp8.safetensors", stem),
                       lora_reader_delta(tmp_path / "lora_dequantized.safetensors", stem)) <= 1e-6, stem


def test_dora_on_a_full_size_layer_takes_the_randomized_svd(tmp_path, monkeypatch):
    """A 200×200 DoRA LoRA: its change to the base is a full-rank matrix, decomposed at rank 8 by the sketch of
    `lowrank.py` in both passes, so the error reported is the error of the factors written, and within
    0.1 % of the optimal one (a dense SVD of the change the pack's DoRA merge makes)."""
    widths = []
    original = lowrank.sketched_svd
    monkeypatch.setattr(lowrank, "sketched_svd", lambda matrix, width: widths.append(width) or original(matrix, width))
    gen = torch.Generator().manual_seed(5)
    stem, key = "lora_unet_blocks_0_self_attn_q", "blocks.0.self_attn.q.weight"
    weight = torch.randn(200, 200, generator=gen)
    save_file({key: weight}, str(tmp_path / "base.safetensors"))
    adapter = {f"{stem}.lora_up.weight": torch.randn(200, 12, generator=gen) * 0.3,
               f"{stem}.lora_down.weight": torch.randn(12, 200, generator=gen) * 0.3, f"{stem}.alpha": torch.tensor(12.0),
               f"{stem}.dora_scale": weight.norm(dim=1, keepdim=True) * (1 + 0.02 * torch.rand(200, 1, generator=gen))}
    save_file(adapter, str(tmp_path / "dora.safetensors"))
    out = tmp_path / "lora.safetensors"
    (report,) = to_lora_file(tmp_path / "dora.safetensors", out, rank=8, base=tmp_path / "base.safetensors", arch="wan").modules
    assert widths == [18, 18]  # the first pass (rank and error) and the second (the factors)
    merge(tmp_path / "base.safetensors", tmp_path / "merged.safetensors", [(tmp_path / "dora.safetensors", 1.0)], progress=False)
    change = load_file(str(tmp_path / "merged.safetensors"))[key].double() - weight.double()
    assert abs(rel_err(lora_reader_delta(out, stem), change) - report.error) <= 1e-6
    optimal = optimal_errors(change)[8]
    assert optimal * (1 - 1e-4) <= report.error <= optimal * 1.001


# ---------------------------------------------------------------------------------------------
# Metadata, bad input, the command line


def test_metadata_is_kept_and_the_ranks_and_errors_recorded(tmp_path):
    """The metadata stays, except the trainer's description of its network (a LoKr's module, dim and
    args), which would be false of a LoRA: it moves into the record."""
    source = MUSUBI / "flux_kontext_lokr_r3_a2.safetensors"
    out = tmp_path / "lora.safetensors"
    result = to_lora_file(source, out, max_error=0.1)
    before, after = raw_modules(source)[1], raw_modules(out)[1]
    network = {k: v for k, v in before.items() if k.startswith("ss_network_")}
    assert network.get("ss_network_module") == "networks.lokr" and not any(k.startswith("ss_network_") for k in after)
    assert all(after[k] == v for k, v in before.items() if k not in network)
    record = json.loads(after[LOW_RANK_KEY])[-1]
    assert record["source_network"] == network
    assert record["command"] == "to-lora" and record["max_error"] == 0.1 and record["source"] == source.name
    assert record["modules"] == {m.stem: {"algorithm": "lokr", "rank": m.rank, "error": m.error} for m in result.modules}
    assert len({m.rank for m in result.modules}) > 1  # the bound gives different modules different ranks


def test_an_existing_output_is_not_replaced(tmp_path):
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(AdapterError, match="output file exists"):
        to_lora_file(MUSUBI / "wan_lokr_r3_a2.safetensors", out, rank=2)
    assert out.read_bytes() == b"keep me"
    to_lora_file(MUSUBI / "wan_lokr_r3_a2.safetensors", out, rank=2, overwrite=True)
    assert read_adapter(out).modules


def test_the_output_may_not_be_the_input(musubi_lora):
    before = musubi_lora.read_bytes()
    with pytest.raises(AdapterError, match="would replace the input"):
        resize_file(musubi_lora, musubi_lora, rank=2, overwrite=True)
    assert musubi_lora.read_bytes() == before


def test_resize_refuses_what_is_not_lora(tmp_path):
    """resize keeps to LoRA files; to-lora is the command that turns LoHa / LoKr into LoRA."""
    with pytest.raises(AdapterError, match=r"resize takes LoRA files.*lora_unet_blocks_0_cross_attn_k \(lokr\).*to-lora"):
        resize_file(MUSUBI / "wan_lokr_r3_a2.safetensors", tmp_path / "out.safetensors", rank=2)
    assert list(tmp_path.iterdir()) == []


def test_nan_values_are_refused_and_nothing_is_written(write_safetensors, tmp_path):
    stem = "lora_unet_blocks_0_ffn_0"
    w2 = torch.randn(4, 4)
    w2[1, 2] = float("nan")
    path = write_safetensors({f"{stem}.lokr_w1": torch.randn(2, 2), f"{stem}.lokr_w2": w2})
    out = tmp_path / "out" / "lora.safetensors"
    out.parent.mkdir()
    with pytest.raises(AdapterError, match=f"NaN/Inf.*{stem}.lokr_w2"):
        to_lora_file(path, out, rank=2, arch="wan")
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(("options", "message"), [
    ({"rank": 0}, "rank must be"), ({"max_error": -0.1}, "maximum error"), ({"max_error": float("nan")}, "maximum error"),
    ({"rank": 2, "max_error": 0.1}, "exactly one"), ({}, "exactly one"), ({"rank": 2, "dtype": "float8"}, "unknown dtype"),
])
def test_bad_options_are_refused(options, message, tmp_path):
    with pytest.raises(AdapterError, match=message):
        to_lora_file(MUSUBI / "wan_lokr_r3_a2.safetensors", tmp_path / "out.safetensors", **options)


def test_a_layout_that_cannot_hold_the_file_is_refused_before_any_svd(tmp_path, monkeypatch):
    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran")

    for name in ("svd", "svdvals", "qr"):
        monkeypatch.setattr(torch.linalg, name, no_svd)
    with pytest.raises(AdapterError, match="musubi layout holds no full differences.*nothing written"):
        to_lora_file(WILD / "comfy_wan_lokr.safetensors", tmp_path / "out.safetensors", rank=2, to="musubi")


class Stop(Exception):
    pass


@pytest.mark.parametrize("command", ["to-lora", "resize"])
def test_progress_counts_every_module_and_a_stop_leaves_nothing(command, musubi_lora, tmp_path):
    """`on_progress(done, total)` after each module decomposed and each written; raising from it (ComfyUI's
    Cancel) while choosing the ranks or while writing leaves no output and no temporary file."""
    source = MUSUBI / "wan_loha_r4_a2.safetensors" if command == "to-lora" else musubi_lora
    run = to_lora_file if command == "to-lora" else resize_file
    folder = tmp_path / "outputs"
    folder.mkdir()
    calls = []
    run(source, folder / "out.safetensors", rank=2, on_progress=lambda *c: calls.append(c))
    modules = len(read_adapter(source).modules)
    assert calls == [(i, 2 * modules) for i in range(1, 2 * modules + 1)]
    for stop_at in (1, modules + 1, len(calls)):
        def stop(done, total, stop_at=stop_at):
            if done == stop_at:
                raise Stop

        with pytest.raises(Stop):
            run(source, folder / "stopped.safetensors", rank=2, on_progress=stop)
        assert [p.name for p in folder.iterdir()] == ["out.safetensors"]


def test_cli_prints_the_table(tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    assert main(["to-lora", str(MUSUBI / "wan_loha_r4_a2.safetensors"), str(out), "--rank", "3", "--max-modules", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["module", "algorithm", "rank", "relative", "error"])
    rows = lines[header + 1 : header + 6]
    assert all(row.split()[1:3] == ["loha", "3"] and float(row.split()[3]) > 0 for row in rows)
    assert lines[header + 6].strip().startswith("... and 19 more modules")
    assert "24 modules as LoRA, rank 3; largest relative error" in lines[-1]

    assert main(["resize", str(out), str(tmp_path / "r2.safetensors"), "--max-error", "0.5", "--to", "comfyui"]) == 0
    assert read_adapter(tmp_path / "r2.safetensors").format == "comfyui"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["resize", str(MUSUBI / "wan_lokr_r3_a2.safetensors"), str(tmp_path / "o.safetensors"), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("comfyui-lycoris resize: error: ") and "to-lora" in err
    for bad in (["--rank", "0"], ["--max-error", "-1"], ["--rank", "2", "--max-error", "0.1"], []):
        with pytest.raises(SystemExit) as stop:
            main(["to-lora", str(MUSUBI / "wan_lokr_r3_a2.safetensors"), str(tmp_path / "o.safetensors"), *bad])
        assert stop.value.code == 2
    assert list(tmp_path.iterdir()) == []
