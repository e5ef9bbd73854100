"""Which layers the trainer adapts and the file it writes, against Musubi Tuner's own files.

The Musubi fixtures (tests/fixtures/musubi/) were written by Musubi's create_arch_network +
save_weights on tiny models of every architecture. Rebuilt from their layer names and shapes, our
trainer must pick exactly the layers Musubi adapted (default excludes, blocks), create the same
tensors (names, shapes, full-matrix rule, alpha value and dtype) and metadata keys, and compute the
`sshs_*` hashes as Musubi does. On ComfyUI's own models (names dumped from a real ComfyUI) it must
produce the same Musubi names, fused q/k/v split into row slices. A trained file must load in the
core and merge to the trained weights.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.nn as nn
from comfyui_lycoris.lycoris_core import read_adapter
from comfyui_lycoris.lycoris_core.errors import AdapterError
from comfyui_lycoris.lycoris_core.merge import merge
from comfyui_lycoris.lycoris_core.plan import make_plan
from comfyui_lycoris.lycoris_core.safetensors_io import SafetensorsReader, save_tensors
from comfyui_lycoris.lycoris_core.training import (
    TrainingConfig,
    inject_adapters,
    musubi_hashes,
    plan_targets,
    save_musubi,
)
from helpers import MUSUBI, comfy_names, expected_weights, manifest_files, module_paths, rel_err
from safetensors import safe_open

SOURCES = [e for e in manifest_files() if e["format"] == "musubi" and not e["file"].endswith(".expected.safetensors")]
IDS = [e["file"] for e in SOURCES]


def build_tree(shapes: dict[str, tuple], device="meta") -> nn.Module:
    """A module tree with a Linear (out, in) at every dotted path."""
    root = nn.Module()
    for path, (out_features, in_features) in shapes.items():
        parent = root
        *parents, leaf = path.split(".")
        for name in parents:
            if name not in parent._modules:
                parent.add_module(name, nn.Module())
            parent = parent._modules[name]
        parent.add_module(leaf, nn.Linear(in_features, out_features, device=device))
    return root


def fixture_layers(entry) -> tuple[dict[str, tuple], list[str]]:
    """({path: shape} of every Linear the fixture knows, adapted paths)."""
    expected = expected_weights(entry)
    shapes = {}
    for key, tensor in expected.items():
        kind, _, rest = key.partition("/")
        if kind in ("base", "unadapted"):
            shapes[rest[: -len(".weight")]] = tuple(tensor.shape)
    return shapes, module_paths(expected)


def fixture_config(entry, **changes) -> TrainingConfig:
    return TrainingConfig(
        algorithm=entry["algorithm"],
        rank=entry["network_dim_arg"],
        alpha=entry["alpha"],
        factor=entry["factor"] if entry["factor"] is not None else -1,
        architecture=entry["arch_id"],
        base_model_version=entry["ss_base_model_version"],
        **changes,
    )


@pytest.mark.parametrize("entry", SOURCES, ids=IDS)
def test_selects_the_layers_musubi_adapted(entry):
    shapes, adapted = fixture_layers(entry)
    targets, skipped = plan_targets(build_tree(shapes), entry["arch_id"])
    assert sorted(t.musubi_path for t in targets) == adapted
    assert all(t.rows is None and t.path == t.musubi_path for t in targets)


@pytest.mark.parametrize("entry", SOURCES, ids=IDS)
def test_saved_file_has_musubis_keys_shapes_alphas_and_metadata(entry, tmp_path):
    shapes, _ = fixture_layers(entry)
    model = build_tree(shapes, device="cpu")
    adapters = inject_adapters(model, fixture_config(entry))
    out = tmp_path / entry["file"]
    title = entry["metadata"]["modelspec.title"]
    timestamp = datetime.datetime(2026, 1, 1).timestamp()  # the fixtures' fixed modelspec.date
    save_musubi(out, adapters, title=title, timestamp=timestamp)
    with safe_open(str(out), "pt") as ours, safe_open(str(MUSUBI / entry["file"]), "pt") as theirs:
        assert sorted(ours.keys()) == sorted(theirs.keys())
        for key in theirs.keys():
            a, b = ours.get_tensor(key), theirs.get_tensor(key)
            assert (a.dtype, a.shape) == (b.dtype, b.shape), key
            if key.endswith(".alpha"):
                assert a.item() == b.item(), key  # 3.0 (= dim) for full-matrix LoKr, else 2.0
        our_meta, their_meta = ours.metadata(), theirs.metadata()
    assert set(their_meta) <= set(our_meta)
    for key in their_meta:
        if not key.startswith("sshs_"):
            assert our_meta[key] == their_meta[key], key
    # The hash is over our tensors: check it the way Musubi would recompute it from the file.
    with safe_open(str(out), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert (our_meta["sshs_model_hash"], our_meta["sshs_legacy_hash"]) == musubi_hashes(tensors, our_meta)
    adapter = read_adapter(out)
    assert adapter.format == "musubi" and adapter.architecture == entry["arch_id"]
    if entry["algorithm"] == "lokr":
        full = sum(m.rank is None for m in adapter.modules.values())
        assert (full, len(adapter.modules) - full) == (entry["lokr_modes"]["w2_full_modules"], entry["lokr_modes"]["w2_lowrank_modules"])


@pytest.mark.parametrize("entry", SOURCES, ids=IDS)
def test_hashes_reproduce_musubis(entry):
    with safe_open(str(MUSUBI / entry["file"]), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    assert musubi_hashes(tensors, metadata) == (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"])


def _hash_beyond_one_megabyte():
    # The legacy hash reads bytes 1 MiB .. 1 MiB + 64 KiB: only files that large have a real one.
    tensors = {"a.alpha": torch.tensor(1.0), "a.lokr_w1": torch.arange(300_000, dtype=torch.float32).reshape(600, 500)}
    return musubi_hashes(tensors, {"ss_x": "1", "modelspec.title": "ignored"}), musubi_hashes(tensors, {"ss_x": "1"})


def test_legacy_hash_reads_past_the_first_megabyte():
    (model_hash, legacy), (model_hash2, legacy2) = _hash_beyond_one_megabyte()
    assert (model_hash, legacy) == (model_hash2, legacy2)  # only ss_* metadata counts
    assert legacy != "e3b0c442"  # sha256 of nothing, what small files get


COMFY_ARCHS = ["wan", "hunyuan_video", "hunyuan_video_1_5", "flux", "flux2", "qwen_image", "z_image"]
FIXTURE_OF_ARCH = {e["arch_id"]: e for e in SOURCES if e["algorithm"] == "loha"}


@pytest.mark.parametrize("arch", COMFY_ARCHS)
def test_comfyui_model_gets_musubis_names(arch):
    """On ComfyUI's own model (real weight names), the adapters carry the names Musubi gives the
    same layers; ComfyUI's fused q/k/v get one adapter per row slice."""
    linears = {k[: -len(".weight")]: tuple(s) for k, s in comfy_names(arch).items() if k.endswith(".weight") and len(s) == 2}
    targets, _ = plan_targets(build_tree(linears), arch)
    _, adapted = fixture_layers(FIXTURE_OF_ARCH[arch])
    assert sorted(t.musubi_path for t in targets) == adapted
    shapes = dict(fixture_layers(FIXTURE_OF_ARCH[arch])[0])
    for t in targets:
        assert (t.out_features, t.in_features) == shapes[t.musubi_path]
        if t.rows is not None:
            assert t.path != t.musubi_path and t.rows.size == linears[t.path][0] // 3


