"""Create LyCORIS Hook inside a real ComfyUI, through ComfyUI's own hook nodes and sampler.

A tiny real model is sampled with ComfyUI's KSampler (4 steps of `euler`, `simple` schedule) while the hook's
strength changes at every step (Create Hook Keyframe + Set Hook Keyframes). Every call of the diffusion model is
recorded (a unet function wrapper, inside ComfyUI's sampling); each is then repeated on the same inputs with the
model from Load LyCORIS (patch mode) at that step's strength, and the outputs must agree. On Wan a Musubi LoKr; on
FLUX a SimpleTuner LoHa whose split q/k/v land on row slices of ComfyUI's fused `qkv`; on HunyuanVideo 1.5 (where
this ComfyUI has it) a Musubi LoKr with split q/k/v on its fused `qkv`. A hook set on one conditioning changes that
conditioning's calls only; block weights and chains reach the hook as they reach the loader; the example workflow
schedules as its note says; bad input is refused in one line.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from comfyui_host import REPO, having_model, require_comfyui
from helpers import FIXTURES, rel_err

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

WILD = FIXTURES / "wild"
STEPS = 4
# (start_percent, strength) of one keyframe per step. On the `simple` schedule step i runs at the sigma of
# percent i/4; a keyframe takes over at the first step whose sigma is at most its start's, so each start sits
# strictly between two steps (never on one, where float rounding would decide).
SCHEDULE = [(0.0, 1.0), (0.2, 0.5), (0.45, 0.0), (0.7, 1.5)]
STRENGTHS = [strength for _, strength in SCHEDULE]
TOLERANCE = 1e-4

# The cases: a model (ComfyUI config class and unet_config; without one, the conftest's fixture-sized model), an
# adapter file, and how to condition it. Wan is i2v at the fixtures' size with 16 latent channels (the Wan latent
# format's), so KSampler's latent handling applies as it does to a real Wan. The wild fixtures come with their models.
WILD_MODELS = json.loads((WILD / "manifest.json").read_text())["models"]


def wild_model(arch: str) -> tuple[str, dict]:
    return WILD_MODELS[arch]["comfyui_class"], WILD_MODELS[arch]["comfyui_unet_config"]


CASES = {
    "wan_musubi_lokr": dict(arch="wan", overrides=dict(out_dim=16), file="wan_lokr_r3_a2.safetensors",
                            latent=(1, 16, 2, 8, 8), extra={}),
    "flux_split_qkv_loha": dict(arch="flux", config=wild_model("flux"), file="st_flux_loha.safetensors",
                                latent=(1, 4, 8, 8), extra=dict(pooled_output=(1, 8), guidance=3.5)),
    "hunyuan_video_1_5_musubi_split_qkv": dict(arch="hunyuan_video_1_5", file="hunyuan_video_1_5_lokr_r3_a2.safetensors",
                                               latent=(1, 4, 2, 8, 8), extra=dict(pooled_output=None)),
}
CASE_IDS = having_model(list(CASES), lambda case: CASES[case]["arch"])


@pytest.fixture(scope="module")
def env(comfy_env):
    """The conftest's ComfyUI with the wild fixtures as a second loras folder (the Musubi set is the first)."""
    folder_paths = comfy_env.folder_paths
    paths = folder_paths.folder_names_and_paths["loras"][0]
    had = str(WILD) in paths
    folder_paths.add_model_folder_path("loras", str(WILD))
    folder_paths.filename_list_cache.pop("loras", None)
    yield comfy_env
    comfy_env.comfy.model_management.unload_all_models()  # leave no hooked or patched model loaded behind
    if not had and str(WILD) in paths:
        paths.remove(str(WILD))
    folder_paths.filename_list_cache.pop("loras", None)


@pytest.fixture(scope="module")
def hook_nodes(env):
    return importlib.import_module("comfy_extras.nodes_hooks")


