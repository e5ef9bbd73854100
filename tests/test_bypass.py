"""Bypass hooks (lycoris_core.bypass): a hooked Linear computes what the merged weight computes.

References: Musubi's own merges (fixtures) for every fixture layer; for DoRA and full diffs, the
core's patch path (`apply_`), itself checked against lycoris-lora's forward in test_lycoris_reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from comfyui_lycoris.lycoris_core import AdapterError, read_adapter
from comfyui_lycoris.lycoris_core.bypass import BypassSet
from comfyui_lycoris.lycoris_core.loading import weight_shapes
from comfyui_lycoris.lycoris_core.plan import make_plan
from comfyui_lycoris.lycoris_core.rows import Rows
from helpers import MUSUBI, adapter_entries, expected_weights, module_paths, rel_err, stem_of

MUSUBI_FILES = [e for e in adapter_entries() if e["format"] == "musubi"]


def hook(hooks, layer, module, strength=1.0, rows=None, source_rows=None):
    """Adapt `layer` by `module` (its tensors read from its file, as the loader nodes do)."""
    hooks.add(layer, module, module.read(), strength, rows, source_rows)


def linear(weight: torch.Tensor, bias: bool = True) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias:
            layer.bias.copy_(torch.randn(weight.shape[0]))
    return layer.requires_grad_(False)


@pytest.mark.parametrize("entry", MUSUBI_FILES, ids=[e["file"] for e in MUSUBI_FILES])
def test_bypass_output_equals_musubi_merged_weight(entry):
    adapter = read_adapter(MUSUBI / entry["file"])
    expected = expected_weights(entry)
    x = torch.randn(3, 5, 10)  # hidden 10 in every fixture; layers with other widths get their own x
    for path in module_paths(expected):
        module = adapter.modules[stem_of(entry, path)]
        layer = linear(expected[f"base/{path}.weight"])
        xs = x if layer.in_features == 10 else torch.randn(3, 5, layer.in_features)
        for strength in ("1.0", "0.5"):
            hooks = BypassSet()
            hook(hooks, "", module, float(strength))
            hooks.attach(layer)
            got = layer(xs)
            hooks.detach()
            want = F.linear(xs, expected[f"merged/{strength}/{path}.weight"], layer.bias)
            assert rel_err(got, want) <= 1e-5, (path, strength)
        assert torch.equal(layer(xs), F.linear(xs, expected[f"base/{path}.weight"], layer.bias))  # detached


def test_split_qkv_land_on_output_rows_of_a_fused_layer():
    entry = next(e for e in MUSUBI_FILES if e["file"] == "hunyuan_video_1_5_lokr_r3_a2.safetensors")
    adapter, expected = read_adapter(MUSUBI / entry["file"]), expected_weights(entry)
    parts = [f"double_blocks.0.img_attn_{p}" for p in "qkv"]
    fused = linear(torch.cat([expected[f"base/{p}.weight"] for p in parts]))
    hooks = BypassSet()
    for i in (0, 2):  # q and v only: k's rows must stay the base layer's
        hook(hooks, "", adapter.modules[stem_of(entry, parts[i])], 0.5, rows=Rows(10 * i, 10 * i + 10))
    hooks.attach(fused)
    x = torch.randn(4, 10)
    got = fused(x)
    hooks.detach()
    want_weight = torch.cat([expected[f"merged/0.5/{parts[0]}.weight"], expected[f"base/{parts[1]}.weight"],
                             expected[f"merged/0.5/{parts[2]}.weight"]])
    assert rel_err(got, F.linear(x, want_weight, fused.bias)) <= 1e-5
    assert torch.equal(got[:, 10:20], fused(x)[:, 10:20])  # untouched rows: bit for bit


def loha_tensors(stem, out_features, in_features, rank=3, dora=None):
    t = {f"{stem}.hada_w1_a": torch.randn(out_features, rank), f"{stem}.hada_w1_b": torch.randn(rank, in_features),
         f"{stem}.hada_w2_a": torch.randn(out_features, rank), f"{stem}.hada_w2_b": torch.randn(rank, in_features),
         f"{stem}.alpha": torch.tensor(2.0)}
    if dora == "out":
        t[f"{stem}.dora_scale"] = torch.rand(out_features, 1) + 0.5
    elif dora == "in":
        t[f"{stem}.dora_scale"] = torch.rand(1, in_features) + 0.5
    return t


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "slice"])
def test_dora_matches_the_patched_weight(write_safetensors, axis, sliced):
    stem = "lora_unet_blocks_0_self_attn_q"
    module = read_adapter(write_safetensors(loha_tensors(stem, 6, 8, dora=axis))).modules[stem]
    weight = torch.randn(18 if sliced else 6, 8)
    rows = Rows(6, 12) if sliced else None
    layer = linear(weight)
    patched = weight.clone()
    target = patched[6:12] if sliced else patched
    module.bind().apply_(target, 0.7)  # the core's patch path writes through the view
    hooks = BypassSet()
    hook(hooks, "", module, 0.7, rows=rows)
    hooks.attach(layer)
    x = torch.randn(2, 3, 8)
    assert rel_err(layer(x), F.linear(x, patched, layer.bias)) <= 1e-5


def test_stacked_sets_add_up_and_detach_in_any_order(write_safetensors):
    stem = "lora_unet_blocks_0_ffn_0"
    first = read_adapter(write_safetensors(loha_tensors(stem, 12, 8))).modules[stem]
    second = read_adapter(write_safetensors({
        f"{stem}.lokr_w1": torch.randn(3, 2), f"{stem}.lokr_w2_a": torch.randn(4, 2),
        f"{stem}.lokr_w2_b": torch.randn(2, 4), f"{stem}.alpha": torch.tensor(1.0)})).modules[stem]
    weight = torch.randn(12, 8)
    layer = linear(weight)
    merged = weight.clone()
    first.bind().apply_(merged, 1.0)
    second.bind().apply_(merged, -0.5)
    a, b = BypassSet(), BypassSet()
    hook(a, "", first, 1.0)
    hook(b, "", second, -0.5)
    a.attach(layer)
    b.attach(layer)
    a.attach(layer)  # attaching twice to the same root is a no-op
    x = torch.randn(5, 8)
    assert rel_err(layer(x), F.linear(x, merged, layer.bias)) <= 1e-5
    a.detach()  # the first attached goes first
    only_b = weight.clone()
    second.bind().apply_(only_b, -0.5)
    assert rel_err(layer(x), F.linear(x, only_b, layer.bias)) <= 1e-5
    b.detach()
    assert torch.equal(layer(x), F.linear(x, weight, layer.bias))


def test_owners_share_the_hooks_and_each_takes_off_only_its_own_hold(write_safetensors):
    stem = "lora_unet_blocks_0_ffn_0"
    module = read_adapter(write_safetensors(loha_tensors(stem, 12, 8))).modules[stem]
    weight = torch.randn(12, 8)
    layer = linear(weight)
    merged = weight.clone()
    module.bind().apply_(merged, 1.0)
    hooks = BypassSet()
    hook(hooks, "", module)
    first, second, stranger = object(), object(), object()
    x = torch.randn(5, 8)
    hooks.attach(layer, owner=first)
    hooks.attach(layer, owner=second)  # shared: still one hook
    assert len(layer._forward_hooks) == 1
    hooks.detach(layer, owner=stranger)  # never attached: detaches nothing
    hooks.detach(layer, owner=first)
    assert rel_err(layer(x), F.linear(x, merged, layer.bias)) <= 1e-5  # the second still holds them
    hooks.detach(layer, owner=second)
    assert not layer._forward_hooks and not hooks.attached
    assert torch.equal(layer(x), F.linear(x, weight, layer.bias))


def test_full_diff_with_bias_on_a_slice(write_safetensors):
    stem = "diffusion_model.layers.0.attention.to_v"
    path = write_safetensors({f"{stem}.diff": torch.randn(4, 4), f"{stem}.diff_b": torch.randn(4)})
    module = read_adapter(path).modules[stem]
    layer = linear(torch.randn(12, 4))
    want_w, want_b = layer.weight.clone(), layer.bias.clone()
    want_w[8:] += 0.5 * module.delta_weight()
    want_b[8:] += 0.5 * module.bind().delta_bias()
    hooks = BypassSet()
    hook(hooks, "", module, 0.5, rows=Rows(8, 12))
    hooks.attach(layer)
    x = torch.randn(3, 4)
    assert rel_err(layer(x), F.linear(x, want_w, want_b)) <= 1e-5


@pytest.mark.parametrize("algorithm", ["loha", "lokr", "diff"])
def test_fused_module_on_split_layers_takes_its_output_rows(write_safetensors, algorithm):
    """A ComfyUI-layout qkv module on a model with separate to_q/to_k/to_v: planned by make_plan,
    each layer adds its own rows of the module's output (and of its bias difference)."""
    stem = "diffusion_model.layers.0.attention.qkv"
    if algorithm == "loha":
        t = loha_tensors(stem, 30, 10)
    elif algorithm == "lokr":
        t = {f"{stem}.lokr_w1": torch.randn(5, 2), f"{stem}.lokr_w2": torch.randn(6, 5)}  # row blocks straddle parts
    else:
        t = {f"{stem}.diff": torch.randn(30, 10), f"{stem}.diff_b": torch.randn(30)}
    adapter = read_adapter(write_safetensors(t))
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].attention = torch.nn.Module()
    for p in "qkv":
        setattr(model.layers[0].attention, f"to_{p}", linear(torch.randn(10, 10)))
    plan = make_plan(adapter, weight_shapes(model.state_dict()), "z_image")
    assert [p.target.source_rows for p in plan.patches] == [Rows(0, 10), Rows(10, 20), Rows(20, 30)]
    module = adapter.modules[stem]
    hooks = BypassSet()
    for patch in plan.patches:
        hook(hooks, patch.target.key[: -len(".weight")], module, 0.5, patch.target.rows, patch.target.source_rows)
    hooks.attach(model)
    x = torch.randn(3, 10)
    delta, delta_bias = module.delta_weight(), module.bind().delta_bias()
    for i, p in enumerate("qkv"):
        layer = getattr(model.layers[0].attention, f"to_{p}")
        rows = slice(10 * i, 10 * (i + 1))
        want_bias = layer.bias + (0 if delta_bias is None else 0.5 * delta_bias[rows])
        assert rel_err(layer(x), F.linear(x, layer.weight + 0.5 * delta[rows], want_bias)) <= 1e-5, p


