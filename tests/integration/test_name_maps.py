"""The pack's Diffusers names, proven by forward equivalence against ComfyUI's own models.

For each architecture: build a tiny Diffusers model (diffusers 0.42.1) and the same tiny ComfyUI
model (ComfyUI's own classes; configs from tests/fixtures/wild/manifest.json "models", with a few
overrides so that every optional module exists), fill the Diffusers model with seeded random weights,
turn its state dict into ComfyUI's names through the pack's naming ALONE (`place_of_stem` of each
parameter's module: ComfyUI's weight and the rows of it; a weight is `.weight`, or `.scale` where the
running ComfyUI keeps the RMSNorm name of the original checkpoints, as the core reads it), load that
into the ComfyUI model strictly, and compare the two forward passes on the same inputs. A wrong name, wrong rows or a missing swap
shows as a large error (see the teeth tests at the end); a correct map agrees to fp32 rounding.

Only bare parameters that sit on no layer of their own (Wan's modulation tables, Z-Image's pad
tokens) go through the small table BARE below: they are never adapter targets. Everything else
must resolve through the pack's naming, or the test fails with the list of modules that did not.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
import time

import pytest
import torch
from comfyui_host import having_model, host_comfyui, require_comfyui
from helpers import WILD, rel_err

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI
diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is not installed (pip install diffusers==0.42.1): the name maps are proven with it")

from comfyui_lycoris.lycoris_core.architectures import ARCHITECTURES, DIFFUSERS, SwapHalves  # noqa: E402
from comfyui_lycoris.lycoris_core.naming import WEIGHT_PARAMS, Naming, naming_for  # noqa: E402
from comfyui_lycoris.lycoris_core.rows import Rows  # noqa: E402

MODELS = json.loads((WILD / "manifest.json").read_text())["models"]
TOLERANCE = 1e-5  # relative error of the whole output, fp32 on CPU

# Bare parameters (not inside a layer): Diffusers key -> ComfyUI key, copied as they are.
BARE = {
    "wan": {"scale_shift_table": "head.modulation", "blocks.{n}.scale_shift_table": "blocks.{n}.modulation"},
    "z_image": {"x_pad_token": "x_pad_token", "cap_pad_token": "cap_pad_token"},
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One pair of tiny models: the manifest's configs with Diffusers (d) and ComfyUI (c) overrides."""

    id: str
    arch: str
    d: dict = dataclasses.field(default_factory=dict)
    c: dict = dataclasses.field(default_factory=dict)
    comfy_class: str | None = None  # a ComfyUI config class other than the manifest's
    tolerance: float = TOLERANCE


def qwen_image_takes(option: str) -> bool:
    """Whether the running ComfyUI's Qwen-Image model takes `option` (use_additional_t_cond: not 0.3.64's)."""
    host_comfyui()
    model = importlib.import_module("comfy.ldm.qwen_image.model").QwenImageTransformer2DModel
    return option in inspect.signature(model).parameters


RUNS = [
    Run("wan_t2v", "wan"),
    # image_dim/added_kv_proj_dim add the image embedder and cross-attention's k_img/v_img
    Run("wan_i2v", "wan", d=dict(image_dim=1280, added_kv_proj_dim=16, in_channels=8, num_layers=2),
        c=dict(model_type="i2v", in_dim=8, num_layers=2), comfy_class="WAN21_I2V"),
    Run("hunyuan_video", "hunyuan_video"),
    # ComfyUI hard-codes the ByT5 projection as 1472 -> 2048 -> 2048 -> hidden, so the real width is
    # needed for context_embedder_2 to have a counterpart; MeanFlow adds time_r_in. Two blocks: the
    # text stream of the last double block never reaches the output.
    Run("hunyuan_video_1_5", "hunyuan_video_1_5", d=dict(text_embed_2_dim=1472, use_meanflow=True, num_layers=2),
        c=dict(byt5=True, meanflow=True, meanflow_sum=True, depth=2)),
    Run("flux", "flux"),
    Run("flux2", "flux2", d=dict(guidance_embeds=True, num_layers=2, num_single_layers=2),
        c=dict(guidance_embed=True, depth=2, depth_single_blocks=2)),
    # addition_t_embedding; two blocks, as for HunyuanVideo 1.5. Only where ComfyUI's model has the option.
    *([Run("qwen_image", "qwen_image", d=dict(use_additional_t_cond=True, num_layers=2),
           c=dict(use_additional_t_cond=True, num_layers=2))] if qwen_image_takes("use_additional_t_cond") else []),
    # the same without it: ComfyUI releases before the option (0.3.64) still prove the other names
    Run("qwen_image_without_t_cond", "qwen_image", d=dict(num_layers=2), c=dict(num_layers=2)),
    # Below width 1024 the two timestep embedders have different shapes (Diffusers 256 -> 1024 ->
    # min(dim, 256), ComfyUI 256 -> min(dim, 1024) -> 256), so the manifest's width 16 cannot agree.
    # At width 1024 fp32 rounding is larger: Diffusers' own fp32 output is ~1.2e-5 from its fp64
    # output there (measured once with a float64 copy); ComfyUI vs Diffusers measures ~4e-6.
    Run("z_image", "z_image", d=dict(dim=1024, n_heads=64, n_kv_heads=64, axes_dims=[4, 6, 6], n_layers=2),
        c=dict(dim=1024, n_heads=64, n_kv_heads=64, axes_dims=[4, 6, 6], n_layers=2), tolerance=3e-5),
]
RUN = {run.id: run for run in having_model(RUNS, lambda run: run.arch)}


