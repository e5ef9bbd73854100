"""The dataset folder format: what ComfyUI's nodes hand to training (latents of several sizes, conditioning
entries with their extra fields) comes back exactly, and a folder that is not right is refused with one
clear error before anything is read: pickle files (ComfyUI's own Save Training Dataset output), a missing
or truncated shard, tensors that differ from the index, an index that is not this format's."""

from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch
from comfyui_lycoris.lycoris_core.errors import AdapterError
from comfyui_lycoris.lycoris_core.safetensors_io import SafetensorsReader, read_header, save_tensors
from comfyui_lycoris.lycoris_core.training.data import training_data
from comfyui_lycoris.lycoris_core.training.dataset import Dataset, write_dataset


def comfy_inputs(seed=0):
    """LATENT and CONDITIONING lists as ComfyUI's dataset nodes make them: Resolution Bucket's batches of two sizes
    (one LATENT per bucket, one conditioning entry per sample), made in inference mode like every node output."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype)

    with torch.inference_mode():
        latents = [{"samples": randn(3, 4, 1, 8, 8)}, {"samples": randn(2, 4, 1, 8, 12)}]
        entries = []
        for i in range(5):
            extra = {"pooled_output": randn(1, 6, dtype=torch.bfloat16), "guidance": 3.5 + i,
                     "attention_mask": torch.ones(1, 7, dtype=torch.int64), "reference_latents": [randn(1, 4, 1, 8, 8)],
                     "area": (8, 8, 0, 0), "strength": 1.0, "clip_start": -math.inf, "note": f"caption {i}",
                     "flag": i % 2 == 0, "nothing": None, "nested": {"weights": [1, 2.5, randn(2)]}}
            entries.append([randn(1, 7, 16, dtype=torch.float16), extra])
        conditioning = [entries[:3], entries[3:]]
    return latents, conditioning


def assert_same(got, want, where="value"):
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), where
    else:
        assert got == want, where


@pytest.fixture
def written(tmp_path):
    samples = training_data(*comfy_inputs())
    folder = write_dataset(tmp_path / "data", samples, samples_per_shard=2)
    return folder, samples


def test_round_trip_is_exact_with_buckets_and_extra_fields(written):
    folder, samples = written
    assert sorted(os.listdir(folder)) == ["dataset.json", "shard-00000.safetensors", "shard-00001.safetensors",
                                          "shard-00002.safetensors"]
    with Dataset.open(folder) as data:
        assert len(data) == 5 and data.captions == 5
        assert [data.latent_shape(i) for i in range(5)] == [(4, 1, 8, 8)] * 3 + [(4, 1, 8, 12)] * 2
        assert data.describe() == "5 samples in 2 sizes (4×1×8×8: 3, 4×1×8×12: 2), 5 captions"
        for i in range(5):
            assert_same(data.latent(i), samples.latent(i), f"latent {i}")
            assert data.caption_of(i) == samples.caption_of(i)
            assert_same(data.caption(data.caption_of(i)), samples.caption(samples.caption_of(i)), f"caption {i}")
        assert data.caption_shape(4) == (1, 7, 16)


def test_one_caption_for_all_is_stored_once(tmp_path):
    latents, conditioning = comfy_inputs()
    samples = training_data(latents, [conditioning[0][:1]])
    folder = write_dataset(tmp_path / "one", samples, samples_per_shard=2)
    index = json.loads(open(os.path.join(folder, "dataset.json")).read())
    assert len(index["captions"]) == 1 and {s["caption"] for s in index["samples"]} == {0}
    stored = [k for shard in index["shards"] for k in read_header(os.path.join(folder, shard["file"])).tensors]
    assert sum(k.startswith("caption.") for k in stored) == 5  # cross_attn and its 4 extra tensors, in one shard
    with Dataset.open(folder) as data:
        assert_same(data.caption(0), samples.caption(0))


def test_open_reads_headers_only(written, monkeypatch):
    folder, _ = written
    reads = []
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, name: reads.append(name))
    Dataset.open(folder)
    assert reads == []


def error(folder) -> str:
    with pytest.raises(AdapterError) as e:
        Dataset.open(folder)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_shard(written):
    folder, _ = written
    os.remove(os.path.join(folder, "shard-00001.safetensors"))
    assert error(folder) == f"dataset {folder}: shard shard-00001.safetensors is missing (samples 2–3)"


def test_truncated_shard(written):
    folder, _ = written
    path = os.path.join(folder, "shard-00002.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    assert "shard-00002.safetensors: truncated file" in error(folder)


def test_tensor_differs_from_the_index(written):
    folder, _ = written
    path = os.path.join(folder, "shard-00001.safetensors")
    with SafetensorsReader(path) as reader:
        tensors = {k: reader.get(k) for k in reader.header.tensors}
    tensors["sample.3.latent"] = tensors["sample.3.latent"][..., :8].contiguous()
    save_tensors(path, tensors, overwrite=True)
    assert error(folder) == (f"dataset {folder}: sample 3's latent in shard-00001.safetensors is F32 [4, 1, 8, 8], "
                             "the index says F32 [4, 1, 8, 12]")


def test_comfyui_save_training_dataset_folder_is_refused_unread(tmp_path, monkeypatch):
    """ComfyUI's Save Training Dataset writes shard_0000.pkl (torch.save) and metadata.json: never unpickled."""
    folder = tmp_path / "training_dataset"
    folder.mkdir()
    latents, conditioning = comfy_inputs()
    with open(folder / "shard_0000.pkl", "wb") as f:
        torch.save({"latents": latents, "conditioning": conditioning}, f)
    (folder / "metadata.json").write_text(json.dumps({"num_samples": 2, "num_shards": 1, "shard_size": 1000}))
    unpickled = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: unpickled.append(1))
    monkeypatch.setattr(pickle, "Unpickler", lambda *a, **k: unpickled.append(1))
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(1))
    message = error(folder)
    assert message.startswith(f"dataset {folder}: holds pickle files (ComfyUI's Save Training Dataset output): shard_0000.pkl;")
    assert "never read" in message and not unpickled


