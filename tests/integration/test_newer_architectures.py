"""FLUX.2, Z-Image and HunyuanVideo 1.5 files on every ComfyUI release, also on those without their models (0.3.64).

Baking and converting a file need no ComfyUI model: the LycorisMerge and LycorisConvert nodes work on these
files in every release, with Musubi's numbers. Loading needs the model. A user of a release without it has
another model at hand (FLUX.1 for a FLUX.2 file, Lumina 2 for Z-Image, HunyuanVideo for HunyuanVideo 1.5):
the loader's error then says that this release has no model for the file, and where the release has one it
is the plain mismatch.
"""

from __future__ import annotations

import pytest
import torch
from comfyui_host import MODEL_CLASSES, comfyui_has, require_comfyui
from helpers import adapter_entries, expected_weights, module_paths, rel_err
from safetensors.torch import load_file, save_file

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

ENTRY = {e["file"]: e for e in adapter_entries()}
FILE_PREFIX = {"flux2": "flux_2", "z_image": "z_image", "hunyuan_video_1_5": "hunyuan_video_1_5"}
ARCHS = list(FILE_PREFIX)  # every release runs them all, whether it has the model or not
# Lumina 2: Z-Image's ComfyUI ancestor (the same weight names, other feed-forward widths), in every release.
LUMINA2 = dict(image_model="lumina2", dim=10, patch_size=2, in_channels=4, cap_feat_dim=8, n_layers=2, n_refiner_layers=1,
               n_heads=1, n_kv_heads=1, multiple_of=1, ffn_dim_multiplier=8.0 / 3.0, qk_norm=True, axes_dims=[2, 4, 4],
               axes_lens=[64, 64, 64])


@pytest.fixture
def folders(comfy_env, tmp_path):
    """A models/diffusion_models folder in ComfyUI's folder list, and ComfyUI's output folder moved to a temporary place."""
    fp = comfy_env.folder_paths
    models = tmp_path / "diffusion_models"
    models.mkdir()
    fp.add_model_folder_path("diffusion_models", str(models))
    old = fp.get_output_directory()
    fp.set_output_directory(str(tmp_path / "output"))
    yield models
    fp.set_output_directory(old)


def base_file(folder, arch) -> tuple[str, dict[str, torch.Tensor]]:
    """A fp32 base in the original naming (the fixture's whole model: adapted and other weights), and the expectations."""
    expected = expected_weights(ENTRY[f"{FILE_PREFIX[arch]}_loha_r4_a2.safetensors"])  # LoHa and LoKr share the base
    name = f"{arch}_tiny.safetensors"
    save_file({k.split("/", 1)[1]: v for k, v in expected.items() if k.startswith(("base/", "unadapted/"))}, str(folder / name))
    return name, expected


def bake(env, unet_name, lora_name, strength, output_name) -> dict[str, torch.Tensor]:
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        path, report = env.node("LycorisMerge").execute(unet_name=unet_name, lora_name=lora_name, strength=strength,
                                                       output_name=output_name).args
    assert "unmatched" not in report, report
    return load_file(path)


def assert_merged(baked, expected, strength, name):
    for p in module_paths(expected):
        assert rel_err(baked[f"{p}.weight"], expected[f"merged/{strength}/{p}.weight"]) <= 1e-5, (name, p)


@pytest.mark.parametrize("arch", ARCHS)
def test_bake_node_needs_no_comfyui_model(comfy_env, folders, arch):
    unet, _ = base_file(folders, arch)
    name = f"{FILE_PREFIX[arch]}_lokr_r3_a2.safetensors"
    expected = expected_weights(ENTRY[name])
    assert_merged(bake(comfy_env, unet, name, 0.5, "baked"), expected, "0.5", name)


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_node_needs_no_comfyui_model(comfy_env, folders, arch):
    """ComfyUI's layout (q/k/v fused where ComfyUI fuses them), baked onto the original naming: Musubi's merge."""
    unet, expected = base_file(folders, arch)
    source = f"{FILE_PREFIX[arch]}_loha_r4_a2.safetensors"
    with torch.inference_mode():
        (path,) = comfy_env.node("LycorisConvert").execute(lora_name=source, to="comfyui", output_name=f"{arch}_comfyui").args
    assert_merged(bake(comfy_env, unet, f"{arch}_comfyui.safetensors", 1.0, "baked_converted"), expected, "1.0", path)


def nearest_model(env, arch):
    """The model of every release a user of a release without `arch`'s model would have at hand for its file."""
    if arch == "z_image":
        model = env.new_model(env.model_class("Lumina2"), LUMINA2)
        cpu = torch.device("cpu")
        return env.comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    return env.model({"flux2": "flux", "hunyuan_video_1_5": "hunyuan_video"}[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_loader_error_says_when_this_comfyui_has_no_model_for_the_file(comfy_env, arch):
    model = nearest_model(comfy_env, arch)
    title = comfy_env.core.architectures.describe_architecture(arch)
    lacks = (f"this ComfyUI ({comfy_env.version}) has no {title} model (comfy.supported_models.{MODEL_CLASSES[arch]}): "
             f"a newer ComfyUI is needed")
    node = comfy_env.node("LycorisLoaderModelOnly")
    for name, architecture in [(f"{FILE_PREFIX[arch]}_lokr_r3_a2.safetensors", "auto"),
                               (f"{FILE_PREFIX[arch]}_loha_r4_a2.diffusers.safetensors", "auto"),
                               (f"{FILE_PREFIX[arch]}_lokr_r3_a2.safetensors", arch)]:
        try:
            node.execute(model=model, lora_name=name, strength_model=1.0, architecture=architecture)
            message = None  # where Lumina 2's layers have Z-Image's shapes (0.28), a Z-Image file loads onto it
        except comfy_env.core.AdapterError as e:
            message = str(e)
        print(f"\n{name} ({architecture}) on {type(model.model).__name__}: {message}")
        if comfyui_has(arch):
            assert message is None or lacks not in message, message
        else:
            assert message is not None and name in message and lacks in message, message
    assert not model.patches
