"""`ema`: post-hoc EMA of adapter checkpoints over s·ΔW, against references nobody here wrote.

ΔW of a Musubi fixture is Musubi's own merge minus the base (tests/fixtures/musubi/); ΔW of a perturbed
copy, the factor average and the EMA weights are computed in this file: the weights by running Musubi's
update (avg ← β·avg + (1 − β)·x) on one-hot vectors, γ of the power-function EMA as the largest real
root of the cubic in Karras et al. (numpy.roots), ΔW by the LyCORIS formulas from the raw tensors.
"""

from __future__ import annotations

import json
import math

import numpy
import pytest
import torch
from comfyui_lycoris.cli import main
from comfyui_lycoris.convert.ema import EMA_KEY, ema_file, ema_weights, power_ema_gamma
from comfyui_lycoris.lycoris_core import AdapterError, read_adapter
from helpers import MUSUBI, adapter_entries, expected_weights, module_paths, rel_err
from safetensors import safe_open
from safetensors.torch import save_file

LOKR_FILE = MUSUBI / "wan_lokr_r3_a2.safetensors"
LOHA_FILE = MUSUBI / "wan_loha_r4_a2.safetensors"
ENTRIES = {e["file"]: e for e in adapter_entries()}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is many times faster than two contending on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stem(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def musubi_deltas(name: str) -> dict[str, torch.Tensor]:
    """{stem: s·ΔW} of a fixture, as Musubi's own merge applies it (float64)."""
    expected = expected_weights(ENTRIES[name])
    return {stem(p): expected[f"merged/1.0/{p}.weight"].double() - expected[f"base/{p}.weight"].double()
            for p in module_paths(expected)}


SUFFIXES = ("lora_up.weight", "lora_down.weight", "lora_A.weight", "lora_B.weight", "alpha", "diff",
            "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def raw(path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """{stem: {suffix: tensor (float64)}} and the metadata, read with safetensors alone."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (not a dict)
            suffix = next(s for s in SUFFIXES if key.endswith("." + s))
            modules.setdefault(key[: -len(suffix) - 1], {})[suffix] = f.get_tensor(key).double()
        return modules, f.metadata()


def lokr_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """s·ΔW of a LoKr module (LyCORIS's rule: alpha / rank of w2, 1 for two full factors)."""
    if "lokr_w2" in t:
        return torch.kron(t["lokr_w1"], t["lokr_w2"])
    return torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * (float(t["alpha"]) / t["lokr_w2_b"].shape[0])


def perturbed_copy(tmp_path, source=LOKR_FILE, name="b.safetensors", seed=3, size=0.3) -> str:
    """The fixture with noise added to every factor (alphas kept): another checkpoint of the same adapter."""
    with safe_open(str(source), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    gen = torch.Generator().manual_seed(seed)
    for key, t in tensors.items():
        if not key.endswith(".alpha"):
            tensors[key] = t + size * torch.randn(t.shape, generator=gen)
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def musubi_schedule(count: int, beta=None, beta2=None, sigma_rel=None) -> list[float]:
    """Each checkpoint's weight, by running the running average of Musubi's script on one-hot inputs."""
    gamma = None
    if sigma_rel is not None:
        t = sigma_rel**-2
        roots = numpy.roots([1, 7, 16 - t, 12 - t])
        gamma = roots[numpy.isreal(roots) & (roots.real >= 0)].real.max()
    beta2 = beta if beta2 is None else beta2
    average = numpy.eye(count)[0]
    for i in range(count - 1):
        if gamma is not None:
            b = (1 - 1 / (i + 1)) ** (gamma + 1)
        else:
            b = beta + (beta2 - beta) * (i / (count - 2)) if count > 2 else beta
        average = average * b + numpy.eye(count)[i + 1] * (1 - b)
    return list(average)


def the_record(path) -> dict:
    return json.loads(raw(path)[1][EMA_KEY])[-1]


# ---------------------------------------------------------------------------------------------
# The weights


@pytest.mark.parametrize(("count", "schedule"), [
    (1, {"beta": 0.9}), (2, {"beta": 0.7}), (5, {"beta": 0.95}), (5, {"beta": 0.8, "beta2": 0.99}),
    (2, {"sigma_rel": 0.2}), (6, {"sigma_rel": 0.05}), (6, {"sigma_rel": 0.28}),
])
def test_weights_are_musubis_schedule(count, schedule):
    weights = ema_weights(count, **schedule)
    assert numpy.allclose(weights, musubi_schedule(count, **schedule), rtol=1e-12, atol=1e-15)
    assert abs(sum(weights) - 1) <= 1e-12


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_gamma_is_the_root_of_the_papers_cubic(sigma_rel):
    t = sigma_rel**-2
    roots = numpy.roots([1, 7, 16 - t, 12 - t])
    assert abs(power_ema_gamma(sigma_rel) - roots[numpy.isreal(roots) & (roots.real >= 0)].real.max()) <= 1e-9 * (1 + abs(t))


# ---------------------------------------------------------------------------------------------
# Over ΔW


@pytest.mark.parametrize("schedule", [{"beta": 0.9}, {"sigma_rel": 0.1}])
@pytest.mark.parametrize("name", ["wan_lokr_r3_a2.safetensors", "qwen_image_loha_r4_a2.safetensors"])
def test_the_ema_of_identical_checkpoints_is_the_checkpoint(name, schedule, tmp_path):
    out = tmp_path / "ema.safetensors"
    result = ema_file([MUSUBI / name] * 3, out, exact=True, **schedule)
    written = raw(out)[0]
    for key, delta in musubi_deltas(name).items():
        assert rel_err(written[_comfy_stem(written, key)]["diff"], delta) <= 1e-6, key
    assert result.factor_average_error <= 1e-12 and read_adapter(out).format == "comfyui"


@pytest.mark.parametrize("beta", [0.5, 0.7])
def test_two_lokr_checkpoints_average_their_delta_and_factor_averaging_is_off(beta, tmp_path):
    """Musubi's fixture and a perturbed copy at β = 0.5 (their mean) and 0.7: the written diff is
    β·ΔW_A + (1 − β)·ΔW_B, and the factor average (every tensor averaged, alphas equal) misses it by the
    error computed here."""
    b = perturbed_copy(tmp_path)
    out = tmp_path / "ema.safetensors"
    result = ema_file([LOKR_FILE, b], out, beta=beta, exact=True)
    assert result.weights == pytest.approx([beta, 1 - beta], abs=1e-15)
    a_modules, b_modules = raw(LOKR_FILE)[0], raw(b)[0]
    deltas_a = musubi_deltas("wan_lokr_r3_a2.safetensors")
    written = raw(out)[0]
    reports = {m.stem: m for m in result.modules}
    differences, averages = 0.0, 0.0
    for key, delta_a in deltas_a.items():
        want = beta * delta_a + (1 - beta) * lokr_delta(b_modules[key])
        diff = written[_comfy_stem(written, key)]["diff"]
        assert rel_err(diff, want) <= 1e-6, key
        averaged = {name: beta * t + (1 - beta) * b_modules[key][name] for name, t in a_modules[key].items()}
        off = lokr_delta(averaged) - want
        expected_error = float(off.norm() / want.norm())
        assert expected_error > 1e-3, key
        assert abs(reports[key].factor_error - expected_error) <= 1e-6 * expected_error + 1e-9, key
        differences += float(off.square().sum())
        averages += float(want.square().sum())
    overall = math.sqrt(differences / averages)
    assert abs(result.factor_average_error - overall) <= 1e-6 * overall
    record = the_record(out)
    assert record["factor_average_error"] == result.factor_average_error and record["exact"] is True
    assert record["weights"] == result.weights and record["beta"] == beta
    assert f"would be off by {overall:.3e} overall" in result.summary()


def _comfy_stem(written: dict, musubi_stem: str) -> str:
    """The comfyui- or diffusers-layout stem of a Wan or Qwen-Image module (their ComfyUI names are Musubi's,
    dotted)."""
    found = [s for s in written if s.replace(".", "_") == "diffusion_model_" + musubi_stem[len("lora_unet_") :]]
    assert len(found) == 1, musubi_stem
    return found[0]


def test_power_ema_over_three_checkpoints(tmp_path):
    b, c = perturbed_copy(tmp_path, seed=4), perturbed_copy(tmp_path, name="c.safetensors", seed=5)
    out = tmp_path / "ema.safetensors"
    result = ema_file([LOKR_FILE, b, c], out, sigma_rel=0.15, exact=True, to="diffusers")
    weights = musubi_schedule(3, sigma_rel=0.15)
    assert weights[0] == 0 and result.weights == pytest.approx(weights, rel=1e-12)
    modules = [raw(path)[0] for path in (LOKR_FILE, b, c)]
    written = raw(out)[0]
    for key in modules[0]:
        want = sum(w * lokr_delta(m[key]) for w, m in zip(weights, modules))
        assert rel_err(written[_comfy_stem(written, key)]["diff"], want) <= 1e-6, key


@pytest.mark.parametrize("rank", [1, 3])
def test_as_lora_the_error_is_eckart_youngs_of_the_average(rank, tmp_path):
    b = perturbed_copy(tmp_path, LOHA_FILE)
    out = tmp_path / "ema.safetensors"
    result = ema_file([LOHA_FILE, b], out, beta=0.6, rank=rank)
    a_modules, b_modules = raw(LOHA_FILE)[0], raw(b)[0]
    written, metadata = raw(out)

    def loha(t):
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (float(t["alpha"]) / t["hada_w1_b"].shape[0])

    for report in result.modules:
        want = 0.6 * loha(a_modules[report.stem]) + 0.4 * loha(b_modules[report.stem])
        s = torch.linalg.svdvals(want)
        optimal = float(s[rank:].norm() / s.norm())
        assert report.rank == rank and abs(report.error - optimal) <= 1e-9, report.stem
        t = written[report.stem]
        lora = t["lora_up.weight"] @ t["lora_down.weight"] * (float(t["alpha"]) / rank)
        assert abs(rel_err(lora, want) - optimal) <= 1e-6, report.stem
    assert metadata["ss_network_module"] == "networks.lora_wan" and metadata["ss_network_dim"] == str(rank)
    assert "sshs_model_hash" not in metadata and metadata["modelspec.title"] == "wan_loha_r4_a2"
    assert the_record(out)["source_network"]["ss_network_module"] == "networks.loha"


def test_checkpoints_of_different_algorithms_average_their_delta(tmp_path):
    """Wan's LoHa and LoKr fixtures adapt the same layers: their ΔW average exists, a factor average does not."""
    out = tmp_path / "ema.safetensors"
    result = ema_file([LOHA_FILE, LOKR_FILE], out, beta=0.25, exact=True)
    loha, lokr = musubi_deltas("wan_loha_r4_a2.safetensors"), musubi_deltas("wan_lokr_r3_a2.safetensors")
    written = raw(out)[0]
    for key in loha:
        assert rel_err(written[_comfy_stem(written, key)]["diff"], 0.25 * loha[key] + 0.75 * lokr[key]) <= 1e-6, key
    assert result.factor_average_error is None
    assert all(m.factor_why == "the checkpoints' algorithms differ" for m in result.modules)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def _rewritten(tmp_path, change, name="bad.safetensors") -> str:
    with safe_open(str(LOKR_FILE), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(tensors)
    save_file(tensors, str(tmp_path / name))
    return str(tmp_path / name)


def _drop(tensors, stem_name):
    for key in [k for k in tensors if k.startswith(stem_name + ".")]:
        del tensors[key]


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: _drop(t, "lora_unet_blocks_1_ffn_2"), r"not a checkpoint of the same adapter as .*: modules 1 only in .*wan_lokr_r3_a2"),
    (lambda t: t.update({"lora_unet_blocks_1_ffn_2.lokr_w1": torch.ones(2, 4)}),
     r"module lora_unet_blocks_1_ffn_2 changes a weight of shape \[10, 32\], but in .*wan_lokr_r3_a2.safetensors one of \[10, 40\]"),
    (lambda t: t["lora_unet_blocks_0_self_attn_q.lokr_w1"].__setitem__((0, 0), float("nan")), r"bad.safetensors: .*lora_unet_blocks_0_self_attn_q.lokr_w1"),
])
def test_bad_checkpoints_are_refused_and_nothing_is_written(change, message, tmp_path):
    bad = _rewritten(tmp_path, change)
    with pytest.raises(AdapterError, match=message):
        ema_file([LOKR_FILE, bad], tmp_path / "ema.safetensors", beta=0.5, exact=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


@pytest.mark.parametrize(("options", "message"), [
    ({"exact": True}, "exactly one of a beta and a sigma_rel"),
    ({"beta": 0.5, "sigma_rel": 0.1, "exact": True}, "exactly one of a beta and a sigma_rel"),
    ({"beta": 1.5, "exact": True}, "beta must be between 0 and 1"),
    ({"sigma_rel": 0.3, "exact": True}, "sigma_rel must be above 0 and at most 0.2887"),
    ({"beta2": 0.9, "sigma_rel": 0.1, "exact": True}, "beta2 moves beta linearly"),
    ({"beta": 0.5}, "exactly one of a rank and a maximum error"),
    ({"beta": 0.5, "rank": 2, "exact": True}, "give one of a rank, a maximum error and exact"),
])
def test_bad_options_are_refused(options, message, tmp_path):
    with pytest.raises(AdapterError, match=message):
        ema_file([LOKR_FILE, LOKR_FILE], tmp_path / "ema.safetensors", **options)


def test_exact_in_the_musubi_layout_is_refused(tmp_path):
    with pytest.raises(AdapterError, match="musubi layout holds no full differences.*nothing written"):
        ema_file([LOKR_FILE, LOKR_FILE], tmp_path / "ema.safetensors", beta=0.5, exact=True, to="musubi")
    assert list(tmp_path.iterdir()) == []


class Stop(Exception):
    pass


def test_progress_counts_every_module_and_a_stop_leaves_nothing(tmp_path):
    """`on_progress(done, total)` after each module averaged and each written; raising from it (ComfyUI's Cancel)
    while averaging or while writing leaves no output and no temporary file."""
    b = perturbed_copy(tmp_path)
    calls = []
    ema_file([LOKR_FILE, b], tmp_path / "ema.safetensors", beta=0.8, rank=2, on_progress=lambda *c: calls.append(c))
    modules = len(read_adapter(LOKR_FILE).modules)
    assert calls == [(i, 2 * modules) for i in range(1, 2 * modules + 1)]
    for stop_at in (1, modules + 1, len(calls)):
        def stop(done, total, stop_at=stop_at):
            if done == stop_at:
                raise Stop

        with pytest.raises(Stop):
            ema_file([LOKR_FILE, b], tmp_path / "stopped.safetensors", beta=0.8, rank=2, on_progress=stop)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "ema.safetensors"]


def test_cli_prints_the_table_and_errors_are_one_line(tmp_path, capsys):
    b = perturbed_copy(tmp_path)
    out = tmp_path / "ema.safetensors"
    assert main(["ema", str(LOKR_FILE), b, str(out), "--power-ema", "0.2", "--rank", "4", "--max-modules", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["module", "written", "as"])
    assert all(row.split()[1:4] == ["lora", "rank", "4"] for row in lines[header + 1 : header + 3])
    assert lines[header + 3].strip().startswith("... and 22 more modules")
    assert "would be off by" in lines[-1]
    assert read_adapter(out).format == "musubi"

    bad = _rewritten(tmp_path, lambda t: _drop(t, "lora_unet_blocks_0_ffn_0"))
    assert main(["ema", str(LOKR_FILE), bad, str(tmp_path / "o2.safetensors"), "--beta", "0.9", "--exact"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("comfyui-lycoris ema: error: ")
    assert not (tmp_path / "o2.safetensors").exists()
