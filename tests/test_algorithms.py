"""apply == W + delta == the weight implied by bypass, for every algorithm, dtype and layout."""

from __future__ import annotations

import pytest
import torch
from comfyui_lycoris.lycoris_core import read_adapter
from comfyui_lycoris.lycoris_core.algorithms import ALGORITHMS, base
from comfyui_lycoris.lycoris_core.rows import Rows
from helpers import rel_err

OUT, IN = 48, 40  # out = 6·8, in = 5·8


def lora(rank=4):
    return {"lora_up.weight": torch.randn(OUT, rank), "lora_down.weight": torch.randn(rank, IN), "alpha": torch.tensor(2.0)}


def loha(rank=4, rank2=None):
    rank2 = rank2 or rank
    return {
        "hada_w1_a": torch.randn(OUT, rank), "hada_w1_b": torch.randn(rank, IN),
        "hada_w2_a": torch.randn(OUT, rank2), "hada_w2_b": torch.randn(rank2, IN),
        "alpha": torch.tensor(3.0),
    }


def lokr_full():
    return {"lokr_w1": torch.randn(6, 5), "lokr_w2": torch.randn(8, 8), "alpha": torch.tensor(8.0)}


def lokr_low_rank():
    return {
        "lokr_w1": torch.randn(6, 5), "lokr_w2_a": torch.randn(8, 2), "lokr_w2_b": torch.randn(2, 8),
        "alpha": torch.tensor(1.0),
    }


def lokr_both_decomposed():
    return {
        "lokr_w1_a": torch.randn(6, 2), "lokr_w1_b": torch.randn(2, 5),
        "lokr_w2_a": torch.randn(8, 2), "lokr_w2_b": torch.randn(2, 8), "alpha": torch.tensor(4.0),
    }


def lokr_w1_decomposed_only():
    return {"lokr_w1_a": torch.randn(6, 3), "lokr_w1_b": torch.randn(3, 5), "lokr_w2": torch.randn(8, 8), "alpha": torch.tensor(6.0)}


def full_diff():
    return {"diff": torch.randn(OUT, IN), "diff_b": torch.randn(OUT)}


BUILDERS = {
    "lora": lora, "loha": loha, "lokr_full": lokr_full, "lokr_low_rank": lokr_low_rank,
    "lokr_both": lokr_both_decomposed, "lokr_w1_only": lokr_w1_decomposed_only, "diff": full_diff,
}
EXPECTED_SCALE = {
    "lora": 0.5, "loha": 0.75, "lokr_full": 1.0, "lokr_low_rank": 0.5, "lokr_both": 2.0, "lokr_w1_only": 2.0, "diff": 1.0,
}


def module_from(tensors, write_safetensors, stem="lora_unet_blocks_0_attn_q"):
    path = write_safetensors({f"{stem}.{k}": v for k, v in tensors.items()})
    return read_adapter(path).modules[stem]


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_scale_rules(kind, write_safetensors):
    module = module_from(BUILDERS[kind](), write_safetensors)
    assert module.scale == pytest.approx(EXPECTED_SCALE[kind])
    assert module.shape == (OUT, IN)


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strength", [1.0, -0.6])
def test_apply_equals_w_plus_delta_cast_once(kind, dtype, strength, write_safetensors):
    module = module_from(BUILDERS[kind](), write_safetensors)
    weight = torch.randn(OUT, IN).to(dtype)
    exact = weight.double() + strength * module.delta_weight(torch.float64)
    applied = weight.clone()
    module.bind().apply_(applied, strength)
    assert applied.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(applied, exact) < 1e-6
    else:
        # fp32 math and one rounding: within one unit in the last place of the exact result
        ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((applied.double() - exact.to(dtype).double()).abs() <= ulp * 1.01).all()
        # rounding twice (a half-precision ΔW, then the sum) would fail this on some elements
        assert (applied != exact.to(dtype)).float().mean() < 0.01


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_bypass_implies_the_same_weight(kind, write_safetensors):
    module = module_from(BUILDERS[kind](), write_safetensors)
    weight = torch.randn(OUT, IN)
    x = torch.eye(IN)
    implied = module.bind().bypass_forward(x, lambda inp: inp @ weight.T, strength=0.7).T
    assert rel_err(implied, weight + 0.7 * module.delta_weight()) < 1e-5


def test_loha_bypass_factored_and_built_paths_agree(write_safetensors):
    module = module_from(loha(rank=2, rank2=3), write_safetensors)
    want = module.delta_weight()
    few_tokens = torch.randn(3, IN)  # r1·r2 = 6 per token is cheaper than building ΔW
    many_tokens = torch.randn(5000, IN)
    for x in (few_tokens, many_tokens):
        assert rel_err(module.bind().bypass_delta(x), x @ want.T) < 1e-5
    wide = module_from(loha(rank=16), write_safetensors)  # 256 > what building costs
    x = torch.randn(7, 5, IN)
    assert rel_err(wide.bind().bypass_delta(x), x @ wide.delta_weight().T) < 1e-5


