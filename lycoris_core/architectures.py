"""The target architectures (SPEC §4), each a data record.

A record says, for one architecture:
- how to recognise it from an adapter file (module paths, shapes, Musubi metadata) and from a
  model's weight names;
- Musubi's default exclude patterns (what its trainer leaves out);
- every Linear layer Musubi can adapt, as a module-path template in Musubi's naming (the original
  checkpoint's), with the ComfyUI model's name for the same weight where it differs: a rename, or a
  row slice of a fused weight (`Slice`);
- other namings files use for those layers (Diffusers, diffusion-pipe), as aliases.

Templates are dotted module paths with placeholders: {n} a block index, {s} `img` or `txt`,
{b} a block-list name. Nothing here is code that depends on the architecture; `plan.py` reads it.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass, field

from .errors import AdapterError
from .rows import Rows

PLACEHOLDERS = {"n": r"\d+", "s": r"img|txt", "b": r"[A-Za-z_]+"}


@dataclass(frozen=True)
class Slice:
    """Part `index` of a fused weight (rows along dim 0), sized by rules on the fused weight's shape.

    Size rules: "third" = out // 3, "in" = in_features, "rest" = what the other parts leave.
    """

    fused: str
    index: int
    sizes: tuple[str, ...]

    def rows(self, fused_shape: tuple[int, ...]) -> Rows:
        """This part's rows in a fused weight of `fused_shape`."""
        out_features, in_features = fused_shape[0], fused_shape[1]
        fixed = {"third": out_features // 3, "in": in_features}
        if "third" in self.sizes and out_features % 3:
            raise AdapterError(f"fused weight {self.fused} has {out_features} rows, not three equal parts")
        known = sum(fixed[s] for s in self.sizes if s != "rest")
        sizes = [fixed[s] if s != "rest" else out_features - known for s in self.sizes]
        if min(sizes) <= 0 or sum(sizes) != out_features:
            raise AdapterError(f"fused weight {self.fused} of shape {list(fused_shape)} cannot be split as {self.sizes}")
        start = sum(sizes[: self.index])
        return Rows(start, start + sizes[self.index])


def _qkv(fused: str) -> tuple[Slice, Slice, Slice]:
    return tuple(Slice(fused, i, ("third", "third", "third")) for i in range(3))


def _linear1(fused: str) -> tuple[Slice, ...]:
    """FLUX single-block linear1: q, k, v (hidden each) then the MLP input."""
    return tuple(Slice(fused, i, ("in", "in", "in", "rest")) for i in range(4))


Target = "str | Slice"


@dataclass(frozen=True)
class Architecture:
    id: str
    title: str
    musubi_versions: tuple[str, ...]  # values of ss_base_model_version
    default_excludes: tuple[str, ...]  # Musubi's regexes, fullmatched against dotted module paths
    # (Musubi template, ComfyUI name: the same template, a rename, or a Slice of a fused weight)
    layers: tuple[tuple[str, object], ...]
    # (template in another naming, the Musubi/ComfyUI template or Slice it stands for)
    aliases: tuple[tuple[str, object], ...] = ()
    # Groups of regexes searched in model module paths (dotted): all of a group must hit.
    model_signature: tuple[tuple[str, ...], ...] = ()
    # The blocks Musubi's trainer adapts (its target_replace_modules, as module-path templates).
    train_blocks: tuple[str, ...] = ()
    # Split q/k/v names ComfyUI core's LoRA loader maps onto slices of its fused weights (ComfyUI
    # 0.28.0, see tests/fixtures/comfyui_models/*.lora_key_map.json): (naming, key prefix), naming
    # "musubi" (the layer templates) or "diffusers" (the aliases). HunyuanVideo 1.5 has none: core
    # maps no name onto the slices of its fused img/txt q/k/v, so parts there only load once fused.
    comfyui_slice_names: tuple[tuple[str, str], ...] = ()
    refused: str | None = None
    notes: tuple[str, ...] = field(default=())


def _same(*templates: str) -> tuple[tuple[str, str], ...]:
    return tuple((t, t) for t in templates)


# ---------------------------------------------------------------------------------------------
# The eight architectures. Layer lists: every Linear of the transformer blocks plus the small
# embedders around them (Musubi excludes most of those by default, but files from other trainers
# may carry them).

WAN = Architecture(
    id="wan",
    title="Wan 2.1/2.2",
    musubi_versions=("wan",),
    default_excludes=(r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*",),
    layers=_same(
        *[f"blocks.{{n}}.self_attn.{p}" for p in "qkvo"],
        *[f"blocks.{{n}}.cross_attn.{p}" for p in ("q", "k", "v", "o", "k_img", "v_img")],
        "blocks.{n}.ffn.0", "blocks.{n}.ffn.2",
        "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
        "time_projection.1", "head.head", "img_emb.proj.1", "img_emb.proj.3",
    ),
    aliases=(  # Diffusers WanTransformer3DModel names (ComfyUI core cannot load these)
        *[(f"blocks.{{n}}.attn1.to_{p}", f"blocks.{{n}}.self_attn.{p}") for p in "qkv"],
        ("blocks.{n}.attn1.to_out.0", "blocks.{n}.self_attn.o"),
        *[(f"blocks.{{n}}.attn2.to_{p}", f"blocks.{{n}}.cross_attn.{p}") for p in "qkv"],
        ("blocks.{n}.attn2.to_out.0", "blocks.{n}.cross_attn.o"),
        ("blocks.{n}.attn2.add_k_proj", "blocks.{n}.cross_attn.k_img"),
        ("blocks.{n}.attn2.add_v_proj", "blocks.{n}.cross_attn.v_img"),
        ("blocks.{n}.ffn.net.0.proj", "blocks.{n}.ffn.0"),
        ("blocks.{n}.ffn.net.2", "blocks.{n}.ffn.2"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
        ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
        ("proj_out", "head.head"),
    ),
    model_signature=((r"^blocks\.\d+\.(self_attn\.q|attn1\.to_q)$", r"^blocks\.\d+\.(cross_attn\.q|attn2\.to_q)$"),),
    train_blocks=("blocks.{n}",),
)

_HV_DOUBLE = (
    ("double_blocks.{n}.{s}_mod.linear", "double_blocks.{n}.{s}_mod.lin"),
    ("double_blocks.{n}.{s}_attn_proj", "double_blocks.{n}.{s}_attn.proj"),
    ("double_blocks.{n}.{s}_mlp.fc1", "double_blocks.{n}.{s}_mlp.0"),
    ("double_blocks.{n}.{s}_mlp.fc2", "double_blocks.{n}.{s}_mlp.2"),
)
_HV_EMBEDDERS = (
    ("time_in.mlp.0", "time_in.in_layer"),
    ("time_in.mlp.2", "time_in.out_layer"),
    ("guidance_in.mlp.0", "guidance_in.in_layer"),
    ("guidance_in.mlp.2", "guidance_in.out_layer"),
    ("vector_in.in_layer", "vector_in.in_layer"),
    ("vector_in.out_layer", "vector_in.out_layer"),
    ("txt_in.input_embedder", "txt_in.input_embedder"),
    ("txt_in.t_embedder.mlp.0", "txt_in.t_embedder.in_layer"),
    ("txt_in.t_embedder.mlp.2", "txt_in.t_embedder.out_layer"),
    ("txt_in.c_embedder.linear_1", "txt_in.c_embedder.in_layer"),
    ("txt_in.c_embedder.linear_2", "txt_in.c_embedder.out_layer"),
    ("txt_in.individual_token_refiner.blocks.{n}.self_attn_qkv", "txt_in.individual_token_refiner.blocks.{n}.self_attn.qkv"),
    ("txt_in.individual_token_refiner.blocks.{n}.self_attn_proj", "txt_in.individual_token_refiner.blocks.{n}.self_attn.proj"),
    ("txt_in.individual_token_refiner.blocks.{n}.mlp.fc1", "txt_in.individual_token_refiner.blocks.{n}.mlp.0"),
    ("txt_in.individual_token_refiner.blocks.{n}.mlp.fc2", "txt_in.individual_token_refiner.blocks.{n}.mlp.2"),
    ("txt_in.individual_token_refiner.blocks.{n}.adaLN_modulation.1", "txt_in.individual_token_refiner.blocks.{n}.adaLN_modulation.1"),
    ("final_layer.linear", "final_layer.linear"),
    ("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
)

HUNYUAN_VIDEO = Architecture(
    id="hunyuan_video",
    title="HunyuanVideo",
    musubi_versions=("hunyuan_video",),
    default_excludes=(r".*(img_mod|txt_mod|modulation).*",),
    layers=(
        ("double_blocks.{n}.{s}_attn_qkv", "double_blocks.{n}.{s}_attn.qkv"),
        *_HV_DOUBLE,
        ("single_blocks.{n}.linear1", "single_blocks.{n}.linear1"),
        ("single_blocks.{n}.linear2", "single_blocks.{n}.linear2"),
        ("single_blocks.{n}.modulation.linear", "single_blocks.{n}.modulation.lin"),
        *_HV_EMBEDDERS,
    ),
    model_signature=((r"^double_blocks\.\d+\.img_attn[._]qkv$", r"^single_blocks\.\d+\.linear1$", r"^txt_in\.individual_token_refiner\."),),
    train_blocks=("double_blocks.{n}", "single_blocks.{n}"),
)

HUNYUAN_VIDEO_1_5 = Architecture(
    id="hunyuan_video_1_5",
    title="HunyuanVideo 1.5",
    musubi_versions=("hunyuan_video_1_5",),
    default_excludes=(r".*(_in).*",),
    layers=(
        *[(f"double_blocks.{{n}}.{{s}}_attn_{p}", part) for p, part in zip("qkv", _qkv("double_blocks.{n}.{s}_attn.qkv"))],
        *_HV_DOUBLE,
        *_HV_EMBEDDERS,
        *_same("byt5_in.fc1", "byt5_in.fc2", "byt5_in.fc3", "vision_in.proj.1", "vision_in.proj.3"),
    ),
    model_signature=(
        (r"^double_blocks\.\d+\.img_attn(\.qkv|_q)$", r"^txt_in\.individual_token_refiner\.", r"^(byt5_in|cond_type_embedding|vision_in)\b"),
    ),
    train_blocks=("double_blocks.{n}",),
)

_FRAMEPACK_DOUBLE = [f"transformer_blocks.{{n}}.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
FRAMEPACK = Architecture(
    id="framepack",
    title="FramePack",
    musubi_versions=("framepack",),
    default_excludes=(r".*(norm).*",),
    layers=_same(
        *_FRAMEPACK_DOUBLE,
        "transformer_blocks.{n}.ff.net.0.proj", "transformer_blocks.{n}.ff.net.2",
        "transformer_blocks.{n}.ff_context.net.0.proj", "transformer_blocks.{n}.ff_context.net.2",
        "transformer_blocks.{n}.norm1.linear", "transformer_blocks.{n}.norm1_context.linear",
        *[f"single_transformer_blocks.{{n}}.attn.to_{p}" for p in "qkv"],
        "single_transformer_blocks.{n}.proj_mlp", "single_transformer_blocks.{n}.proj_out",
        "single_transformer_blocks.{n}.norm.linear",
        "context_embedder.proj_in",
        "context_embedder.time_text_embed.timestep_embedder.linear_1", "context_embedder.time_text_embed.timestep_embedder.linear_2",
        "context_embedder.time_text_embed.text_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_2",
        *[f"context_embedder.token_refiner.refiner_blocks.{{n}}.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2", "norm_out.linear")],
        "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
        "image_projection.up", "image_projection.down", "norm_out.linear", "proj_out",
    ),
    model_signature=((r"^single_transformer_blocks\.\d+\.proj_mlp$", r"^context_embedder\.token_refiner\."),),
    notes=("ComfyUI core has no FramePack model; FramePack wrappers use these (Musubi's) names.",),
    train_blocks=("transformer_blocks.{n}", "single_transformer_blocks.{n}"),
)

_FLUX_DOUBLE = (
    ("double_blocks.{n}.{s}_attn.qkv", "double_blocks.{n}.{s}_attn.qkv"),
    ("double_blocks.{n}.{s}_attn.proj", "double_blocks.{n}.{s}_attn.proj"),
    ("double_blocks.{n}.{s}_mlp.0", "double_blocks.{n}.{s}_mlp.0"),
    ("double_blocks.{n}.{s}_mlp.2", "double_blocks.{n}.{s}_mlp.2"),
    ("single_blocks.{n}.linear1", "single_blocks.{n}.linear1"),
    ("single_blocks.{n}.linear2", "single_blocks.{n}.linear2"),
)
# Diffusers Flux names: q/k/v are separate where ComfyUI fuses them (as comfy.utils.flux_to_diffusers).
_FLUX_DIFFUSERS = (
    *[(f"transformer_blocks.{{n}}.attn.to_{p}", part) for p, part in zip("qkv", _qkv("double_blocks.{n}.img_attn.qkv"))],
    *[(f"transformer_blocks.{{n}}.attn.add_{p}_proj", part) for p, part in zip("qkv", _qkv("double_blocks.{n}.txt_attn.qkv"))],
    ("transformer_blocks.{n}.attn.to_out.0", "double_blocks.{n}.img_attn.proj"),
    ("transformer_blocks.{n}.attn.to_add_out", "double_blocks.{n}.txt_attn.proj"),
    *[(f"single_transformer_blocks.{{n}}.{p}", part) for p, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), _linear1("single_blocks.{n}.linear1"))],
    ("single_transformer_blocks.{n}.proj_out", "single_blocks.{n}.linear2"),
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("proj_out", "final_layer.linear"),
)
_FLUX_EXCLUDES = (r".*(img_mod\.lin|txt_mod\.lin|modulation\.lin).*", r".*(norm).*")

FLUX = Architecture(
    id="flux",
    title="FLUX.1 dev / Kontext",
    musubi_versions=("flux_kontext", "flux"),
    default_excludes=_FLUX_EXCLUDES,
    layers=(
        *_FLUX_DOUBLE,
        *_same(
            "double_blocks.{n}.{s}_mod.lin", "single_blocks.{n}.modulation.lin",
            "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
            "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1",
        ),
    ),
    aliases=(
        *_FLUX_DIFFUSERS,
        ("transformer_blocks.{n}.ff.net.0.proj", "double_blocks.{n}.img_mlp.0"),
        ("transformer_blocks.{n}.ff.net.2", "double_blocks.{n}.img_mlp.2"),
        ("transformer_blocks.{n}.ff_context.net.0.proj", "double_blocks.{n}.txt_mlp.0"),
        ("transformer_blocks.{n}.ff_context.net.2", "double_blocks.{n}.txt_mlp.2"),
        ("transformer_blocks.{n}.norm1.linear", "double_blocks.{n}.img_mod.lin"),
        ("transformer_blocks.{n}.norm1_context.linear", "double_blocks.{n}.txt_mod.lin"),
        ("single_transformer_blocks.{n}.norm.linear", "single_blocks.{n}.modulation.lin"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ),
    model_signature=((r"^double_blocks\.\d+\.img_mod\.lin$", r"^single_blocks\.\d+\.linear1$", r"^txt_in$"),),
    train_blocks=("double_blocks.{n}", "single_blocks.{n}"),
    comfyui_slice_names=(("diffusers", "transformer."),),
)

FLUX2 = Architecture(
    id="flux2",
    title="FLUX.2 dev / Klein",
    musubi_versions=("flux_2_dev", "flux_2_klein_4b", "flux_2_klein_9b", "flux_2"),
    default_excludes=_FLUX_EXCLUDES,
    layers=(
        *_FLUX_DOUBLE,
        *_same(
            "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
            "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
            "final_layer.linear", "final_layer.adaLN_modulation.1",
        ),
    ),
    aliases=(
        *_FLUX_DIFFUSERS,
        ("transformer_blocks.{n}.ff.linear_in", "double_blocks.{n}.img_mlp.0"),
        ("transformer_blocks.{n}.ff.linear_out", "double_blocks.{n}.img_mlp.2"),
        ("transformer_blocks.{n}.ff_context.linear_in", "double_blocks.{n}.txt_mlp.0"),
        ("transformer_blocks.{n}.ff_context.linear_out", "double_blocks.{n}.txt_mlp.2"),
        ("single_transformer_blocks.{n}.attn.to_qkv_mlp_proj", "single_blocks.{n}.linear1"),
        ("single_transformer_blocks.{n}.attn.to_out", "single_blocks.{n}.linear2"),
        ("double_stream_modulation_img.linear", "double_stream_modulation_img.lin"),
        ("double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin"),
        ("single_stream_modulation.linear", "single_stream_modulation.lin"),
    ),
    model_signature=((r"^(double|single)_stream_modulation", r"^single_blocks\.\d+\.linear1$"),),
    train_blocks=("double_blocks.{n}", "single_blocks.{n}"),
    comfyui_slice_names=(("diffusers", "transformer."),),
)

QWEN_IMAGE = Architecture(
    id="qwen_image",
    title="Qwen-Image",
    musubi_versions=("qwen_image", "qwen_image_edit", "qwen_image_layered"),
    default_excludes=(r".*(_mod_).*",),
    layers=_same(
        *[f"transformer_blocks.{{n}}.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")],
        "transformer_blocks.{n}.img_mod.1", "transformer_blocks.{n}.txt_mod.1",
        "transformer_blocks.{n}.img_mlp.net.0.proj", "transformer_blocks.{n}.img_mlp.net.2",
        "transformer_blocks.{n}.txt_mlp.net.0.proj", "transformer_blocks.{n}.txt_mlp.net.2",
        "img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
        "norm_out.linear", "proj_out",
    ),
    model_signature=((r"^transformer_blocks\.\d+\.img_mod\.1$", r"^transformer_blocks\.\d+\.attn\.add_q_proj$"),),
    train_blocks=("transformer_blocks.{n}",),
)

_ZIMAGE_BLOCK = "{b}.{n}"
Z_IMAGE = Architecture(
    id="z_image",
    title="Z-Image",
    musubi_versions=("z_image",),
    default_excludes=(r".*(_modulation|_refiner).*",),
    layers=(
        *[(f"{_ZIMAGE_BLOCK}.attention.to_{p}", part) for p, part in zip("qkv", _qkv(f"{_ZIMAGE_BLOCK}.attention.qkv"))],
        (f"{_ZIMAGE_BLOCK}.attention.to_out.0", f"{_ZIMAGE_BLOCK}.attention.out"),
        *_same(*[f"{_ZIMAGE_BLOCK}.feed_forward.w{i}" for i in (1, 2, 3)], f"{_ZIMAGE_BLOCK}.adaLN_modulation.0"),
        ("all_x_embedder.2-1", "x_embedder"),
        ("all_final_layer.2-1.linear", "final_layer.linear"),
        ("all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
        *_same("cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2"),
    ),
    model_signature=((r"^layers\.\d+\.attention\.(qkv|to_q)$", r"^layers\.\d+\.feed_forward\.w1$", r"^(noise|context)_refiner\.\d+\."),),
    train_blocks=("layers.{n}", "noise_refiner.{n}", "context_refiner.{n}"),
    comfyui_slice_names=(("musubi", "diffusion_model."),),
)

KANDINSKY5 = Architecture(
    id="kandinsky5",
    title="Kandinsky 5",
    musubi_versions=("kandinsky5",),
    default_excludes=(),
    layers=(),
    refused="Kandinsky 5 is not supported: Musubi Tuner does not train LoHa/LoKr for it, and its files follow no layout this pack knows",
)

ARCHITECTURES: dict[str, Architecture] = {
    a.id: a for a in (WAN, HUNYUAN_VIDEO, HUNYUAN_VIDEO_1_5, FRAMEPACK, FLUX, FLUX2, QWEN_IMAGE, Z_IMAGE, KANDINSKY5)
}
SUPPORTED = tuple(a for a in ARCHITECTURES.values() if not a.refused)


def get_architecture(arch_id: str) -> Architecture:
    try:
        arch = ARCHITECTURES[arch_id]
    except KeyError:
        raise AdapterError(f"unknown architecture {arch_id!r} (known: {', '.join(ARCHITECTURES)})") from None
    if arch.refused:
        raise AdapterError(arch.refused)
    return arch


def describe_architecture(arch_id: str | None) -> str:
    if arch_id is None:
        return "an unknown architecture"
    arch = ARCHITECTURES.get(arch_id)
    return f"{arch.title} ({arch.id})" if arch else arch_id


# ---------------------------------------------------------------------------------------------
# Templates


_FORMATTER = string.Formatter()


@functools.lru_cache(maxsize=None)
def template_regex(template: str, flat: bool = False) -> re.Pattern:
    """A template as a full-match regex; `flat` matches the underscored form ('.' -> '_')."""
    pattern = ""
    for literal, name, _, _ in _FORMATTER.parse(template):
        text = literal.replace(".", "_") if flat else literal
        pattern += re.escape(text)
        if name is not None:
            pattern += f"(?P<{name}>{PLACEHOLDERS[name]})"
    return re.compile(pattern)


def match_template(template: str, path: str, flat: bool = False) -> dict[str, str] | None:
    found = template_regex(template, flat).fullmatch(path)
    return found.groupdict() if found else None


def flatten(path: str) -> str:
    return path.replace(".", "_")


# ---------------------------------------------------------------------------------------------
# Detection


def architecture_from_metadata(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "").strip().lower()
    for arch in ARCHITECTURES.values():
        if version in arch.musubi_versions:
            return arch.id
    return None


def all_templates(arch: Architecture, musubi_only: bool = False) -> list[str]:
    """Module-path templates of an architecture: Musubi's naming only, or every naming it knows."""
    found = [template for template, _ in arch.layers]
    if not musubi_only:
        for template, target in (*arch.layers, *arch.aliases):
            found.append(template)
            found.append(target.fused if isinstance(target, Slice) else target)
    return list(dict.fromkeys(found))


@functools.lru_cache(maxsize=None)
def _explains_regex(arch_id: str, musubi_only: bool) -> re.Pattern:
    unnamed = [
        re.sub(r"\(\?P<\w+>", "(?:", template_regex(t, flat=True).pattern)
        for t in all_templates(ARCHITECTURES[arch_id], musubi_only)
    ]
    return re.compile(r"(?:^|_)(?:" + "|".join(unnamed) + r")$")


def explained_count(arch_id: str, stems, musubi_only: bool = False) -> int:
    """How many module stems (any prefix, any key family) name a layer of this architecture."""
    if ARCHITECTURES[arch_id].refused:
        return 0
    pattern = _explains_regex(arch_id, musubi_only)
    return sum(1 for stem in stems if pattern.search(flatten(stem)))


def _mlp_ratio(module_shapes: dict[str, tuple]) -> float | None:
    """out/in of a FLUX double-block MLP input layer (4 in FLUX.1, 6 in FLUX.2), if adapted."""
    for stem, shape in module_shapes.items():
        if re.search(r"(^|_)double_blocks_\d+_img_mlp_0$", flatten(stem)) and len(shape) >= 2 and shape[1]:
            return shape[0] / shape[1]
    return None


def detect_adapter_architecture(module_shapes: dict[str, tuple], metadata: dict[str, str]) -> str | None:
    """The architecture of an adapter from its module stems (and shapes); metadata breaks ties.

    Keys decide (SPEC §3): the architectures whose layer names explain the most modules are the
    candidates. Among them the metadata hint wins; else the one whose Musubi naming explains the
    most. Names that fit several equally (FLUX.1 vs HunyuanVideo in ComfyUI naming, FLUX in
    Diffusers naming vs FramePack) and carry no hint give None.
    """
    hint = architecture_from_metadata(metadata)
    if hint and ARCHITECTURES[hint].refused:
        return hint
    stems = list(module_shapes)
    scores = {arch.id: explained_count(arch.id, stems) for arch in SUPPORTED}
    ratio = _mlp_ratio(module_shapes)
    if ratio is not None:
        scores["flux2" if ratio < 5 else "flux"] = 0
    best = max(scores.values())
    if best == 0:
        return hint
    candidates = [a for a, s in scores.items() if s == best]
    if hint in candidates:
        return hint
    by_musubi_names = {a: explained_count(a, stems, musubi_only=True) for a in candidates}
    top = max(by_musubi_names.values())
    leaders = [a for a, s in by_musubi_names.items() if s == top]
    return leaders[0] if len(leaders) == 1 else None


def comfyui_only_templates(arch: Architecture) -> list[str]:
    """ComfyUI names that differ from Musubi's for the same layer (renames and fused weights)."""
    found = []
    for musubi, comfy in arch.layers:
        name = comfy.fused if isinstance(comfy, Slice) else comfy
        if name != musubi:
            found.append(name)
    return list(dict.fromkeys(found))


def refine_format(file_format: str, stems, arch_id: str | None) -> str:
    """'comfyui' for a dotted-key file that uses ComfyUI's own names where they differ from Musubi's."""
    if file_format != "diffusers" or arch_id not in ARCHITECTURES:
        return file_format
    arch = ARCHITECTURES[arch_id]
    comfy_only = [template_regex(t, flat=True) for t in comfyui_only_templates(arch)]
    musubi_only = [
        template_regex(m, flat=True) for m, c in arch.layers if m != (c.fused if isinstance(c, Slice) else c)
    ]

    def uses(patterns, stem) -> bool:
        flat = flatten(stem)
        starts = [0] + [i + 1 for i, ch in enumerate(flat) if ch == "_"]
        return any(p.fullmatch(flat[i:]) for p in patterns for i in starts)

    stems = list(stems)
    if any(uses(comfy_only, s) for s in stems) and not any(uses(musubi_only, s) for s in stems):
        return "comfyui"
    return file_format


def detect_file_architecture(adapter) -> str | None:
    return detect_adapter_architecture({stem: m.shape for stem, m in adapter.modules.items()}, adapter.metadata)


# "model.model.": how ComfyUI's ModelSave writes HunyuanVideo (1.5) models
MODEL_PREFIXES = ("model.diffusion_model.", "model.model.", "diffusion_model.", "model.")


def module_path(key: str) -> str:
    """A model weight key without its container prefix and parameter suffix."""
    for prefix in MODEL_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key


def detect_model_architecture(weight_names) -> str | None:
    """The architecture of a model (base file or ComfyUI model) from its weight names."""
    paths = {module_path(k) for k in weight_names}
    for arch in SUPPORTED:
        for group in arch.model_signature:
            if all(any(re.search(sig, p) for p in paths) for sig in group):
                return arch.id
    return None
