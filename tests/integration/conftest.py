"""A real ComfyUI for the integration tests (found by comfyui_host.py; each test module skips with the
reason when there is none). The test process hosts ComfyUI the way its `main.py` does (its root
on sys.path, CPU) and imports this pack with ComfyUI's own `nodes.load_custom_node`: the module comes
from `<pack>/__init__.py` under a path-like name, and the pack folder is not on sys.path.

Models are ComfyUI's own classes (`comfy.supported_models` configs) at the Musubi fixtures' tiny size
(hidden 10, one head, two blocks of each kind): every adapted layer has the fixture's shape.

Older ComfyUI releases lack some of those classes (0.3.64 has no FLUX.2, Z-Image or HunyuanVideo 1.5).
Tests that need one are not collected there (`comfyui_host.having_model` builds their parameter lists),
so reaching a missing class or a missing model option here is a failure, never a skip.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from comfyui_host import MODEL_CLASSES, REPO, comfyui_version, host_comfyui
from helpers import MUSUBI, comfy_location, module_paths

OFF = (False, None, [], ())  # values of a unet_config option that mean "without the feature"


def _tiny_configs() -> dict:
    """ComfyUI config class name and unet_config per architecture, fixture-sized (see notes in comfy_models.md)."""
    h, rope = 10, [2, 4, 4]  # rope axes sum to the head dim (10), each even
    configs = {
        "wan": dict(
            image_model="wan2.1", model_type="i2v", dim=h, num_heads=1, ffn_dim=4 * h, num_layers=2, in_dim=36,
            out_dim=4, text_dim=8, freq_dim=8, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True,
            cross_attn_norm=True, eps=1e-6),
        "hunyuan_video": dict(
            image_model="hunyuan_video", in_channels=4, out_channels=4, patch_size=[1, 2, 2], vec_in_dim=8,
            context_in_dim=8, hidden_size=h, mlp_ratio=4.0, num_heads=1, depth=2, depth_single_blocks=2,
            axes_dim=rope, theta=256, qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
            use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False),
        "hunyuan_video_1_5": dict(
            image_model="hunyuan_video", in_channels=9, out_channels=4, patch_size=[1, 1, 1], vec_in_dim=None,
            context_in_dim=8, hidden_size=h, mlp_ratio=4.0, num_heads=1, depth=2, depth_single_blocks=0,
            axes_dim=rope, theta=256, qkv_bias=True, guidance_embed=False, byt5=True, meanflow=False,
            use_cond_type_embedding=True, vision_in_dim=8, meanflow_sum=True),
        "flux": dict(
            image_model="flux", in_channels=1, out_channels=1, vec_in_dim=8, context_in_dim=8, hidden_size=h,
            mlp_ratio=4.0, num_heads=1, depth=2, depth_single_blocks=2, axes_dim=rope, theta=10000, patch_size=2,
            qkv_bias=True, guidance_embed=True, txt_ids_dims=[], yak_mlp=False, txt_norm=False),
        "flux2": dict(
            image_model="flux2", in_channels=4, out_channels=4, vec_in_dim=None, context_in_dim=8, hidden_size=h,
            mlp_ratio=3.0, num_heads=1, depth=2, depth_single_blocks=2, axes_dim=[2, 2, 2, 4], theta=2000,
            patch_size=1, qkv_bias=False, guidance_embed=False, txt_ids_dims=[3], global_modulation=True,
            mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0, yak_mlp=False,
            txt_norm=False),
        "qwen_image": dict(
            image_model="qwen_image", in_channels=4, out_channels=4, num_layers=2, attention_head_dim=h,
            num_attention_heads=1, joint_attention_dim=8, axes_dims_rope=(2, 4, 4)),
        "z_image": dict(
            image_model="lumina2", dim=h, patch_size=2, in_channels=4, cap_feat_dim=8, n_layers=2, n_refiner_layers=1,
            n_heads=1, n_kv_heads=1, multiple_of=1, ffn_dim_multiplier=8.0 / 3.0, qk_norm=True, axes_dims=rope,
            axes_lens=[64, 64, 64], rope_theta=256.0, z_image_modulation=True, time_scale=1000.0,
            pad_tokens_multiple=32),
    }
    return {arch: (MODEL_CLASSES[arch], unet_config) for arch, unet_config in configs.items()}


class ComfyEnv:
    """The in-process ComfyUI: its modules, the pack as ComfyUI loaded it, tiny models."""

    def __init__(self, root: Path):
        self.root = root
        self.version = comfyui_version(root)
        self.comfy = SimpleNamespace(
            **{name.split(".")[-1]: importlib.import_module(name) for name in (
                "comfy.model_management", "comfy.model_patcher", "comfy.supported_models", "comfy.utils", "comfy.lora",
                "comfy.sd", "comfy.sd1_clip", "comfy.model_detection")}
        )
        self.nodes = importlib.import_module("nodes")  # ComfyUI's nodes.py
        self.folder_paths = importlib.import_module("folder_paths")
        assert Path(self.nodes.__file__).resolve() == root / "nodes.py", self.nodes.__file__
        loaded = asyncio.run(self.nodes.load_custom_node(str(REPO)))
        assert loaded, "ComfyUI could not load the pack (see the log above)"
        self.pack = sys.modules[str(REPO).replace(".", "_x_")]  # the name ComfyUI registers a folder pack under
        self.core = self.pack.lycoris_core
        self.folder_paths.add_model_folder_path("loras", str(MUSUBI), is_default=True)
        self.configs = _tiny_configs()  # {arch: (class name, unet_config)}; classes via model_class
        self._models: dict[str, object] = {}

    def node(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def core_node(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]()

    def model_class(self, name: str) -> type:
        """`comfy.supported_models.<name>`. A test that needs a class this ComfyUI lacks is not collected here
        (`comfyui_host.having_model`), so reaching one fails."""
        cls = getattr(self.comfy.supported_models, name, None)
        if cls is None:
            pytest.fail(f"ComfyUI {self.version} has no comfy.supported_models.{name}: a test for that model was "
                        f"collected without comfyui_host.having_model")
        return cls

    def config(self, arch: str) -> tuple[type, dict]:
        """(ComfyUI config class, fixture-sized unet_config) of `arch`."""
        name, unet_config = self.configs[arch]
        return self.model_class(name), unet_config

    def new_model(self, config_cls: type, unet_config: dict, dtype=torch.float32, manual_cast_dtype=None):
        """ComfyUI's model (a BaseModel, uninitialised weights) of `config_cls` with `unet_config`.

        Options newer than the running ComfyUI (its model class refuses the keyword) are left out where
        the test sets them off (False, None, empty: the older model simply lacks the feature); a test that
        turns one on is collected only where the model takes it, so that fails.
        """
        unet_config = dict(unet_config)
        while True:
            config = config_cls(dict(unet_config))
            config.set_inference_dtype(dtype, manual_cast_dtype)
            try:
                return config.get_model({}, "")
            except TypeError as e:
                found = re.search(r"unexpected keyword argument '(\w+)'", str(e))
                if found is None or found[1] not in unet_config or unet_config[found[1]] not in OFF:
                    raise
                del unet_config[found[1]]

    @staticmethod
    def fixture_names(model_keys) -> dict[str, str]:
        """{fixture name: this ComfyUI's name} for the weights this ComfyUI names otherwise than the fixtures.

        The fixtures name weights as ComfyUI 0.28 does. ComfyUI 0.3.64 keeps the RMSNorm weight of FLUX and
        HunyuanVideo (their QK norms) as `<module>.scale`, e.g. `double_blocks.0.img_attn.norm.key_norm.scale`,
        where 0.28 has `.weight` (0.28 renames `_norm.scale` on load: supported_models.Flux.process_unet_state_dict).
        Same parameter, same shape: only the name differs. Empty on ComfyUI 0.28.
        """
        keys = set(model_keys)
        return {k[: -len("scale")] + "weight": k for k in keys
                if k.endswith(".scale") and k[: -len("scale")] + "weight" not in keys}

    def build(self, arch: str, seed: int = 0, **overrides):
        """A fresh ModelPatcher of ComfyUI's `arch` model with random (seeded) weights, on the CPU."""
        config_cls, unet_config = self.config(arch)
        model = self.new_model(config_cls, dict(unet_config, **overrides))
        gen = torch.Generator().manual_seed(seed)
        sd = {k: torch.randn(v.shape, generator=gen) * 0.1 if v.is_floating_point() else v
              for k, v in model.diffusion_model.state_dict().items()}
        model.diffusion_model.load_state_dict(sd)  # ComfyUI layers start uninitialised
        cpu = torch.device("cpu")
        return self.comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)

    def model(self, arch: str):
        """One shared model per architecture (the tests set its adapted weights, patch, and unpatch)."""
        if arch not in self._models:
            self._models[arch] = self.build(arch)
        return self._models[arch]

    def set_base(self, mp, arch: str, expected: dict) -> dict[str, tuple[str, slice]]:
        """Write the fixture's base weights into the model; {Musubi path: (model key, rows)}."""
        where = {}
        with torch.no_grad():
            for path in module_paths(expected):
                name, part = comfy_location(arch, path)
                key = "diffusion_model." + name
                base = expected[f"base/{path}.weight"]
                rows = slice(None) if part is None else slice(part * base.shape[0], (part + 1) * base.shape[0])
                self.comfy.utils.get_attr(mp.model, key)[rows].copy_(base)
                where[path] = (key, rows)
        return where

    def weights(self, mp) -> dict[str, torch.Tensor]:
        """Every diffusion-model weight as the module holds it now (patch_model replaces parameters)."""
        return {k: self.comfy.utils.get_attr(mp.model, k).detach().clone()
                for k in mp.model.state_dict() if k.startswith("diffusion_model.")}


@pytest.fixture(scope="session")
def comfy_env():
    root = host_comfyui()  # usually done already, by the test modules' parameter lists at collection
    # Tiny tensors: one thread is ~1000x faster per op than several threads contending on a shared machine.
    torch.set_num_threads(1)
    return ComfyEnv(root)
