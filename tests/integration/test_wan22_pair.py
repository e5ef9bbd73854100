"""Load LyCORIS Wan 2.2 Pair inside a real ComfyUI: two of ComfyUI's Wan models (the experts; the Musubi fixtures'
size and base weights, other weights seeded apart), one file each, against Musubi's own merges:
each model computes x·(W + strength·ΔW)ᵀ + b with only its own file's ΔW, at its own strength and block weights.
Also ai-toolkit's file holding both experts (`diffusion_model.transformer_1.` high noise, `transformer_2.` low
noise), made here from the fixtures' Diffusers-key copies as ai-toolkit lays such a file out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from comfyui_host import require_comfyui
from helpers import MUSUBI, adapter_entries, expected_weights, module_paths, rel_err
from safetensors.torch import load_file, save_file

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

ENTRY = {e["file"]: e for e in adapter_entries()}
HIGH, LOW = "wan_loha_r4_a2.safetensors", "wan_lokr_r3_a2.safetensors"  # the high- and the low-noise file
PAIR = "LycorisLoaderWan22Pair"


@pytest.fixture(scope="module")
def lora_dir(comfy_env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair_loras")
    comfy_env.folder_paths.add_model_folder_path("loras", str(folder))
    return folder


def delta(name: str) -> dict[str, torch.Tensor]:
    e = expected_weights(ENTRY[name])
    return {p: e[f"merged/1.0/{p}.weight"] - e[f"base/{p}.weight"] for p in module_paths(e)}


def experts(env):
    """The two expert models: ComfyUI's Wan, fixture base weights on the adapted layers, the rest seeded apart."""
    models = []
    for seed in (1, 2):
        mp = env.build("wan", seed=seed)
        env.set_base(mp, "wan", expected_weights(ENTRY[HIGH]))
        models.append(mp)
    return models


def outputs(env, patcher, x) -> dict[str, torch.Tensor]:
    """Every adapted layer's output for x (of its width), with the model's patches or hooks on."""
    patcher.patch_model()
    try:
        with torch.no_grad():
            return {p: env.comfy.utils.get_attr(patcher.model.diffusion_model, p)(x[w]) for p, w in widths().items()}
    finally:
        patcher.unpatch_model()


def widths() -> dict[str, int]:
    return {p: d.shape[1] for p, d in delta(HIGH).items()}