def test_pickle_next_to_a_good_dataset_is_refused(written):
    folder, _ = written
    open(os.path.join(folder, "extra.pt"), "wb").close()
    assert "holds pickle files: extra.pt;" in error(folder)


@pytest.mark.parametrize("change,expected", [
    (lambda index: index.update(format="something"), "not a comfyui-lycoris-dataset index"),
    (lambda index: index.update(version=2), "version 2, this reader knows 1"),
    (lambda index: index["shards"][0].update(file="../elsewhere.safetensors"), "shards[0] must name a .safetensors file in the folder"),
    (lambda index: index["samples"][1].update(caption=9), "samples[1].caption must be an index below 5, not 9"),
    (lambda index: index["samples"][0].update(shape="4x8"), "samples[0].shape must be a list of sizes"),
    (lambda index: index["captions"][0]["extra"]["dict"].update(hook={"__reduce__": "os.system"}),
     "captions[0].extra.hook is not a value this format stores"),
    (lambda index: index["samples"][4].update(shape=[5, 1, 8, 12]), "latents differ in channels or dimensions"),
    (lambda index: index.update(samples=[]), "holds no samples"),
])
def test_bad_index(written, change, expected):
    folder, _ = written
    path = os.path.join(folder, "dataset.json")
    index = json.loads(open(path).read())
    change(index)
    with open(path, "w") as f:
        json.dump(index, f)
    assert expected in error(folder)


def test_not_a_dataset(tmp_path):
    assert error(tmp_path) == f"dataset {tmp_path}: no dataset.json (not a folder written by Save LyCORIS Dataset)"
    assert error(tmp_path / "nowhere") == f"dataset {tmp_path / 'nowhere'}: no such folder"
    (tmp_path / "dataset.json").write_text("{not json")
    assert error(tmp_path).startswith(f"dataset {tmp_path}: dataset.json: unreadable")


def test_writing_is_all_or_nothing(tmp_path, written):
    folder, samples = written
    with pytest.raises(AdapterError, match="exists"):
        write_dataset(folder, samples)
    latents, conditioning = comfy_inputs()
    conditioning[1][0][1]["control"] = object()  # a ControlNet: an object, not data
    bad = training_data(latents, conditioning)
    with pytest.raises(AdapterError, match=r"caption 3: field control holds a object, which a dataset cannot store"):
        write_dataset(tmp_path / "bad", bad, samples_per_shard=2)
    with pytest.raises(AdapterError):
        write_dataset(folder, bad, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no temporary folder left, the old dataset intact
    with Dataset.open(folder) as data:
        assert_same(data.latent(4), samples.latent(4))
    fewer = training_data(latents[:1], conditioning[:1])
    write_dataset(folder, fewer, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["data"]
    with Dataset.open(folder) as data:
        assert len(data) == 3
