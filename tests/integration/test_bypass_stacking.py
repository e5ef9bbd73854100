"""Bypass loaders stacked on one model inside a real ComfyUI: any number of them, alone, mixed with patch-mode
loaders and with ComfyUI core's LoRA loaders, on the weight formats ComfyUI runs: bf16, fp8 (e4m3fn), fp8 with a
per-tensor scale (the `scale_weight` checkpoints; ComfyUI 0.28 loads them as `weight_scale` QuantizedTensors) and
0.28's mixed-precision quantization (`comfy_quant` layers: int8, fp8 and unquantized layers in one model).

The model is ComfyUI's own Wan (the Musubi fixtures' size) with the fixtures' base weights, stored in the format
at hand by this test (it quantizes them itself, so it knows what the layers compute with). References come from
the fixtures' expected merges: ΔW = merged/1.0 − base, and each adapted layer must output
x·(W + Σ strengthᵢ·ΔWᵢ)ᵀ + b, with W the stored base weight as the layer dequantizes it.

Patch-mode loaders (ours and core's `LoraLoaderModelOnly`) write W + Σ strength·ΔW back into the stored format,
rounded to bf16 or fp8 by ComfyUI's own patcher; that rounding is ComfyUI's and is what bypass mode exists to
avoid. Where they are mixed in, the bypass part is checked exactly on top of what the same chain without its
bypass loaders computes, and that chain against the full reference within the format's own rounding (except on
ComfyUI 0.3.64's fp8-scaled layers, which it re-quantizes with the file's scale: patched weights grown past the
largest stored one are clipped there, off by up to 120 % in this model).

ComfyUI 0.3.64 has neither mixed-precision quantization (no `comfy.quant_ops`) nor a core bypass loader
(`LoraLoaderBypassModelOnly`): those cases are not collected there.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from comfyui_host import host_comfyui, require_comfyui
from helpers import adapter_entries, expected_weights, module_paths, rel_err
from safetensors.torch import save_file

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

ENTRY = {e["file"]: e for e in adapter_entries()}
LOHA, LOKR = "wan_loha_r4_a2.safetensors", "wan_lokr_r3_a2.safetensors"
LOKR_COPY = "wan_lokr_r3_a2.diffusers.safetensors"  # Musubi's Diffusers-key copy of LOKR: the same ΔW, another file


def _release_has(module: str, name: str | None = None) -> bool:
    host_comfyui()
    try:
        found = importlib.import_module(module)
    except ImportError:
        return False
    return name is None or hasattr(found, name)


HAS_QUANT = _release_has("comfy.quant_ops")
HAS_CORE_BYPASS = _release_has("comfy_extras.nodes_lora_debug", "LoraLoaderBypassModelOnly")

# Storage formats of the model's Linear weights. "quant": ComfyUI 0.28's mixed precision.
FORMATS = ["bf16", "fp8", "fp8_scaled"] + (["quant"] if HAS_QUANT else [])
FP8 = torch.float8_e4m3fn
# How far one rounding into the format moves a weight, relative to it: ComfyUI rounds patched weights
# stochastically, up to a unit in the last place (and core's bypass loader computes in the weights' dtype). The
# mixed-precision model holds fp8 and int8 layers (int8: 1/127 of the largest weight, finer than fp8 here).
ROUNDING = {"bf16": torch.finfo(torch.bfloat16).eps, "fp8": torch.finfo(FP8).eps, "fp8_scaled": torch.finfo(FP8).eps,
            "quant": torch.finfo(FP8).eps}
# ComfyUI's int8 layers quantize their input to int8 as well (per row): their output is that close to x·Wᵀ.
INT8_ACTIVATIONS = 1e-2

# Chains of loaders, in order: (loader, file, strength). "bypass", "patch": LycorisLoaderModelOnly in that mode;
# "core": ComfyUI's LoraLoaderModelOnly (patch mode); "core_bypass": ComfyUI's LoraLoaderBypassModelOnly.
CHAINS = {
    "2 bypass": [("bypass", LOHA, 0.5), ("bypass", LOKR, 1.0)],
    "3 bypass": [("bypass", LOHA, 0.5), ("bypass", LOKR, 1.0), ("bypass", LOKR_COPY, -0.7)],
    "bypass + patch": [("bypass", LOHA, 0.5), ("patch", LOKR, 1.0), ("bypass", LOKR_COPY, -0.7)],
    "bypass + core LoRA loader": [("core", LOHA, 0.5), ("bypass", LOKR, 1.0), ("bypass", LOKR_COPY, -0.7)],
}
if HAS_CORE_BYPASS:
    CHAINS["bypass + core bypass loader"] = [("bypass", LOHA, 0.5), ("core_bypass", LOKR, 1.0), ("bypass", LOKR_COPY, -0.7)]


def linear_layers(model) -> list[str]:
    return [name for name, m in model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)]


def quantize(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored tensor, per-tensor scale) of `weight` in fp8 with a scale, or int8 with a scale."""
    if kind == "int8":
        scale = weight.abs().max() / 127
        return torch.round(weight / scale).clamp(-127, 127).to(torch.int8), scale.float()
    scale = weight.abs().max() / torch.finfo(FP8).max
    return (weight / scale).to(FP8), scale.float()


