"""The loader nodes inside a real ComfyUI, on ComfyUI's own models, against Musubi's own merges.

Patch mode: the weights ComfyUI produces when it loads the patched model (`patch_model`, weights read
back from the modules) equal the fixture expectations. Bypass mode: the adapted layers' outputs equal
those of the expected merged weights, and the weights stay untouched.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from comfyui_host import having_model, require_comfyui
from helpers import ARCH_OF_PREFIX, adapter_entries, expected_weights, module_paths, rel_err

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI


def arch_of(entry) -> str:
    return ARCH_OF_PREFIX[entry["file"].split("_loha_")[0].split("_lokr_")[0]]


# Every Musubi fixture file (sources and Diffusers copies) for an architecture the running ComfyUI has a model
# for (ComfyUI core has none for FramePack).
ENTRIES = having_model([e for e in adapter_entries() if e["arch_id"] != "framepack"], arch_of)
IDS = [e["file"] for e in ENTRIES]
STRENGTHS = ["1.0", "0.5"]  # the strengths the expectation files hold


def load(env, model, entry, strength, mode, **kwargs):
    node = env.node("LycorisLoaderModelOnly")
    out = node.execute(model=model, lora_name=entry["file"], strength_model=float(strength), architecture="auto",
                       mode=mode, **kwargs)
    patched, report = out.args
    assert out.ui.as_dict() == {"text": (report,)}
    return patched, report


def expected_full(env, mp, where, expected, strength) -> dict[str, torch.Tensor]:
    """{model key: the whole weight a correct load gives} for every adapted key (fused rows filled in)."""
    full = {}
    for path, (key, rows) in where.items():
        weight = full.setdefault(key, env.comfy.utils.get_attr(mp.model, key).detach().clone())
        weight[rows] = expected[f"merged/{strength}/{path}.weight"]
    return full


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_patch_mode_weights_equal_musubi_merge(comfy_env, entry, strength):
    arch, expected = arch_of(entry), expected_weights(entry)
    mp = comfy_env.model(arch)
    where = comfy_env.set_base(mp, arch, expected)
    before = comfy_env.weights(mp)
    patched, report = load(comfy_env, mp, entry, strength, "patch")
    n = len(module_paths(expected))
    assert f"applied       {n} of {n} modules" in report and "unmatched     0" in report
    assert not mp.patches, "the input model must stay unpatched (the node works on a clone)"
    lazy = comfy_env.weights(patched)
    assert all(torch.equal(lazy[k], before[k]) for k in before), "weights change only when ComfyUI loads the model"
    patched.patch_model()
    try:
        after = comfy_env.weights(patched)
    finally:
        patched.unpatch_model()
    for path, (key, rows) in where.items():
        assert rel_err(after[key][rows], expected[f"merged/{strength}/{path}.weight"]) <= 1e-5, path
    adapted = {key for key, _ in where.values()}
    for key, weight in before.items():
        if key in adapted:
            untouched_rows = torch.ones(weight.shape[0], dtype=torch.bool)
            for k, rows in where.values():
                if k == key:
                    untouched_rows[rows] = False
            assert torch.equal(after[key][untouched_rows], weight[untouched_rows]), key
        else:
            assert torch.equal(after[key], weight), f"{key} must stay untouched"
    restored = comfy_env.weights(mp)
    assert all(torch.equal(restored[k], before[k]) for k in before), "unpatch_model must restore the base weights"


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_bypass_mode_layer_outputs_equal_musubi_merge(comfy_env, entry, strength):
    arch, expected = arch_of(entry), expected_weights(entry)
    mp = comfy_env.model(arch)
    where = comfy_env.set_base(mp, arch, expected)
    before = comfy_env.weights(mp)
    want = expected_full(comfy_env, mp, where, expected, strength)
    patched, report = load(comfy_env, mp, entry, strength, "bypass")
    assert "mode          bypass" in report
    gen = torch.Generator().manual_seed(1)
    inputs = {key: torch.randn(2, 3, w.shape[1], generator=gen) for key, w in want.items()}
    layers = {key: comfy_env.comfy.utils.get_attr(patched.model, key[: -len(".weight")]) for key in want}
    patched.patch_model()  # injects the hooks
    try:
        with torch.no_grad():
            outputs = {key: layers[key](x) for key, x in inputs.items()}
        during = comfy_env.weights(patched)
    finally:
        patched.unpatch_model()
    for key, x in inputs.items():
        bias = None if layers[key].bias is None else layers[key].bias.detach()
        assert rel_err(outputs[key], F.linear(x, want[key], bias)) <= 1e-5, key
        with torch.no_grad():
            assert torch.equal(layers[key](x), F.linear(x, before[key], bias)), f"{key}: hooks must be gone after unpatch"
    assert all(torch.equal(during[k], before[k]) for k in before), "bypass must not change any weight"


@pytest.mark.parametrize("arch", having_model(["wan", "hunyuan_video", "hunyuan_video_1_5", "flux", "flux2"]))
def test_bypass_whole_model_output_equals_patched_model(comfy_env, arch):
    """apply_model (the sampler's call) with bypass hooks equals apply_model with the merged weights."""
    entry = next(e for e in ENTRIES if arch_of(e) == arch and e["file"].endswith("lokr_r3_a2.safetensors"))
    expected = expected_weights(entry)
    mp = comfy_env.build(arch, seed=5)
    comfy_env.set_base(mp, arch, expected)
    model = mp.model
    gen = torch.Generator().manual_seed(3)
    shape = {"flux": (1, 1, 8, 8), "flux2": (1, 4, 8, 8)}.get(arch, (1, 4, 2, 8, 8))
    x = torch.randn(shape, generator=gen)
    extra = {"flux": dict(pooled_output=torch.randn(1, 8, generator=gen), guidance=3.5),
             "hunyuan_video": dict(pooled_output=torch.randn(1, 8, generator=gen), guidance=3.5),
             "hunyuan_video_1_5": dict(pooled_output=None)}.get(arch, {})
    conds = model.extra_conds(noise=x, device=torch.device("cpu"), cross_attn=torch.randn(1, 7, 8, generator=gen), **extra)
    kwargs = {k: v.cond for k, v in conds.items()}
    sigma = torch.tensor([0.5])

    def run(patcher):
        patcher.patch_model()
        try:
            with torch.no_grad():
                return patcher.model.apply_model(x, sigma, **kwargs)
        finally:
            patcher.unpatch_model()

    base_out = run(mp)
    bypassed = run(load(comfy_env, mp, entry, "1.0", "bypass")[0])
    merged = run(load(comfy_env, mp, entry, "1.0", "patch")[0])
    assert rel_err(bypassed, merged) <= 1e-4
    assert rel_err(merged, base_out) > 1e-3, "the adapter must change the output"
