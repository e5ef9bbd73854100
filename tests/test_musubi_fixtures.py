"""Every Musubi reference file: our per-module delta reproduces Musubi's own merge (fp32, ≤ 1e-5)."""

from __future__ import annotations

import pytest
import torch
from comfyui_lycoris.lycoris_core import read_adapter
from helpers import MUSUBI, adapter_entries, expected_weights, module_paths, rel_err, stem_of

ENTRIES = adapter_entries()


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_delta_weight_reproduces_musubi_merge(entry):
    adapter = read_adapter(MUSUBI / entry["file"])
    expected = expected_weights(entry)
    paths = module_paths(expected)
    assert len(adapter.modules) == len(paths) == entry.get("module_count", len(paths))
    for path in paths:
        module = adapter.modules[stem_of(entry, path)]
        base = expected[f"base/{path}.weight"]
        for strength in ("1.0", "0.5"):
            want = expected[f"merged/{strength}/{path}.weight"]
            got = base + float(strength) * module.delta_weight()
            assert rel_err(got, want) <= 1e-5, (path, strength)
            applied = base.clone()
            module.bind().apply_(applied, float(strength))
            assert rel_err(applied, want) <= 1e-5, (path, strength)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["format"] == "musubi"], ids=lambda e: e["file"])
def test_file_facts_match_manifest(entry):
    adapter = read_adapter(MUSUBI / entry["file"])
    assert adapter.format == "musubi"
    assert adapter.metadata == entry["metadata"]
    assert adapter.unknown_keys == []
    algorithms = {m.algorithm for m in adapter.modules.values()}
    assert algorithms == {entry["algorithm"]}
    scales = sorted({round(m.scale, 6) for m in adapter.modules.values()})
    assert scales == sorted(round(s, 6) for s in entry["scales"])
    alphas = sorted({m.alpha for m in adapter.modules.values()})
    assert alphas == sorted(entry["stored_alpha_values"])
    if entry["algorithm"] == "lokr":
        full = sum(m.rank is None for m in adapter.modules.values())
        assert full == entry["lokr_modes"]["w2_full_modules"]
        assert len(adapter.modules) - full == entry["lokr_modes"]["w2_lowrank_modules"]
    else:
        assert {m.rank for m in adapter.modules.values()} == {entry["rank"]}


def test_diffusers_copies_are_read_as_dotted_layout():
    for entry in ENTRIES:
        if entry["format"] != "musubi":
            adapter = read_adapter(MUSUBI / entry["file"])
            assert adapter.format == "diffusers"
            assert all(stem.startswith(entry["diffusers_prefix"] + ".") for stem in adapter.modules)


def test_expected_weights_are_fp32():
    expected = expected_weights(ENTRIES[0])
    assert all(t.dtype == torch.float32 for t in expected.values())