class Wan:
    """ComfyUI's Wan model holding the fixtures' base weights in one storage format, and what it computes with."""

    def __init__(self, env, fmt: str):
        self.env, self.fmt = env, fmt
        config_cls, unet_config = env.config("wan")
        reference = env.new_model(config_cls, unet_config)
        gen = torch.Generator().manual_seed(0)
        sd = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in reference.diffusion_model.state_dict().items()}
        self.paths = module_paths(expected_weights(ENTRY[LOHA]))
        base = expected_weights(ENTRY[LOHA])
        for path in self.paths:
            sd[f"{path}.weight"] = base[f"base/{path}.weight"].clone()  # Wan: Musubi's paths are ComfyUI's names
        layers = linear_layers(reference)
        self.int8: set[str] = set()  # layers stored in int8
        with torch.inference_mode():  # ComfyUI loads models (UNETLoader) and runs every node in inference mode
            stored, self.base = self._store(env, config_cls, unet_config, sd, layers)
        self.bias = {p: self.layer(stored, p).bias.detach().float() for p in self.paths}  # as stored (fp8 rounds it)
        self.mp = env.comfy.model_patcher.ModelPatcher(stored, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    def _store(self, env, config_cls, unet_config, sd, layers):
        """(ComfyUI model holding `sd` in the format, {path: the base weight it computes with, fp32})."""
        fmt = self.fmt
        if fmt in ("bf16", "fp8"):
            dtype = torch.bfloat16 if fmt == "bf16" else FP8
            model = env.new_model(config_cls, unet_config, dtype=dtype, manual_cast_dtype=torch.float32)
            model.diffusion_model.load_state_dict(sd)
            return model, {p: sd[f"{p}.weight"].to(dtype).float() for p in self.paths}
        kinds = {layer: "fp8" for layer in layers}
        if fmt == "quant":  # mixed precision: int8 and fp8 layers, the feed-forward layers left in full precision
            kinds = {layer: "int8" if ".self_attn." in layer else "fp8" for layer in layers if ".ffn." not in layer}
            self.int8 = {layer for layer, kind in kinds.items() if kind == "int8"}
        base = {}
        for layer, kind in kinds.items():
            q, scale = quantize(sd[f"{layer}.weight"], kind)
            sd[f"{layer}.weight"] = q
            sd[f"{layer}.weight_scale" if fmt == "quant" else f"{layer}.scale_weight"] = scale
            base[layer] = q.float() * scale
        base = {p: base.get(p, sd[f"{p}.weight"]) for p in self.paths}
        if fmt == "quant":
            formats = {"int8": "int8_tensorwise", "fp8": "float8_e4m3fn"}
            metadata = {"_quantization_metadata": json.dumps({"layers": {k: {"format": formats[v]} for k, v in kinds.items()}})}
            return self._quantized(env, config_cls, unet_config, sd, metadata), base
        sd["scaled_fp8"] = torch.empty(0, dtype=FP8)  # how fp8-scaled checkpoints mark themselves
        if HAS_QUANT:  # ComfyUI 0.28 loads them as mixed precision: fp8 QuantizedTensors with their weight_scale
            return self._quantized(env, config_cls, unet_config, sd, {}), base
        del sd["scaled_fp8"]
        scaled = type("ScaledFp8", (config_cls,), {"scaled_fp8": FP8})  # 0.3.64: scaled fp8 ops, `scale_weight` per layer
        model = env.new_model(scaled, unet_config, dtype=torch.float32)
        model.diffusion_model.load_state_dict(sd)
        return model, base

    @staticmethod
    def _quantized(env, config_cls, unet_config, sd, metadata):
        sd, _ = env.comfy.utils.convert_old_quants(sd, "", metadata)  # ComfyUI's own loading step for both layouts
        mixed = type("Mixed", (config_cls,), {"quant_config": {"mixed_ops": True}})
        model = env.new_model(mixed, unet_config, dtype=torch.float32, manual_cast_dtype=torch.float32)
        missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        return model

    def layer(self, model, path):
        return self.env.comfy.utils.get_attr(model.diffusion_model, path)

    def outputs(self, patcher, x) -> dict[str, torch.Tensor]:
        """Every adapted layer's output for x, the model loaded the way ComfyUI loads it to sample."""
        management = self.env.comfy.model_management
        with torch.inference_mode():  # as ComfyUI runs a prompt
            management.load_models_gpu([patcher])
            try:
                return {p: self.layer(patcher.model, p)(x[self.base[p].shape[1]]) for p in self.paths}
            finally:
                management.unload_all_models()

    def reference(self, x, added: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {p: F.linear(x[w.shape[1]], w + added.get(p, 0), self.bias[p]) for p, w in self.base.items()}


def delta(name: str) -> dict[str, torch.Tensor]:
    """ΔW per Musubi path of a fixture file at strength 1: Musubi's own merge minus the base."""
    e = expected_weights(ENTRY[name])
    return {p: e[f"merged/1.0/{p}.weight"] - e[f"base/{p}.weight"] for p in module_paths(e)}


def total(chain) -> dict[str, torch.Tensor]:
    out = {}
    for _, name, strength in chain:
        for p, d in delta(name).items():
            out[p] = out.get(p, 0) + strength * d
    return out


@torch.inference_mode()
def load_chain(env, model, chain):
    for node, name, strength in chain:
        if node in ("bypass", "patch"):
            model = env.node("LycorisLoaderModelOnly").execute(model=model, lora_name=name, strength_model=strength,
                                                               mode=node).args[0]
        elif node == "core":
            (model,) = env.core_node("LoraLoaderModelOnly").load_lora_model_only(model, name, strength)
        else:
            loader = importlib.import_module("comfy_extras.nodes_lora_debug").LoraLoaderBypassModelOnly()
            (model,) = loader.load_lora_model_only(model, name, strength)
    return model


def inputs() -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {width: torch.randn(3, width, generator=gen) for width in (10, 40)}  # ffn.2 takes 40 inputs, the rest 10


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("chain", list(CHAINS))
def test_stacked_loaders_add_up(comfy_env, chain, fmt):
    wan = Wan(comfy_env, fmt)
    steps = CHAINS[chain]
    x = inputs()
    base = wan.outputs(wan.mp, x)
    for p, want in wan.reference(x, {}).items():  # the test knows what each layer computes with
        assert rel_err(base[p], want) <= (INT8_ACTIVATIONS if p in wan.int8 else 1e-5), (fmt, p, "base")
    got = wan.outputs(load_chain(comfy_env, wan.mp, steps), x)
    ours = total([s for s in steps if s[0] == "bypass"])
    others = [s for s in steps if s[0] != "bypass"]
    # Our bypass loaders add exactly their part to what the rest of the chain computes, in any order ...
    under = wan.outputs(load_chain(comfy_env, wan.mp, others), x) if others else base
    for p in wan.paths:
        assert rel_err(got[p], under[p] + F.linear(x[ours[p].shape[1]], ours[p])) <= 1e-4, (chain, fmt, p)
    # ... so the whole chain is the model with base + Σ strength·ΔW: exactly where only our bypass loaders
    # adapt it, up to one rounding of the patched weights into the format where others write into them.
    if others and fmt == "fp8_scaled" and not HAS_QUANT:
        return  # ComfyUI 0.3.64 writes patched weights back with the file's scale: W + ΔW past the largest W clips
    want = wan.reference(x, total(steps))
    for p in wan.paths:
        tolerance = ROUNDING[fmt] if others else INT8_ACTIVATIONS if p in wan.int8 else 1e-4
        assert rel_err(got[p], want[p]) <= tolerance, (chain, fmt, p)


def hooked_layers(model) -> list[str]:
    return [name for name, m in model.named_modules() if m._forward_hooks]


def test_each_model_takes_off_only_its_own_hooks(comfy_env):
    """A chained loader clones a model that may be loaded, hooks on, at that moment (its `is_injected` flag is
    copied to the clone). Whichever of the two leaves the model first, the other keeps every hook it needs."""
    wan = Wan(comfy_env, "bf16")
    x = inputs()
    steps = CHAINS["2 bypass"]
    want = wan.reference(x, total(steps))
    with torch.inference_mode():
        first = load_chain(comfy_env, wan.mp, steps[:1])
        first.patch_model()
        second = load_chain(comfy_env, first, steps[1:])
        second.patch_model()
        first.unpatch_model()  # leaves after the second came
        got = {p: wan.layer(second.model, p)(x[w.shape[1]]) for p, w in wan.base.items()}
        second.unpatch_model()
        assert not hooked_layers(wan.mp.model)
        second.patch_model()  # and the other way round
        first.patch_model()
        second.unpatch_model()
        only_first = {p: wan.layer(first.model, p)(x[w.shape[1]]) for p, w in wan.base.items()}
        first.unpatch_model()
        assert not hooked_layers(wan.mp.model)
        after = {p: wan.layer(wan.mp.model, p)(x[w.shape[1]]) for p, w in wan.base.items()}
    want_first, want_base = wan.reference(x, total(steps[:1])), wan.reference(x, {})
    for p in wan.paths:
        assert rel_err(got[p], want[p]) <= 1e-4, p
        assert rel_err(only_first[p], want_first[p]) <= 1e-4, p
        assert rel_err(after[p], want_base[p]) <= 1e-5, p


def test_switching_between_stacks_in_comfyui(comfy_env):
    """ComfyUI's model management moving between models that share their weights (one chain and its prefixes, as
    when a loader is added to or removed from a graph between runs): each run gets exactly its chain's hooks."""
    wan = Wan(comfy_env, "fp8")
    x = inputs()
    steps = CHAINS["3 bypass"]
    with torch.inference_mode():
        chains = [wan.mp]
        for step in steps:
            chains.append(load_chain(comfy_env, chains[-1], [step]))
    management = comfy_env.comfy.model_management
    for n in (2, 1, 3, 0, 3, 2):
        with torch.inference_mode():
            management.load_models_gpu([chains[n]])
            got = {p: wan.layer(chains[n].model, p)(x[w.shape[1]]) for p, w in wan.base.items()}
        want = wan.reference(x, total(steps[:n]))
        for p in wan.paths:
            assert rel_err(got[p], want[p]) <= 1e-4, (n, p)
    management.unload_all_models()
    assert not hooked_layers(wan.mp.model)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dora_in_bypass_reads_the_dequantized_weight(comfy_env, fmt, tmp_path):
    """DoRA rescales by the norm of the weight the layer computes with: on quantized layers that is the stored
    weight times its scale (or the QuantizedTensor dequantized), never the raw fp8 or int8 numbers."""
    wan = Wan(comfy_env, fmt)
    gen = torch.Generator().manual_seed(11)
    path = "blocks.0.cross_attn.k" if fmt == "quant" else "blocks.0.self_attn.k"  # a quantized layer, never int8
    stem = "lora_unet_" + path.replace(".", "_")
    tensors = {f"{stem}.hada_w1_a": torch.randn(10, 2, generator=gen), f"{stem}.hada_w1_b": torch.randn(2, 10, generator=gen),
               f"{stem}.hada_w2_a": torch.randn(10, 2, generator=gen), f"{stem}.hada_w2_b": torch.randn(2, 10, generator=gen),
               f"{stem}.alpha": torch.tensor(1.0), f"{stem}.dora_scale": torch.rand(10, 1, generator=gen) + 0.5}
    name = f"dora_{fmt}.safetensors"  # one name per test: the loader finds a file by name in every loras folder
    save_file(tensors, str(tmp_path / name))
    comfy_env.folder_paths.add_model_folder_path("loras", str(tmp_path))
    module = comfy_env.core.read_adapter(tmp_path / name).modules[stem]
    want = wan.base[path].clone()
    module.bind().apply_(want, 0.8)  # the core's DoRA merge onto the weight the layer computes with
    x = inputs()[10]
    with torch.inference_mode():
        patched = comfy_env.node("LycorisLoaderModelOnly").execute(model=wan.mp, lora_name=name,
                                                                   strength_model=0.8, mode="bypass").args[0]
    got = wan.outputs(patched, inputs())[path]
    assert rel_err(got, F.linear(x, want, wan.bias[path])) <= 1e-4