# -- the two models ---------------------------------------------------------------------------------

_built: dict[str, tuple] = {}


def models(comfy_env, run: Run):
    """(Diffusers model with seeded random weights, ComfyUI model), built once per run."""
    if run.id not in _built:
        spec = MODELS[run.arch]
        config_cls = comfy_env.model_class(run.comfy_class or spec["comfyui_class"])
        torch.manual_seed(spec["seed"])
        dm = getattr(diffusers, spec["diffusers_class"])(**{**spec["diffusers_config"], **run.d}).eval()
        gen = torch.Generator().manual_seed(spec["seed"])
        with torch.no_grad():
            for name, p in dm.named_parameters():
                r = torch.randn(p.shape, generator=gen)
                if p.ndim >= 2:  # matrices, convs, embeddings, tables: outputs of unit variance
                    p.copy_(r / p[0].numel() ** 0.5)
                else:  # norm weights around 1, biases small
                    p.copy_(1 + 0.2 * r if name.endswith("weight") else 0.2 * r)
        cm = comfy_env.new_model(config_cls, {**spec["comfyui_unet_config"], **run.c}).diffusion_model.eval()
        _built[run.id] = dm, cm
    return _built[run.id]


# -- the conversion: the pack's naming only -------------------------------------------------------------

def bare_key(arch: str, key: str) -> str | None:
    for d_template, c_template in BARE.get(arch, {}).items():
        found = re.fullmatch(re.escape(d_template).replace(r"\{n\}", r"(\d+)"), key)
        if found:
            return c_template.replace("{n}", found.group(1)) if found.groups() else c_template
    return None


def unresolved_modules(naming: Naming, arch: str, dm) -> list[str]:
    """Diffusers modules with parameters of their own that neither the naming nor BARE places."""
    return sorted(
        name for name, module in dm.named_modules()
        if any(bare_key(arch, f"{name}.{p}" if name else p) is None for p, _ in module.named_parameters(recurse=False))
        and naming.place_of_stem(name) is None
    )


