"""Saving trained adapters as Musubi Tuner does (`LoRANetwork.save_weights` + its trainer's metadata),
so Musubi loads our files and we load Musubi's the same way.

Keys `lora_unet_<path>.{lokr_w1, lokr_w2 | lokr_w2_a, lokr_w2_b | hada_w1_a, …, alpha}`, every tensor
(alpha too, 0-dim) in the save dtype; metadata all strings: the `ss_*` training record, the
`modelspec.*` block (architecture ending in `/lora` whatever the algorithm, as Musubi writes it) and
the `sshs_model_hash` / `sshs_legacy_hash` that Musubi precomputes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass

import torch

from ..safetensors_io import save_tensors
from .config import TrainingConfig
from .inject import AdapterSet


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # modelspec.architecture without the "/lora" Musubi appends
    implementation: str
    resolution: str


# Musubi's utils/sai_model_spec.py, keyed by ss_base_model_version.
MODELSPECS: dict[str, ModelSpec] = {
    "wan": ModelSpec("wan2.1", "https://github.com/Wan-Video/Wan2.1", "1280x720"),
    "hunyuan_video": ModelSpec("hunyuan-video", "https://github.com/Tencent/HunyuanVideo", "1280x720"),
    "hunyuan_video_1_5": ModelSpec("hunyuan-video-1.5", "https://github.com/Tencent-Hunyuan/HunyuanVideo-1.5", "1280x720"),
    "framepack": ModelSpec("framepack", "https://github.com/lllyasviel/FramePack", "1280x720"),
    "flux_kontext": ModelSpec("Flux.1-dev", "https://github.com/black-forest-labs/flux", "1280x720"),
    "flux_2_dev": ModelSpec("Flux.2-dev", "https://github.com/black-forest-labs/flux2", "1280x720"),
    "flux_2_klein_4b": ModelSpec("Flux.2-klein-4b", "https://github.com/black-forest-labs/flux2", "1280x720"),
    "flux_2_klein_9b": ModelSpec("Flux.2-klein-9b", "https://github.com/black-forest-labs/flux2", "1280x720"),
    "qwen_image": ModelSpec("Qwen-Image", "https://github.com/QwenLM/Qwen-Image", "1328x1328"),
    "qwen_image_edit": ModelSpec("Qwen-Image-Edit", "https://github.com/QwenLM/Qwen-Image", "1024x1024"),
    "qwen_image_layered": ModelSpec("Qwen-Image-Layered", "https://github.com/QwenLM/Qwen-Image-Layered", "1280x720"),
    "z_image": ModelSpec("Z-Image", "https://github.com/Tongyi-MAI/Z-Image", "1024x1024"),
}


def musubi_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as Musubi's precalculate_safetensors_hashes:
    serialize the tensors with only the `ss_*` metadata, then sha256 of everything after the
    header, and the first 8 hex digits of sha256 of bytes 0x100000..0x110000."""
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_end = 8 + int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[header_end:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


# Musubi's LoRA network module of each architecture (its --network_module); LoHa and LoKr have one
# module for every architecture, `networks.loha` and `networks.lokr`.
LORA_NETWORK_MODULES = {
    "wan": "networks.lora_wan",
    "hunyuan_video": "networks.lora",
    "hunyuan_video_1_5": "networks.lora_hv_1_5",
    "framepack": "networks.lora_framepack",
    "flux": "networks.lora_flux",
    "flux2": "networks.lora_flux_2",
    "qwen_image": "networks.lora_qwen_image",
    "z_image": "networks.lora_zimage",
}


def network_module(algorithm: str, architecture: str | None) -> str:
    """`ss_network_module` as Musubi writes it for an adapter of this algorithm and architecture."""
    if algorithm == "lora":
        return LORA_NETWORK_MODULES.get(architecture or "", "networks.lora")
    return f"networks.{algorithm}"


def network_description(
    algorithm: str, architecture: str | None, dim: int, alpha: float | None, network_args: dict[str, str]
) -> dict[str, str]:
    """Musubi's `ss_network_*` metadata: the network's module, dim, alpha and arguments (strings)."""
    metadata = {
        "ss_network_module": network_module(algorithm, architecture),
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(alpha) if alpha else None),
    }
    if network_args:
        metadata["ss_network_args"] = json.dumps(network_args)
    return metadata


def network_metadata(
    algorithm: str,
    architecture: str | None,
    dim: int,
    alpha: float | None,
    network_args: dict[str, str],
    base_model_version: str | None,
    title: str,
    timestamp: float,
) -> dict[str, str]:
    """What Musubi's metadata says about the network itself, whoever made it: the output name,
    `ss_network_*`, the base model version and the `modelspec.*` block (all strings)."""
    metadata = {"ss_output_name": title, **network_description(algorithm, architecture, dim, alpha, network_args)}
    if base_model_version:
        metadata["ss_base_model_version"] = base_model_version
    spec = MODELSPECS.get(base_model_version or "")
    if spec:
        metadata.update(
            {
                "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": f"{spec.architecture}/lora",
                "modelspec.implementation": spec.implementation,
                "modelspec.title": title,
                "modelspec.resolution": spec.resolution,
                "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
            }
        )
    return {k: str(v) for k, v in metadata.items()}


def musubi_metadata(
    config: TrainingConfig,
    title: str,
    timestamp: float | None = None,
    steps: int | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The metadata a Musubi run with these options writes (without the hashes)."""
    timestamp = time.time() if timestamp is None else timestamp
    optimizer_args = ",".join(f"{k}={v}" for k, v in config.optimizer_args.items())
    metadata = {
        "ss_learning_rate": config.learning_rate,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_max_train_steps": config.max_steps,
        "ss_lr_warmup_steps": config.warmup_steps,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_network_dropout": None,
        "ss_seed": config.seed,
        "ss_optimizer": f"torch.optim.{config.optimizer}" + (f"({optimizer_args})" if optimizer_args else ""),
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_training_finished_at": timestamp,
    }
    if steps is not None:
        metadata["ss_steps"] = steps
    metadata = {k: str(v) for k, v in metadata.items()}
    metadata.update(network_metadata(config.algorithm, config.architecture, config.rank, config.alpha,
                                     config.network_args(), config.resolved_base_model_version(), title, timestamp))
    metadata.update({k: str(v) for k, v in (extra or {}).items()})
    return metadata


def save_musubi(
    path: str | os.PathLike,
    adapters: AdapterSet,
    title: str | None = None,
    steps: int | None = None,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    timestamp: float | None = None,
) -> dict[str, str]:
    """Write the adapters as a Musubi-format safetensors file (atomically; an existing file is
    kept unless `overwrite`). `title` defaults to the file name without extension (Musubi's
    output_name); `metadata` adds or overrides keys. Returns the metadata written."""
    path = os.fspath(path)
    title = title or os.path.splitext(os.path.basename(path))[0]
    tensors = adapters.musubi_tensors(dtype)
    meta = musubi_metadata(adapters.config, title, timestamp, steps, metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = musubi_hashes(tensors, meta)
    save_tensors(path, tensors, meta, overwrite=overwrite)
    return meta
