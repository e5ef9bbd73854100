"""The target architectures, each a data record. Nothing here reads them: `naming.py` does.

A record says, for one architecture:
- the names its layers have in each naming, as `Name` entries: Musubi's (the original checkpoint's
  module paths, which Musubi Tuner trains and saves) and Diffusers' (what SimpleTuner, PEFT and
  ai-toolkit train), each pointing at ComfyUI's weight for the same layer, always the whole weight,
  with the rows the name stands for when it is a part of it (`Part`: q, k and v that ComfyUI fuses
  into one `qkv`) or when the rows come in another order (`SWAP_HALVES`). ComfyUI's own names are
  the `weight` fields; a name no entry knows is taken as ComfyUI's own;
- how to recognise it: Musubi's metadata values and regexes over a model's weight names;
- Musubi's default exclude patterns and the blocks its trainer adapts;
- the blocks that block weights address, in their order, and the kinds of layer inside them
  (`lycoris_core/block_weights.py` reads these).

The Diffusers entries are proven by loading the same random weights into the tiny Diffusers model
and, through these entries, into ComfyUI's model, and comparing their outputs
(tests/integration/test_name_maps.py).

Templates are dotted module paths with placeholders: {n} a block index, {s} `img` or `txt`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import AdapterError
from .rows import Rows

MUSUBI, DIFFUSERS, COMFYUI = "musubi", "diffusers", "comfyui"  # the namings
PLACEHOLDERS = {"n": r"\d+", "s": r"img|txt"}


@dataclass(frozen=True)
class Part:
    """Rows of a fused weight: part `index` of parts sized by rules on the fused weight's shape.

    Size rules: "third" = out // 3, "in" = in_features, "rest" = what the other parts leave.
    """

    index: int
    sizes: tuple[str, ...]

    def all_rows(self, fused_shape: tuple) -> list[Rows]:
        out_features = fused_shape[0]
        in_features = fused_shape[1] if len(fused_shape) > 1 else 0
        if "third" in self.sizes and out_features % 3:
            raise AdapterError(f"a fused weight of {out_features} rows has no three equal parts")
        fixed = {"third": out_features // 3, "in": in_features}
        known = sum(fixed[s] for s in self.sizes if s != "rest")
        sizes = [fixed[s] if s != "rest" else out_features - known for s in self.sizes]
        if min(sizes) <= 0 or sum(sizes) != out_features:
            raise AdapterError(f"a fused weight of shape {list(fused_shape)} cannot be split as {list(self.sizes)}")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [Rows(start, start + size) for start, size in zip(starts, sizes)]

    def rows(self, fused_shape: tuple) -> Rows:
        return self.all_rows(fused_shape)[self.index]

    def pieces(self, fused_shape: tuple) -> list[tuple[Rows, Rows | None]]:
        """(rows of the fused weight, rows of the module's ΔW or None for all) it adds to."""
        return [(self.rows(fused_shape), None)]


@dataclass(frozen=True)
class SwapHalves:
    """The whole weight with its two halves of rows in the other order: Diffusers' final
    AdaLayerNormContinuous has (scale, shift) rows where ComfyUI's final layer has (shift, scale)."""

    def pieces(self, shape: tuple) -> list[tuple[Rows, Rows | None]]:
        if shape[0] % 2:
            raise AdapterError(f"a weight of {shape[0]} rows has no two equal halves")
        half = shape[0] // 2
        return [(Rows(half, 2 * half), Rows(0, half)), (Rows(0, half), Rows(half, 2 * half))]


SWAP_HALVES = SwapHalves()


@dataclass(frozen=True)
class Name:
    naming: str  # MUSUBI or DIFFUSERS
    template: str
    weight: str  # ComfyUI's template of the whole weight this name adapts
    rows: Part | SwapHalves | None = None


def musubi(template: str, weight: str | None = None, rows: Part | None = None) -> Name:
    return Name(MUSUBI, template, weight or template, rows)


def same(*templates: str) -> tuple[Name, ...]:
    """Musubi names that are ComfyUI's too."""
    return tuple(musubi(t) for t in templates)


def diffusers(template: str, weight: str, rows: Part | SwapHalves | None = None) -> Name:
    return Name(DIFFUSERS, template, weight, rows)


def also_diffusers(*names: Name) -> tuple[Name, ...]:
    """Musubi names that are Diffusers' too (Musubi trains Diffusers' own model class)."""
    return (*names, *(Name(DIFFUSERS, n.template, n.weight, n.rows) for n in names))


THIRDS = ("third", "third", "third")
LINEAR1 = ("in", "in", "in", "rest")  # FLUX / HunyuanVideo single-block linear1: q, k, v, then the MLP input


def qkv(i: int) -> Part:
    return Part(i, THIRDS)


def linear1(i: int) -> Part:
    return Part(i, LINEAR1)


@dataclass(frozen=True)
class BlockList:
    """A list of repeated blocks that block weights address: the name users write (`double_blocks`) and
    the module path of ComfyUI's weights before the block index. They differ only for FramePack, which has
    no ComfyUI model: its double and single blocks keep their original names."""

    name: str
    path: str


def block_lists(*paths: str) -> tuple[BlockList, ...]:
    """Block lists named as ComfyUI names them."""
    return tuple(BlockList(path, path) for path in paths)


@dataclass(frozen=True)
class LayerKind:
    """A kind of layer inside a block, for block weights (`attn=0.5`): a regex fullmatched against a
    weight's module path inside its block, in ComfyUI's naming (`img_attn.qkv`). A layer can be of
    several kinds (FLUX's single-block `linear1` holds attention and MLP inputs together)."""

    name: str
    pattern: str


@dataclass(frozen=True)
class Architecture:
    id: str
    title: str
    musubi_versions: tuple[str, ...]  # values of ss_base_model_version (Musubi's and other trainers')
    default_excludes: tuple[str, ...]  # Musubi's regexes, fullmatched against dotted module paths
    names: tuple[Name, ...] = ()
    # Groups of regexes searched in model module paths (dotted): all of a group must hit.
    model_signature: tuple[tuple[str, ...], ...] = ()
    # The blocks Musubi's trainer adapts (its target_replace_modules, as module-path templates).
    train_blocks: tuple[str, ...] = ()
    # Every list of repeated blocks, as ComfyUI names it (module paths before the block index).
    blocks: tuple[str, ...] = ()
    # Names of parts of fused weights that ComfyUI core's LoRA loader maps onto its row slices
    # (ComfyUI 0.28.0, see tests/fixtures/comfyui_models/*.lora_key_map.json): (naming, key prefix).
    # HunyuanVideo 1.5 has none: core maps no name onto the slices of its fused img/txt q/k/v.
    comfyui_slice_names: tuple[tuple[str, str], ...] = ()
    # How `modelspec.architecture` values (Musubi, kohya, SimpleTuner) start for this architecture,
    # lower-cased; the longest matching start wins ("flux.2-dev/lora" is FLUX.2, not FLUX).
    modelspec: tuple[str, ...] = ()
    refused: str | None = None
    notes: tuple[str, ...] = field(default=())
    comfyui_model: bool = True  # ComfyUI core has a model class (its weights' names are a naming)
    # The blocks block weights address, in the order a vector of one number per block follows (the order
    # the model runs them), and the kinds of layer inside them. How many blocks each list has is counted
    # in the model at hand; layers outside these blocks always keep factor 1.
    weighted_blocks: tuple[BlockList, ...] = ()
    layer_kinds: tuple[LayerKind, ...] = ()


# ---------------------------------------------------------------------------------------------
# The eight architectures. Musubi names: every Linear of the transformer blocks plus the small
# embedders around them (Musubi excludes most of those by default, but files from other trainers
# may carry them). Diffusers names: every module with parameters, norms and embeddings included.

_WAN_ATTENTION = [("attn1", "self_attn"), ("attn2", "cross_attn")]
WAN = Architecture(
    id="wan",
    title="Wan 2.1/2.2",
    musubi_versions=("wan", "wan_2.1", "wan_2.2_14b", "wan_2.2_5b"),
    modelspec=("wan",),
    default_excludes=(r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*",),
    names=(
        *same(
            *[f"blocks.{{n}}.self_attn.{p}" for p in "qkvo"],
            *[f"blocks.{{n}}.cross_attn.{p}" for p in ("q", "k", "v", "o", "k_img", "v_img")],
            "blocks.{n}.ffn.0", "blocks.{n}.ffn.2",
            "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
            "time_projection.1", "head.head", "img_emb.proj.1", "img_emb.proj.3",
        ),
        diffusers("patch_embedding", "patch_embedding"),
        diffusers("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        diffusers("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        diffusers("condition_embedder.time_proj", "time_projection.1"),
        diffusers("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        diffusers("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        diffusers("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
        diffusers("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
        diffusers("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
        diffusers("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
        diffusers("proj_out", "head.head"),
        *[diffusers(f"blocks.{{n}}.{d}.to_{p}", f"blocks.{{n}}.{c}.{p}") for d, c in _WAN_ATTENTION for p in "qkv"],
        *[diffusers(f"blocks.{{n}}.{d}.to_out.0", f"blocks.{{n}}.{c}.o") for d, c in _WAN_ATTENTION],
        *[diffusers(f"blocks.{{n}}.{d}.norm_{p}", f"blocks.{{n}}.{c}.norm_{p}") for d, c in _WAN_ATTENTION for p in "qk"],
        diffusers("blocks.{n}.attn2.add_k_proj", "blocks.{n}.cross_attn.k_img"),
        diffusers("blocks.{n}.attn2.add_v_proj", "blocks.{n}.cross_attn.v_img"),
        diffusers("blocks.{n}.attn2.norm_added_k", "blocks.{n}.cross_attn.norm_k_img"),
        diffusers("blocks.{n}.norm2", "blocks.{n}.norm3"),  # the affine cross-attention pre-norm
        diffusers("blocks.{n}.ffn.net.0.proj", "blocks.{n}.ffn.0"),
        diffusers("blocks.{n}.ffn.net.2", "blocks.{n}.ffn.2"),
    ),
    model_signature=((r"^blocks\.\d+\.(self_attn\.q|attn1\.to_q)$", r"^blocks\.\d+\.(cross_attn\.q|attn2\.to_q)$"),),
    train_blocks=("blocks.{n}",),
    blocks=("blocks",),
    weighted_blocks=block_lists("blocks"),
    layer_kinds=(
        LayerKind("attn", r"(self_attn|cross_attn)\..+|norm3"),  # norm3: the cross-attention pre-norm
        LayerKind("self_attn", r"self_attn\..+"),
        LayerKind("cross_attn", r"cross_attn\..+|norm3"),
        LayerKind("ffn", r"ffn\..+"),
    ),
)

# HunyuanVideo (1.5): Musubi's names for the double blocks and embedders, and Diffusers' for both.
_HV_DOUBLE = (
    musubi("double_blocks.{n}.{s}_mod.linear", "double_blocks.{n}.{s}_mod.lin"),
    musubi("double_blocks.{n}.{s}_attn_proj", "double_blocks.{n}.{s}_attn.proj"),
    musubi("double_blocks.{n}.{s}_mlp.fc1", "double_blocks.{n}.{s}_mlp.0"),
    musubi("double_blocks.{n}.{s}_mlp.fc2", "double_blocks.{n}.{s}_mlp.2"),
)
_HV_REFINER = "txt_in.individual_token_refiner.blocks.{n}"
_HV_EMBEDDERS = (
    musubi("time_in.mlp.0", "time_in.in_layer"),
    musubi("time_in.mlp.2", "time_in.out_layer"),
    musubi("guidance_in.mlp.0", "guidance_in.in_layer"),
    musubi("guidance_in.mlp.2", "guidance_in.out_layer"),
    *same("vector_in.in_layer", "vector_in.out_layer", "txt_in.input_embedder"),
    musubi("txt_in.t_embedder.mlp.0", "txt_in.t_embedder.in_layer"),
    musubi("txt_in.t_embedder.mlp.2", "txt_in.t_embedder.out_layer"),
    musubi("txt_in.c_embedder.linear_1", "txt_in.c_embedder.in_layer"),
    musubi("txt_in.c_embedder.linear_2", "txt_in.c_embedder.out_layer"),
    musubi(f"{_HV_REFINER}.self_attn_qkv", f"{_HV_REFINER}.self_attn.qkv"),
    musubi(f"{_HV_REFINER}.self_attn_proj", f"{_HV_REFINER}.self_attn.proj"),
    musubi(f"{_HV_REFINER}.mlp.fc1", f"{_HV_REFINER}.mlp.0"),
    musubi(f"{_HV_REFINER}.mlp.fc2", f"{_HV_REFINER}.mlp.2"),
    *same(f"{_HV_REFINER}.adaLN_modulation.1", "final_layer.linear", "final_layer.adaLN_modulation.1"),
)
_HV_DIFFUSERS_REFINER = "context_embedder.token_refiner.refiner_blocks.{n}"
_HV_DIFFUSERS_COMMON = (
    diffusers("x_embedder.proj", "img_in.proj"),
    diffusers("norm_out.linear", "final_layer.adaLN_modulation.1", SWAP_HALVES),
    diffusers("proj_out", "final_layer.linear"),
    diffusers("context_embedder.proj_in", "txt_in.input_embedder"),
    diffusers("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.in_layer"),
    diffusers("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.out_layer"),
    diffusers("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.in_layer"),
    diffusers("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.out_layer"),
    *[diffusers(f"{_HV_DIFFUSERS_REFINER}.attn.to_{p}", f"{_HV_REFINER}.self_attn.qkv", qkv(i)) for i, p in enumerate("qkv")],
    diffusers(f"{_HV_DIFFUSERS_REFINER}.attn.to_out.0", f"{_HV_REFINER}.self_attn.proj"),
    diffusers(f"{_HV_DIFFUSERS_REFINER}.norm1", f"{_HV_REFINER}.norm1"),
    diffusers(f"{_HV_DIFFUSERS_REFINER}.norm2", f"{_HV_REFINER}.norm2"),
    diffusers(f"{_HV_DIFFUSERS_REFINER}.ff.net.0.proj", f"{_HV_REFINER}.mlp.0"),
    diffusers(f"{_HV_DIFFUSERS_REFINER}.ff.net.2", f"{_HV_REFINER}.mlp.2"),
    diffusers(f"{_HV_DIFFUSERS_REFINER}.norm_out.linear", f"{_HV_REFINER}.adaLN_modulation.1"),
    # double blocks: Diffusers' transformer_blocks (as FLUX's)
    *[diffusers(f"transformer_blocks.{{n}}.attn.to_{p}", "double_blocks.{n}.img_attn.qkv", qkv(i)) for i, p in enumerate("qkv")],
    *[diffusers(f"transformer_blocks.{{n}}.attn.add_{p}_proj", "double_blocks.{n}.txt_attn.qkv", qkv(i)) for i, p in enumerate("qkv")],
    diffusers("transformer_blocks.{n}.norm1.linear", "double_blocks.{n}.img_mod.lin"),
    diffusers("transformer_blocks.{n}.norm1_context.linear", "double_blocks.{n}.txt_mod.lin"),
    diffusers("transformer_blocks.{n}.attn.norm_q", "double_blocks.{n}.img_attn.norm.query_norm"),
    diffusers("transformer_blocks.{n}.attn.norm_k", "double_blocks.{n}.img_attn.norm.key_norm"),
    diffusers("transformer_blocks.{n}.attn.norm_added_q", "double_blocks.{n}.txt_attn.norm.query_norm"),
    diffusers("transformer_blocks.{n}.attn.norm_added_k", "double_blocks.{n}.txt_attn.norm.key_norm"),
    diffusers("transformer_blocks.{n}.attn.to_out.0", "double_blocks.{n}.img_attn.proj"),
    diffusers("transformer_blocks.{n}.attn.to_add_out", "double_blocks.{n}.txt_attn.proj"),
    diffusers("transformer_blocks.{n}.ff.net.0.proj", "double_blocks.{n}.img_mlp.0"),
    diffusers("transformer_blocks.{n}.ff.net.2", "double_blocks.{n}.img_mlp.2"),
    diffusers("transformer_blocks.{n}.ff_context.net.0.proj", "double_blocks.{n}.txt_mlp.0"),
    diffusers("transformer_blocks.{n}.ff_context.net.2", "double_blocks.{n}.txt_mlp.2"),
)

# Layer kinds of HunyuanVideo's and FLUX's blocks (ComfyUI names): double blocks keep an image and a text
# stream apart; a single block's linear1 (q, k, v and the MLP input) and linear2 (attention and MLP
# output) are attention and feed-forward at once.
_ATTN_DOUBLE_SINGLE = LayerKind("attn", r"(img|txt)_attn\..+|linear[12]|norm\..+")
_FFN_DOUBLE_SINGLE = LayerKind("ffn", r"(img|txt)_mlp\..+|linear[12]")
_MOD_DOUBLE_SINGLE = LayerKind("mod", r"(img|txt)_mod\..+|modulation\..+")
_STREAMS = (LayerKind("img", r"img_.+"), LayerKind("txt", r"txt_.+"))
_DOUBLE_SINGLE_KINDS = (_ATTN_DOUBLE_SINGLE, _FFN_DOUBLE_SINGLE, _MOD_DOUBLE_SINGLE, *_STREAMS)

HUNYUAN_VIDEO = Architecture(
    id="hunyuan_video",
    title="HunyuanVideo",
    musubi_versions=("hunyuan_video",),
    modelspec=("hunyuan-video", "hunyuan_video"),
    default_excludes=(r".*(img_mod|txt_mod|modulation).*",),
    names=(
        musubi("double_blocks.{n}.{s}_attn_qkv", "double_blocks.{n}.{s}_attn.qkv"),
        *_HV_DOUBLE,
        *same("single_blocks.{n}.linear1", "single_blocks.{n}.linear2"),
        musubi("single_blocks.{n}.modulation.linear", "single_blocks.{n}.modulation.lin"),
        *_HV_EMBEDDERS,
        *_HV_DIFFUSERS_COMMON,
        diffusers("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        diffusers("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        diffusers("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        diffusers("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        diffusers("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        diffusers("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        *[diffusers(f"single_transformer_blocks.{{n}}.{p}", "single_blocks.{n}.linear1", linear1(i))
          for i, p in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))],
        diffusers("single_transformer_blocks.{n}.attn.norm_q", "single_blocks.{n}.norm.query_norm"),
        diffusers("single_transformer_blocks.{n}.attn.norm_k", "single_blocks.{n}.norm.key_norm"),
        diffusers("single_transformer_blocks.{n}.norm.linear", "single_blocks.{n}.modulation.lin"),
        diffusers("single_transformer_blocks.{n}.proj_out", "single_blocks.{n}.linear2"),
    ),
    model_signature=((r"^double_blocks\.\d+\.img_attn[._]qkv$", r"^single_blocks\.\d+\.linear1$", r"^txt_in\.individual_token_refiner\."),),
    train_blocks=("double_blocks.{n}", "single_blocks.{n}"),
    blocks=("double_blocks", "single_blocks", "txt_in.individual_token_refiner.blocks"),
    # The token refiner's blocks prepare the text; block weights leave them at 1, as FLUX's embedders.
    weighted_blocks=block_lists("double_blocks", "single_blocks"),
    layer_kinds=_DOUBLE_SINGLE_KINDS,
)

HUNYUAN_VIDEO_1_5 = Architecture(
    id="hunyuan_video_1_5",
    title="HunyuanVideo 1.5",
    musubi_versions=("hunyuan_video_1_5",),
    modelspec=("hunyuan-video-1.5", "hunyuan_video_1_5", "hunyuanvideo"),  # SimpleTuner's `hunyuanvideo` is 1.5
    default_excludes=(r".*(_in).*",),
    names=(
        *[musubi(f"double_blocks.{{n}}.{{s}}_attn_{p}", "double_blocks.{n}.{s}_attn.qkv", qkv(i)) for i, p in enumerate("qkv")],
        *_HV_DOUBLE,
        *_HV_EMBEDDERS,
        *same("byt5_in.fc1", "byt5_in.fc2", "byt5_in.fc3", "vision_in.proj.1", "vision_in.proj.3"),
        *_HV_DIFFUSERS_COMMON,
        diffusers("time_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        diffusers("time_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        diffusers("time_embed.timestep_embedder_r.linear_1", "time_r_in.in_layer"),
        diffusers("time_embed.timestep_embedder_r.linear_2", "time_r_in.out_layer"),
        diffusers("image_embedder.norm_in", "vision_in.proj.0"),
        diffusers("image_embedder.linear_1", "vision_in.proj.1"),
        diffusers("image_embedder.linear_2", "vision_in.proj.3"),
        diffusers("image_embedder.norm_out", "vision_in.proj.4"),
        diffusers("context_embedder_2.norm", "byt5_in.layernorm"),
        diffusers("context_embedder_2.linear_1", "byt5_in.fc1"),
        diffusers("context_embedder_2.linear_2", "byt5_in.fc2"),
        diffusers("context_embedder_2.linear_3", "byt5_in.fc3"),
        diffusers("cond_type_embed", "cond_type_embedding"),
    ),
    model_signature=(
        (r"^double_blocks\.\d+\.img_attn(\.qkv|_q)$", r"^txt_in\.individual_token_refiner\.", r"^(byt5_in|cond_type_embedding|vision_in)\b"),
    ),
    train_blocks=("double_blocks.{n}",),
    blocks=("double_blocks", "txt_in.individual_token_refiner.blocks"),
    weighted_blocks=block_lists("double_blocks"),
    layer_kinds=_DOUBLE_SINGLE_KINDS,
)

_FRAMEPACK_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_FRAMEPACK_REFINER = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2", "norm_out.linear")
FRAMEPACK = Architecture(
    id="framepack",
    title="FramePack",
    musubi_versions=("framepack",),
    modelspec=("framepack",),
    default_excludes=(r".*(norm).*",),
    names=same(
        *[f"transformer_blocks.{{n}}.attn.{p}" for p in _FRAMEPACK_ATTENTION],
        "transformer_blocks.{n}.ff.net.0.proj", "transformer_blocks.{n}.ff.net.2",
        "transformer_blocks.{n}.ff_context.net.0.proj", "transformer_blocks.{n}.ff_context.net.2",
        "transformer_blocks.{n}.norm1.linear", "transformer_blocks.{n}.norm1_context.linear",
        *[f"single_transformer_blocks.{{n}}.attn.to_{p}" for p in "qkv"],
        "single_transformer_blocks.{n}.proj_mlp", "single_transformer_blocks.{n}.proj_out",
        "single_transformer_blocks.{n}.norm.linear",
        "context_embedder.proj_in",
        "context_embedder.time_text_embed.timestep_embedder.linear_1", "context_embedder.time_text_embed.timestep_embedder.linear_2",
        "context_embedder.time_text_embed.text_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_2",
        *[f"context_embedder.token_refiner.refiner_blocks.{{n}}.{p}" for p in _FRAMEPACK_REFINER],
        "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
        "image_projection.up", "image_projection.down", "norm_out.linear", "proj_out",
    ),
    model_signature=((r"^single_transformer_blocks\.\d+\.proj_mlp$", r"^context_embedder\.token_refiner\."),),
    notes=("ComfyUI core has no FramePack model; FramePack wrappers use these (Musubi's) names.",),
    comfyui_model=False,
    train_blocks=("transformer_blocks.{n}", "single_transformer_blocks.{n}"),
    blocks=("transformer_blocks", "single_transformer_blocks", "context_embedder.token_refiner.refiner_blocks"),
    # FramePack's blocks are HunyuanVideo's double and single blocks, under Diffusers' names.
    weighted_blocks=(BlockList("double_blocks", "transformer_blocks"), BlockList("single_blocks", "single_transformer_blocks")),
    layer_kinds=(
        LayerKind("attn", r"attn\..+|proj_out"),  # a single block's proj_out takes attention and MLP outputs together
        LayerKind("ffn", r"ff\..+|ff_context\..+|proj_mlp|proj_out"),
        LayerKind("mod", r"norm1\.linear|norm1_context\.linear|norm\.linear"),
    ),
)

_FLUX_DOUBLE = same(
    "double_blocks.{n}.{s}_attn.qkv", "double_blocks.{n}.{s}_attn.proj", "double_blocks.{n}.{s}_mlp.0",
    "double_blocks.{n}.{s}_mlp.2", "single_blocks.{n}.linear1", "single_blocks.{n}.linear2",
)
# Diffusers' FLUX.1 and FLUX.2 double blocks: q/k/v apart where ComfyUI fuses them.
_FLUX_DIFFUSERS_DOUBLE = (
    *[diffusers(f"transformer_blocks.{{n}}.attn.to_{p}", "double_blocks.{n}.img_attn.qkv", qkv(i)) for i, p in enumerate("qkv")],
    *[diffusers(f"transformer_blocks.{{n}}.attn.add_{p}_proj", "double_blocks.{n}.txt_attn.qkv", qkv(i)) for i, p in enumerate("qkv")],
    diffusers("transformer_blocks.{n}.attn.norm_q", "double_blocks.{n}.img_attn.norm.query_norm"),
    diffusers("transformer_blocks.{n}.attn.norm_k", "double_blocks.{n}.img_attn.norm.key_norm"),
    diffusers("transformer_blocks.{n}.attn.norm_added_q", "double_blocks.{n}.txt_attn.norm.query_norm"),
    diffusers("transformer_blocks.{n}.attn.norm_added_k", "double_blocks.{n}.txt_attn.norm.key_norm"),
    diffusers("transformer_blocks.{n}.attn.to_out.0", "double_blocks.{n}.img_attn.proj"),
    diffusers("transformer_blocks.{n}.attn.to_add_out", "double_blocks.{n}.txt_attn.proj"),
    diffusers("x_embedder", "img_in"),
    diffusers("context_embedder", "txt_in"),
    diffusers("norm_out.linear", "final_layer.adaLN_modulation.1", SWAP_HALVES),
    diffusers("proj_out", "final_layer.linear"),
)
_FLUX_EXCLUDES = (r".*(img_mod\.lin|txt_mod\.lin|modulation\.lin).*", r".*(norm).*")

FLUX = Architecture(
    id="flux",
    title="FLUX.1 dev / Kontext",
    musubi_versions=("flux_kontext", "flux", "flux1", "flux.1", "flux.1_kontext"),
    modelspec=("flux.1", "flux-1", "flux1", "flux"),
    default_excludes=_FLUX_EXCLUDES,
    names=(
        *_FLUX_DOUBLE,
        *same(
            "double_blocks.{n}.{s}_mod.lin", "single_blocks.{n}.modulation.lin",
            "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
            "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1",
        ),
        *_FLUX_DIFFUSERS_DOUBLE,
        diffusers("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        diffusers("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        diffusers("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        diffusers("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        diffusers("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        diffusers("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        diffusers("transformer_blocks.{n}.norm1.linear", "double_blocks.{n}.img_mod.lin"),
        diffusers("transformer_blocks.{n}.norm1_context.linear", "double_blocks.{n}.txt_mod.lin"),
        diffusers("transformer_blocks.{n}.ff.net.0.proj", "double_blocks.{n}.img_mlp.0"),
        diffusers("transformer_blocks.{n}.ff.net.2", "double_blocks.{n}.img_mlp.2"),
        diffusers("transformer_blocks.{n}.ff_context.net.0.proj", "double_blocks.{n}.txt_mlp.0"),
        diffusers("transformer_blocks.{n}.ff_context.net.2", "double_blocks.{n}.txt_mlp.2"),
        *[diffusers(f"single_transformer_blocks.{{n}}.{p}", "single_blocks.{n}.linear1", linear1(i))
          for i, p in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))],
        diffusers("single_transformer_blocks.{n}.attn.norm_q", "single_blocks.{n}.norm.query_norm"),
        diffusers("single_transformer_blocks.{n}.attn.norm_k", "single_blocks.{n}.norm.key_norm"),
        diffusers("single_transformer_blocks.{n}.norm.linear", "single_blocks.{n}.modulation.lin"),
        diffusers("single_transformer_blocks.{n}.proj_out", "single_blocks.{n}.linear2"),
    ),
    model_signature=((r"^double_blocks\.\d+\.img_mod\.lin$", r"^single_blocks\.\d+\.linear1$", r"^txt_in$"),),
    train_blocks=("double_blocks.{n}", "single_blocks.{n}"),
    blocks=("double_blocks", "single_blocks"),
    comfyui_slice_names=((DIFFUSERS, "transformer."),),
    weighted_blocks=block_lists("double_blocks", "single_blocks"),
    layer_kinds=_DOUBLE_SINGLE_KINDS,
)

FLUX2 = Architecture(
    id="flux2",
    title="FLUX.2 dev / Klein",
    musubi_versions=("flux_2_dev", "flux_2_klein_4b", "flux_2_klein_9b", "flux_2", "flux2", "flux2_klein_4b", "flux2_klein_9b"),
    modelspec=("flux.2", "flux-2", "flux2"),
    default_excludes=_FLUX_EXCLUDES,
    names=(
        *_FLUX_DOUBLE,
        *same(
            "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
            "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
            "final_layer.linear", "final_layer.adaLN_modulation.1",
        ),
        *_FLUX_DIFFUSERS_DOUBLE,
        diffusers("time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        diffusers("time_guidance_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        diffusers("time_guidance_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        diffusers("time_guidance_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        diffusers("double_stream_modulation_img.linear", "double_stream_modulation_img.lin"),
        diffusers("double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin"),
        diffusers("single_stream_modulation.linear", "single_stream_modulation.lin"),
        diffusers("transformer_blocks.{n}.ff.linear_in", "double_blocks.{n}.img_mlp.0"),
        diffusers("transformer_blocks.{n}.ff.linear_out", "double_blocks.{n}.img_mlp.2"),
        diffusers("transformer_blocks.{n}.ff_context.linear_in", "double_blocks.{n}.txt_mlp.0"),
        diffusers("transformer_blocks.{n}.ff_context.linear_out", "double_blocks.{n}.txt_mlp.2"),
        diffusers("single_transformer_blocks.{n}.attn.to_qkv_mlp_proj", "single_blocks.{n}.linear1"),  # fused in both
        diffusers("single_transformer_blocks.{n}.attn.to_out", "single_blocks.{n}.linear2"),
        diffusers("single_transformer_blocks.{n}.attn.norm_q", "single_blocks.{n}.norm.query_norm"),
        diffusers("single_transformer_blocks.{n}.attn.norm_k", "single_blocks.{n}.norm.key_norm"),
    ),
    model_signature=((r"^(double|single)_stream_modulation", r"^single_blocks\.\d+\.linear1$"),),
    train_blocks=("double_blocks.{n}", "single_blocks.{n}"),
    blocks=("double_blocks", "single_blocks"),
    comfyui_slice_names=((DIFFUSERS, "transformer."),),
    weighted_blocks=block_lists("double_blocks", "single_blocks"),
    # FLUX.2 modulates outside its blocks (double_stream_modulation_*, single_stream_modulation).
    layer_kinds=(_ATTN_DOUBLE_SINGLE, _FFN_DOUBLE_SINGLE, *_STREAMS),
)

_QWEN_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
QWEN_IMAGE = Architecture(
    id="qwen_image",
    title="Qwen-Image",
    musubi_versions=("qwen_image", "qwen_image_edit", "qwen_image_layered"),
    modelspec=("qwen-image", "qwen_image", "qwenimage"),
    default_excludes=(r".*(_mod_).*",),
    names=(
        # ComfyUI, Musubi and Diffusers name every layer alike.
        *also_diffusers(*same(
            *[f"transformer_blocks.{{n}}.attn.{p}" for p in _QWEN_ATTENTION],
            "transformer_blocks.{n}.img_mod.1", "transformer_blocks.{n}.txt_mod.1",
            "transformer_blocks.{n}.img_mlp.net.0.proj", "transformer_blocks.{n}.img_mlp.net.2",
            "transformer_blocks.{n}.txt_mlp.net.0.proj", "transformer_blocks.{n}.txt_mlp.net.2",
            "img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
            "norm_out.linear", "proj_out",
        )),
        *[diffusers(n, n) for n in (
            "transformer_blocks.{n}.attn.norm_q", "transformer_blocks.{n}.attn.norm_k",
            "transformer_blocks.{n}.attn.norm_added_q", "transformer_blocks.{n}.attn.norm_added_k",
            "txt_norm", "time_text_embed.addition_t_embedding",
        )],
    ),
    model_signature=((r"^transformer_blocks\.\d+\.img_mod\.1$", r"^transformer_blocks\.\d+\.attn\.add_q_proj$"),),
    train_blocks=("transformer_blocks.{n}",),
    blocks=("transformer_blocks",),
    weighted_blocks=block_lists("transformer_blocks"),
    layer_kinds=(
        LayerKind("attn", r"attn\..+"),
        LayerKind("ffn", r"(img|txt)_mlp\..+"),
        LayerKind("mod", r"(img|txt)_mod\..+"),
        LayerKind("img", r"img_.+|attn\.(to_[qkv]|to_out\.0|norm_[qk])"),
        LayerKind("txt", r"txt_.+|attn\.(add_[qkv]_proj|to_add_out|norm_added_[qk])"),
    ),
)

_ZI_BLOCKS = ("layers", "noise_refiner", "context_refiner")


def _z_image_block(b: str) -> tuple[Name, ...]:
    block = f"{b}.{{n}}"
    return (
        *also_diffusers(
            *[musubi(f"{block}.attention.to_{p}", f"{block}.attention.qkv", qkv(i)) for i, p in enumerate("qkv")],
            musubi(f"{block}.attention.to_out.0", f"{block}.attention.out"),
            *same(*[f"{block}.feed_forward.w{i}" for i in (1, 2, 3)], f"{block}.adaLN_modulation.0"),
        ),
        diffusers(f"{block}.attention.norm_q", f"{block}.attention.q_norm"),
        diffusers(f"{block}.attention.norm_k", f"{block}.attention.k_norm"),
        *[diffusers(f"{block}.{n}", f"{block}.{n}") for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")],
    )


Z_IMAGE = Architecture(
    id="z_image",
    title="Z-Image",
    musubi_versions=("z_image", "zimage"),
    modelspec=("z-image", "z_image", "zimage"),
    default_excludes=(r".*(_modulation|_refiner).*",),
    names=(
        *[name for b in _ZI_BLOCKS for name in _z_image_block(b)],
        *also_diffusers(
            musubi("all_x_embedder.2-1", "x_embedder"),
            musubi("all_final_layer.2-1.linear", "final_layer.linear"),
            musubi("all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
            *same("cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2"),
        ),
        diffusers("cap_embedder.0", "cap_embedder.0"),
    ),
    model_signature=((r"^layers\.\d+\.attention\.(qkv|to_q)$", r"^layers\.\d+\.feed_forward\.w1$", r"^(noise|context)_refiner\.\d+\."),),
    train_blocks=("layers.{n}", "noise_refiner.{n}", "context_refiner.{n}"),
    blocks=_ZI_BLOCKS,
    # In the order ComfyUI runs them: the caption's refiner, the image-prompt refiner (Omni models only),
    # the latent's refiner, then the main layers.
    weighted_blocks=block_lists("context_refiner", "siglip_refiner", "noise_refiner", "layers"),
    layer_kinds=(
        LayerKind("attn", r"attention\..+|attention_norm[12]"),
        LayerKind("ffn", r"feed_forward\..+|ffn_norm[12]"),
        LayerKind("mod", r"adaLN_modulation\..+"),
    ),
    comfyui_slice_names=((MUSUBI, "diffusion_model."),),
)

KANDINSKY5 = Architecture(
    id="kandinsky5",
    title="Kandinsky 5",
    musubi_versions=("kandinsky5",),
    default_excludes=(),
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
        raise AdapterError(f"unknown architecture {arch_id!r} (known: {', '.join(a.id for a in SUPPORTED)})") from None
    if arch.refused:
        raise AdapterError(arch.refused)
    return arch


def describe_architecture(arch_id: str | None) -> str:
    if arch_id is None:
        return "an unknown architecture"
    arch = ARCHITECTURES.get(arch_id)
    return f"{arch.title} ({arch.id})" if arch else arch_id
