"""Where the pack's writing nodes put files: adapters into ComfyUI's `output/loras`, baked models
into `output/diffusion_models`. Each output folder is also registered as a model folder of the same
kind, so the loaders (this pack's and ComfyUI's: LoRA loaders, Load Diffusion Model) list what was
written there without a restart or a copy.
"""

from __future__ import annotations

import os

import folder_paths

from ..lycoris_core.errors import AdapterError
from ..lycoris_core.safetensors_io import MAX_NAME_BYTES
from .common import ADAPTER_FOLDER

MODEL_FOLDER = "diffusion_models"  # what ComfyUI's UNETLoader lists
OUTPUT_KINDS = (ADAPTER_FOLDER, MODEL_FOLDER)  # output/<kind> is listed as a folder of <kind>
EXTENSION = ".safetensors"


def output_folder(kind: str = ADAPTER_FOLDER, create: bool = True) -> str:
    """`<output>/<kind>`, listed under `kind` (idempotent) and created unless `create` is False.

    Called on import and before every write, so a changed output directory (tests, --output-directory
    set by a launcher) is followed.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(kind)
    folder = os.path.abspath(os.path.join(folder_paths.get_output_directory(), kind))
    if create:
        os.makedirs(folder, exist_ok=True)
    folder_paths.add_model_folder_path(kind, folder)
    return folder


def output_loras_folder(create: bool = True) -> str:
    return output_folder(ADAPTER_FOLDER, create)


def named_output(name: str, overwrite: bool, kind: str = ADAPTER_FOLDER) -> str:
    """The absolute path of `name` (may hold subfolders, `.safetensors` added) inside output/<kind>.

    Raises AdapterError for names that leave the folder, and for an existing file unless `overwrite`.
    """
    folder = output_folder(kind)
    name = name.strip()
    if name and not name.endswith(EXTENSION):
        name += EXTENSION
    path = _inside(folder, name, "output name", kind)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path) and not overwrite:
        raise AdapterError(f"{path}: file exists; turn on 'overwrite' to replace it, or choose another name")
    return path


def numbered_output(filename_prefix: str) -> str:
    """A new file `<prefix>_<counter>_.safetensors` in output/loras, numbered like ComfyUI's SaveLoRA and
    image savers (the counter continues after the highest existing number for that prefix)."""
    folder = output_loras_folder()
    filename_prefix = filename_prefix.strip()
    _inside(folder, filename_prefix, "filename prefix", ADAPTER_FOLDER)
    full_folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder)
    while True:  # the counter is one past the highest; step over any file created since
        path = os.path.join(full_folder, f"{filename}_{counter:05}_{EXTENSION}")
        if not os.path.exists(path):
            return path
        counter += 1


def _inside(folder: str, name: str, what: str, kind: str) -> str:
    if "\0" in name:
        raise AdapterError(f"{what} {name!r} contains a NUL character")
    long = [part for part in name.replace(os.sep, "/").split("/") if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES]
    if long:
        raise AdapterError(f"{what} {name[:60]!r}...: a name of {len(long[0].encode('utf-8', 'surrogateescape'))} bytes "
                           f"is longer than a file name may be ({MAX_NAME_BYTES})")
    path = os.path.abspath(os.path.join(folder, name))
    if not name or os.path.commonpath([folder, path]) != folder or path == folder:
        raise AdapterError(f"{what} {name!r} must name a file inside the output/{kind} folder")
    return path


def listed_name(path: str, kind: str = ADAPTER_FOLDER) -> str:
    """The name under which the loaders list `path` (relative to output/<kind>, with `/`)."""
    return os.path.relpath(path, output_folder(kind, create=False)).replace(os.sep, "/")


for _kind in OUTPUT_KINDS:  # list earlier outputs in the loaders from ComfyUI's start
    output_folder(_kind, create=False)