def _randomize(adapters, scale=0.2):
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(std=scale)


@pytest.mark.parametrize("algorithm", ["lokr", "loha"])
def test_fused_qkv_adapters_change_their_row_slices(algorithm):
    # z_image in ComfyUI: one attention.qkv Linear (30 rows) stands for Musubi's to_q/to_k/to_v.
    model = build_tree({"layers.0.attention.qkv": (30, 10), "layers.0.attention.out": (10, 10)}, device="cpu")
    config = TrainingConfig(algorithm=algorithm, rank=2, alpha=1.0, architecture="z_image")
    adapters = inject_adapters(model, config)
    assert sorted(adapters.adapters) == [
        "lora_unet_layers_0_attention_to_k", "lora_unet_layers_0_attention_to_out_0",
        "lora_unet_layers_0_attention_to_q", "lora_unet_layers_0_attention_to_v",
    ]
    _randomize(adapters)
    qkv = model.layers._modules["0"].attention.qkv
    deltas = adapters.delta_weights()
    expected_weight = qkv.weight + torch.cat([deltas[f"lora_unet_layers_0_attention_to_{p}"] for p in "qkv"])
    x = torch.randn(4, 10)
    with torch.no_grad():
        assert rel_err(qkv(x), x @ expected_weight.T + qkv.bias) < 1e-6
        adapters.remove()
        assert rel_err(qkv(x), x @ qkv.weight.T + qkv.bias) < 1e-7