def to_comfyui(naming: Naming, arch: str, dm, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The Diffusers model's weights under ComfyUI's names, each ComfyUI row filled exactly once."""
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, torch.Tensor] = {}  # times each row of each ComfyUI tensor was written
    problems = []
    for name, module in dm.named_modules():
        for pname, value in module.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            value = value.detach()
            ckey, pieces = bare_key(arch, key), None
            if ckey is None:
                place = naming.place_of_stem(name)
                if place is None:
                    problems.append(f"{key}: no place")
                    continue
                ckey = f"{place.weight}.{pname}"
                if pname == "weight":  # the core's weight parameter names: `.weight` or a norm's `.scale`
                    ckey = next((f"{place.weight}{p}" for p in WEIGHT_PARAMS if f"{place.weight}{p}" in shapes), ckey)
                if ckey in shapes and place.rows is not None:
                    # rows are counted on ComfyUI's (fused) weight; its bias follows the same rows
                    pieces = place.rows.pieces(shapes.get(f"{place.weight}.weight", shapes[ckey]))
            if ckey not in shapes:
                problems.append(f"{key} -> {ckey}: ComfyUI's model has no such tensor")
                continue
            pieces = pieces or [(Rows(0, shapes[ckey][0]), None)]  # the whole tensor, rows in order
            target = out.setdefault(ckey, torch.full(shapes[ckey], float("nan")))
            count = filled.setdefault(ckey, torch.zeros(shapes[ckey][0], dtype=torch.int64))
            for comfy_rows, diffusers_rows in pieces:
                source = value if diffusers_rows is None else diffusers_rows.of(value)
                if comfy_rows.of(target).shape != source.shape:
                    problems.append(f"{key} -> {ckey}[{comfy_rows}]: shape {list(source.shape)}, "
                                    f"ComfyUI's rows {list(comfy_rows.of(target).shape)}")
                    continue
                comfy_rows.of(target).copy_(source)
                comfy_rows.of(count).add_(1)
    problems += [f"{k}: ComfyUI tensor left unfilled" for k in sorted(set(shapes) - set(out))]
    problems += [f"{k}: rows not written exactly once ({c.tolist()})" for k, c in filled.items() if not (c == 1).all()]
    assert not problems, "conversion through the pack's naming failed:\n  " + "\n  ".join(problems)
    return out


def converted_error(comfy_env, run: Run, naming: Naming) -> float:
    """Load the Diffusers weights, converted through `naming`, into ComfyUI's model; compare outputs."""
    dm, cm = models(comfy_env, run)
    shapes = {k: tuple(v.shape) for k, v in cm.state_dict().items()}
    cm.load_state_dict(to_comfyui(naming, run.arch, dm, shapes), strict=True)
    with torch.no_grad():
        want, got = FORWARD[run.arch](run, dm, cm, torch.Generator().manual_seed(MODELS[run.arch]["seed"] + 1))
    assert got.shape == want.shape, (got.shape, want.shape)
    return rel_err(got, want)


# -- the same inputs to both models, in each one's conventions ----------------------------------------

def randn(g, *shape):
    return torch.randn(*shape, generator=g)


def forward_wan(run, dm, cm, g):
    x, t = randn(g, 1, dm.config.in_channels, 2, 4, 4), torch.tensor([437.0])
    if not run.d.get("image_dim"):
        ctx = randn(g, 1, 7, 8)
        return dm(x, t, ctx).sample, cm(x, t, ctx)
    ctx, image = randn(g, 1, 512, 8), randn(g, 1, 5, 1280)  # Diffusers' I2V attention takes 512 text tokens
    return dm(x, t, ctx, encoder_hidden_states_image=image).sample, cm(x, t, ctx, clip_fea=image)


def forward_hunyuan_video(run, dm, cm, g):
    x, t, guidance = randn(g, 1, 4, 2, 4, 4), torch.tensor([437.0]), torch.tensor([3.5])
    ctx, pooled = randn(g, 1, 6, 8), randn(g, 1, 8)
    want = dm(x, t, ctx, torch.ones(1, 6), pooled, guidance=guidance * 1000).sample  # Diffusers' guidance is x1000
    return want, cm(x, t, ctx, y=pooled, guidance=guidance)


def forward_hunyuan_video_1_5(run, dm, cm, g):
    x, t = randn(g, 1, 9, 2, 3, 3), torch.tensor([437.0])
    ctx, image, byt5 = randn(g, 1, 6, 8), randn(g, 1, 3, 8), randn(g, 1, 4, 1472)
    # MeanFlow's second timestep: Diffusers takes it as timestep_r, ComfyUI from the next sigma
    want = dm(x, t, ctx, torch.ones(1, 6), encoder_hidden_states_2=byt5, encoder_attention_mask_2=torch.ones(1, 4),
              image_embeds=image, timestep_r=torch.tensor([250.0])).sample
    options = {"sigmas": torch.tensor([0.437]), "sample_sigmas": torch.tensor([0.437, 0.25, 0.0])}
    return want, cm(x, t, ctx, txt_byt5=byt5, clip_fea=image, transformer_options=options)


def forward_flux(run, dm, cm, g):
    x, t, guidance, ctx = randn(g, 1, 4, 4, 6), torch.tensor([0.437]), torch.tensor([3.5]), randn(g, 1, 5, 8)
    img, img_ids = cm.process_img(x)  # Diffusers takes ComfyUI's packed tokens and their ids
    if run.arch == "flux":
        pooled = randn(g, 1, 8)
        kw, comfy_kw = dict(pooled_projections=pooled, guidance=guidance), dict(y=pooled, guidance=guidance)
        txt_ids = torch.zeros(5, 3)
    else:
        kw = comfy_kw = dict(guidance=guidance) if dm.config.guidance_embeds else {}
        txt_ids = torch.zeros(5, 4)
        txt_ids[:, 3] = torch.arange(5)  # ComfyUI's FLUX.2 numbers text tokens on axis 3 (txt_ids_dims=[3])
    want = dm(hidden_states=img, encoder_hidden_states=ctx, timestep=t, img_ids=img_ids[0], txt_ids=txt_ids,
              **kw).sample
    return want, cm.process_img(cm(x, t, ctx, **comfy_kw))[0]


def forward_qwen_image(run, dm, cm, g):
    # an even token grid (2 x 4): on odd grids the two RoPEs centre their positions differently
    x, t, ctx = randn(g, 1, 4, 1, 4, 8), torch.tensor([0.437]), randn(g, 1, 5, 8)
    kw = dict(additional_t_cond=torch.tensor([1])) if run.d.get("use_additional_t_cond") else {}
    want = dm(hidden_states=cm.process_img(x)[0], encoder_hidden_states=ctx,
              encoder_hidden_states_mask=torch.ones(1, 5), timestep=t, img_shapes=[[(1, 2, 4)]], **kw).sample
    return want, cm.process_img(cm(x, t, ctx, **kw))[0]


def forward_z_image(run, dm, cm, g):
    x, t, ctx = randn(g, 1, 4, 4, 6), torch.tensor([0.437]), randn(g, 1, 5, 8)
    # ComfyUI's model feeds 1 - t and negates the output; for Diffusers its pipeline does both
    want = -dm([x[0].unsqueeze(1)], 1.0 - t, [ctx[0]]).sample[0].squeeze(1).unsqueeze(0)
    return want, cm(x, t, ctx, num_tokens=5)


FORWARD = {"wan": forward_wan, "hunyuan_video": forward_hunyuan_video, "hunyuan_video_1_5": forward_hunyuan_video_1_5,
           "flux": forward_flux, "flux2": forward_flux, "qwen_image": forward_qwen_image, "z_image": forward_z_image}


# -- the proofs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("run_id", list(RUN))
def test_diffusers_names_give_comfyui_the_same_model(comfy_env, run_id):
    run, naming = RUN[run_id], naming_for(RUN[run_id].arch)
    start = time.perf_counter()
    dm, _ = models(comfy_env, run)
    assert unresolved_modules(naming, run.arch, dm) == [], "Diffusers modules the pack's naming does not place"
    err = converted_error(comfy_env, run, naming)
    seconds = time.perf_counter() - start
    print(f"\n{run_id}: ComfyUI vs Diffusers rel err {err:.2e} (bound {run.tolerance:g}), {seconds:.1f}s")
    assert err <= run.tolerance


def _mutated(arch: str, mutate) -> Naming:
    """The architecture's naming with its names changed by `mutate`."""
    record = ARCHITECTURES[arch]
    names = mutate(record.names)
    assert names != record.names, "the mutation changed nothing"
    return Naming(dataclasses.replace(record, names=names))


def without_swap(names):
    return tuple(dataclasses.replace(n, rows=None) if isinstance(n.rows, SwapHalves) else n for n in names)


def exchanged(first: str, second: str):
    """Two Diffusers names given each other's rows of their fused ComfyUI weight."""
    def mutate(names):
        rows = {n.template: n.rows for n in names if n.naming == DIFFUSERS}
        swap = {first: rows[second], second: rows[first]}
        return tuple(dataclasses.replace(n, rows=swap[n.template]) if n.naming == DIFFUSERS and n.template in swap
                     else n for n in names)
    return mutate


# Wrong maps that still load (every ComfyUI row filled once, every shape right): only the forward tells.
TEETH = {
    "flux_final_layer_without_swap": ("flux", without_swap),
    "flux_single_block_q_k_exchanged": (
        "flux", exchanged("single_transformer_blocks.{n}.attn.to_q", "single_transformer_blocks.{n}.attn.to_k")),
    "hunyuan_video_txt_k_v_exchanged": (
        "hunyuan_video", exchanged("transformer_blocks.{n}.attn.add_k_proj", "transformer_blocks.{n}.attn.add_v_proj")),
}


@pytest.mark.parametrize("mutation", list(TEETH))
def test_a_wrong_map_fails_the_comparison(comfy_env, mutation):
    arch, edit = TEETH[mutation]
    err = converted_error(comfy_env, RUN[arch], _mutated(arch, edit))
    print(f"\n{mutation}: rel err {err:.2e}")
    assert err > 1e-2
