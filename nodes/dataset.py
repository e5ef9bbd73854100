"""LycorisSaveDataset: what Train LyCORIS takes (latents and their conditioning, one or lists of them, buckets of
different sizes included) written as a dataset folder for the `train` command: safetensors shards and a JSON
index, never pickle (lycoris_core/training/dataset.py says why and how)."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from ..lycoris_core.errors import AdapterError
from ..lycoris_core.training.data import training_data
from ..lycoris_core.training.dataset import SAMPLES_PER_SHARD, write_dataset
from .common import ADVANCED, show_text, showing_failures

CATEGORY = "training/lycoris"
DATASET_FOLDER = "datasets"  # inside ComfyUI's output folder


def datasets_folder() -> str:
    return os.path.abspath(os.path.join(folder_paths.get_output_directory(), DATASET_FOLDER))


def dataset_path(name: str) -> str:
    """output/datasets/<name> (subfolders allowed), or AdapterError for a name that leaves that folder."""
    folder = datasets_folder()
    name = name.strip().strip("/\\")
    path = os.path.abspath(os.path.join(folder, name))
    if not name or "\0" in name or os.path.commonpath([folder, path]) != folder or path == folder:
        raise AdapterError(f"dataset name {name!r} must name a folder inside output/{DATASET_FOLDER}")
    return path


class LycorisSaveDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisSaveDataset",
            display_name="Save LyCORIS Dataset",
            category=CATEGORY,
            description="Saves latents and their conditioning (what Train LyCORIS takes, e.g. from Make Training Dataset "
            "or Resolution Bucket) into output/datasets/<name> as safetensors shards and a JSON index, for training "
            "outside the queue (comfyui-lycoris train, on one GPU or several). No pickle: safe to share and to load.",
            is_input_list=True,  # the dataset nodes send lists of latents and conditionings
            inputs=[
                io.Latent.Input("latents", tooltip="The training latents; every batch item is one sample (sizes may "
                                "differ, e.g. Resolution Bucket's batches)."),
                io.Conditioning.Input("conditioning", tooltip="Their captions: one conditioning for all latents, or one "
                                      "per latent (in order), with their extra fields (pooled output, guidance, ...)."),
                io.String.Input("name", default="lycoris_dataset",
                                tooltip="The dataset's folder inside output/datasets (subfolders allowed)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a dataset of this name (only once the new one is complete)."),
                io.Int.Input("samples_per_shard", default=SAMPLES_PER_SHARD, min=1, max=100000, **ADVANCED,
                             tooltip="Samples per safetensors file."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The dataset folder written (absolute path).")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latents, conditioning, name, overwrite, samples_per_shard) -> io.NodeOutput:
        name, overwrite, samples_per_shard = name[0], overwrite[0], samples_per_shard[0]  # is_input_list
        with showing_failures(cls):
            samples = training_data(latents, conditioning)
            path = write_dataset(dataset_path(name), samples, samples_per_shard, overwrite)
        shards = len([n for n in os.listdir(path) if n.endswith(".safetensors")])
        where = os.path.relpath(path, folder_paths.get_output_directory()).replace(os.sep, "/")
        text = f"saved {samples.describe()} in output/{where} ({shards} shard{'s' * (shards != 1)})"
        show_text(cls, text)
        return io.NodeOutput(path, ui=ui.PreviewText(text))
