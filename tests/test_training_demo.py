"""`comfyui-lycoris demo`: the whole job on the built-in model, end to end, through the CLI."""

from __future__ import annotations

import json
import os

from comfyui_lycoris.cli import main
from comfyui_lycoris.demo import output_files
from comfyui_lycoris.lycoris_core import read_adapter


def test_demo_trains_saves_converts_merges_and_verifies(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "12"]) == 0
    printed = capsys.readouterr().out
    assert "verified" in printed and "detected as wan" in printed

    converter = _has_converter()
    assert sorted(os.listdir(out)) == sorted(output_files(convert=converter))
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["architecture"] == "wan"
    for entry in report["algorithms"]:
        assert len(entry["losses"]) == 12
        assert entry["reload_max_abs_err"] <= 1e-6 and entry["merge_max_rel_err"] <= 1e-5 and entry["output_max_rel_err"] <= 1e-5
        if converter:
            assert entry["convert_max_abs_err"] <= 1e-6
        adapter = read_adapter(entry["file"])
        assert adapter.format == "musubi" and adapter.architecture == "wan" and len(adapter.modules) == 20
        assert adapter.metadata["ss_network_module"] == f"networks.{entry['algorithm']}"
        assert adapter.metadata["modelspec.architecture"] == "wan2.1/lora"
    lokr = next(e for e in report["algorithms"] if e["algorithm"] == "lokr")
    assert lokr["full_matrix_layers"] > 0 and lokr["low_rank_layers"] > 0  # one file, both LoKr kinds

    png = (out / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image  # a test dependency: an independent PNG reader

    with Image.open(out / "loss_curve.png") as image:
        image.load()
        assert image.size == (640, 400)
        assert len(image.getcolors(1 << 16)) >= 4  # background, axes, two curves

    # A second run into the same folder refuses, in one line, and changes nothing.
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert main(["demo", "--out", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "exists" in err and "\n" not in err and "Traceback" not in err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def _has_converter() -> bool:
    try:
        from comfyui_lycoris.convert import convert_file  # noqa: F401
    except ImportError:
        return False
    return True
