"""LycorisTrain, LycorisSave and LycorisApply inside a real ComfyUI, on ComfyUI's own Wan model.

The model is ComfyUI's Wan 2.1 i2v class at the Musubi fixtures' size (hidden 10, two blocks), with 16
latent channels (ComfyUI's Wan latent format is per-channel over 16). Latents and conditioning are made
under inference mode, as ComfyUI's nodes make them. References nobody here wrote: Musubi Tuner's own files
for the same architecture (tests/fixtures/musubi/wan_*: which layers, which tensors, which shapes, and the
Diffusers copy Musubi's converter made), and ComfyUI's own patching of the saved file.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from comfyui_host import having_model, require_comfyui
from helpers import MUSUBI, rel_err
from safetensors import safe_open

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

LATENT_CHANNELS = 16


def rebuild(env, seed, disable_dynamic=False):
    return env.build("wan", seed=seed, out_dim=LATENT_CHANNELS)


def trainable_model(env, seed=0):
    """A ModelPatcher ComfyUI can deep-copy for training: `cached_patcher_init` rebuilds it with the same
    weights, as ComfyUI's own loaders (Load Diffusion Model) set it up. Built in inference mode, as a loader
    node builds it."""
    with torch.inference_mode():
        mp = rebuild(env, seed)
    mp.cached_patcher_init = (rebuild, (env, seed))
    return mp


def run(env, node_id, **inputs):
    """A node's execute as ComfyUI's executor calls it: the whole prompt runs in inference mode."""
    with torch.inference_mode():
        return env.node(node_id).execute(**inputs)


@pytest.fixture(scope="module")
def comfy_dirs(comfy_env, tmp_path_factory):
    """ComfyUI's output and temp folders moved to a temporary place for this module."""
    fp = comfy_env.folder_paths
    old = fp.get_output_directory(), fp.get_temp_directory()
    base = tmp_path_factory.mktemp("comfy_out")
    fp.set_output_directory(str(base / "output"))
    fp.set_temp_directory(str(base / "temp"))
    yield base
    fp.set_output_directory(old[0])
    fp.set_temp_directory(old[1])