def test_a_dora_module_is_not_split_over_layers(write_safetensors):
    stem = "lora_unet_blocks_0_ffn_2"
    module = read_adapter(write_safetensors(loha_tensors(stem, 8, 4, dora="out"))).modules[stem]
    with pytest.raises(AdapterError, match="DoRA module cannot be split"):
        hook(BypassSet(), "0", module, source_rows=Rows(0, 4))


def test_low_precision_layer_is_computed_in_fp32_and_cast_once(write_safetensors):
    stem = "lora_unet_blocks_0_ffn_2"
    module = read_adapter(write_safetensors(loha_tensors(stem, 8, 16))).modules[stem]
    weight = torch.randn(8, 16)
    layer = linear(weight).to(torch.bfloat16)
    hooks = BypassSet()
    hook(hooks, "", module, 1.0)
    hooks.attach(layer)
    x = torch.randn(4, 16).to(torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    base = F.linear(x, layer.weight, layer.bias).float()
    want = base + F.linear(x.float(), module.delta_weight())
    # the only rounding is the one cast of (base output + fp32 delta) to bf16
    assert ((got.float() - want).abs() <= torch.finfo(torch.bfloat16).eps * want.abs() + 1e-6).all()


def test_keyword_input_and_nested_layer_paths(write_safetensors):
    stem = "lora_unet_blocks_0_self_attn_o"
    module = read_adapter(write_safetensors(loha_tensors(stem, 6, 6))).modules[stem]
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList([torch.nn.Module()])
    root.blocks[0].o = linear(torch.randn(6, 6))
    merged = root.blocks[0].o.weight.clone()
    module.bind().apply_(merged, 1.0)
    hooks = BypassSet()
    hook(hooks, "blocks.0.o", module)
    hooks.attach(root)
    x = torch.randn(2, 6)
    assert rel_err(root.blocks[0].o(input=x), F.linear(x, merged, root.blocks[0].o.bias)) <= 1e-5


def test_refusals(write_safetensors):
    conv_stem = "lora_unet_patch_embedding"
    conv = read_adapter(write_safetensors({f"{conv_stem}.lora_up.weight": torch.randn(4, 2, 1, 1),
                                           f"{conv_stem}.lora_down.weight": torch.randn(2, 3, 3, 3)})).modules[conv_stem]
    with pytest.raises(AdapterError, match="Linear layers only.*use patch mode"):
        hook(BypassSet(), "patch_embedding", conv)
    stem = "lora_unet_blocks_0_ffn_2"
    module = read_adapter(write_safetensors(loha_tensors(stem, 4, 4))).modules[stem]
    root = torch.nn.Sequential(linear(torch.randn(4, 4)))
    hooks = BypassSet()
    hook(hooks, "0", module)
    hook(hooks, "blocks.0.ffn.2", module)
    with pytest.raises(AdapterError, match="no layer blocks.0.ffn.2"):
        hooks.attach(root)
    assert not hooks.attached and not root[0]._forward_hooks  # nothing left half-attached