@pytest.mark.parametrize("algorithm", ["lokr", "loha"])
def test_trained_file_loads_and_merges_to_the_trained_weights(algorithm, tmp_path):
    entry = FIXTURE_OF_ARCH["wan"]
    shapes, _ = fixture_layers(entry)
    model = build_tree(shapes, device="cpu")
    base_file = tmp_path / "base.safetensors"
    save_tensors(base_file, {k: v.detach().clone() for k, v in model.state_dict().items()})
    adapters = inject_adapters(model, TrainingConfig(algorithm=algorithm, rank=3, alpha=2.0, architecture="wan"))
    _randomize(adapters)
    adapter_file = tmp_path / "trained.safetensors"
    save_musubi(adapter_file, adapters)
    trained = adapters.delta_weights()

    loaded = read_adapter(adapter_file)
    in_memory = adapters.to_adapter_file()
    assert set(loaded.modules) == set(in_memory.modules) == set(trained)
    for stem, delta in trained.items():
        assert torch.equal(loaded.modules[stem].delta_weight(), delta)
        assert torch.equal(in_memory.modules[stem].delta_weight(), delta)
    plan = make_plan(in_memory, {f"{k}.weight": tuple(v) for k, v in shapes.items()})
    assert len(plan.patches) == len(trained) and not plan.unmatched

    merged_file = tmp_path / "merged.safetensors"
    merge(base_file, merged_file, [(adapter_file, 0.5)], progress=False)
    with SafetensorsReader(merged_file) as reader:
        for stem, target in adapters.targets.items():
            want = model.get_submodule(target.path).weight + 0.5 * trained[stem]
            assert rel_err(reader.get(f"{target.path}.weight"), want) < 1e-6
        # The adapted model's output (hooks) equals the merged weight's output at strength 1.
        x = torch.randn(3, 10)
        q = model.get_submodule("blocks.0.self_attn.q")
        with torch.no_grad():
            adapted = q(x)
        assert rel_err(adapted, x @ (q.weight + trained["lora_unet_blocks_0_self_attn_q"]).T + q.bias) < 1e-6
    with pytest.raises(AdapterError, match="exists"):
        save_musubi(adapter_file, adapters)


def test_user_excludes_and_includes_follow_musubi():
    shapes, adapted = fixture_layers(FIXTURE_OF_ARCH["wan"])
    model = build_tree(shapes)
    # An exclude drops layers; an include only re-admits excluded ones, it never narrows the set.
    targets, _ = plan_targets(model, "wan", exclude=(r".*ffn.*",), include=(r"blocks\.0\.ffn\.0",))
    paths = sorted(t.musubi_path for t in targets)
    assert paths == sorted(p for p in adapted if ".ffn." not in p or p == "blocks.0.ffn.0")
    targets, _ = plan_targets(model, "wan", include=(r".*self_attn\.q",))
    assert sorted(t.musubi_path for t in targets) == adapted
    targets, _ = plan_targets(model, "wan", include=(r"head\.head",))  # outside the blocks: never a target
    assert sorted(t.musubi_path for t in targets) == adapted
    with pytest.raises(AdapterError, match="no layer to train"):
        inject_adapters(model, TrainingConfig(architecture="wan", exclude=(".*",)))


def test_bad_options_are_one_clear_error():
    for changes, word in [
        (dict(algorithm="lora"), "algorithm"), (dict(rank=0), "rank"), (dict(rank_dropout=1.0), "rank_dropout"),
        (dict(optimizer="LBFGS"), "optimizer"), (dict(optimizer="Nope"), "optimizer"), (dict(exclude=("(",)), "regex"),
        (dict(architecture="kandinsky5"), "Kandinsky"), (dict(architecture="wan", base_model_version="flux_kontext"), "base_model_version"),
        (dict(factor=0), "factor"), (dict(save_dtype="int8"), "save_dtype"),
    ]:
        with pytest.raises(AdapterError, match=word):
            TrainingConfig(**changes).validate()
