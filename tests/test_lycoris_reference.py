"""Our math against lycoris-lora's module *forward* (the reference; its merge_to double-scales).

A LyCORIS module wraps a real Linear/Conv2d; its effective weight is read off the forward pass with
one-hot inputs. The module's state dict is written to a file exactly as a kohya-style network saves
it, read back with `read_adapter`, and our delta / apply / bypass must all give that weight.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

lycoris_modules = pytest.importorskip("lycoris.modules", reason="lycoris-lora (test extra) is not installed")

from comfyui_lycoris.lycoris_core import read_adapter  # noqa: E402
from helpers import rel_err  # noqa: E402

DIMS = [4, 6, 8, 12, 16, 18, 20, 24, 30, 32, 36, 48, 64]
STEM = "lora_unet_blocks_0_attn_q"


def effective_weight(base: nn.Module) -> torch.Tensor:
    """The weight a (bias-free) layer applies, read off its forward with one-hot inputs."""
    with torch.no_grad():
        if isinstance(base, nn.Linear):
            return base(torch.eye(base.in_features)).T.contiguous()
        k = base.kernel_size
        n = base.in_channels * math.prod(k)
        y = base(torch.eye(n).reshape(n, base.in_channels, *k))  # (n, out, 1, 1)
        return y.reshape(n, base.out_channels).T.reshape(base.out_channels, base.in_channels, *k).contiguous()


def build_lycoris(cls, base: nn.Module, multiplier: float, **options) -> nn.Module:
    module = cls(STEM, base, multiplier=multiplier, **options)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "dora_scale":  # keep DoRA's magnitude at its real init (norms of W)
                p.copy_(torch.randn_like(p) * 0.2)
            else:
                p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))
    module.eval()
    return module


def save_like_kohya(module: nn.Module, write_safetensors) -> str:
    tensors = {f"{STEM}.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    return write_safetensors(tensors)


def check_against_reference(cls, base, multiplier, options, write_safetensors):
    base_weight = base.weight.detach().clone()
    module = build_lycoris(cls, base, multiplier, **options)
    path = save_like_kohya(module, write_safetensors)
    module.apply_to()
    reference = effective_weight(base)

    ours = read_adapter(path).modules[STEM]
    assert ours.shape == tuple(base_weight.shape) or math.prod(ours.shape) == base_weight.numel()

    applied = base_weight.clone()
    ours.bind().apply_(applied, strength=multiplier)
    assert rel_err(applied, reference) < 1e-5

    if not ours.has_dora:
        plus_delta = base_weight + multiplier * ours.delta_weight().reshape(base_weight.shape)
        assert rel_err(plus_delta, reference) < 1e-5
        assert rel_err(applied, plus_delta) < 1e-6

    if isinstance(base, nn.Linear):
        bias = torch.randn(base_weight.shape[0])
        x = torch.eye(base_weight.shape[1])

        def base_forward(inp):
            return inp @ base_weight.T + bias

        bound = ours.bind()
        rescale = bound.dora_rescale(base_weight, multiplier) if ours.has_dora else None
        y = bound.bypass_forward(x, base_forward, multiplier, bias=bias, rescale=rescale)
        assert rel_err((y - bias).T, reference) < 1e-5
    return ours


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(
    out_features=st.sampled_from(DIMS),
    in_features=st.sampled_from(DIMS),
    rank=st.integers(1, 8),
    alpha=st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0]),
    factor=st.sampled_from([-1, 2, 4, 8]),
    decompose_both=st.booleans(),
    full_matrix=st.booleans(),
    dora=st.booleans(),
    multiplier=st.sampled_from([1.0, 0.5, 0.7, 1.3]),
)
def test_lokr_linear_matches_lycoris_forward(
    write_safetensors, out_features, in_features, rank, alpha, factor, decompose_both, full_matrix, dora, multiplier
):
    base = nn.Linear(in_features, out_features, bias=False)
    options = dict(
        lora_dim=rank, alpha=alpha, factor=factor, decompose_both=decompose_both,
        full_matrix=full_matrix, weight_decompose=dora,
    )
    ours = check_against_reference(lycoris_modules.LokrModule, base, multiplier, options, write_safetensors)
    assert ours.algorithm == "lokr"


@SETTINGS
@given(
    out_features=st.sampled_from(DIMS),
    in_features=st.sampled_from(DIMS),
    rank=st.integers(1, 8),
    alpha=st.sampled_from([0.5, 1.0, 2.0, 8.0]),
    dora=st.booleans(),
    wd_on_out=st.booleans(),
    multiplier=st.sampled_from([1.0, 0.5, 1.3]),
)
def test_loha_linear_matches_lycoris_forward(
    write_safetensors, out_features, in_features, rank, alpha, dora, wd_on_out, multiplier
):
    base = nn.Linear(in_features, out_features, bias=False)
    options = dict(lora_dim=rank, alpha=alpha, weight_decompose=dora, wd_on_out=wd_on_out)
    ours = check_against_reference(lycoris_modules.LohaModule, base, multiplier, options, write_safetensors)
    assert ours.algorithm == "loha"


@SETTINGS
@given(
    out_features=st.sampled_from(DIMS),
    in_features=st.sampled_from(DIMS),
    rank=st.integers(1, 8),
    alpha=st.sampled_from([0.5, 1.0, 2.0, 8.0]),
    dora=st.booleans(),
    multiplier=st.sampled_from([1.0, 0.5, 1.3]),
)
def test_lora_linear_matches_lycoris_forward(write_safetensors, out_features, in_features, rank, alpha, dora, multiplier):
    base = nn.Linear(in_features, out_features, bias=False)
    options = dict(lora_dim=rank, alpha=alpha, weight_decompose=dora)
    ours = check_against_reference(lycoris_modules.LoConModule, base, multiplier, options, write_safetensors)
    assert ours.algorithm == "lora"


@pytest.mark.parametrize("cls_name", ["LokrModule", "LohaModule", "LoConModule"])
@pytest.mark.parametrize("use_tucker", [False, True])
@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_modules_match_lycoris_forward(write_safetensors, cls_name, use_tucker, kernel):
    base = nn.Conv2d(32, 48, kernel, bias=False)
    options = dict(lora_dim=2, alpha=1.0, use_tucker=use_tucker)
    if cls_name == "LokrModule":
        options["factor"] = 4
    ours = check_against_reference(getattr(lycoris_modules, cls_name), base, 0.8, options, write_safetensors)
    if use_tucker and kernel == 3:
        assert {"lokr_t2", "hada_t1", "mid"} & set(ours.params)


def test_full_matrix_lokr_scale_is_one_whatever_alpha(write_safetensors):
    base = nn.Linear(48, 64, bias=False)
    module = build_lycoris(lycoris_modules.LokrModule, base, 1.0, lora_dim=4, alpha=2, factor=-1)
    path = save_like_kohya(module, write_safetensors)
    ours = read_adapter(path).modules[STEM]
    assert ours.rank is None and ours.alpha == 4.0 and ours.scale == 1.0
    assert set(ours.params) == {"alpha", "lokr_w1", "lokr_w2"}


@pytest.mark.parametrize("cls_name", ["LokrModule", "LohaModule", "LoConModule"])
@pytest.mark.parametrize("conv", ["1d", "3d"])
def test_conv1d_and_conv3d_modules_match_lycoris_forward(write_safetensors, cls_name, conv):
    """Patch embeddings of video models are Conv3d (ComfyUI's trainer adapts them): LoKr's w2 is then
    5-D, and LyCORIS builds kron(w1, w2) as torch broadcasts a 2-D w1 against it."""
    base = nn.Conv1d(8, 12, 3, bias=False) if conv == "1d" else nn.Conv3d(8, 12, (1, 2, 2), bias=False)
    options = dict(lora_dim=2, alpha=1.0, **({"factor": 4} if cls_name == "LokrModule" else {}))
    ours = check_against_reference(getattr(lycoris_modules, cls_name), base, 0.8, options, write_safetensors)
    assert ours.shape == tuple(base.weight.shape) or math.prod(ours.shape) == base.weight.numel()