def reference(env, mp, x, added: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """x·(W + added)ᵀ + b of every adapted layer of `mp`, W and b read from the model itself."""
    out = {}
    for p, w in widths().items():
        layer = env.comfy.utils.get_attr(mp.model.diffusion_model, p)
        out[p] = F.linear(x[w], layer.weight.detach() + added.get(p, 0), layer.bias.detach())
    return out


def scaled(d: dict, strength: float, zero_block: str | None = None) -> dict:
    return {p: (0.0 if zero_block and p.startswith(zero_block + ".") else strength) * v for p, v in d.items()}


def inputs():
    gen = torch.Generator().manual_seed(3)
    return {width: torch.randn(2, 3, width, generator=gen) for width in (10, 40)}


def run(env, **inputs):
    return env.node(PAIR).execute(**{"architecture": "auto", "mode": "patch", **inputs}).args


@pytest.mark.parametrize("mode", ["patch", "bypass"])
def test_each_model_gets_its_own_file_at_its_own_strength(comfy_env, mode):
    high, low = experts(comfy_env)
    x = inputs()
    d_high, d_low = delta(HIGH), delta(LOW)
    seen = {}
    for s_high, s_low, blocks_high in ((0.5, 1.0, ""), (0.5, -0.3, ""), (1.5, -0.3, "blocks.0=0")):
        m_high, m_low, report = run(comfy_env, model_high_noise=high, model_low_noise=low, lora_high_noise=HIGH,
                                    strength_high_noise=s_high, lora_low_noise=LOW, strength_low_noise=s_low, mode=mode,
                                    block_weights_high_noise=blocks_high)
        got_high, got_low = outputs(comfy_env, m_high, x), outputs(comfy_env, m_low, x)
        want_high = reference(comfy_env, high, x, scaled(d_high, s_high, "blocks.0" if blocks_high else None))
        want_low = reference(comfy_env, low, x, scaled(d_low, s_low))
        for p in widths():
            assert rel_err(got_high[p], want_high[p]) <= 1e-4, (mode, s_high, s_low, "high", p)
            assert rel_err(got_low[p], want_low[p]) <= 1e-4, (mode, s_high, s_low, "low", p)
        seen[(s_high, s_low, blocks_high)] = got_high, got_low
        report_high, report_low = report.split("\n\nlow-noise model\n")
        assert report_high.startswith("high-noise model\nfile          wan_loha_r4_a2.safetensors")
        assert report_low.startswith("file          wan_lokr_r3_a2.safetensors")
        assert f"mode          {mode}, strength {s_high:g}\n" in report_high and f"mode          {mode}, strength {s_low:g}\n" in report_low
        assert ("blocks        " in report_high) == bool(blocks_high) and "blocks        " not in report_low
    # A strength is its own model's only: the low-noise strength changes nothing on the high-noise model, and back.
    for p in widths():
        assert torch.equal(seen[(0.5, 1.0, "")][0][p], seen[(0.5, -0.3, "")][0][p]), p
        assert torch.equal(seen[(0.5, -0.3, "")][1][p], seen[(1.5, -0.3, "blocks.0=0")][1][p]), p
    assert not high.patches and not high.injections and not low.patches and not low.injections  # inputs untouched


def write_both_experts(folder, name: str) -> str:
    """ai-toolkit's layout of a file holding both experts: the high-noise file's keys under transformer_1, the
    low-noise file's under transformer_2 (Diffusers-key copies: `diffusion_model.<path>.<tensor>`)."""
    tensors = {}
    for segment, source in (("transformer_1", HIGH), ("transformer_2", LOW)):
        for key, value in load_file(str(MUSUBI / source.replace(".safetensors", ".diffusers.safetensors"))).items():
            assert key.startswith("diffusion_model.blocks."), key
            tensors[key.replace("diffusion_model.", f"diffusion_model.{segment}.", 1)] = value
    save_file(tensors, str(folder / name))
    return name


def test_a_file_holding_both_experts(comfy_env, lora_dir):
    name = write_both_experts(lora_dir, "wan22_both_experts.safetensors")
    high, low = experts(comfy_env)
    x = inputs()
    m_high, m_low, report = run(comfy_env, model_high_noise=high, model_low_noise=low, lora_high_noise=name,
                                strength_high_noise=0.5, lora_low_noise=name, strength_low_noise=1.0, mode="bypass")
    got_high, got_low = outputs(comfy_env, m_high, x), outputs(comfy_env, m_low, x)
    want_high = reference(comfy_env, high, x, scaled(delta(HIGH), 0.5))
    want_low = reference(comfy_env, low, x, scaled(delta(LOW), 1.0))
    for p in widths():
        assert rel_err(got_high[p], want_high[p]) <= 1e-4, ("high", p)
        assert rel_err(got_low[p], want_low[p]) <= 1e-4, ("low", p)
    assert ("expert        transformer_1 (high-noise) of a file holding both experts; its 24 transformer_2 modules are "
            "for the low-noise model") in report
    assert report.count("applied       24 of 24 modules") == 2 and "24 loha" in report and "24 lokr" in report
    # Only in one slot: the other model goes on as it came.
    m_high, m_low, report = run(comfy_env, model_high_noise=high, model_low_noise=low, lora_high_noise=name,
                                strength_high_noise=1.0, lora_low_noise="None", strength_low_noise=1.0)
    assert m_low is low and m_high.patches and "lora_low_noise  None: the low-noise model goes on unchanged" in report
    # One model cannot take both: the plain loader refuses the file rather than add the two experts together.
    with pytest.raises(ValueError, match=r"holds both Wan 2\.2 experts \(24 high-noise modules under transformer_1, "
                                         r"24 low-noise under transformer_2\): load it onto the two expert models"):
        comfy_env.node("LycorisLoaderModelOnly").execute(model=high, lora_name=name, strength_model=1.0)
    only_low = {k: v for k, v in load_file(str(lora_dir / name)).items() if ".transformer_2." in k}
    save_file(only_low, str(lora_dir / "wan22_only_low.safetensors"))
    with pytest.raises(ValueError, match=r"lora_high_noise: .*wan22_only_low\.safetensors holds only the low-noise "
                                         r"expert \(transformer_2\), nothing for the high-noise model"):
        run(comfy_env, model_high_noise=high, model_low_noise=low, lora_high_noise="wan22_only_low.safetensors",
            strength_high_noise=1.0, lora_low_noise="None", strength_low_noise=1.0)


def test_no_file_a_wrong_file_and_a_misnamed_one(comfy_env, lora_dir):
    high, low = experts(comfy_env)
    m_high, m_low, report = run(comfy_env, model_high_noise=high, model_low_noise=low, lora_high_noise="None",
                                strength_high_noise=1.0, lora_low_noise="None", strength_low_noise=1.0)
    assert m_high is high and m_low is low
    assert report == ("high-noise model\nlora_high_noise  None: the high-noise model goes on unchanged\n\n"
                      "low-noise model\nlora_low_noise  None: the low-noise model goes on unchanged")
    with pytest.raises(ValueError, match=r"^lora_low_noise: .*flux_kontext_lokr_r3_a2\.safetensors is an adapter for "
                                         r"FLUX\.1 dev / Kontext \(flux\), but the model is Wan"):
        run(comfy_env, model_high_noise=high, model_low_noise=low, lora_high_noise=HIGH, strength_high_noise=1.0,
            lora_low_noise="flux_kontext_lokr_r3_a2.safetensors", strength_low_noise=1.0)
    misnamed = "my_wan22_low_noise.safetensors"  # ai-toolkit's and ComfyUI's file names say which expert
    (lora_dir / misnamed).write_bytes((MUSUBI / HIGH).read_bytes())
    _, _, report = run(comfy_env, model_high_noise=high, model_low_noise=low, lora_high_noise=misnamed,
                       strength_high_noise=1.0, lora_low_noise=misnamed, strength_low_noise=1.0)
    warning = "warning       the file's name says low-noise, but it went onto the high-noise model"
    assert report.count(warning) == 1 and report.index(warning) < report.index("low-noise model\n")
