"""Training datasets on disk: latents and their captions as safetensors shards plus a small JSON index.

    <folder>/dataset.json              the index: every sample and caption, where its tensors are
    <folder>/shard-00000.safetensors   the tensors of a run of samples (and of the captions they use first)
    <folder>/shard-00001.safetensors   ...

Nothing here is pickle. ComfyUI's own Save Training Dataset node writes `torch.save` pickles, and loading a
pickle can run code that the file brings along (`weights_only` narrows that, and has had escapes); a dataset
is something people download and share, so it is stored as data only: tensors in safetensors files (a JSON
header and raw bytes, validated before anything is read) and everything else as JSON. A folder with pickle
files in it is refused, never read.

A caption is one ComfyUI conditioning entry: the cross-attention tensor and its extra fields (pooled_output,
attention_mask, guidance, reference_latents, ...). The extra fields are stored as JSON values with their
tensors in the shard: `{"tensor": name, "dtype": "F32", "shape": [...]}` for a tensor, `{"dict": {...}}`,
`{"tuple": [...]}`, `{"float": "inf"}` for a non-finite float, and plain JSON for lists, strings, integers,
finite floats, booleans and null. Objects (a ControlNet, hooks) cannot be stored and are refused by name.

`Dataset.open` checks the whole folder before training starts (no pickle, the index, every shard there and
every tensor in it with the index's dtype and shape) and then reads one sample at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import OrderedDict

import torch

from ..errors import AdapterError
from ..safetensors_io import PICKLE_SUFFIXES, SafetensorsReader, dtype_name, save_tensors
from .data import Samples

FORMAT = "comfyui-lycoris-dataset"
VERSION = 1
INDEX = "dataset.json"
SHARD = "shard-{:05d}.safetensors"
SAMPLES_PER_SHARD = 256
MAX_INDEX_BYTES = 256 << 20
REFUSED_SUFFIXES = (*PICKLE_SUFFIXES, ".pkl", ".pickle")


# ---------------------------------------------------------------------------------------------
# Writing


def write_dataset(folder: str | os.PathLike, samples: Samples, samples_per_shard: int = SAMPLES_PER_SHARD,
                  overwrite: bool = False) -> str:
    """Write `samples` as a dataset folder; returns its absolute path.

    The folder appears complete or not at all (written under a temporary name next to it, then renamed).
    An existing folder is refused unless `overwrite`, and then replaced only once the new one is complete.
    """
    folder = os.path.abspath(os.fspath(folder))
    if samples_per_shard < 1:
        raise AdapterError(f"samples per shard must be at least 1, not {samples_per_shard}")
    if not len(samples):
        raise AdapterError(f"{folder}: no samples to write")
    if os.path.lexists(folder) and not overwrite:
        raise AdapterError(f"{folder}: exists (choose another name, or overwrite)")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise AdapterError(f"{folder}: exists and is not a folder")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    temp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", suffix=".tmp", dir=parent)
    try:
        _write_into(temp, samples, samples_per_shard)
        if os.path.lexists(folder):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old.", suffix=".tmp", dir=parent)
            os.replace(folder, os.path.join(old, "dataset"))
            os.replace(temp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return folder


def _write_into(folder: str, samples: Samples, samples_per_shard: int) -> None:
    records, records_of_captions, shards = [], [], []
    captions: dict[int, int] = {}  # the samples' caption index -> the dataset's
    for first in range(0, len(samples), samples_per_shard):
        shard = len(shards)
        tensors: dict[str, torch.Tensor] = {}
        for i in range(first, min(first + samples_per_shard, len(samples))):
            latent = samples.latent(i)
            if not isinstance(latent, torch.Tensor):
                raise AdapterError(f"sample {i}: the latent is {type(latent).__name__}, not a tensor")
            name = f"sample.{i}.latent"
            tensors[name] = _plain(latent)
            caption = samples.caption_of(i)
            if caption not in captions:  # numbered in order of first use, stored with that sample
                captions[caption] = len(captions)
                records_of_captions.append(_encode_caption(samples.caption(caption), captions[caption], shard, tensors))
            records.append({"shard": shard, "latent": name, **_tensor_info(latent), "caption": captions[caption]})
        file = SHARD.format(shard)
        save_tensors(os.path.join(folder, file), tensors)
        shards.append({"file": file, "bytes": os.path.getsize(os.path.join(folder, file))})
    index = {"format": FORMAT, "version": VERSION, "samples": records, "captions": records_of_captions, "shards": shards}
    with open(os.path.join(folder, INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy that can be written outside inference mode (ComfyUI makes its tensors in it)."""
    tensor = tensor.detach().cpu()
    if tensor.is_inference():
        with torch.inference_mode(False):
            return tensor.clone()
    return tensor.contiguous()


