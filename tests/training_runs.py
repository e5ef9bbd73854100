"""Runs of the `train` command for the integration tests: tiny ComfyUI models written as files that ComfyUI's own
loader detects on every release, and the command in one process or under torchrun (gloo, CPU).

The models are ComfyUI's Wan 2.1 (t2v) and HunyuanVideo classes at the smallest size whose file ComfyUI's
detection reads back as the same model on 0.3.64 too (it derives the head count from width/128 and fixes
Wan's text width at 4096): width 128, one head, two (Wan) or one+one (HunyuanVideo) blocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = {
    "wan": ("WAN21_T2V", dict(
        image_model="wan2.1", model_type="t2v", dim=128, num_heads=1, ffn_dim=256, num_layers=2, in_dim=16, out_dim=16,
        text_dim=4096, freq_dim=256, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)),
    "hunyuan_video": ("HunyuanVideo", dict(
        image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2], vec_in_dim=768, context_in_dim=16,
        hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256,
        qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, use_cond_type_embedding=False, vision_in_dim=None,
        meanflow_sum=False)),
}
TEXT_WIDTH = {"wan": 4096, "hunyuan_video": 16}


def write_model(env, arch: str, path: Path, seed: int = 0) -> Path:
    """ComfyUI's `arch` model at the tiny size, random (seeded) weights, saved as a diffusion-model file."""
    name, unet_config = TINY[arch]
    model = env.new_model(env.model_class(name), unet_config)
    gen = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(v.shape, generator=gen) * 0.05 if v.is_floating_point() else v).contiguous()
          for k, v in model.diffusion_model.state_dict().items()}
    save_file(sd, str(path))
    return path


def command(args: list[str], processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "comfyui_lycoris", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "comfyui_lycoris", "train", *args]


def start(args: list[str], processes: int = 1, cwd: Path | None = None) -> subprocess.Popen:
    """The command as a user runs it (ComfyUI from COMFYUI_PATH); one thread per process, as torchrun sets it,
    so one process and two compute alike."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(command(args, processes), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"the train command did not finish in {timeout} s:\n{err[-3000:]}") from None
    return process.returncode, out, err


def run(args: list[str], processes: int = 1, cwd: Path | None = None) -> tuple[int, str, str]:
    return finish(start(args, processes, cwd))


def events(path: Path) -> list[dict]:
    """The progress file's events (JSON lines)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def error_lines(stderr: str) -> list[str]:
    """The command's own error lines (torchrun adds its report around them)."""
    return [line for line in stderr.splitlines() if line.startswith("comfyui-lycoris train:")]