def test_lokr_bypass_both_associations(write_safetensors):
    square = module_from(lokr_low_rank(), write_safetensors)
    tall = module_from({"lokr_w1": torch.randn(2, 20), "lokr_w2": torch.randn(24, 2)}, write_safetensors)
    for module in (square, tall):
        x = torch.randn(2, 3, module.shape[1])
        assert rel_err(module.bind().bypass_delta(x, 1.3), 1.3 * x @ module.delta_weight().T) < 1e-5


def test_apply_to_row_slice_of_fused_weight(write_safetensors):
    module = module_from(lokr_low_rank(), write_safetensors)
    fused = torch.randn(3 * OUT, IN)
    before = fused.clone()
    module.bind().apply_(fused[OUT : 2 * OUT], 1.0)
    assert torch.equal(fused[:OUT], before[:OUT]) and torch.equal(fused[2 * OUT :], before[2 * OUT :])
    assert rel_err(fused[OUT : 2 * OUT], before[OUT : 2 * OUT] + module.delta_weight()) < 1e-6


def test_lokr_apply_on_non_contiguous_weight(write_safetensors):
    module = module_from(lokr_both_decomposed(), write_safetensors)
    storage = torch.randn(IN, OUT)
    weight = storage.T  # a transposed view: the strided kron view is impossible, rows are used instead
    want = weight + module.delta_weight()
    module.bind().apply_(weight, 1.0)
    assert rel_err(storage.T, want) < 1e-6


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr_low_rank"])
def test_row_chunking_matches_single_block(kind, write_safetensors, monkeypatch):
    module = module_from(BUILDERS[kind](), write_safetensors)
    weight = torch.randn(OUT, IN, dtype=torch.bfloat16)
    whole = weight.clone()
    module.bind().apply_(whole, 1.0)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", IN * 5)  # 5 rows per block, 48 rows: a ragged last block
    chunked = weight.clone()
    module.bind().apply_(chunked, 1.0)
    assert torch.equal(whole, chunked)


def test_half_precision_factors_are_computed_in_fp32(write_safetensors):
    tensors = {k: v.to(torch.bfloat16) for k, v in loha().items()}
    module = module_from(tensors, write_safetensors)
    assert module.alpha == 3.0
    fp32 = {k: v.float() for k, v in tensors.items() if k != "alpha"}
    want = 0.75 * ALGORITHMS["loha"].delta_weight(
        {"hada_w1_a": fp32["hada_w1_a"], "hada_w1_b": fp32["hada_w1_b"], "hada_w2_a": fp32["hada_w2_a"], "hada_w2_b": fp32["hada_w2_b"]}
    )
    assert module.delta_weight().dtype == torch.float32
    assert torch.equal(module.delta_weight(), want)


def test_diff_bias(write_safetensors):
    tensors = full_diff()
    module = module_from(tensors, write_safetensors)
    assert torch.equal(module.bind().delta_bias(), tensors["diff_b"])
    assert module_from(lora(), write_safetensors).bind().delta_bias() is None


def test_apply_rejects_wrong_target_shape(write_safetensors):
    module = module_from(lokr_full(), write_safetensors)
    with pytest.raises(ValueError, match=r"produces shape \[48, 40\].*\[40, 48\]"):
        module.bind().apply_(torch.zeros(IN, OUT))


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(0, OUT), (3, 17), (8, 40), (16, 24), (5, 6), (41, 48)])
def test_apply_to_a_row_range(kind, dtype, rows, write_safetensors, monkeypatch):
    """Row blocks (as merge works) give the rows of the whole-weight result: aligned LoKr groups through
    the strided view, partial groups and other algorithms through row-block deltas."""
    from comfyui_lycoris.lycoris_core.algorithms import lokr

    monkeypatch.setattr(lokr, "STAGE_ELEMENTS", 8 * IN)  # several fp32 stages per half-precision block
    module = module_from(BUILDERS[kind](), write_safetensors)
    start, stop = rows
    weight = torch.randn(OUT, IN).to(dtype)
    exact = weight.double() + 0.7 * module.delta_weight(torch.float64)
    block = weight[start:stop].clone()
    module.bind().apply_(block, 0.7, rows=Rows(start, stop))
    want = exact[start:stop]
    if dtype == torch.float32:
        assert rel_err(block, want) < 1e-6
    else:
        ulp = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((block.double() - want.to(dtype).double()).abs() <= ulp * 1.01).all()
