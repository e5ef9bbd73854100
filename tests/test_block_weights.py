"""Block weights: the parser, the blocks counted in each model, the errors, and `merge` reproducing
Musubi's own merges scaled per block.

Every expectation below is built here from the fixtures: ΔW = merged/1.0 − base per module path (Musubi's
merge at strength 1), and each module's factor is derived here from its Musubi path and the block order
written out in BLOCK_ORDER, so W' = base + strength · factor · ΔW owes nothing to the pack's tables.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from comfyui_lycoris.convert import convert_file
from comfyui_lycoris.lycoris_core import AdapterError, read_adapter
from comfyui_lycoris.lycoris_core.architectures import ARCHITECTURES, SUPPORTED
from comfyui_lycoris.lycoris_core.block_weights import (
    PRESETS,
    BlockWeightsText,
    Entry,
    parse_block_weights,
    presets_for,
    resolve_block_weights,
)
from comfyui_lycoris.lycoris_core.merge import merge, parse_adapter_arg
from comfyui_lycoris.lycoris_core.plan import make_plan
from helpers import (
    BLOCK_ORDER,
    MUSUBI,
    adapter_entries,
    block_of,
    blocks_in,
    comfy_base,
    comfy_names,
    expected_weights,
    is_attention,
    module_paths,
    original_base,
    rel_err,
    scaled_merge,
    vector_for,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ENTRIES = adapter_entries()
SOURCES = [e for e in ENTRIES if e["format"] == "musubi"]
COMFY_ENTRIES = [e for e in ENTRIES if e["arch_id"] != "framepack"]  # ComfyUI core has no FramePack model
def run_merge(tmp_path, base_tensors, adapters):
    """(the merged tensors, the MergeResult) of BASE = `base_tensors` and `adapters`."""
    base = tmp_path / "base.safetensors"
    save_file(base_tensors, str(base))
    result = merge(base, tmp_path / "out.safetensors", adapters, progress=False)
    return load_file(result.output), result


# -- the parser ------------------------------------------------------------------------------------


def test_empty_text_is_no_block_weights():
    assert parse_block_weights("") is None
    assert parse_block_weights("  \n# only a comment\n , ,") is None


def test_numbers_only_are_a_vector_over_lines_and_commas():
    assert parse_block_weights("1, 0.5,\n-2 # the third\n1e-1") == BlockWeightsText(vector=(1.0, 0.5, -2.0, 0.1))


def test_presets_and_entries_keep_their_order():
    parsed = parse_block_weights("attn_only\n double_blocks.0-9 = 0.5, single_blocks=0 # off\nblocks.3.ffn=2")
    assert parsed == BlockWeightsText(items=(
        "attn_only", Entry("double_blocks.0-9", 0.5), Entry("single_blocks", 0.0), Entry("blocks.3.ffn", 2.0)))


@pytest.mark.parametrize("text, message", [
    ("attn=1, 0.5", "'0.5' is a bare number among pattern entries"),
    ("attn=half", "'attn=half': 'half' is not a number"),
    ("=1", "'=1' has no pattern before '='"),
    ("1, nan", "'nan': nan is not a finite number"),
    ("attn=inf", "'attn=inf': inf is not a finite number"),
    ("1, 1e39", "1e39 is not a finite number within the float32 range"),
])
def test_malformed_text_is_one_line_error(text, message):
    with pytest.raises(AdapterError) as e:
        parse_block_weights(text)
    assert message in str(e.value) and "\n" not in str(e.value)


# -- the blocks of each model ---------------------------------------------------------------------


def full_size_names(fixture_names, arch: str, counts: dict[str, int]) -> list[str]:
    """A model's weight names at full size: the fixture model's names with each list of blocks repeated."""
    names = set()
    for name in fixture_names:
        block = block_of(arch, name)
        if block is None:
            names.add(name)
        else:
            inner = name.split(".", 2)[2]
            names.update(f"{block[0]}.{i}.{inner}" for i in range(counts[block[0]]))
    return sorted(names)


# FramePack has no ComfyUI model: its weights are named as in the fixture model.
FRAMEPACK_NAMES = [k.split("/", 1)[1].removesuffix(".weight")
                   for k in expected_weights(next(e for e in SOURCES if e["arch_id"] == "framepack"))
                   if k.startswith(("base/", "unadapted/"))]
# Real model sizes (Wan 2.1 14B and 1.3B / Wan 2.2 5B, FLUX.1, HunyuanVideo, HunyuanVideo 1.5, FramePack,
# Qwen-Image, Z-Image Turbo), each made from the fixture model's names.
SIZES = [
    ("wan", {"blocks": 40}),
    ("wan", {"blocks": 30}),
    ("flux", {"double_blocks": 19, "single_blocks": 38}),
    ("hunyuan_video", {"double_blocks": 20, "single_blocks": 40}),
    ("hunyuan_video_1_5", {"double_blocks": 54}),
    ("framepack", {"transformer_blocks": 20, "single_transformer_blocks": 40}),
    ("qwen_image", {"transformer_blocks": 60}),
    ("z_image", {"context_refiner": 2, "noise_refiner": 2, "layers": 30}),
]


def names_of(arch: str) -> list[str]:
    """The module paths of the weights of the fixture-sized model (ComfyUI's, for FramePack the fixture's)."""
    return FRAMEPACK_NAMES if arch == "framepack" else [k.rsplit(".", 1)[0] for k in comfy_names(arch)]


@pytest.mark.parametrize("arch, counts", SIZES, ids=[f"{a}-{sum(c.values())}" for a, c in SIZES])
def test_blocks_are_counted_in_the_model(arch, counts):
    names = full_size_names(names_of(arch), arch, counts)
    total = sum(counts.values())
    numbered = resolve_block_weights(", ".join(str(n) for n in range(total)), arch, names)  # block n gets n
    half = resolve_block_weights("first_half", arch, names)
    order = [(name, i) for name in BLOCK_ORDER[arch] for i in range(counts.get(name, 0))]
    assert len(order) == total
    for n, (name, i) in enumerate(order):
        for weight in [x for x in names if block_of(arch, x) == (name, i)]:
            assert numbered.factor(weight) == n, weight
            assert half.factor(weight) == (1.0 if n < total // 2 else 0.0), weight  # the first ⌊N/2⌋ blocks
    for outside in [x for x in names if block_of(arch, x) is None]:
        assert numbered.factor(outside) == 1.0, outside
    with pytest.raises(AdapterError) as e:
        resolve_block_weights(", ".join(["1"] * (total - 1)), arch, names)
    message = str(e.value)
    assert "\n" not in message and f"{total - 1} numbers given" in message and f"has {total} blocks" in message
    assert ARCHITECTURES[arch].title in message and "attn_only" in message


def test_first_half_of_flux_reads_as_runs():
    names = full_size_names(names_of("flux"), "flux", {"double_blocks": 19, "single_blocks": 38})
    described = resolve_block_weights("first_half", "flux", names).describe()
    assert described == "double_blocks.0-18: 1; single_blocks.0-8: 1; single_blocks.9-37: 0"
    described = resolve_block_weights("all=0.5\nattn=1\ndouble_blocks.3=0", "flux", names).describe()
    assert described == ("double_blocks.0-2: 0.5, attn 1; double_blocks.3: 0; double_blocks.4-18: 0.5, attn 1; "
                         "single_blocks.0-37: 0.5, attn 1")


@pytest.mark.parametrize("arch", [a.id for a in SUPPORTED])
def test_every_layer_in_a_block_has_a_kind(arch):
    """attn_only / ffn_only leave nothing unnamed: each weight inside a block is of some kind, and the
    pattern words (kinds, lists, selectors) cannot be taken for one another."""
    names = names_of(arch)
    bw = resolve_block_weights("all", arch, names)
    assert bw.layout.blocks
    for block in bw.layout.blocks:
        for inner in bw.layout.inner[block]:
            assert bw.layout.kinds_of(inner), f"{block}.{inner} is of no kind"
    record = ARCHITECTURES[arch]
    words = [k.name for k in record.layer_kinds] + [b.name for b in record.weighted_blocks] + ["all", "first_half", "second_half"]
    assert len(words) == len(set(words))
    assert {"attn", "ffn"} <= {k.name for k in record.layer_kinds}


def test_presets_per_architecture():
    by_arch = {a.id: [p.name for p in presets_for(a)] for a in SUPPORTED}
    common = ["all", "none", "attn_only", "ffn_only", "first_half", "second_half"]
    for arch in ("wan", "hunyuan_video_1_5", "qwen_image", "z_image"):
        assert by_arch[arch] == common
    for arch in ("hunyuan_video", "framepack", "flux", "flux2"):
        assert by_arch[arch] == common + ["double_only", "single_only"]
    assert {p.name for p in PRESETS} == set(common + ["double_only", "single_only"])


@pytest.mark.parametrize("text, message", [
    ("half_and_half", "unknown preset 'half_and_half'"),
    ("double_only", "unknown preset 'double_only'"),  # Wan has one list of blocks
    ("bloks=0.5", "unknown pattern 'bloks'"),
    ("blocks.2=1", "'blocks.2' names no block of the model (blocks holds 0-1"),
    ("blocks.1-0=1", "'blocks.1-0' names no block"),
    ("blocks.x=1", "'blocks.x' names no block"),
    ("mod=0", "unknown pattern 'mod'"),  # Wan's blocks have no modulation layer to adapt
])
def test_patterns_that_do_not_fit_the_model(text, message):
    with pytest.raises(AdapterError) as e:
        resolve_block_weights(text, "wan", names_of("wan"))
    text = str(e.value)
    assert message in text and "\n" not in text
    assert "Wan 2.1/2.2 (wan) model has 2 blocks (blocks.0-1)" in text and "first_half, second_half" in text


def test_block_weights_need_a_known_architecture():
    with pytest.raises(AdapterError, match="has no blocks"):
        resolve_block_weights("all", None, ["a.0.b"])
    with pytest.raises(AdapterError, match="the model has none of"):
        resolve_block_weights("all", "wan", ["head.head", "patch_embedding"])


def test_framepack_lists_go_by_either_name():
    a = resolve_block_weights("double_blocks=0.5, single_transformer_blocks.1=2", "framepack", FRAMEPACK_NAMES)
    b = resolve_block_weights("transformer_blocks=0.5, single_blocks.1=2", "framepack", FRAMEPACK_NAMES)
    assert a.describe() == b.describe() == "double_blocks.0-1: 0.5; single_blocks.0: 1; single_blocks.1: 2"


# -- every naming of a layer gets its block's factor -----------------------------------------------


@pytest.mark.parametrize("entry", [e for e in SOURCES if e["algorithm"] == "loha" and e["arch_id"] != "framepack"],
                         ids=lambda e: e["file"])
def test_every_naming_gets_the_same_factor(entry, tmp_path):
    arch = entry["arch_id"]
    shapes = comfy_names(arch)
    vector = ", ".join(f"{v:g}" for v in vector_for(blocks_in(arch, shapes)))
    files = [MUSUBI / entry["file"], MUSUBI / entry["file"].replace(".safetensors", ".diffusers.safetensors")]
    files.append(tmp_path / "comfyui.safetensors")
    convert_file(files[0], files[2], to="comfyui")
    factors = []  # per file, {weight key: factor} (a key lies in one block)
    for path in files:
        plan = make_plan(read_adapter(path), shapes, "auto", vector)
        factors.append({p.target.key: p.factor for p in plan.patches})
        assert plan.switched_off and not plan.unmatched
    assert factors[0] and factors[0] == factors[1] == factors[2]


# -- merge: Musubi's merges scaled per block -------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_vector_merge_onto_original_naming(entry, tmp_path):
    arch, expected = entry["arch_id"], expected_weights(entry)
    base = original_base(expected)
    blocks = blocks_in(arch, base)
    vector = vector_for(blocks)
    merged, result = run_merge(tmp_path, base, [(MUSUBI / entry["file"], 0.5, ", ".join(f"{v:g}" for v in vector))])
    assert result.plans[0].switched_off and not result.plans[0].unmatched
    for path in module_paths(expected):
        factor = vector[blocks.index(block_of(arch, path))]
        assert rel_err(merged[f"{path}.weight"], scaled_merge(expected, path, 0.5, factor)) <= 1e-5, (path, factor)
        if factor == 0:
            assert torch.equal(merged[f"{path}.weight"], base[f"{path}.weight"]), path


@pytest.mark.parametrize("entry", COMFY_ENTRIES, ids=[e["file"] for e in COMFY_ENTRIES])
def test_vector_merge_onto_comfyui_naming(entry, tmp_path):
    """Split q/k/v on row slices of ComfyUI's fused weights, each slice at its own block's factor."""
    arch, expected = entry["arch_id"], expected_weights(entry)
    base, where = comfy_base(arch, expected, key_prefix="model.diffusion_model.")
    blocks = blocks_in(arch, base)
    vector = vector_for(blocks)
    merged, _ = run_merge(tmp_path, base, [(MUSUBI / entry["file"], 1.0, ", ".join(f"{v:g}" for v in vector))])
    for path, (key, rows) in where.items():
        factor = vector[blocks.index(block_of(arch, path))]
        assert rel_err(merged[key][rows], scaled_merge(expected, path, 1.0, factor)) <= 1e-5, (path, factor)


@pytest.mark.parametrize("entry", SOURCES, ids=[e["file"] for e in SOURCES])
def test_pattern_and_preset_merge(entry, tmp_path):
    """`all=0.5, attn=2, <last block>=-1` on one adapter and a preset on a second copy of it, in one merge."""
    arch, expected = entry["arch_id"], expected_weights(entry)
    base = original_base(expected)
    blocks = blocks_in(arch, base)
    last = blocks[-1]
    patterns = f"all=0.5\nattn=2\n{last[0]}.{last[1]}=-1"
    preset = "single_only" if len(BLOCK_ORDER[arch]) == 2 else "second_half"
    merged, _ = run_merge(tmp_path, base, [(MUSUBI / entry["file"], 1.0, patterns), (MUSUBI / entry["file"], 0.5, preset)])
    for path in module_paths(expected):
        block = block_of(arch, path)
        first = -1.0 if block == last else 2.0 if is_attention(path) else 0.5
        if preset == "single_only":
            second = 1.0 if block[0] == BLOCK_ORDER[arch][1] else 0.0
        else:
            second = 1.0 if blocks.index(block) >= len(blocks) // 2 else 0.0
        base_w = expected[f"base/{path}.weight"]
        delta = expected[f"merged/1.0/{path}.weight"] - base_w
        assert rel_err(merged[f"{path}.weight"], base_w + (first + 0.5 * second) * delta) <= 1e-5, (path, first, second)


def test_wrong_vector_or_unknown_preset_stops_the_merge(tmp_path):
    entry = next(e for e in SOURCES if e["arch_id"] == "flux" and e["algorithm"] == "lokr")
    base = tmp_path / "base.safetensors"
    save_file(original_base(expected_weights(entry)), str(base))
    out = tmp_path / "out.safetensors"
    for blocks, message in (("1, 2, 3", "3 numbers given"), ("attn_onyl", "unknown preset 'attn_onyl'")):
        with pytest.raises(AdapterError) as e:
            merge(base, out, [(MUSUBI / entry["file"], 1.0, blocks)], progress=False)
        text = str(e.value)
        assert message in text and "FLUX.1 dev / Kontext (flux) model has 4 blocks" in text and "\n" not in text
        assert "double_only, single_only" in text
        assert not out.exists()


def test_merge_summary_and_record_list_the_multipliers(tmp_path):
    entry = next(e for e in SOURCES if e["arch_id"] == "wan" and e["algorithm"] == "lokr")
    _, result = run_merge(tmp_path, original_base(expected_weights(entry)), [(MUSUBI / entry["file"], 1.0, "0, 1")])
    summary = result.summary()
    assert "24/24 modules matched" in summary and "12 at block weight 0 (not applied)" in summary
    assert "block weights 2 numbers: blocks.0: 0; blocks.1: 1; outside the blocks: 1" in summary
    with safe_open(result.output, "pt") as f:
        record = json.loads(f.metadata()["comfyui_lycoris.merge"])
    assert record[0]["block_weights"] == "blocks.0: 0; blocks.1: 1"


# -- FILE:STRENGTH:BLOCKS --------------------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [
    ("a.safetensors", ("a.safetensors", 1.0, "")),
    ("a.safetensors:0.8", ("a.safetensors", 0.8, "")),
    ("a.safetensors:0.8:attn_only", ("a.safetensors", 0.8, "attn_only")),
    ("a.safetensors:1:1,1,0.5,0", ("a.safetensors", 1.0, "1,1,0.5,0")),
    ("a.safetensors:-1:double_blocks=0.5,single_blocks.0-9=0", ("a.safetensors", -1.0, "double_blocks=0.5,single_blocks.0-9=0")),
    (r"C:\loras\a.safetensors", (r"C:\loras\a.safetensors", 1.0, "")),
    (r"C:\loras\a.safetensors:0.5", (r"C:\loras\a.safetensors", 0.5, "")),
    (r"C:\loras\a.safetensors:0.5:first_half", (r"C:\loras\a.safetensors", 0.5, "first_half")),
])
def test_adapter_argument(text, parsed):
    assert parse_adapter_arg(text) == parsed


def test_adapter_argument_with_colons_in_the_file_name(tmp_path):
    named = tmp_path / "v1:0.5:final.safetensors"
    named.write_bytes(b"")
    assert parse_adapter_arg(str(named)) == (str(named), 1.0, "")
    assert parse_adapter_arg(f"{named}:0.7:attn_only") == (str(named), 0.7, "attn_only")
    plain = tmp_path / "a.safetensors"
    plain.write_bytes(b"")
    with pytest.raises(AdapterError, match="FILE:STRENGTH:BLOCKS"):
        parse_adapter_arg(f"{plain}:attn_only")


def test_cli_merge_takes_block_weights(tmp_path):
    """`merge --adapter FILE:STRENGTH:BLOCKS` through the command line as it is; q/k/v slices of HunyuanVideo 1.5."""
    entry = next(e for e in SOURCES if e["file"] == "hunyuan_video_1_5_lokr_r3_a2.safetensors")
    expected = expected_weights(entry)
    base_tensors, where = comfy_base("hunyuan_video_1_5", expected)
    base = tmp_path / "base.safetensors"
    save_file(base_tensors, str(base))
    out = tmp_path / "merged.safetensors"

    def run(blocks: str):
        cmd = [sys.executable, "-m", "comfyui_lycoris", "merge", str(base), str(out), "--adapter",
               f"{MUSUBI / entry['file']}:0.5:{blocks}"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    done = run("-1,2")
    assert done.returncode == 0, done.stderr
    assert "block weights 2 numbers: double_blocks.0: -1; double_blocks.1: 2" in done.stdout
    merged = load_file(str(out))
    for path, (key, rows) in where.items():
        factor = {0: -1.0, 1: 2.0}[block_of("hunyuan_video_1_5", path)[1]]
        assert rel_err(merged[key][rows], scaled_merge(expected, path, 0.5, factor)) <= 1e-5, path
    out.unlink()
    for blocks in ("1,2,3", "double_only"):
        failed = run(blocks)
        assert failed.returncode == 2 and not out.exists()
        assert len(failed.stderr.strip().splitlines()) == 1 and "has 2 blocks (double_blocks.0-1)" in failed.stderr