def data(samples=2, seed=0):
    """(LATENT, CONDITIONING) as ComfyUI's nodes hand them over: made in inference mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        latent = {"samples": torch.randn(samples, LATENT_CHANNELS, 1, 8, 8, generator=gen)}
        positive = [[torch.randn(1, 7, 8, generator=gen), {}]]
    return latent, positive


def train_inputs(mp, algorithm="lokr", rank=3, alpha=2.0, steps=3, **changes):
    latent, positive = data()
    inputs = dict(model=mp, latents=latent, positive=positive, algorithm=algorithm, rank=rank, alpha=alpha, factor=-1,
                  steps=steps, learning_rate=0.01, optimizer="AdamW", batch_size=2, seed=0, warmup_steps=0,
                  gradient_checkpointing=True, architecture="auto", rank_dropout=0.0, module_dropout=0.0, include="",
                  exclude="")
    inputs.update(changes)
    return {k: [v] for k, v in inputs.items()}  # is_input_list: ComfyUI passes every input as a list


def linear_hooks(mp) -> int:
    return sum(len(m._forward_hooks) for m in mp.model.modules() if isinstance(m, torch.nn.Linear))


@pytest.fixture(scope="module")
def trained(comfy_env, comfy_dirs):
    """LycorisTrain's outputs for LoKr rank 3 / alpha 2 (the Musubi fixture's options), and the input model."""
    mp = trainable_model(comfy_env)
    before = comfy_env.weights(mp)
    out = run(comfy_env, "LycorisTrain", **train_inputs(mp))
    adapter, image = out.args
    return dict(model=mp, before=before, adapter=adapter, image=image, ui=out.ui)


def fixture_layout(name) -> dict[str, tuple]:
    with safe_open(str(MUSUBI / name), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_train_node_trains_musubis_layers_and_leaves_the_model_alone(comfy_env, trained):
    adapter, mp = trained["adapter"], trained["model"]
    assert adapter.steps == 3 and len(adapter.losses) == 3
    assert all(math.isfinite(x) and x > 0 for x in adapter.losses)
    # The tensors Musubi Tuner's own networks.lokr makes for this architecture and these options.
    tensors = adapter.adapters.musubi_tensors()
    assert {k: tuple(t.shape) for k, t in tensors.items()} == fixture_layout("wan_lokr_r3_a2.safetensors")
    deltas = adapter.adapters.delta_weights()
    assert all(d.abs().max() > 0 for d in deltas.values()), "every trained module must have moved from ΔW = 0"
    assert all(not p.requires_grad and p.device.type == "cpu" for p in adapter.adapters.parameters())
    # The input model: same weights, no patches, no hooks left behind.
    after = comfy_env.weights(mp)
    assert all(torch.equal(after[k], trained["before"][k]) for k in after)
    assert not mp.patches and linear_hooks(mp) == 0
    assert not comfy_env.comfy.model_management.in_training
    # The loss chart: a ComfyUI IMAGE with a curve on it, also shown on the node.
    image = trained["image"]
    assert image.shape == (1, 400, 640, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.min()) < 0.5
    assert len(trained["ui"].as_dict()["images"]) == 1


def test_train_node_loha_has_musubis_tensors(comfy_env, comfy_dirs):
    mp = trainable_model(comfy_env, seed=1)
    adapter, _ = run(comfy_env, "LycorisTrain", **train_inputs(mp, "loha", rank=4, steps=1)).args
    tensors = adapter.adapters.musubi_tensors()
    assert {k: tuple(t.shape) for k, t in tensors.items()} == fixture_layout("wan_loha_r4_a2.safetensors")
    assert all(float(tensors[k]) == 2.0 for k in tensors if k.endswith(".alpha"))


def test_include_exclude_patterns(comfy_env, comfy_dirs):
    training = comfy_env.pack.nodes.training
    assert training.split_patterns("a,b\n  c{1,3} , [x,y]\n\n(d|e),f") == ("a", "b", "c{1,3}", "[x,y]", "(d|e)", "f")
    mp = trainable_model(comfy_env, seed=2)
    inputs = train_inputs(mp, steps=1, exclude=r".*cross_attn.*, .*ffn\..*", include=r"blocks\.1\.ffn\.0")
    adapter, _ = run(comfy_env, "LycorisTrain", **inputs).args
    stems = set(adapter.adapters.adapters)
    assert stems == {s for s in {k.rsplit(".", 1)[0] for k in fixture_layout("wan_lokr_r3_a2.safetensors")}
                     if "cross_attn" not in s and ("_ffn_" not in s or s == "lora_unet_blocks_1_ffn_0")}
    with pytest.raises(comfy_env.core.AdapterError, match="no layer to train"):
        run(comfy_env, "LycorisTrain", **train_inputs(mp, steps=1, exclude=".*"))


def test_interrupt_stops_training_cleanly(comfy_env, comfy_dirs, monkeypatch):
    mm = comfy_env.comfy.model_management
    mp = trainable_model(comfy_env)
    before = comfy_env.weights(mp)
    asked = []

    def interrupted():  # ComfyUI's Cancel button, pressed during the third step
        asked.append(1)
        if len(asked) == 3:
            mm.interrupt_current_processing(True)
        return mm.interrupt_processing

    monkeypatch.setattr(mm, "processing_interrupted", interrupted)
    updates = []
    comfy_env.comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: updates.append((value, total)))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(comfy_env, "LycorisTrain", **train_inputs(mp, steps=50))
    finally:
        comfy_env.comfy.utils.set_progress_bar_global_hook(None)
    assert len(asked) == 3, "the loop asks before each step: two steps done, stopped before the third"
    assert updates[0] == (1, 50) and all(value < 50 for value, _ in updates)
    assert not mm.interrupt_processing, "the interrupt is consumed, so the next prompt runs"
    assert not mm.in_training and linear_hooks(mp) == 0 and not mp.patches
    after = comfy_env.weights(mp)
    assert all(torch.equal(after[k], before[k]) for k in after)


def test_save_musubi_file_reads_back_as_musubis(comfy_env, comfy_dirs, trained):
    adapter = trained["adapter"]
    path, = run(comfy_env, "LycorisSave", adapter=adapter, filename_prefix="tests/wan_lokr", format="musubi",
                                                  prefix="diffusion_model", save_dtype="float32").args
    assert re.fullmatch(r".*/output/loras/tests/wan_lokr_\d{5}_\.safetensors", path), path
    assert "tests/" + path.rsplit("/", 1)[1] in comfy_env.folder_paths.get_filename_list("loras")
    loaded = comfy_env.core.read_adapter(path)
    reference = comfy_env.core.read_adapter(MUSUBI / "wan_lokr_r3_a2.safetensors")
    assert (loaded.format, loaded.architecture) == ("musubi", "wan")
    assert sorted(loaded.tensors) == sorted(reference.tensors)
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "modelspec.architecture"):
        assert loaded.metadata[key] == reference.metadata[key], key
    assert loaded.metadata["ss_steps"] == "3"
    deltas = adapter.adapters.delta_weights()
    for stem, module in loaded.modules.items():
        assert torch.equal(module.delta_weight(), deltas[stem]), stem
    # A second save never replaces the first: the counter moves on.
    again, = run(comfy_env, "LycorisSave", adapter=adapter, filename_prefix="tests/wan_lokr", format="musubi",
                                                   prefix="diffusion_model", save_dtype="float32").args
    assert again != path and int(again[-18:-13]) == int(path[-18:-13]) + 1


def test_save_diffusers_file_has_musubi_converters_layout(comfy_env, comfy_dirs, trained):
    adapter = trained["adapter"]
    path, = run(comfy_env, "LycorisSave", adapter=adapter, filename_prefix="tests/wan_lokr_diffusers",
                                                  format="diffusers", prefix="diffusion_model", save_dtype="bfloat16").args
    # Musubi's own convert_lora.py --target other made this copy of a Musubi file with the same layers.
    reference = fixture_layout("wan_lokr_r3_a2.diffusers.safetensors")
    with safe_open(path, "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == reference
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    loaded = comfy_env.core.read_adapter(path)
    assert (loaded.format, loaded.architecture) == ("diffusers", "wan")
    assert loaded.metadata["ss_network_module"] == "networks.lokr"
    deltas = adapter.adapters.delta_weights()
    for stem, module in loaded.modules.items():
        want = deltas["lora_unet_" + stem[len("diffusion_model."):].replace(".", "_")]
        assert rel_err(module.delta_weight(), want) < 1e-2, stem  # bf16 factors


def patched_weights(env, patcher) -> dict[str, torch.Tensor]:
    patcher.patch_model()
    try:
        return env.weights(patcher)
    finally:
        patcher.unpatch_model()


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_apply_patches_like_saving_and_loading(comfy_env, comfy_dirs, trained, strength):
    adapter, mp = trained["adapter"], trained["model"]
    path, = run(comfy_env, "LycorisSave", adapter=adapter, filename_prefix="tests/apply", format="musubi",
                                                  prefix="diffusion_model", save_dtype="float32").args
    applied, report = run(comfy_env, "LycorisApply", model=mp, adapter=adapter, strength=strength, mode="patch").args
    assert "applied       24 of 24 modules" in report and "unmatched     0" in report
    loaded, _ = run(comfy_env, "LycorisLoaderModelOnly",
        model=mp, lora_name="tests/" + path.rsplit("/", 1)[1], strength_model=strength, architecture="auto", mode="patch",
        lokr_full_matrix_alpha=False).args
    base = comfy_env.weights(mp)
    via_apply, via_file = patched_weights(comfy_env, applied), patched_weights(comfy_env, loaded)
    changed = [k for k in base if not torch.equal(via_apply[k], base[k])]
    assert len(changed) == 24  # the 24 Linears Musubi adapts in this model (no fused weights in Wan)
    assert all(torch.equal(via_apply[k], via_file[k]) for k in base)
    deltas = adapter.adapters.delta_weights()
    q = "diffusion_model.blocks.0.self_attn.q.weight"
    assert rel_err(via_apply[q] - base[q], strength * deltas["lora_unet_blocks_0_self_attn_q"]) < 1e-5


def test_apply_bypass_layer_outputs_equal_patched_weights(comfy_env, comfy_dirs, trained):
    adapter, mp = trained["adapter"], trained["model"]
    patched, _ = run(comfy_env, "LycorisApply", model=mp, adapter=adapter, strength=1.0, mode="patch").args
    bypassed, report = run(comfy_env, "LycorisApply", model=mp, adapter=adapter, strength=1.0, mode="bypass").args
    assert "mode          bypass" in report
    merged = patched_weights(comfy_env, patched)
    key = "diffusion_model.blocks.1.ffn.0.weight"
    layer = comfy_env.comfy.utils.get_attr(bypassed.model, key[: -len(".weight")])
    x = torch.randn(2, 3, merged[key].shape[1], generator=torch.Generator().manual_seed(4))
    bypassed.patch_model()
    try:
        with torch.no_grad():
            out = layer(x)
    finally:
        bypassed.unpatch_model()
    assert rel_err(out, torch.nn.functional.linear(x, merged[key], layer.bias.detach())) < 1e-5


FORWARD = {  # latent shape, model overrides, extra conds of each architecture's forward at the fixtures' size
    "wan": ((1, 4, 2, 8, 8), {}, {}),
    "hunyuan_video": ((1, 4, 2, 8, 8), {}, {"pooled_output": (1, 8), "guidance": 3.5}),
    "hunyuan_video_1_5": ((1, 4, 2, 8, 8), {}, {"pooled_output": None}),
    "flux": ((1, 1, 8, 8), {}, {"pooled_output": (1, 8), "guidance": 3.5}),
    "flux2": ((1, 4, 8, 8), {}, {}),
    "qwen_image": ((1, 4, 1, 8, 8), {"in_channels": 16}, {}),
    "z_image": ((1, 4, 8, 8), {"dim": 256, "n_heads": 8, "n_kv_heads": 8, "axes_dims": [8, 12, 12]}, {}),  # runs at dim ≥ 256
}


@pytest.mark.parametrize("arch,algorithm", having_model([(a, "lokr" if i % 2 else "loha") for i, a in enumerate(FORWARD)],
                                                      lambda case: case[0]))
def test_gradient_checkpointing_is_exact_on_comfyui_blocks(comfy_env, arch, algorithm):
    """ComfyUI's blocks add into tensors in place (Flux, HunyuanVideo: `img += ...` on keyword inputs and on
    tensors autograd saved), where torch's own checkpoint gives wrong gradients without an error. Reference: the
    same forward without checkpointing, every saved tensor copied when saved (in-place adds cannot change it).
    With rank and module dropout: the recomputation must replay the same draws."""
    training, mm = comfy_env.pack.lycoris_core.training, comfy_env.comfy.model_management
    shape, overrides, extra = FORWARD[arch]
    mp = comfy_env.build(arch, seed=3, **overrides)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen)
    extra = {k: torch.randn(v, generator=gen) if isinstance(v, tuple) else v for k, v in extra.items()}
    conds = mp.model.extra_conds(noise=x, device=torch.device("cpu"), cross_attn=torch.randn(1, 7, 8, generator=gen),
                                 **extra)
    kwargs = {k: v.cond for k, v in conds.items()}

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        config = training.TrainingConfig(algorithm=algorithm, rank=2, architecture=arch, seed=1, rank_dropout=0.3,
                                         module_dropout=0.3, gradient_checkpointing=checkpointing)
        adapters = training.inject_adapters(mp.model.diffusion_model, config)
        adapters.train()
        with torch.no_grad():
            for i, p in enumerate(adapters.parameters()):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
        mm.in_training = True
        torch.manual_seed(7)  # the dropout draws
        try:
            if checkpointing:
                mp.model.apply_model(x, torch.tensor([0.5]), **kwargs).square().mean().backward()
            else:
                with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t):
                    mp.model.apply_model(x, torch.tensor([0.5]), **kwargs).square().mean().backward()
        finally:
            mm.in_training = False
            adapters.remove()
        return {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in adapters.named_parameters()}

    got, want = gradients(True), gradients(False)
    moved = [n for n in want if want[n].abs().max() > 0]
    assert len(moved) > len(want) / 2  # some modules dropped, most not
    assert all(torch.equal(got[n], want[n]) for n in want if n not in moved)
    assert max(rel_err(got[n], want[n]) for n in moved) < 1e-5


def test_flux_trains_with_checkpointing_and_says_why_not_without(comfy_env, comfy_dirs):
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        mp = comfy_env.build("flux", seed=3)
        latent = {"samples": torch.randn(2, 1, 8, 8, generator=gen)}
        pooled = torch.randn(1, 8, generator=gen)
        positive = [[torch.randn(1, 7, 8, generator=gen), {"pooled_output": pooled, "guidance": 3.5}]]
    mp.cached_patcher_init = (lambda disable_dynamic=False: comfy_env.build("flux", seed=3), ())
    inputs = train_inputs(mp, steps=2)
    inputs.update(latents=[latent], positive=[positive])
    adapter, _ = run(comfy_env, "LycorisTrain", **inputs).args
    assert adapter.config.architecture == "flux" and len(adapter.adapters.adapters) == 20
    assert all(math.isfinite(x) for x in adapter.losses)
    inputs["gradient_checkpointing"] = [False]
    with pytest.raises(comfy_env.core.AdapterError, match="turn gradient_checkpointing on"):
        run(comfy_env, "LycorisTrain", **inputs)


@pytest.mark.parametrize("node_id,category,outputs", [
    ("LycorisTrain", "training/lycoris", ["LYCORIS_ADAPTER", "IMAGE"]),
    ("LycorisSave", "training/lycoris", ["STRING"]),
    ("LycorisApply", "training/lycoris", ["MODEL", "STRING"]),
    ("LycorisConvert", "loaders/lycoris", ["STRING"]),
    ("LycorisMerge", "loaders/lycoris", ["STRING", "STRING"]),
])
def test_node_info_as_the_server_lists_it(comfy_env, node_id, category, outputs):
    """What /object_info serves for the node (ComfyUI's server calls GET_NODE_INFO_V1): every input has a tooltip."""
    info = comfy_env.node(node_id).GET_NODE_INFO_V1()
    assert (info["category"], info["output"]) == (category, outputs) and info["description"]
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert info["output_node"] == (node_id in ("LycorisSave", "LycorisConvert", "LycorisMerge"))
    # /object_info's is_input_list, or where the running ComfyUI's node info has none (0.3.64) the class
    # attribute its executor reads instead
    is_input_list = info["is_input_list"] if "is_input_list" in info else comfy_env.node(node_id).INPUT_IS_LIST
    assert is_input_list == (node_id == "LycorisTrain")
    if node_id == "LycorisTrain":
        assert info["input"]["required"]["optimizer"][1]["options"][0] == "AdamW"
        assert {"SGD", "Adam", "RMSprop"} <= set(info["input"]["required"]["optimizer"][1]["options"])


FRONTEND_ONLY = {"Note", "MarkdownNote"}
# ComfyUI's dataset nodes (comfy_extras/nodes_dataset.py), which the training template builds its dataset with.
# Releases before them (0.3.64) have none; their folder loader (LoadImageTextSetFromFolderNode) is gone from
# later releases, so no template has a dataset on both.
DATASET_NODES = {"LoadImageTextDataSetFromFolder", "ResizeImagesByShorterEdge", "CenterCropImages", "MakeTrainingDataset"}


def node_spec(cls) -> tuple[dict, list[str], list[str]]:
    """({input: spec}, input order, output types) as /object_info describes a V1 or V3 node."""
    if hasattr(cls, "GET_NODE_INFO_V1"):
        info = cls.GET_NODE_INFO_V1()
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        return specs, order, list(info["output"])
    types = cls.INPUT_TYPES()
    specs = {**types.get("required", {}), **types.get("optional", {})}
    return specs, list(specs), list(cls.RETURN_TYPES)


def test_example_training_workflow_fits_the_nodes(comfy_env):
    """The template's links and widget values line up with the nodes' inputs (what the frontend and
    POST /prompt need), checked against ComfyUI's own node definitions."""
    import asyncio

    from comfyui_host import example_workflow

    nodes = comfy_env.nodes
    if "MakeTrainingDataset" not in nodes.NODE_CLASS_MAPPINGS:  # ComfyUI's comfy_extras nodes, as main.py loads them
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _, workflow = example_workflow("LycorisTrain")
    links = {link[0]: link for link in workflow["links"]}
    by_id = {node["id"]: node for node in workflow["nodes"]}
    types = {node["type"] for node in workflow["nodes"]}
    assert {"LycorisTrain", "LycorisSave", "LycorisApply"} <= types
    # What the running release lacks can only be ComfyUI's dataset nodes (0.3.64 has none): the template needs a
    # newer ComfyUI for those, and everything else in it is checked here on every release.
    missing = sorted(types - FRONTEND_ONLY - set(nodes.NODE_CLASS_MAPPINGS))
    assert set(missing) <= DATASET_NODES, missing
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node["type"] in missing:
            continue
        specs, order, outputs = node_spec(nodes.NODE_CLASS_MAPPINGS[node["type"]])
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        for name, (_, from_node, from_slot, to_node, _, kind) in linked.items():
            assert to_node == node["id"] and name in specs, (node["type"], name)
            if by_id[from_node]["type"] in missing:
                assert kind == specs[name][0], (node["type"], name, kind)
                continue
            source = node_spec(nodes.NODE_CLASS_MAPPINGS[by_id[from_node]["type"]])
            assert kind == source[2][from_slot] == specs[name][0], (node["type"], name, kind)
        assert [o["type"] for o in node["outputs"]] == outputs[: len(node["outputs"])], node["type"]
        values = list(node["widgets_values"])
        for name in order:
            kind, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            if name in linked or kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") and not isinstance(kind, list):
                continue
            value = values.pop(0)
            if kind == "COMBO" or isinstance(kind, list):
                choices = options.get("options", kind if isinstance(kind, list) else [])
                if node["type"].startswith("Lycoris") or name not in ("unet_name", "clip_name", "vae_name", "folder"):
                    assert value in choices, (node["type"], name, value)  # model and folder names are the user's
            elif kind in ("INT", "FLOAT"):
                assert isinstance(value, (int, float)), (node["type"], name)
                assert options.get("min", value) <= value <= options.get("max", value), (node["type"], name)
            else:
                assert isinstance(value, {"STRING": str, "BOOLEAN": bool}[kind]), (node["type"], name)
            if options.get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert not values, f"{node['type']} (node {node['id']}): widget values left over: {values}"