def model_of(env, case: dict, seed: int = 0):
    """A fresh ModelPatcher of the case's ComfyUI model, seeded random weights."""
    if "config" not in case:
        return env.build(case["arch"], seed=seed, **case.get("overrides", {}))
    name, unet_config = case["config"]
    model = env.new_model(env.model_class(name), unet_config)
    gen = torch.Generator().manual_seed(seed)
    model.diffusion_model.load_state_dict({k: torch.randn(v.shape, generator=gen) * 0.1
                                           for k, v in model.diffusion_model.state_dict().items()})
    cpu = torch.device("cpu")
    return env.comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def conditioning(case: dict, seed: int):
    """A CONDITIONING as a text encoder gives it: (tokens, {pooled output and such})."""
    gen = torch.Generator().manual_seed(seed)
    extra = {k: torch.randn(v, generator=gen) if isinstance(v, tuple) else v for k, v in case["extra"].items()}
    return [[torch.randn(1, 7, 8, generator=gen), extra]]


def create_hook(env, model, file, strength=1.0, **inputs):
    out = env.node("LycorisCreateHook").execute(model=model, lora_name=file, strength_model=strength, **inputs)
    hooks, report = out.args
    assert out.ui.as_dict() == {"text": (report,)}
    return hooks, report


def scheduled(hook_nodes, hooks):
    """`hooks` with one keyframe per step (SCHEDULE), through ComfyUI's own keyframe nodes."""
    keyframes = None
    for start, strength in SCHEDULE:
        (keyframes,) = hook_nodes.CreateHookKeyframe().create_hook_keyframe(strength, start, prev_hook_kf=keyframes)
    (hooks,) = hook_nodes.SetHookKeyframes().set_hook_keyframes(hooks, hook_kf=keyframes)
    return hooks


