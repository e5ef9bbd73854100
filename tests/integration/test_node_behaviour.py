"""The nodes' behaviour inside ComfyUI beyond the numbers: chaining, errors, text encoders, the patch
object's contract with ComfyUI's memory management, options, and the inspector."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from comfyui_host import having_model, require_comfyui
from helpers import MUSUBI, adapter_entries, expected_weights, rel_err
from safetensors.torch import save_file

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

ENTRY = {e["file"]: e for e in adapter_entries()}
# Split q, k and v modules on row slices of one fused ComfyUI weight: (stem, that weight) of block `n`, `p` one of
# q, k, v. Z-Image in Musubi's names where the running ComfyUI has the model, FLUX.1 in SimpleTuner's
# (`lycoris_` + Diffusers' names) on every release. Both weights are (30, 10): q, k, v are rows 0-10, 10-20, 20-30.
SPLIT_QKV = {
    "z_image": ("lora_unet_layers_{n}_attention_to_{p}", "diffusion_model.layers.{n}.attention.qkv.weight"),
    "flux": ("lycoris_transformer_blocks_{n}_attn_to_{p}", "diffusion_model.double_blocks.{n}.img_attn.qkv.weight"),
}
SPLIT_ARCHS = having_model(list(SPLIT_QKV))


@pytest.fixture(scope="module")
def lora_dir(comfy_env, tmp_path_factory):
    """A second 'loras' folder for files made by the tests."""
    folder = tmp_path_factory.mktemp("loras")
    comfy_env.folder_paths.add_model_folder_path("loras", str(folder))
    return folder


def write(folder, name, tensors, metadata=None) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name), metadata=metadata)
    return name


def loha(stem, out_features, in_features, gen, rank=2) -> dict[str, torch.Tensor]:
    return {f"{stem}.hada_w1_a": torch.randn(out_features, rank, generator=gen),
            f"{stem}.hada_w1_b": torch.randn(rank, in_features, generator=gen),
            f"{stem}.hada_w2_a": torch.randn(out_features, rank, generator=gen),
            f"{stem}.hada_w2_b": torch.randn(rank, in_features, generator=gen), f"{stem}.alpha": torch.tensor(1.0)}


def split_qkv_lokr(lora_dir, arch, gen) -> tuple[str, str, torch.Tensor]:
    """(file, fused weight, its ΔW): full-matrix LoKr q, k and v of block 0 (no alpha: scale 1, ΔW = w1 ⊗ w2)."""
    stem, key = SPLIT_QKV[arch]
    tensors, parts = {}, []
    for p in "qkv":
        w1, w2 = torch.randn(2, 2, generator=gen), torch.randn(5, 5, generator=gen)
        tensors.update({f"{stem.format(n=0, p=p)}.lokr_w1": w1, f"{stem.format(n=0, p=p)}.lokr_w2": w2})
        parts.append(torch.kron(w1, w2))
    return write(lora_dir, f"{arch}_split_qkv.safetensors", tensors), key.format(n=0), torch.cat(parts)


def fixture_tensors(comfy_env, name):
    adapter = comfy_env.core.read_adapter(MUSUBI / name)
    return {key: adapter.load(key) for key in adapter.tensors}, adapter.metadata


def run(comfy_env, node_id, **inputs):
    return comfy_env.node(node_id).execute(**inputs).args


def layer_outputs(env, patcher, keys, x):
    patcher.patch_model()
    try:
        with torch.no_grad():
            return {k: env.comfy.utils.get_attr(patcher.model, k[: -len(".weight")])(x) for k in keys}
    finally:
        patcher.unpatch_model()


def test_chained_loaders_add_up_in_either_mode(comfy_env):
    loha, lokr = ENTRY["wan_loha_r4_a2.safetensors"], ENTRY["wan_lokr_r3_a2.safetensors"]
    e1, e2 = expected_weights(loha), expected_weights(lokr)
    mp = comfy_env.model("wan")
    where = comfy_env.set_base(mp, "wan", e1)
    want = {key: e1[f"base/{p}.weight"] + (e1[f"merged/0.5/{p}.weight"] - e1[f"base/{p}.weight"])
            + (e2[f"merged/1.0/{p}.weight"] - e2[f"base/{p}.weight"]) for p, (key, _) in where.items()}
    for first, second in [("patch", "patch"), ("patch", "bypass"), ("bypass", "bypass")]:
        m1, _ = run(comfy_env, "LycorisLoaderModelOnly", model=mp, lora_name=loha["file"], strength_model=0.5, mode=first)
        m2, _ = run(comfy_env, "LycorisLoaderModelOnly", model=m1, lora_name=lokr["file"], strength_model=1.0, mode=second)
        for width in (10, 40):  # ffn.2 takes 40 inputs, every other adapted layer 10
            keys = {k: w for k, w in want.items() if w.shape[1] == width}
            x = torch.randn(3, width)
            got = layer_outputs(comfy_env, m2, keys, x)
            for key, weight in keys.items():
                bias = comfy_env.comfy.utils.get_attr(mp.model, key[: -len(".weight")]).bias.detach()
                assert rel_err(got[key], F.linear(x, weight, bias)) <= 1e-5, (first, second, key)


def test_errors_name_the_problem_and_leave_the_model_alone(comfy_env, lora_dir):
    mp = comfy_env.model("wan")
    node = comfy_env.node("LycorisLoaderModelOnly")
    wrong_model = r"is an adapter for FLUX\.1 dev / Kontext \(flux\), but the model is Wan 2\.1/2\.2 \(wan\)"
    with pytest.raises(ValueError, match=wrong_model):
        node.execute(model=mp, lora_name="flux_kontext_lokr_r3_a2.safetensors", strength_model=1.0)
    with pytest.raises(ValueError, match=r"architecture FLUX\.1 dev / Kontext \(flux\) was asked for, but the model is Wan"):
        node.execute(model=mp, lora_name="wan_lokr_r3_a2.safetensors", strength_model=1.0, architecture="flux")
    nothing = write(lora_dir, "nothing.safetensors", {"lora_unet_no_such_layer.lora_up.weight": torch.randn(4, 2),
                                                      "lora_unet_no_such_layer.lora_down.weight": torch.randn(2, 4)})
    with pytest.raises(ValueError, match=r"none of its 1 modules matches a weight of the model .*lora_unet_no_such_layer"):
        node.execute(model=mp, lora_name=nothing, strength_model=1.0, mode="bypass")
    tensors, metadata = fixture_tensors(comfy_env, "wan_loha_r4_a2.safetensors")
    tensors["lora_unet_blocks_1_ffn_0.hada_w2_b"] = tensors["lora_unet_blocks_1_ffn_0.hada_w2_b"].clone()
    tensors["lora_unet_blocks_1_ffn_0.hada_w2_b"][0, 0] = float("inf")
    broken = write(lora_dir, "broken.safetensors", tensors, metadata)
    nonfinite = r"1 non-finite values \(NaN/Inf, or float64 beyond float32.s range\) in lora_unet_blocks_1_ffn_0\.hada_w2_b \(1\); nothing was applied"
    with pytest.raises(ValueError, match=nonfinite):
        node.execute(model=mp, lora_name=broken, strength_model=1.0)
    tensors, metadata = fixture_tensors(comfy_env, "wan_loha_r4_a2.safetensors")
    tensors["lora_unet_blocks_0_ffn_0.hada_w1_a"] = torch.randn(41, 4)  # 41 rows: the layer has 40
    tensors["lora_unet_blocks_0_ffn_0.hada_w2_a"] = torch.randn(41, 4)
    misfit = write(lora_dir, "misfit.safetensors", tensors, metadata)
    with pytest.raises(ValueError, match=r"shape mismatch: module lora_unet_blocks_0_ffn_0 \(loha\) produces \[41, 10\]"):
        node.execute(model=mp, lora_name=misfit, strength_model=1.0)
    with pytest.raises(FileNotFoundError):
        node.execute(model=mp, lora_name="not_there.safetensors", strength_model=1.0)
    for strength in (float("nan"), float("inf"), 1e39):  # the API takes any number; the widget's bounds do not apply
        with pytest.raises(ValueError, match="strength"):
            node.execute(model=mp, lora_name="wan_lokr_r3_a2.safetensors", strength_model=strength)
    assert not mp.patches and not mp.injections


def test_strength_zero_checks_the_file_and_applies_nothing(comfy_env):
    mp = comfy_env.model("wan")
    model, report = run(comfy_env, "LycorisLoaderModelOnly", model=mp, lora_name="wan_lokr_r3_a2.safetensors", strength_model=0.0)
    assert model is mp and "strength 0: the file was checked against the model, nothing was applied" in report
    with pytest.raises(ValueError, match="but the model is"):
        run(comfy_env, "LycorisLoaderModelOnly", model=mp, lora_name="flux_2_lokr_r3_a2.safetensors", strength_model=0.0)


def tiny_clip(env):
    import functools
    import json

    config = json.loads((env.root / "comfy" / "sd1_clip_config.json").read_text())
    config.update(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, projection_dim=8)

    class Target:  # a CLIP-L text encoder, shrunk
        params = {"clip_model": functools.partial(env.comfy.sd1_clip.SDClipModel, textmodel_json_config=config)}
        clip = env.comfy.sd1_clip.SD1ClipModel
        tokenizer = env.comfy.sd1_clip.SD1Tokenizer

    clip = env.comfy.sd.CLIP(target=Target)
    gen = torch.Generator().manual_seed(2)
    clip.cond_stage_model.load_state_dict({k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                                           for k, v in clip.cond_stage_model.state_dict().items()})
    return clip


def test_text_encoder_modules_go_to_comfyui_core_and_the_report_says_so(comfy_env, lora_dir):
    tensors, metadata = fixture_tensors(comfy_env, "wan_loha_r4_a2.safetensors")
    te = {"lora_te_text_model_encoder_layers_0_mlp_fc1": (16, 8), "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (8, 8),
          "lora_te_text_model_encoder_layers_7_mlp_fc1": (16, 8)}  # layer 7: the tiny CLIP has one layer
    gen = torch.Generator().manual_seed(4)
    for stem, (out_features, in_features) in te.items():
        tensors.update(loha(stem, out_features, in_features, gen))
    name = write(lora_dir, "wan_with_te.safetensors", tensors, metadata)
    mp, clip = comfy_env.model("wan"), tiny_clip(comfy_env)
    model, new_clip, report = run(comfy_env, "LycorisLoader", model=mp, clip=clip, lora_name=name,
                                  strength_model=1.0, strength_clip=0.5)
    assert "applied       24 of 27 modules" in report
    assert "delegated     2 modules: text encoder, patched by ComfyUI core's LoRA loader" in report
    assert "unmatched     1 (listed below" in report and "lora_te_text_model_encoder_layers_7_mlp_fc1" in report
    assert "1 unmatched modules are for a text encoder: ComfyUI's CLIP key map does not know them" in report
    adapter = comfy_env.core.read_adapter(lora_dir / name)
    layer = "clip_l.transformer.text_model.encoder.layers.0."
    targets = {"lora_te_text_model_encoder_layers_0_mlp_fc1": layer + "mlp.fc1.weight",
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj": layer + "self_attn.q_proj.weight"}
    base = {key: comfy_env.comfy.utils.get_attr(clip.cond_stage_model, key).detach().clone() for key in targets.values()}
    management = comfy_env.comfy.model_management
    management.load_models_gpu([new_clip.patcher])  # how ComfyUI loads a CLIP to encode (swaps out the unpatched one)
    try:
        for stem, key in targets.items():
            got = comfy_env.comfy.utils.get_attr(new_clip.patcher.model, key).float()
            want = base[key].float() + 0.5 * adapter.modules[stem].delta_weight()
            assert rel_err(got, want) <= 1e-3, stem  # the tiny CLIP is fp16 (ComfyUI's text-encoder dtype here)
            assert rel_err(got, base[key].float()) > 1e-2, stem
    finally:
        management.unload_all_models()
    assert not clip.patcher.patches  # the input CLIP is untouched

    _, no_clip_report = run(comfy_env, "LycorisLoaderModelOnly", model=mp, lora_name=name, strength_model=1.0)
    assert "unmatched     3 (listed below" in no_clip_report
    assert "3 unmatched modules are for a text encoder: connect a CLIP to LycorisLoader to apply them" in no_clip_report
    model, none_clip, _ = run(comfy_env, "LycorisLoader", model=mp, clip=None, lora_name=name,
                              strength_model=1.0, strength_clip=1.0)
    assert none_clip is None and model.patches


@pytest.mark.parametrize("arch", SPLIT_ARCHS)
def test_weight_patch_keeps_all_state_in_weights_for_comfyui_memory_management(comfy_env, lora_dir, arch):
    """ComfyUI rebuilds adapters as type(a)(loaded_keys, weights) with moved tensors and counts their memory
    (releases with dynamic VRAM; 0.3.64 does neither and uses the patches as they are)."""
    name, key, delta = split_qkv_lokr(lora_dir, arch, torch.Generator().manual_seed(9))
    mp = comfy_env.model(arch)
    patched, _ = run(comfy_env, "LycorisLoaderModelOnly", model=mp, lora_name=name, strength_model=1.0, architecture=arch)
    patches = patched.patches[key]
    assert len(patches) == 3 and sorted(p[3] for p in patches) == [(0, 0, 10), (0, 10, 10), (0, 20, 10)]
    lora = comfy_env.comfy.lora
    rebuilt = patches
    if hasattr(lora, "prefetch_prepared_value"):
        rebuilt = [(p[0], lora.prefetch_prepared_value(p[1], [0], None, None, False), *p[2:]) for p in patches]
        assert all(type(r[1]) is type(p[1]) and r[1] is not p[1] for r, p in zip(rebuilt, patches))
    low_vram = comfy_env.comfy.model_patcher.LowVramPatch(key, patched.patches)
    if hasattr(low_vram, "memory_required"):
        tensor_bytes = sum(t.numel() * t.element_size() for p in patches for t in p[1].weights if isinstance(t, torch.Tensor))
        assert low_vram.memory_required() >= tensor_bytes > 0
    base = comfy_env.comfy.utils.get_attr(mp.model, key).detach()
    want = base + delta
    got = lora.calculate_weight(rebuilt, base.clone(), key)
    assert rel_err(got, want) <= 1e-5
    half = lora.calculate_weight(rebuilt, base.to(torch.float16), key, intermediate_dtype=torch.float16)
    # fp16 weight in (ComfyUI's compute dtype on GPUs): fp32 math inside, one rounding to fp16
    assert half.dtype == torch.float16
    assert ((half.float() - want).abs() <= 2 * torch.finfo(torch.float16).eps * want.abs() + 1e-4).all()


def test_lokr_full_matrix_alpha_option(comfy_env, lora_dir):
    tensors, metadata = fixture_tensors(comfy_env, "wan_lokr_r3_a2.safetensors")
    name = write(lora_dir, "wan_lokr_dim6.safetensors", tensors, dict(metadata, ss_network_dim="6"))
    adapter = comfy_env.core.read_adapter(lora_dir / name)
    full = [stem for stem, m in adapter.modules.items() if m.rank is None]
    low = [stem for stem, m in adapter.modules.items() if m.rank is not None]
    assert full and low
    expected = expected_weights(ENTRY["wan_lokr_r3_a2.safetensors"])
    mp = comfy_env.model("wan")
    where = comfy_env.set_base(mp, "wan", expected)
    patched, _ = run(comfy_env, "LycorisLoaderModelOnly", model=mp, lora_name=name, strength_model=1.0,
                     lokr_full_matrix_alpha=True)
    patched.patch_model()
    try:
        for path, (key, _) in where.items():
            stem = "lora_unet_" + path.replace(".", "_")
            delta = expected[f"merged/1.0/{path}.weight"] - expected[f"base/{path}.weight"]
            factor = 3 / 6 if stem in full else 1.0  # stored alpha 3 / ss_network_dim 6; low-rank modules keep alpha/rank
            got = comfy_env.comfy.utils.get_attr(patched.model, key)
            assert rel_err(got, expected[f"base/{path}.weight"] + factor * delta) <= 1e-5, path
    finally:
        patched.unpatch_model()


@pytest.mark.parametrize("arch", SPLIT_ARCHS)
def test_dora_on_a_fused_slice_bypass_equals_patch(comfy_env, lora_dir, arch):
    gen = torch.Generator().manual_seed(6)
    stem, key = SPLIT_QKV[arch]
    tensors = {}
    for n, p, dora_shape in ((0, "k", (10, 1)), (1, "v", (1, 10))):  # DoRA per output row, then per input column
        tensors.update(loha(stem.format(n=n, p=p), 10, 10, gen))
        tensors[f"{stem.format(n=n, p=p)}.dora_scale"] = torch.rand(dora_shape, generator=gen) + 0.5
    name = write(lora_dir, f"{arch}_dora.safetensors", tensors)
    mp = comfy_env.model(arch)
    keys = [key.format(n=0), key.format(n=1)]
    x = torch.randn(2, 5, 10)
    outputs = {}
    for mode in ("patch", "bypass"):
        patched, report = run(comfy_env, "LycorisLoaderModelOnly", model=mp, lora_name=name, strength_model=0.8, mode=mode,
                              architecture=arch)
        assert "2 loha, 2 with DoRA" in report
        outputs[mode] = layer_outputs(comfy_env, patched, keys, x)
    base = layer_outputs(comfy_env, mp, keys, x)
    for key in keys:
        assert rel_err(outputs["bypass"][key], outputs["patch"][key]) <= 1e-5, key
        assert rel_err(outputs["patch"][key], base[key]) > 1e-3


def test_inspect_node_shows_the_core_report(comfy_env):
    name = "hunyuan_video_1_5_lokr_r3_a2.safetensors"
    (report,) = run(comfy_env, "LycorisInspect", lora_name=name, lokr_full_matrix_alpha=False, max_modules=40)
    core = comfy_env.core
    from_core = core.report.format_report(core.report.describe(core.read_adapter(MUSUBI / name)), max_modules=40)
    assert report == from_core
    assert "format        musubi" in report and "architecture  hunyuan_video_1_5" in report
    assert "lokr          16 full-matrix (scale 1), 12 low-rank" in report


def test_inspect_node_refuses_a_broken_file(comfy_env, lora_dir):
    (lora_dir / "truncated.safetensors").write_bytes((MUSUBI / "wan_loha_r4_a2.safetensors").read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        run(comfy_env, "LycorisInspect", lora_name="truncated.safetensors", max_modules=1)


@pytest.mark.parametrize("arch", SPLIT_ARCHS)
def test_low_vram_patches_apply_our_patch_in_the_forward_pass(comfy_env, lora_dir, arch):
    """With too little memory ComfyUI leaves weights alone and patches each one as it is used (LowVramPatch)."""
    name, key, delta = split_qkv_lokr(lora_dir, arch, torch.Generator().manual_seed(10))
    mp = comfy_env.model(arch)
    patched, _ = run(comfy_env, "LycorisLoaderModelOnly", model=mp, lora_name=name, strength_model=0.5, architecture=arch)
    want = comfy_env.comfy.utils.get_attr(mp.model, key).detach() + 0.5 * delta
    layer = comfy_env.comfy.utils.get_attr(patched.model, key[: -len(".weight")])
    x = torch.randn(2, 10)
    with torch.inference_mode():  # as ComfyUI executes nodes
        patched.patch_model(lowvram_model_memory=1)
        try:
            assert any(type(f).__name__ == "LowVramPatch" for f in layer.weight_function)
            got = layer(x)
            assert torch.equal(layer.weight, comfy_env.comfy.utils.get_attr(mp.model, key))  # weight itself untouched
        finally:
            patched.unpatch_model()
    bias = None if layer.bias is None else layer.bias.detach()  # FLUX's qkv has one, Z-Image's not
    assert rel_err(got, F.linear(x, want, bias)) <= 1e-5


def test_bypass_is_exact_on_fp8_weights_where_patching_rounds(comfy_env):
    """fp8 weights: bypass adds the adapter in fp32 on the layer output; patch mode must round the merged
    weight back to fp8. This is what bypass mode is for."""
    # fp8 storage, fp32 compute (manual cast)
    model = comfy_env.new_model(*comfy_env.config("wan"), dtype=torch.float8_e4m3fn, manual_cast_dtype=torch.float32)
    gen = torch.Generator().manual_seed(8)
    model.diffusion_model.load_state_dict({
        k: (torch.randn(v.shape, generator=gen) * 0.1).to(v.dtype) if v.is_floating_point() else v
        for k, v in model.diffusion_model.state_dict().items()})
    cpu = torch.device("cpu")
    mp = comfy_env.comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    name = "wan_lokr_r3_a2.safetensors"
    module = comfy_env.core.read_adapter(MUSUBI / name).modules["lora_unet_blocks_0_self_attn_q"]
    layer = model.diffusion_model.blocks[0].self_attn.q
    assert layer.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(4, 10)
    with torch.no_grad():
        want = F.linear(x, layer.weight.float() + module.delta_weight(), layer.bias.float())
    got = {}
    for mode in ("bypass", "patch"):
        patched, _ = run(comfy_env, "LycorisLoaderModelOnly", model=mp, lora_name=name, strength_model=1.0, mode=mode)
        with torch.inference_mode():
            patched.patch_model()
            try:
                assert layer.weight.dtype == torch.float8_e4m3fn
                got[mode] = layer(x)
            finally:
                patched.unpatch_model()
    assert rel_err(got["bypass"], want) <= 1e-5
    assert rel_err(got["patch"], want) > 1e-3  # merged, then rounded to fp8


def test_a_patch_that_does_not_fit_raises_where_core_adapters_log_and_skip(comfy_env):
    """Core's LoHa/LoKr adapters catch every exception, log it, and leave the weight unchanged; ours raise."""
    name = "wan_lokr_r3_a2.safetensors"
    adapter = comfy_env.core.read_adapter(MUSUBI / name)
    stem = "lora_unet_blocks_0_ffn_0"  # (40, 10)
    patches_module = importlib.import_module(comfy_env.pack.__name__ + ".nodes.patches")
    ours = patches_module.LycorisWeightPatch.create(adapter.modules[stem], adapter.modules[stem].read())
    wrong = torch.zeros(30, 10)  # not the layer this module was made for
    misfit = r"lora_unet_blocks_0_ffn_0: lokr produces shape \[40, 10\] but the target weight has shape \[30, 10\]"
    with pytest.raises(ValueError, match=misfit):
        comfy_env.comfy.lora.calculate_weight([(1.0, ours, 1.0, None, None)], wrong.clone(), "diffusion_model.x.weight")
    sd = {key: adapter.load(key) for key in adapter.modules[stem].keys}
    core = importlib.import_module("comfy.weight_adapter").LoKrAdapter.load(stem, sd, adapter.modules[stem].alpha, None)
    out = comfy_env.comfy.lora.calculate_weight([(1.0, core, 1.0, None, None)], wrong.clone(), "diffusion_model.x.weight")
    assert torch.equal(out, wrong)  # silently unchanged


