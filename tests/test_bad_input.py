"""Bad input: bad files and paths get one clear error naming what is wrong, and nothing is written."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from comfyui_lycoris.lycoris_core import AdapterError, SafetensorsWriter, read_adapter, save_tensors
from comfyui_lycoris.lycoris_core.safetensors_io import TensorEntry, atomic_output

GOOD = {
    "lora_unet_a.hada_w1_a": torch.randn(8, 4), "lora_unet_a.hada_w1_b": torch.randn(4, 8),
    "lora_unet_a.hada_w2_a": torch.randn(8, 4), "lora_unet_a.hada_w2_b": torch.randn(4, 8),
    "lora_unet_a.alpha": torch.tensor(2.0),
}


def raw_file(tmp_path, header: bytes, data: bytes = b"", name="bad.safetensors") -> str:
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def expect_error(path, pattern):
    with pytest.raises(AdapterError, match=pattern) as info:
        read_adapter(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_truncated_file(write_safetensors, tmp_path):
    path = write_safetensors(GOOD)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    expect_error(cut, "truncated file")


def test_truncated_inside_header(write_safetensors, tmp_path):
    data = open(write_safetensors(GOOD), "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:40])
    expect_error(cut, "truncated or not a safetensors file")


def test_corrupt_header(tmp_path):
    expect_error(raw_file(tmp_path, b'{"a": {"dtype": "F32", "sha'), "corrupt safetensors header")
    expect_error(raw_file(tmp_path, b'{"a": [1, 2, 3]}', name="list.safetensors"), "entry 'a' is not an object")
    expect_error(raw_file(tmp_path, b"{\xff\xfe}", name="bin.safetensors"), "corrupt safetensors header")
    # A safetensors header is a JSON object: anything else is not a safetensors file at all.
    expect_error(raw_file(tmp_path, b"[1, 2, 3]", name="array.safetensors"), "not a safetensors file")


def test_oversized_header(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 200 * 1000 * 1000) + b"{}")
    expect_error(path, "larger than the 100 MB limit")


def test_not_a_safetensors_file(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("this is a text file, not tensors\n" * 4)
    expect_error(text, "not a safetensors file")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    expect_error(empty, "not a safetensors file")
    expect_error(tmp_path / "missing.safetensors", "no such file")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    expect_error(folder, "is a directory")


def test_inconsistent_offsets(tmp_path):
    header = {"a.lokr_w1": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "a.lokr_w2": {"dtype": "F32", "shape": [2, 2], "data_offsets": [20, 36]}}
    expect_error(raw_file(tmp_path, json.dumps(header).encode(), bytes(36)), "inconsistent offsets")
    wrong_size = {"a.lokr_w1": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}
    expect_error(raw_file(tmp_path, json.dumps(wrong_size).encode(), bytes(12), "size.safetensors"), "needs 16 bytes")
    trailing = {"a.lokr_w1": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    expect_error(raw_file(tmp_path, json.dumps(trailing).encode(), bytes(24), "trail.safetensors"), "after the last tensor")
    bad_dtype = {"a.lokr_w1": {"dtype": "F33", "shape": [2, 2], "data_offsets": [0, 16]}}
    expect_error(raw_file(tmp_path, json.dumps(bad_dtype).encode(), bytes(16), "dt.safetensors"), "unsupported dtype")


def test_integer_weights_are_refused(write_safetensors):
    bad = dict(GOOD, **{"lora_unet_a.hada_w1_a": torch.ones(8, 4, dtype=torch.int32)})
    expect_error(write_safetensors(bad), r"module lora_unet_a: hada_w1_a has dtype I32, expected a float type")


def test_rank_mismatch_names_module_and_shapes(write_safetensors):
    bad = dict(GOOD, **{"lora_unet_a.hada_w1_b": torch.randn(3, 8)})
    message = expect_error(write_safetensors(bad), r"module lora_unet_a \(loha\): rank mismatch")
    assert "hada_w1_a [8, 4]" in message and "hada_w1_b [3, 8]" in message


def test_halves_of_different_shape(write_safetensors):
    bad = dict(GOOD, **{"lora_unet_a.hada_w2_a": torch.randn(6, 4)})
    expect_error(write_safetensors(bad), r"two halves differ in shape: \[8, 8\] vs \[6, 8\]")


def test_incomplete_modules(write_safetensors):
    missing = {k: v for k, v in GOOD.items() if not k.endswith("hada_w2_b")}
    expect_error(write_safetensors(missing), r"module lora_unet_a \(loha\): missing hada_w2_b")
    lokr = {"lora_unet_b.lokr_w1": torch.randn(2, 2), "lora_unet_b.lokr_w2_a": torch.randn(4, 2)}
    expect_error(write_safetensors(lokr), r"module lora_unet_b \(lokr\): missing lokr_w2_b")
    lora = {"lora_unet_c.lora_up.weight": torch.randn(4, 2)}
    expect_error(write_safetensors(lora), r"module lora_unet_c \(lora\): missing down")


def test_mixed_and_duplicate_tensors_in_one_module(write_safetensors):
    mixed = dict(GOOD, **{"lora_unet_a.lokr_w1": torch.randn(2, 2)})
    expect_error(write_safetensors(mixed), "mixes tensors of loha and lokr")
    twice = {"m.lora_up.weight": torch.randn(4, 2), "m.lora_B.weight": torch.randn(4, 2), "m.lora_down.weight": torch.randn(2, 4)}
    expect_error(write_safetensors(twice), "up is given twice")


def test_alpha_must_be_one_finite_value(write_safetensors):
    expect_error(write_safetensors(dict(GOOD, **{"lora_unet_a.alpha": torch.tensor([1.0, 2.0])})), "alpha must be a single value")
    expect_error(write_safetensors(dict(GOOD, **{"lora_unet_a.alpha": torch.tensor(float("nan"))})), "alpha is nan")


def test_dora_scale_must_fit(write_safetensors):
    expect_error(write_safetensors(dict(GOOD, **{"lora_unet_a.dora_scale": torch.ones(5, 1)})), "dora_scale")


def test_no_adapter_tensors(write_safetensors):
    expect_error(write_safetensors({"model.weight": torch.randn(2, 2)}), "no LoRA/LoHa/LoKr/diff modules")


def test_nan_weights_are_counted(write_safetensors):
    bad = dict(GOOD)
    w = bad["lora_unet_a.hada_w2_b"].clone()
    w[0, :3] = float("nan")
    w[1, 0] = float("inf")
    bad["lora_unet_a.hada_w2_b"] = w
    adapter = read_adapter(write_safetensors(bad))  # readable: inspect must be able to show it
    assert adapter.nonfinite_counts() == {"lora_unet_a.hada_w2_b": 4}
    with pytest.raises(AdapterError, match=r"4 non-finite values \(NaN/Inf, or float64 beyond float32.s range\) in lora_unet_a.hada_w2_b \(4\)"):
        adapter.check_finite()


def test_existing_output_is_never_replaced(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(AdapterError, match="output file exists"):
        save_tensors(out, {"a": torch.zeros(2)})
    assert out.read_bytes() == b"precious"
    save_tensors(out, {"a": torch.zeros(2)}, overwrite=True)
    assert out.read_bytes() != b"precious"
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "new.safetensors"
    layout = [TensorEntry("a", torch.float32, (2,)), TensorEntry("b", torch.float32, (3,))]
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(out, layout) as writer:
            writer.write("a", torch.zeros(2))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(AdapterError, match="'b' was never written"):
        with SafetensorsWriter(out, layout) as writer:
            writer.write("a", torch.zeros(2))
    assert os.listdir(tmp_path) == []
    with pytest.raises(AdapterError, match="does not match the planned"):
        with SafetensorsWriter(out, layout) as writer:
            writer.write("a", torch.zeros(3))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        with atomic_output(out) as tmp:
            open(tmp, "wb").write(b"partial")
            raise ValueError("stop")
    assert os.listdir(tmp_path) == []


def test_writer_output_reads_back_exactly(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "w": torch.randn(3, 5).to(torch.bfloat16), "a": torch.tensor(2.0, dtype=torch.float16),
        "f8": torch.randn(4, 4).to(torch.float8_e4m3fn), "i": torch.arange(7, dtype=torch.int64),
    }
    out = tmp_path / "w.safetensors"
    save_tensors(out, tensors, metadata={"k": "v"})
    back = load_file(str(out))
    assert all(torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)) for k, v in tensors.items())
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"k": "v"}


def test_outputs_get_the_usual_file_mode(tmp_path):
    out = tmp_path / "mode.safetensors"
    save_tensors(out, {"a": torch.zeros(2)})
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask


def test_writer_takes_a_tensor_in_row_blocks(tmp_path):
    from safetensors.torch import load_file

    big = torch.randn(10, 3).to(torch.bfloat16)
    layout = [TensorEntry("big", torch.bfloat16, (10, 3)), TensorEntry("small", torch.float32, ())]
    out = tmp_path / "rows.safetensors"
    with SafetensorsWriter(out, layout) as writer:
        writer.write_rows("big", big[:4])
        writer.write_rows("big", big[4:9])
        writer.write_rows("big", big[9:])
        writer.write("small", torch.tensor(1.5))
    back = load_file(str(out))
    assert torch.equal(back["big"], big) and back["small"].item() == 1.5
    for bad_parts, message in (
        ([big[:4], big[:7]], "more data than planned"),
        ([big[:4].float()], "does not match the planned"),
        ([big[:4, :2]], "does not match the planned"),
    ):
        with pytest.raises(AdapterError, match=message):
            with SafetensorsWriter(tmp_path / "bad.safetensors", layout) as writer:
                for part in bad_parts:
                    writer.write_rows("big", part)
        assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(AdapterError, match="'big' was only partly written"):
        with SafetensorsWriter(tmp_path / "short.safetensors", layout) as writer:
            writer.write_rows("big", big[:4])