def sample(env, model, case, positive, negative, cfg=2.0, steps=STEPS) -> list[dict]:
    """Run ComfyUI's KSampler on `model`; every call of the diffusion model: its inputs and output, and `model`."""
    calls = []

    def record(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        c = dict(args["c"], transformer_options=dict(args["c"].get("transformer_options", {})))
        calls.append(dict(model=model, input=args["input"].clone(), timestep=args["timestep"].clone(), c=c,
                          cond_or_uncond=list(args["cond_or_uncond"]), output=out.detach().clone()))
        return out

    recording = model.clone()
    recording.set_model_unet_function_wrapper(record)
    latent = torch.randn(case["latent"], generator=torch.Generator().manual_seed(7))  # not empty: keeps its channels
    with torch.no_grad():
        env.nodes.KSampler().sample(recording, 11, steps, cfg, "euler", "simple", positive, negative, {"samples": latent})
    return calls


def step_of(env, model, calls, count=STEPS) -> list[int]:
    """The sampling step of each call (its sigma on the `simple` schedule of `count` steps)."""
    sigmas = importlib.import_module("comfy.samplers").calculate_sigmas(model.get_model_object("model_sampling"), "simple", count)
    steps = []
    for call in calls:
        found = [i for i in range(count) if torch.allclose(call["timestep"], sigmas[i].expand_as(call["timestep"]))]
        assert len(found) == 1, (call["timestep"], sigmas)
        steps.append(found[0])
    return steps


def rerun(env, patcher, call) -> torch.Tensor:
    """The diffusion model's output for a recorded call's inputs, with `patcher`'s weights loaded as for sampling."""
    env.comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.apply_model(call["input"], call["timestep"], **call["c"])


def loader(env, model, file, strength, **inputs):
    out = env.node("LycorisLoaderModelOnly").execute(model=model, lora_name=file, strength_model=strength, mode="patch", **inputs)
    return out.args[0]


def compare(env, calls, patcher_of) -> tuple[list[float], list[float]]:
    """(each call's output against the same inputs rerun on `patcher_of(index, call)`, how far that reference is
    from the bare model's output); `patcher_of` gives None for calls that must equal the bare model."""
    errors, moved = [], []
    for i, call in enumerate(calls):
        base = rerun(env, call["model"], call)
        patcher = patcher_of(i, call)
        want = base if patcher is None else rerun(env, patcher, call)
        errors.append(rel_err(call["output"], want))
        moved.append(rel_err(base, want))
    return errors, moved


def shown(values) -> str:
    return "[" + ", ".join(f"{v:.1e}" for v in values) + "]"


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_keyframed_strength_equals_the_loader_at_each_steps_strength(env, hook_nodes, case_id):
    case = CASES[case_id]
    mp = model_of(env, case)
    hooks, report = create_hook(env, mp, case["file"])
    assert "mode          hook, strength 1" in report and "unmatched     0" in report
    if case_id == "wan_musubi_lokr":  # what the node shows: the loader's summary, in mode `hook`
        assert env.pack.nodes.common.load_summary(report).splitlines()[:3] == [
            "wan_lokr_r3_a2.safetensors", "Wan 2.1/2.2 (wan), hook, strength 1", "24 of 24 modules applied, 0 unmatched"]
    else:
        assert "fused         " in report, "the case must put split q/k/v on fused weights"
    positive, negative = conditioning(case, 1), conditioning(case, 2)
    hooked_positive, hooked_negative = hook_nodes.PairConditioningSetProperties().set_properties(
        positive, negative, 1.0, "default", hooks=scheduled(hook_nodes, hooks))
    calls = sample(env, mp, case, hooked_positive, hooked_negative)
    assert step_of(env, mp, calls) == list(range(STEPS)), "one call per step: both conditionings carry the same hooks"
    assert all(sorted(call["cond_or_uncond"]) == [0, 1] for call in calls)

    references = {s: loader(env, mp, case["file"], s) for s in set(STRENGTHS)}
    errors, moved = compare(env, calls, lambda step, call: references[STRENGTHS[step]])
    print(f"{case_id} ({env.version}): rel err per step {shown(errors)}; the adapter's change {shown(moved)}")
    assert max(errors) <= TOLERANCE, errors
    assert moved[STRENGTHS.index(0.0)] == 0.0, "strength 0 is the bare model"
    assert min(m for m, s in zip(moved, STRENGTHS) if s) > 10 * TOLERANCE, "the adapter must change the output"


@pytest.mark.parametrize("attach", ["ConditioningSetProperties", "SetModelHooksOnCond"])
def test_a_hook_on_one_conditioning_changes_that_conditioning_only(env, hook_nodes, attach):
    case = CASES["wan_musubi_lokr"]
    mp = model_of(env, case, seed=1)
    hooks, _ = create_hook(env, mp, case["file"], strength=0.8)
    hooks = scheduled(hook_nodes, hooks)
    positive, negative = conditioning(case, 1), conditioning(case, 2)
    if attach == "ConditioningSetProperties":  # "Cond Set Props"
        (positive,) = hook_nodes.ConditioningSetProperties().set_properties(positive, 1.0, "default", hooks=hooks)
    else:
        (positive,) = hook_nodes.SetModelHooksOnCond().attach_hook(positive, hooks)
    calls = sample(env, mp, case, positive, negative)
    # Conditionings with other hooks run apart: a hooked call (positive, 0) and a bare one (negative, 1) per step.
    steps = step_of(env, mp, calls)
    assert sorted((step, call["cond_or_uncond"]) for step, call in zip(steps, calls)) == \
        [(step, [which]) for step in range(STEPS) for which in (0, 1)]
    references = {s: loader(env, mp, case["file"], 0.8 * s) for s in set(STRENGTHS)}
    errors, moved = compare(env, calls, lambda i, call: references[STRENGTHS[steps[i]]] if call["cond_or_uncond"] == [0] else None)
    print(f"{attach} ({env.version}): rel err per call {shown(errors)}; the adapter's change {shown(moved)}")
    assert max(errors) <= TOLERANCE, errors
    hooked = [m for m, call, step in zip(moved, calls, steps) if call["cond_or_uncond"] == [0] and STRENGTHS[step]]
    assert len(hooked) == 3 and min(hooked) > 10 * TOLERANCE, "the hooked conditioning must change"


BLOCK_WEIGHTS = {"wan_musubi_lokr": "blocks.0=0.5\nblocks.1.ffn=0\nblocks.1.attn=-2", "flux_split_qkv_loha": "double_blocks=-1, single_blocks=0"}


@pytest.mark.parametrize("case_id", list(BLOCK_WEIGHTS))
def test_block_weights_reach_the_hook_as_they_reach_the_loader(env, hook_nodes, case_id):
    case, text = CASES[case_id], BLOCK_WEIGHTS[case_id]
    mp = model_of(env, case, seed=2)
    hooks, report = create_hook(env, mp, case["file"], strength=0.7, block_weights=text)
    assert "blocks        " in report and "zeroed        " in report
    positive, negative = hook_nodes.PairConditioningSetProperties().set_properties(
        conditioning(case, 1), conditioning(case, 2), 1.0, "default", hooks=scheduled(hook_nodes, hooks))
    calls = sample(env, mp, case, positive, negative)
    assert step_of(env, mp, calls) == list(range(STEPS))
    weighted = {s: loader(env, mp, case["file"], 0.7 * s, block_weights=text) for s in set(STRENGTHS)}
    errors, _ = compare(env, calls, lambda step, call: weighted[STRENGTHS[step]])
    unweighted = {s: loader(env, mp, case["file"], 0.7 * s) for s in set(STRENGTHS)}
    apart, _ = compare(env, calls, lambda step, call: unweighted[STRENGTHS[step]])
    print(f"{case_id} with block weights ({env.version}): rel err per step {shown(errors)}; "
          f"against the loader without them {shown(apart)}")
    assert max(errors) <= TOLERANCE, errors
    assert min(a for a, s in zip(apart, STRENGTHS) if s) > 10 * TOLERANCE, "the block weights must matter"


def test_chained_hooks_equal_chained_loaders(env, hook_nodes):
    case = CASES["wan_musubi_lokr"]
    mp = model_of(env, case, seed=3)
    first, _ = create_hook(env, mp, "wan_loha_r4_a2.safetensors", strength=0.5)
    both, _ = create_hook(env, mp, case["file"], strength=-1.0, prev_hooks=first)
    assert len(first) == 1 and len(both) == 2, "the chain keeps the earlier hook and adds one"
    positive, negative = hook_nodes.PairConditioningSetProperties().set_properties(
        conditioning(case, 1), conditioning(case, 2), 1.0, "default", hooks=both)
    calls = sample(env, mp, case, positive, negative)
    chained = loader(env, loader(env, mp, "wan_loha_r4_a2.safetensors", 0.5), case["file"], -1.0)
    errors, moved = compare(env, calls, lambda step, call: chained)
    print(f"chained ({env.version}): rel err per step {shown(errors)}; the adapters' change {shown(moved)}")
    assert max(errors) <= TOLERANCE and min(moved) > 10 * TOLERANCE, (errors, moved)


def test_strength_zero_adds_no_hook(env):
    mp = model_of(env, CASES["wan_musubi_lokr"])
    first, _ = create_hook(env, mp, "wan_loha_r4_a2.safetensors")
    hooks, report = create_hook(env, mp, "wan_lokr_r3_a2.safetensors", strength=0.0, prev_hooks=first)
    assert hooks.hooks == first.hooks and hooks is not first
    assert "strength 0: the file was checked against the model, no hook was added" in report


def one_line_error(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


def test_bad_input_is_refused_in_one_line_naming_the_file(env):
    mp = model_of(env, CASES["wan_musubi_lokr"])
    with pytest.raises(ValueError) as e:
        create_hook(env, mp, "flux_kontext_lokr_r3_a2.safetensors")
    assert "flux_kontext_lokr_r3_a2.safetensors is an adapter for FLUX.1 dev / Kontext (flux), but the model is " \
           "Wan 2.1/2.2 (wan)" in one_line_error(e)
    with pytest.raises(ValueError) as e:
        create_hook(env, mp, "wan_lokr_r3_a2.safetensors", architecture="flux")
    assert "architecture FLUX.1 dev / Kontext (flux) was asked for, but the model is Wan" in one_line_error(e)
    with pytest.raises(ValueError) as e:
        create_hook(env, mp, "wan_lokr_r3_a2.safetensors", block_weights="1, 2, 3")
    assert "3 numbers given" in one_line_error(e)
    with pytest.raises(FileNotFoundError) as e:
        create_hook(env, mp, "not_there.safetensors")
    assert "not_there.safetensors" in one_line_error(e)
    with pytest.raises(ValueError) as e:
        create_hook(env, mp, "wan_lokr_r3_a2.safetensors", strength=float("nan"))
    assert "wan_lokr_r3_a2.safetensors: strength nan is not a finite number" in one_line_error(e)


def test_a_hook_sampled_on_another_model_stops_the_sampler_in_one_line(env, hook_nodes):
    hooks, _ = create_hook(env, model_of(env, CASES["wan_musubi_lokr"]), "wan_lokr_r3_a2.safetensors")
    case = CASES["flux_split_qkv_loha"]
    positive, negative = hook_nodes.PairConditioningSetProperties().set_properties(
        conditioning(case, 1), conditioning(case, 2), 1.0, "default", hooks=hooks)
    with pytest.raises(ValueError) as e:
        sample(env, model_of(env, case), case, positive, negative)
    assert "wan_lokr_r3_a2.safetensors: the hook was made on another model (diffusion_model.blocks." in one_line_error(e)
    assert "connect the model you sample with to Create LyCORIS Hook" in str(e.value)


def test_the_example_workflow_schedules_as_its_note_says(env, hook_nodes):
    """The template's hook chain, rebuilt from its saved nodes and widget values (its adapter file swapped for a
    fixture): the adapter at full strength over the first half of the steps, off after."""
    workflow = json.loads((REPO / "example_workflows" / "Schedule a LyCORIS over the steps.json").read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source(node, name):
        link = next(i["link"] for i in node["inputs"] if i["name"] == name)
        return nodes[links[link][1]]

    ksampler = next(node for node in nodes.values() if node["type"] == "KSampler")
    pair = source(ksampler, "positive")
    assert pair["type"] == "PairConditioningSetProperties" and source(ksampler, "negative") is pair
    setter = source(pair, "hooks")
    create = source(setter, "hooks")
    assert (setter["type"], create["type"]) == ("SetHookKeyframes", "LycorisCreateHook")
    keyframes, node = [], source(setter, "hook_kf")
    while node is not None:
        assert node["type"] == "CreateHookKeyframe"
        keyframes.insert(0, node["widgets_values"])
        linked = next(i["link"] for i in node["inputs"] if i["name"] == "prev_hook_kf")
        node = None if linked is None else nodes[links[linked][1]]
    assert keyframes == [[1.0, 0.0], [0.0, 0.5]], "the note describes these keyframes"

    schema = env.node("LycorisCreateHook").define_schema()
    widgets = [i.id for i in schema.inputs if i.id not in ("model", "prev_hooks")]
    inputs = dict(zip(widgets, create["widgets_values"], strict=True))
    inputs["lora_name"] = "wan_loha_r4_a2.safetensors"  # the template's my_wan_loha.safetensors
    case = CASES["wan_musubi_lokr"]
    mp = model_of(env, case, seed=4)
    hooks, _ = env.node("LycorisCreateHook").execute(model=mp, **inputs).args
    kf = None
    for strength, start in keyframes:
        (kf,) = hook_nodes.CreateHookKeyframe().create_hook_keyframe(strength, start, prev_hook_kf=kf)
    (hooks,) = hook_nodes.SetHookKeyframes().set_hook_keyframes(hooks, hook_kf=kf)
    positive, negative = hook_nodes.PairConditioningSetProperties().set_properties(
        conditioning(case, 1), conditioning(case, 2), *pair["widgets_values"], hooks=hooks)
    steps = 5  # steps at percents 0, 0.2, ... 0.8: half-way falls between two of them
    calls = sample(env, mp, case, positive, negative, steps=steps)
    assert step_of(env, mp, calls, steps) == list(range(steps))
    full = loader(env, mp, inputs["lora_name"], inputs["strength_model"])
    errors, moved = compare(env, calls, lambda step, call: full if step < 3 else None)
    print(f"example workflow ({env.version}): rel err per step {shown(errors)}; the adapter's change {shown(moved)}")
    assert max(errors) <= TOLERANCE and min(moved[:3]) > 10 * TOLERANCE, (errors, moved)


def test_registration_skips_a_clip_and_refuses_a_dynamic_vram_patcher(env):
    """ComfyUI registers a conditioning's hooks on the sampled model, and Set CLIP Hooks on a CLIP's patcher."""
    hooks_module = importlib.import_module("comfy.hooks")
    mp = model_of(env, CASES["wan_musubi_lokr"])
    hooks, _ = create_hook(env, mp, "wan_lokr_r3_a2.safetensors")
    clip_side = mp.clone()
    registered = clip_side.register_all_hook_patches(hooks, hooks_module.create_target_dict(hooks_module.EnumWeightTarget.Clip))
    assert len(registered) == 0 and not clip_side.hook_patches, "a model-only hook gives a CLIP nothing"
    model_side = mp.clone()
    registered = model_side.register_all_hook_patches(hooks, hooks_module.create_target_dict(hooks_module.EnumWeightTarget.Model))
    assert len(registered) == 1 and len(next(iter(model_side.hook_patches.values()))) == 24  # 2 blocks x 12 i2v layers
    # ComfyUI 0.28's dynamic-VRAM patcher (ModelPatcherDynamic, the default on NVIDIA GPUs) says so through
    # is_dynamic() and raises a RuntimeError about --fast options when it meets any weight hook.
    dynamic = mp.clone()
    dynamic.is_dynamic = lambda: True
    with pytest.raises(ValueError) as e:
        dynamic.register_all_hook_patches(hooks, hooks_module.create_target_dict(hooks_module.EnumWeightTarget.Model))
    assert "wan_lokr_r3_a2.safetensors: this ComfyUI runs with dynamic VRAM" in one_line_error(e)
    assert "--disable-dynamic-vram" in str(e.value)


# Files core's hook leaves out in part or whole: Musubi's split q/k/v on HunyuanVideo 1.5 (where this ComfyUI has
# it), SimpleTuner's Diffusers-named Wan layers.
CORE_MISSES = having_model([("hunyuan_video_1_5", None, "hunyuan_video_1_5_lokr_r3_a2.safetensors"),
                            ("wan", wild_model("wan"), "st_wan_lokr.safetensors")], lambda case: case[0])


@pytest.mark.parametrize("arch, config, file", CORE_MISSES, ids=[case[-1] for case in CORE_MISSES])
def test_core_create_hook_lora_leaves_out_what_this_hook_places(env, hook_nodes, arch, config, file):
    """Why the node exists: core's Create Hook LoRA (MO) maps a file with ComfyUI's LoRA key map, which has no place
    for split q/k/v on fused weights, nor for several layers' names in Musubi's or Diffusers' naming."""
    hooks_module = importlib.import_module("comfy.hooks")
    mp = model_of(env, dict(arch=arch, **({"config": config} if config else {})))
    target = hooks_module.create_target_dict(hooks_module.EnumWeightTarget.Model)
    (core,) = hook_nodes.CreateHookLoraModelOnly().create_hook_model_only(file, 1.0)
    ours, report = create_hook(env, mp, file)
    assert "unmatched     0" in report
    weights = {}
    for name, hooks in (("core", core), ("ours", ours)):
        patcher = mp.clone()
        patcher.register_all_hook_patches(hooks, target)
        weights[name] = set(next(iter(patcher.hook_patches.values()), {}))
    fused = {key for key in weights["ours"] if key.endswith("attn.qkv.weight")}
    print(f"{file} ({env.version}): core's hook patches {len(weights['core'])} weights, this one {len(weights['ours'])}")
    assert weights["core"] < weights["ours"] and not fused & weights["core"]


def test_node_info_as_the_server_lists_it(env):
    """What /object_info serves (ComfyUI's server calls GET_NODE_INFO_V1): the loaders' category, inputs in the
    loader's order with `prev_hooks` last as in core's Create Hook LoRA, a tooltip on every input."""
    info = env.node("LycorisCreateHook").GET_NODE_INFO_V1()
    assert (info["category"], info["output"], info["display_name"]) == ("loaders/lycoris", ["HOOKS", "STRING"], "Create LyCORIS Hook")
    order = info["input_order"]
    assert order["required"] == ["model", "lora_name", "strength_model", "architecture", "lokr_full_matrix_alpha"]
    assert order["optional"] == ["block_weights", "prev_hooks"]
    for section in ("required", "optional"):
        for name, spec in info["input"][section].items():
            assert spec[1].get("tooltip"), f"{name} has no tooltip"
    assert "wan_lokr_r3_a2.safetensors" in info["input"]["required"]["lora_name"][1]["options"]