def _tensor_info(tensor: torch.Tensor) -> dict:
    return {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}


def _encode_caption(entry, caption: int, shard: int, tensors: dict[str, torch.Tensor]) -> dict:
    """The JSON record of one conditioning entry; its tensors go into `tensors` (the shard's)."""
    where = f"caption {caption}"
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], dict):
        raise AdapterError(f"{where}: a conditioning entry is [tensor, dict], not {type(entry).__name__}")
    cross_attn, extra = entry
    if cross_attn is not None and not isinstance(cross_attn, torch.Tensor):
        raise AdapterError(f"{where}: the conditioning tensor is {type(cross_attn).__name__}")
    counter = iter(range(1 << 62))

    def encode(value, path: str):
        if isinstance(value, torch.Tensor):
            name = f"caption.{caption}.{next(counter)}"
            tensors[name] = _plain(value)
            return {"tensor": name, **_tensor_info(value)}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"float": str(value)}
        if isinstance(value, list):
            return [encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"tuple": [encode(v, f"{path}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise AdapterError(f"{where}: field {path} has a key {bad[0]!r} that is not a string")
            return {"dict": {k: encode(v, f"{path}.{k}" if path else k) for k, v in value.items()}}
        raise AdapterError(f"{where}: field {path} holds a {type(value).__name__}, which a dataset cannot store "
                           "(only tensors, numbers, strings, lists and dicts of them); train without it")

    return {"shard": shard, "cross_attn": encode(cross_attn, "cross_attn"), "extra": encode(extra, "")}


# ---------------------------------------------------------------------------------------------
# Reading


class Dataset(Samples):
    """A dataset folder, checked whole by `open` and then read one tensor at a time."""

    OPEN_SHARDS = 4  # shard files kept open (samples are mostly read in runs from one shard)

    def __init__(self, folder: str, index: dict, shapes: list[tuple[int, ...]]):
        self.folder = folder
        self._samples = index["samples"]
        self._captions = index["captions"]
        self._shards = [os.path.join(folder, s["file"]) for s in index["shards"]]
        self._shapes = shapes
        self._readers: OrderedDict[int, SafetensorsReader] = OrderedDict()

    @classmethod
    def open(cls, folder: str | os.PathLike) -> Dataset:
        folder = os.path.abspath(os.fspath(folder))
        refuse_pickle(folder)
        index = _read_index(folder)
        _check_shards(folder, index)
        shapes = [tuple(s["shape"]) for s in index["samples"]]
        return cls(folder, index, shapes)

    def __len__(self) -> int:
        return len(self._samples)

    def latent_shape(self, index: int) -> tuple[int, ...]:
        return self._shapes[index]

    def latent(self, index: int) -> torch.Tensor:
        record = self._samples[index]
        return self._reader(record["shard"]).get(record["latent"])

    def caption_of(self, index: int) -> int:
        return self._samples[index]["caption"]

    @property
    def captions(self) -> int:
        return len(self._captions)

    def caption(self, index: int) -> list:
        record = self._captions[index]
        reader = self._reader(record["shard"])

        def decode(value):
            if isinstance(value, list):
                return [decode(v) for v in value]
            if isinstance(value, dict):
                if "tensor" in value:
                    return reader.get(value["tensor"])
                if "dict" in value:
                    return {k: decode(v) for k, v in value["dict"].items()}
                if "tuple" in value:
                    return tuple(decode(v) for v in value["tuple"])
                return float(value["float"])
            return value

        return [decode(record["cross_attn"]), decode(record["extra"])]

    def caption_shape(self, index: int) -> tuple[int, ...] | None:
        """The shape of caption `index`'s cross-attention tensor (None where it has none), from the index."""
        value = self._captions[index]["cross_attn"]
        return tuple(value["shape"]) if isinstance(value, dict) else None

    def _reader(self, shard: int) -> SafetensorsReader:
        reader = self._readers.pop(shard, None) or SafetensorsReader(self._shards[shard])
        self._readers[shard] = reader
        while len(self._readers) > self.OPEN_SHARDS:
            self._readers.popitem(last=False)[1].close()
        return reader

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def refuse_pickle(folder: str) -> None:
    """AdapterError if `folder` is not a folder or holds pickle files (checked before anything is read)."""
    if not os.path.isdir(folder):
        raise AdapterError(f"dataset {folder}: " + ("not a folder" if os.path.exists(folder) else "no such folder"))
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise AdapterError(f"dataset {folder}: cannot list the folder ({e.strerror or e})") from None
    pickles = [n for n in names if n.lower().endswith(REFUSED_SUFFIXES)]
    if pickles:
        shown = ", ".join(pickles[:3]) + (f" and {len(pickles) - 3} more" if len(pickles) > 3 else "")
        comfy = " (ComfyUI's Save Training Dataset output)" if any(n.startswith("shard_") and n.endswith(".pkl") for n in pickles) else ""
        raise AdapterError(f"dataset {folder}: holds pickle files{comfy}: {shown}; pickle can run code when it is loaded, "
                           "so it is never read: save the latents and conditioning with Save LyCORIS Dataset instead")


def _read_index(folder: str) -> dict:
    path = os.path.join(folder, INDEX)
    where = f"dataset {folder}: {INDEX}"
    if not os.path.isfile(path):
        raise AdapterError(f"dataset {folder}: no {INDEX} (not a folder written by Save LyCORIS Dataset)")
    if os.path.getsize(path) > MAX_INDEX_BYTES:
        raise AdapterError(f"{where}: larger than {MAX_INDEX_BYTES >> 20} MB")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterError(f"{where}: unreadable ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise AdapterError(f"{where}: not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise AdapterError(f"{where}: version {index.get('version')!r}, this reader knows {VERSION}")
    shards, samples, captions = index.get("shards"), index.get("samples"), index.get("captions")
    if not (isinstance(shards, list) and isinstance(samples, list) and isinstance(captions, list)):
        raise AdapterError(f"{where}: needs lists 'shards', 'samples' and 'captions'")
    if not samples:
        raise AdapterError(f"{where}: holds no samples")
    for i, shard in enumerate(shards):
        file = shard.get("file") if isinstance(shard, dict) else None
        if not isinstance(file, str) or os.path.basename(file) != file or not file.endswith(".safetensors") or file.startswith("."):
            raise AdapterError(f"{where}: shards[{i}] must name a .safetensors file in the folder")
    for i, sample in enumerate(samples):
        _check_record(where, f"samples[{i}]", sample, {"shard": len(shards), "caption": len(captions)}, ("latent",))
        _check_tensor(where, f"samples[{i}]", sample)
    for c, caption in enumerate(captions):
        _check_record(where, f"captions[{c}]", caption, {"shard": len(shards)}, ())
        if "cross_attn" not in caption or "extra" not in caption:
            raise AdapterError(f"{where}: captions[{c}] needs 'cross_attn' and 'extra'")
        _check_value(where, f"captions[{c}].cross_attn", caption["cross_attn"])
        _check_value(where, f"captions[{c}].extra", caption["extra"])
        if caption["cross_attn"] is not None and "tensor" not in caption["cross_attn"]:
            raise AdapterError(f"{where}: captions[{c}].cross_attn must be a tensor or null")
        if not (isinstance(caption["extra"], dict) and "dict" in caption["extra"]):
            raise AdapterError(f"{where}: captions[{c}].extra must be a dict")
    kinds = sorted({(len(s["shape"]), s["shape"][0] if s["shape"] else 0) for s in samples})
    if len(kinds) > 1 or not kinds[0][0]:
        raise AdapterError(f"{where}: latents differ in channels or dimensions "
                           f"({', '.join(f'{c} channels, {d} dims' for d, c in kinds)})")
    return index


def _check_record(where: str, what: str, record, bounds: dict[str, int], names: tuple[str, ...]) -> None:
    if not isinstance(record, dict):
        raise AdapterError(f"{where}: {what} is not an object")
    for key, bound in bounds.items():
        value = record.get(key)
        if type(value) is not int or not 0 <= value < bound:
            raise AdapterError(f"{where}: {what}.{key} must be an index below {bound}, not {value!r}")
    for key in names:
        if not isinstance(record.get(key), str):
            raise AdapterError(f"{where}: {what}.{key} must be a tensor name")


def _check_tensor(where: str, what: str, record: dict) -> None:
    shape, dtype = record.get("shape"), record.get("dtype")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise AdapterError(f"{where}: {what}.shape must be a list of sizes, not {shape!r}")
    if not isinstance(dtype, str):
        raise AdapterError(f"{where}: {what}.dtype must be a safetensors dtype name, not {dtype!r}")


def _check_value(where: str, what: str, value, depth: int = 0) -> None:
    """An encoded value is one of the forms the writer makes, and nothing else."""
    if depth > 32:
        raise AdapterError(f"{where}: {what} is nested too deeply")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_value(where, f"{what}[{i}]", v, depth + 1)
        return
    if isinstance(value, dict) and len(value) in (1, 3):
        if "tensor" in value and isinstance(value["tensor"], str):
            _check_tensor(where, what, value)
            return
        if len(value) == 1 and isinstance(value.get("dict"), dict):
            for k, v in value["dict"].items():
                _check_value(where, f"{what}.{k}", v, depth + 1)
            return
        if len(value) == 1 and isinstance(value.get("tuple"), list):
            _check_value(where, what, value["tuple"], depth + 1)
            return
        if len(value) == 1 and value.get("float") in ("inf", "-inf", "nan"):
            return
    raise AdapterError(f"{where}: {what} is not a value this format stores")


def _check_shards(folder: str, index: dict) -> None:
    """Every shard is there and holds every tensor the index puts in it, with the index's dtype and shape."""
    wanted: dict[int, dict[str, tuple[str, str, list]]] = {}
    for i, sample in enumerate(index["samples"]):
        wanted.setdefault(sample["shard"], {})[sample["latent"]] = (f"sample {i}'s latent", sample["dtype"], sample["shape"])
    for c, caption in enumerate(index["captions"]):
        for name, dtype, shape in _tensors_in(caption["cross_attn"]) + _tensors_in(caption["extra"]):
            wanted.setdefault(caption["shard"], {})[name] = (f"caption {c}'s tensor {name}", dtype, shape)
    for shard, file in enumerate(s["file"] for s in index["shards"]):
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            users = [i for i, s in enumerate(index["samples"]) if s["shard"] == shard]
            held = f" (samples {users[0]}–{users[-1]})" if users else ""
            raise AdapterError(f"dataset {folder}: shard {file} is missing{held}")
        with SafetensorsReader(path) as reader:
            header = reader.header.tensors
        for name, (what, dtype, shape) in wanted.get(shard, {}).items():
            entry = header.get(name)
            if entry is None:
                raise AdapterError(f"dataset {folder}: {file} lacks {what}")
            if dtype_name(entry.dtype) != dtype or list(entry.shape) != shape:
                raise AdapterError(f"dataset {folder}: {what} in {file} is {dtype_name(entry.dtype)} {list(entry.shape)}, "
                                   f"the index says {dtype} {shape}")


def _tensors_in(value) -> list[tuple[str, str, list]]:
    if isinstance(value, list):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        if "tensor" in value:
            return [(value["tensor"], value["dtype"], value["shape"])]
        inner = value.get("dict", {}).values() if "dict" in value else value.get("tuple", [])
        return [t for v in inner for t in _tensors_in(v)]
    return []