def test_weight_patch_for_one_part_of_a_fused_module(comfy_env, write_safetensors):
    """A fused (qkv) module planned onto a model's separate q/k/v weights: each ComfyUI weight patch
    adds its own rows of ΔW, also after ComfyUI rebuilds it from its `weights` (ComfyUI's dynamic-VRAM
    prefetch, `comfy.lora.prefetch_prepared_value`; releases without it, such as 0.3.64, never rebuild patches)."""
    read_adapter = comfy_env.core.read_adapter
    LycorisWeightPatch = importlib.import_module(comfy_env.pack.__name__ + ".nodes.patches").LycorisWeightPatch
    gen = torch.Generator().manual_seed(3)
    stem = "diffusion_model.layers.0.attention.qkv"
    module = read_adapter(write_safetensors(loha(stem, 30, 10, gen))).modules[stem]
    tensors = module.read()
    delta = module.delta_weight()
    lora = comfy_env.comfy.lora
    rebuild = getattr(lora, "prefetch_prepared_value", None)
    for i in range(3):
        key = f"diffusion_model.layers.0.attention.to_{'qkv'[i]}.weight"
        patch = LycorisWeightPatch.create(module, tensors, source_rows=comfy_env.core.rows.Rows(10 * i, 10 * i + 10))
        base = torch.randn(10, 10, generator=gen)
        for used in [patch] + ([rebuild(patch, [0], None, None, False)] if rebuild else []):
            got = lora.calculate_weight([(0.5, used, 1.0, None, None)], base.clone(), key)
            assert rel_err(got, base + 0.5 * delta[10 * i : 10 * (i + 1)]) <= 1e-5
