"""Save LyCORIS Dataset inside a real ComfyUI: what ComfyUI's dataset nodes hand to training (Resolution Bucket's
batches of two sizes, conditioning entries with pooled output, attention mask, guidance and reference latents) is
written into output/datasets/<name> and read back exactly; Train LyCORIS trains on the same bucketed inputs."""

from __future__ import annotations

import math
import os

import pytest
import torch
from comfyui_host import require_comfyui

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI


@pytest.fixture
def output(comfy_env, tmp_path):
    fp = comfy_env.folder_paths
    old = fp.get_output_directory()
    fp.set_output_directory(str(tmp_path / "output"))
    yield tmp_path / "output"
    fp.set_output_directory(old)


def bucketed(seed=0, channels=16):
    """Resolution Bucket's outputs: one LATENT per size, and per size a list of one conditioning entry per sample."""
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        latents = [{"samples": torch.randn(2, channels, 1, 8, 8, generator=gen)}, {"samples": torch.randn(1, channels, 1, 8, 12, generator=gen)}]
        entries = [[torch.randn(1, 7, 8, generator=gen).to(torch.bfloat16),
                    {"pooled_output": torch.randn(1, 8, generator=gen), "attention_mask": torch.ones(1, 7, dtype=torch.bool),
                     "guidance": 3.5, "reference_latents": [torch.randn(1, channels, 1, 8, 8, generator=gen)]}] for _ in range(3)]
    return latents, [entries[:2], entries[2:]]


def save(env, latents, conditioning, name="buckets", overwrite=False):
    with torch.inference_mode():
        return env.node("LycorisSaveDataset").execute(latents=latents, conditioning=conditioning, name=[name],
                                                      overwrite=[overwrite], samples_per_shard=[2])


def test_saved_dataset_reads_back_exactly(comfy_env, output):
    latents, conditioning = bucketed()
    result = save(comfy_env, latents, conditioning)
    (path,) = result.args
    assert path == str(output / "datasets" / "buckets")
    assert list(result.ui.as_dict()["text"]) == ["saved 3 samples in 2 sizes (16×1×8×8: 2, 16×1×8×12: 1), 3 captions in "
                                                 "output/datasets/buckets (2 shards)"]
    assert not any(name.endswith((".pkl", ".pt")) for name in os.listdir(path))
    samples = [s for latent in latents for s in latent["samples"]]
    entries = [e for c in conditioning for e in c]
    with comfy_env.core.training.dataset.Dataset.open(path) as data:
        assert len(data) == 3
        for i in range(3):
            assert torch.equal(data.latent(i), samples[i])
            cross_attn, extra = data.caption(data.caption_of(i))
            assert cross_attn.dtype == torch.bfloat16 and torch.equal(cross_attn, entries[i][0])
            assert sorted(extra) == sorted(entries[i][1]) and extra["guidance"] == 3.5
            for key in ("pooled_output", "attention_mask"):
                assert extra[key].dtype == entries[i][1][key].dtype and torch.equal(extra[key], entries[i][1][key])
            assert torch.equal(extra["reference_latents"][0], entries[i][1]["reference_latents"][0])


def test_names_and_overwriting(comfy_env, output):
    latents, conditioning = bucketed()
    save(comfy_env, latents, conditioning, "mine")
    with pytest.raises(comfy_env.core.AdapterError, match="exists"):
        save(comfy_env, latents, conditioning, "mine")
    with pytest.raises(comfy_env.core.AdapterError, match="must name a folder inside output/datasets"):
        save(comfy_env, latents, conditioning, "../elsewhere")
    fewer = [latents[0]], [conditioning[0]]
    (path,) = save(comfy_env, *fewer, "mine", overwrite=True).args
    with comfy_env.core.training.dataset.Dataset.open(path) as data:
        assert len(data) == 2
    assert sorted(os.listdir(output / "datasets")) == ["mine"]  # nothing half-written left behind


def test_objects_in_conditioning_are_refused_by_name(comfy_env, output):
    latents, conditioning = bucketed()
    conditioning[1][0][1]["control"] = comfy_env.comfy.model_patcher  # a ControlNet or any object: not data
    with pytest.raises(comfy_env.core.AdapterError, match=r"caption 2: field control holds a module, which a dataset cannot store"):
        save(comfy_env, latents, conditioning)
    assert not (output / "datasets" / "buckets").exists()


def test_train_node_trains_on_buckets(comfy_env):
    """Train LyCORIS takes the bucketed lists too (one forward pass per sample, whatever its size)."""
    gen = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        mp = comfy_env.build("wan", seed=4, out_dim=16)
        latents = [{"samples": torch.randn(2, 16, 1, 8, 8, generator=gen)}, {"samples": torch.randn(1, 16, 1, 8, 12, generator=gen)}]
        conditioning = [[[torch.randn(1, 7, 8, generator=gen), {}] for _ in range(2)], [[torch.randn(1, 5, 8, generator=gen), {}]]]
    mp.cached_patcher_init = (lambda disable_dynamic=False: comfy_env.build("wan", seed=4, out_dim=16), ())
    inputs = dict(model=mp, latents=latents, positive=conditioning, algorithm="lokr", rank=2, alpha=1.0, factor=-1, steps=2,
                  learning_rate=0.01, optimizer="AdamW", batch_size=3, seed=0, warmup_steps=0, gradient_checkpointing=True,
                  architecture="auto", rank_dropout=0.0, module_dropout=0.0, include="", exclude="")
    with torch.inference_mode():
        adapter, _ = comfy_env.node("LycorisTrain").execute(
            **{k: v if k in ("latents", "positive") else [v] for k, v in inputs.items()}).args
    assert adapter.steps == 2 and all(math.isfinite(x) and x > 0 for x in adapter.losses)
    assert all(d.abs().max() > 0 for d in adapter.adapters.delta_weights().values())


def test_node_info(comfy_env):
    info = comfy_env.node("LycorisSaveDataset").GET_NODE_INFO_V1()
    assert (info["category"], info["output"], info["output_node"]) == ("training/lycoris", ["STRING"], True)
    is_input_list = info["is_input_list"] if "is_input_list" in info else comfy_env.node("LycorisSaveDataset").INPUT_IS_LIST
    assert is_input_list
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), name
