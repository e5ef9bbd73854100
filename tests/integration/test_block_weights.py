"""Block weights in the loader nodes inside a real ComfyUI, on ComfyUI's own models, against Musubi's own
merges scaled per block: W' = base + strength · factor · ΔW with ΔW = merged/1.0 − base from the fixtures
and each module's factor derived here from its Musubi path (helpers.BLOCK_ORDER), in patch and in bypass
mode, split q/k/v on row slices of fused weights and full-matrix LoKr included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from comfyui_host import having_model, require_comfyui
from helpers import (
    BLOCK_ORDER,
    adapter_entries,
    block_of,
    blocks_in,
    expected_weights,
    is_attention,
    module_paths,
    rel_err,
    scaled_merge,
    vector_for,
)

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

# Every Musubi fixture file (sources and Diffusers copies) for a model the running ComfyUI has (none for FramePack).
ENTRIES = having_model([e for e in adapter_entries() if e["arch_id"] != "framepack"], lambda e: e["arch_id"])
SOURCES = [e for e in ENTRIES if e["format"] == "musubi"]
MODES = ["patch", "bypass"]


def load(env, model, entry, strength, mode, block_weights, node="LycorisLoaderModelOnly"):
    out = env.node(node).execute(model=model, lora_name=entry["file"], strength_model=strength, architecture="auto",
                                 mode=mode, block_weights=block_weights, **({"strength_clip": 1.0} if node == "LycorisLoader" else {}))
    return out.args[0], out.args[-1]


def vector_text(env, mp, arch) -> tuple[str, dict]:
    """One number per block of the model (counted here from its weight names) and {block: number}."""
    blocks = blocks_in(arch, mp.model.state_dict())
    vector = vector_for(blocks)
    return ", ".join(f"{v:g}" for v in vector), dict(zip(blocks, vector))


def check(env, mp, patched, mode, where, wanted: dict[str, torch.Tensor]):
    """The model with `patched`'s patches or hooks gives `wanted` for each Musubi path: weights (patch mode) or
    layer outputs (bypass mode, weights untouched); every other weight and row stays as it was."""
    before = env.weights(mp)
    full = {}
    for path, (key, rows) in where.items():
        full.setdefault(key, before[key].clone())[rows] = wanted[path]
    gen = torch.Generator().manual_seed(1)
    inputs = {key: torch.randn(2, 3, w.shape[1], generator=gen) for key, w in full.items()}
    layers = {key: env.comfy.utils.get_attr(patched.model, key[: -len(".weight")]) for key in full}
    patched.patch_model()
    try:
        after = env.weights(patched)
        with torch.no_grad():
            outputs = {key: layers[key](x) for key, x in inputs.items()}
    finally:
        patched.unpatch_model()
    for key, weight in before.items():
        if mode == "patch" and key in full:
            assert rel_err(after[key], full[key]) <= 1e-5, key
        else:
            assert torch.equal(after[key], weight), f"{key} must stay as it was"
    for key, x in inputs.items():
        bias = None if layers[key].bias is None else layers[key].bias.detach()
        assert rel_err(outputs[key], F.linear(x, full[key], bias)) <= 1e-5, key


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_vector_equals_musubi_merge_scaled_per_block(comfy_env, entry, mode):
    arch, expected = entry["arch_id"], expected_weights(entry)
    mp = comfy_env.model(arch)
    where = comfy_env.set_base(mp, arch, expected)
    text, factor_of = vector_text(comfy_env, mp, arch)
    patched, report = load(comfy_env, mp, entry, 0.5, mode, text)
    wanted = {path: scaled_merge(expected, path, 0.5, factor_of[block_of(arch, path)]) for path in where}
    check(comfy_env, mp, patched, mode, where, wanted)
    zeroed = sum(factor_of[block_of(arch, path)] == 0 for path in module_paths(expected))
    assert zeroed and f"zeroed        {zeroed} modules at block weight 0 (not applied)" in report
    assert f"blocks        {len(factor_of)} numbers: " in report and "unmatched     0" in report


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("entry", SOURCES, ids=[e["file"] for e in SOURCES])
def test_patterns_and_a_preset_on_chained_loaders(comfy_env, entry, mode):
    """Two loaders of one file: `all=0.5, attn=2, <last block>=-1` at strength 1, then a preset at 0.5."""
    arch, expected = entry["arch_id"], expected_weights(entry)
    mp = comfy_env.model(arch)
    where = comfy_env.set_base(mp, arch, expected)
    blocks = blocks_in(arch, mp.model.state_dict())
    last = blocks[-1]
    preset = "single_only" if len(BLOCK_ORDER[arch]) == 2 else "second_half"
    first, _ = load(comfy_env, mp, entry, 1.0, mode, f"all=0.5\nattn=2\n{last[0]}.{last[1]}=-1")
    patched, report = load(comfy_env, first, entry, 0.5, mode, preset)
    wanted = {}
    for path in where:
        block = block_of(arch, path)
        one = -1.0 if block == last else 2.0 if is_attention(path) else 0.5
        two = 1.0 if (block[0] == BLOCK_ORDER[arch][1] if preset == "single_only"
                      else blocks.index(block) >= len(blocks) // 2) else 0.0
        wanted[path] = scaled_merge(expected, path, 1.0, one + 0.5 * two)
    check(comfy_env, mp, patched, mode, where, wanted)
    assert f"blocks        {preset}: " in report


@pytest.mark.parametrize("text, message", [("1, 2, 3", "3 numbers given"), ("attn_onyl", "unknown preset 'attn_onyl'")])
@pytest.mark.parametrize("node", ["LycorisLoaderModelOnly", "LycorisLoader"])
def test_a_wrong_vector_or_preset_stops_the_load(comfy_env, node, text, message):
    entry = next(e for e in SOURCES if e["file"] == "flux_kontext_lokr_r3_a2.safetensors")
    with pytest.raises(comfy_env.core.AdapterError) as e:
        load(comfy_env, comfy_env.model("flux"), entry, 1.0, "patch", text, node=node)
    text = str(e.value)
    assert message in text and "FLUX.1 dev / Kontext (flux) model has 4 blocks" in text and "\n" not in text
    assert "double_only, single_only" in text


def test_loader_with_clip_takes_block_weights(comfy_env):
    entry = next(e for e in SOURCES if e["file"] == "wan_loha_r4_a2.safetensors")
    expected = expected_weights(entry)
    mp = comfy_env.model("wan")
    where = comfy_env.set_base(mp, "wan", expected)
    patched, report = load(comfy_env, mp, entry, 1.0, "patch", "ffn_only", node="LycorisLoader")
    wanted = {path: scaled_merge(expected, path, 1.0, 0.0 if is_attention(path) else 1.0) for path in where}
    check(comfy_env, mp, patched, "patch", where, wanted)
    assert "blocks        ffn_only: blocks.0-1: 0, ffn 1; outside the blocks: 1" in report
    zeroed = sum(is_attention(path) for path in where)
    assert f"block weights ffn_only, {zeroed} modules at 0" in comfy_env.pack.nodes.common.load_summary(report)


def test_no_block_weights_input_loads_as_before(comfy_env):
    """A workflow saved before block weights existed has no such input: the node runs as it always did."""
    entry = next(e for e in SOURCES if e["file"] == "wan_lokr_r3_a2.safetensors")
    expected = expected_weights(entry)
    mp = comfy_env.model("wan")
    where = comfy_env.set_base(mp, "wan", expected)
    out = comfy_env.node("LycorisLoaderModelOnly").execute(model=mp, lora_name=entry["file"], strength_model=1.0)
    patched, report = out.args
    check(comfy_env, mp, patched, "patch", where, {p: expected[f"merged/1.0/{p}.weight"] for p in where})
    assert "blocks " not in report
