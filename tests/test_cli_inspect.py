"""`comfyui-lycoris inspect`: the table, the stable JSON, and one-line errors with no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import MUSUBI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comfyui_lycoris", *args], capture_output=True, text=True, timeout=120)


def test_inspect_json_on_a_musubi_lokr_file():
    result = run_cli("inspect", str(MUSUBI / "wan_lokr_r3_a2.safetensors"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "musubi"
    assert report["architecture"] == "wan"
    assert report["module_count"] == 24
    assert report["algorithms"] == {"lokr": 24}
    assert report["lokr"] == {"full": 20, "low_rank": 4}
    assert report["scales"] == {"1": 20, "0.666667": 4}
    assert report["alphas"] == {"3": 20, "2": 4}
    assert report["dtypes"] == {"F32": 20 * 3 + 4 * 4}  # alpha+w1+w2, or alpha+w1+w2_a+w2_b
    assert report["nonfinite_values"] == 0
    assert report["problems"] == []
    assert report["metadata"]["ss_network_module"] == "networks.lokr"
    first = next(m for m in report["modules"] if m["stem"] == "lora_unet_blocks_0_ffn_0")
    assert first["lokr_mode"] in ("full", "low_rank") and first["shape"] == [40, 10]


def test_inspect_table_lists_unknown_keys_and_nan(write_safetensors):
    w = torch.randn(2, 4)
    w[0, 0] = float("nan")
    path = write_safetensors(
        {
            "lora_unet_x.lora_up.weight": torch.randn(4, 2), "lora_unet_x.lora_down.weight": w,
            "lora_unet_x.lora_down.bias": torch.randn(2), "stray_tensor": torch.zeros(1),
        }
    )
    result = run_cli("inspect", path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "unknown keys" in out and "stray_tensor" in out and "lora_unet_x.lora_down.bias" in out
    assert "lora_unet_x.lora_down.weight: 1 non-finite values" in out
    assert "lora_unet_x" in out and "lora" in out


def test_inspect_user_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    result = run_cli("inspect", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert str(bad) in lines[0] and "corrupt safetensors header" in lines[0]


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("comfyui-lycoris")
    assert exe, "the comfyui-lycoris console script is not on PATH"
    result = subprocess.run([exe, "inspect", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--json" in result.stdout


def test_demo_default_folder_never_collides(tmp_path, monkeypatch):
    from comfyui_lycoris.cli import _fresh_folder

    monkeypatch.chdir(tmp_path)
    assert _fresh_folder("comfyui-lycoris-demo") == "comfyui-lycoris-demo"
    (tmp_path / "comfyui-lycoris-demo").mkdir()
    (tmp_path / "comfyui-lycoris-demo-2").mkdir()
    assert _fresh_folder("comfyui-lycoris-demo") == "comfyui-lycoris-demo-3"


def test_cli_polish():
    """--version, a description on every command, --arch choices without the refused Kandinsky 5."""
    from comfyui_lycoris import __version__
    from comfyui_lycoris.cli import build_parser

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"comfyui-lycoris {__version__}"
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        assert sub.description and len(sub.description) > 60, name
    for name in ("merge", "convert"):
        arch = next(a for a in commands[name]._actions if a.dest == "arch")
        assert "wan" in arch.choices and "kandinsky5" not in arch.choices


@pytest.mark.parametrize("to", ["comfyui", "diffusers", "musubi"])
def test_inspect_names_the_layout_a_conversion_wrote(tmp_path, to):
    """Wan's ComfyUI and Diffusers-layout names are the same keys; the conversion's record tells them apart."""
    out = tmp_path / f"{to}.safetensors"
    assert run_cli("convert", str(MUSUBI / "wan_lokr_r3_a2.safetensors"), str(out), "--to", to).returncode == 0
    report = json.loads(run_cli("inspect", "--json", str(out)).stdout)
    assert report["format"] == to and report["source"].startswith(f"comfyui-lycoris conversion ({to} layout")


def test_files_that_are_not_safetensors_say_so(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is text\n" * 10)
    result = run_cli("inspect", str(text))
    assert result.returncode == 2 and result.stderr.strip().endswith("not a safetensors file (it does not start with a header length and a JSON header)")
