"""Trainable LoKr/LoHa layers against lycoris-lora's modules (forward path, never merge_to).

Given the same factors, our layer's output change and every gradient (factors and input) must equal
what `lycoris.modules.LokrModule` / `LohaModule` compute through their normal (rebuild) forward, in
every execution path: LoKr bypass and materialize; LoHa factored, rebuild (also in several row
blocks) and materialize. Shapes follow Musubi (= LyCORIS with decompose_both off).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

lycoris_modules = pytest.importorskip("lycoris.modules", reason="lycoris-lora (test extra) is not installed")
from comfyui_lycoris.lycoris_core.algorithms.lokr import factorization  # noqa: E402
from comfyui_lycoris.lycoris_core.algorithms.lokr import trainable_shapes as lokr_shapes  # noqa: E402
from comfyui_lycoris.lycoris_core.training import make_adapter  # noqa: E402
from comfyui_lycoris.lycoris_core.training import modules as training_modules  # noqa: E402
from helpers import rel_err  # noqa: E402
from lycoris.functional import factorization as lycoris_factorization  # noqa: E402

DIMS = [4, 6, 8, 10, 12, 16, 18, 24, 26, 30, 32, 40, 48, 64]
SETTINGS = settings(max_examples=25, deadline=None)


@pytest.mark.parametrize(
    "dim, factor, expected",
    [(512, -1, (16, 32)), (512, 4, (4, 128)), (5120, -1, (64, 80)), (3072, -1, (48, 64)),
     (13824, -1, (108, 128)), (5120, 7, (5, 1024))],
)
def test_factorization_spec_examples(dim, factor, expected):
    assert factorization(dim, factor) == expected


@settings(max_examples=200, deadline=None)
@given(dim=st.integers(1, 20000), factor=st.sampled_from([-1, 1, 2, 3, 4, 5, 7, 8, 16, 64]))
def test_factorization_equals_lycoris(dim, factor):
    assert factorization(dim, factor) == tuple(lycoris_factorization(dim, factor))


def _lycoris(algorithm, out_features, in_features, rank, alpha, factor, multiplier):
    base = nn.Linear(in_features, out_features, bias=False)
    nn.init.zeros_(base.weight)  # LyCORIS returns W0·x + (W'-W0)·x: with W0 = 0 that is its ΔW·x exactly
    if algorithm == "lokr":
        ref = lycoris_modules.LokrModule("x", base, multiplier=multiplier, lora_dim=rank, alpha=alpha, factor=factor)
    else:
        ref = lycoris_modules.LohaModule("x", base, multiplier=multiplier, lora_dim=rank, alpha=alpha)
    return base, ref


def check_against_lycoris(algorithm, out_features, in_features, rank, alpha, factor, multiplier, tokens, configure):
    # Both sides run in float64: the two implementations sum in different orders, and in fp32 a
    # scalar factor's gradient (a sum over every output, input and token) can legitimately differ by
    # ~1e-5 relative when its terms cancel. In float64 that noise is ~1e-13, so 1e-9 tests the math.
    ours = make_adapter(algorithm, out_features, in_features, rank, alpha, factor, multiplier=multiplier).double()
    configure(ours)
    base, ref = _lycoris(algorithm, out_features, in_features, rank, alpha, factor, multiplier)
    base.double()
    ref.double()
    ref_params = dict(ref.named_parameters())
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == {n: tuple(p.shape) for n, p in ref_params.items()}
    assert ours.scale == pytest.approx(ref.scale) and float(ours.alpha) == pytest.approx(float(ref.alpha))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
            ref_params[name].copy_(p)
    ref.apply_to()

    x = torch.randn(2, tokens, in_features, dtype=torch.float64)
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours = ours(x_ours)
    y_ref = base(x_ref)
    assert y_ours.dtype == torch.float64
    assert rel_err(y_ours.detach(), y_ref.detach()) < 1e-9
    grad = torch.randn_like(y_ref)
    (y_ours * grad).sum().backward()
    (y_ref * grad).sum().backward()
    assert rel_err(x_ours.grad, x_ref.grad) < 1e-9
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, ref_params[name].grad) < 1e-9, name


@SETTINGS
@given(
    out_features=st.sampled_from(DIMS), in_features=st.sampled_from(DIMS), rank=st.integers(1, 8),
    alpha=st.sampled_from([0.5, 1.0, 2.0, 8.0]), factor=st.sampled_from([-1, 2, 4, 8]),
    multiplier=st.sampled_from([1.0, 0.7]), tokens=st.integers(1, 6), mode=st.sampled_from(["bypass", "materialize"]),
)
def test_lokr_forward_and_gradients_match_lycoris(out_features, in_features, rank, alpha, factor, multiplier, tokens, mode):
    def configure(layer):
        layer.mode = mode

    check_against_lycoris("lokr", out_features, in_features, rank, alpha, factor, multiplier, tokens, configure)


@SETTINGS
@given(
    out_features=st.sampled_from(DIMS), in_features=st.sampled_from(DIMS), rank=st.integers(1, 8),
    alpha=st.sampled_from([0.5, 1.0, 2.0, 8.0]), multiplier=st.sampled_from([1.0, 1.3]), tokens=st.integers(1, 6),
    path=st.sampled_from(["factored", "rebuild", "materialize", "auto"]),
)
def test_loha_forward_and_gradients_match_lycoris(out_features, in_features, rank, alpha, multiplier, tokens, path):
    def configure(layer):
        if path == "materialize":
            layer.mode = "materialize"
        else:
            layer.path = path

    check_against_lycoris("loha", out_features, in_features, rank, alpha, -1, multiplier, tokens, configure)


def test_loha_rebuild_in_row_blocks_matches_lycoris(monkeypatch):
    # Force _HadaLinear to build ΔW in several blocks of rows (forward and backward).
    monkeypatch.setattr(training_modules, "HADA_BLOCK_ELEMENTS", 3 * 24)

    def configure(layer):
        layer.path = "rebuild"

    check_against_lycoris("loha", 40, 24, 3, 2.0, -1, 1.0, 5, configure)


@pytest.mark.parametrize("out_features, in_features, rank, factor", [(64, 48, 4, -1), (64, 48, 1, -1), (64, 48, 4, 4), (48, 64, 16, 4)])
def test_lokr_shapes_and_alpha_follow_musubi(out_features, in_features, rank, factor):
    # Musubi's own module (checked by hand): full w2 => scale 1 and alpha saved = network_dim.
    layer = make_adapter("lokr", out_features, in_features, rank, 2.0, factor)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == lokr_shapes(out_features, in_features, rank, factor)
    if "lokr_w2" in shapes:
        assert layer.full_matrix and layer.scale == 1.0 and float(layer.alpha) == rank
    else:
        assert not layer.full_matrix and layer.scale == 2.0 / rank and float(layer.alpha) == 2.0


@pytest.mark.parametrize("algorithm", ["lokr", "loha"])
def test_initial_delta_is_zero(algorithm):
    layer = make_adapter(algorithm, 48, 64, 4, 1.0, 4)
    zero = {"lokr": ("lokr_w2_b",), "loha": ("hada_w2_a",)}[algorithm]
    for name, p in layer.named_parameters():
        assert (not p.any()) == (name in zero), name
    assert not layer.delta_weight().any()
    assert not layer(torch.randn(3, 64)).any()


def _saved_for_backward(layer, x):
    """Shapes of every tensor autograd keeps for the backward of layer(x)."""
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum()
    return saved


@pytest.mark.parametrize("algorithm, path, rank", [("lokr", None, 8), ("loha", "factored", 2), ("loha", "rebuild", 8)])
def test_backward_never_keeps_a_full_size_delta(algorithm, path, rank):
    out_features, in_features = 64, 48
    layer = make_adapter(algorithm, out_features, in_features, rank, 1.0, 4)
    if path:
        layer.path = path
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(3, in_features, requires_grad=True)
    def full_size(saved):
        return [s for s in saved if torch.Size(s).numel() >= out_features * in_features]

    assert full_size(_saved_for_backward(layer, x)) == []
    # The Musubi-style reference does keep ΔW (F.linear saves it): the check above can fail.
    layer.mode = "materialize"
    assert full_size(_saved_for_backward(layer, x))


@pytest.mark.parametrize("algorithm", ["lokr", "loha"])
def test_rank_dropout_masks_output_rows_as_musubi(algorithm):
    p = 0.4
    layer = make_adapter(algorithm, 24, 16, 2, 1.0, -1, rank_dropout=p)
    with torch.no_grad():
        for q in layer.parameters():
            q.normal_()
    x = torch.randn(5, 16)
    layer.train()
    torch.manual_seed(123)
    got = layer(x).detach()
    # Musubi: drop = rand(out) > p on ΔW rows (dim 0), whole delta times 1/(1-p).
    torch.manual_seed(123)
    keep = (torch.rand(24) > p).float()
    expected = x @ (layer.delta_weight() * keep[:, None]).T / (1 - p)
    assert rel_err(got, expected) < 1e-5
    assert 0 < int(keep.sum()) < 24
    layer.eval()
    assert rel_err(layer(x).detach(), x @ layer.delta_weight().T) < 1e-5


def test_module_dropout_skips_the_layer_with_probability_p():
    layer = make_adapter("lokr", 24, 16, 2, 1.0, -1, module_dropout=0.3)
    with torch.no_grad():
        for q in layer.parameters():
            q.normal_()
    layer.train()
    torch.manual_seed(7)
    skipped = [layer(torch.randn(2, 16)) is None for _ in range(400)]
    torch.manual_seed(7)
    expected = []
    for _ in range(400):
        torch.randn(2, 16)  # the input, drawn before the layer runs
        expected.append(bool(torch.rand(1) < 0.3))  # Musubi: torch.rand(1) < p skips the module
    assert skipped == expected
    assert 80 < sum(skipped) < 160
    layer.eval()
    assert all(layer(torch.randn(2, 16)) is not None for _ in range(20))
