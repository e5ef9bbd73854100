"""Where the pack's writing nodes put adapter files: ComfyUI's `output/loras` folder, which is also
registered as a `loras` folder so every LoRA loader (this pack's and ComfyUI's) lists what was
written there without a restart or a copy.
"""

from __future__ import annotations

import os

import folder_paths

from ..lycoris_core.errors import AdapterError
from .common import ADAPTER_FOLDER

OUTPUT_SUBFOLDER = "loras"  # the same place ComfyUI's own SaveLoRA node uses by default
EXTENSION = ".safetensors"


def output_loras_folder(create: bool = True) -> str:
    """`<output>/loras`, listed under `loras` (idempotent) and created unless `create` is False.

    Called on import and before every write, so a changed output directory (tests, --output-directory
    set by a launcher) is followed.
    """
    folder = os.path.abspath(os.path.join(folder_paths.get_output_directory(), OUTPUT_SUBFOLDER))
    if create:
        os.makedirs(folder, exist_ok=True)
    folder_paths.add_model_folder_path(ADAPTER_FOLDER, folder)
    return folder


def named_output(name: str, overwrite: bool) -> str:
    """The absolute path of `name` (may hold subfolders, `.safetensors` added) inside output/loras.

    Raises AdapterError for names that leave the folder, and for an existing file unless `overwrite`.
    """
    folder = output_loras_folder()
    name = name.strip()
    if name and not name.endswith(EXTENSION):
        name += EXTENSION
    path = _inside(folder, name, "output name")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path) and not overwrite:
        raise AdapterError(f"{path}: file exists; turn on 'overwrite' to replace it, or choose another name")
    return path


def numbered_output(filename_prefix: str) -> str:
    """A new file `<prefix>_<counter>_.safetensors` in output/loras, numbered like ComfyUI's SaveLoRA and
    image savers (the counter continues after the highest existing number for that prefix)."""
    folder = output_loras_folder()
    filename_prefix = filename_prefix.strip()
    _inside(folder, filename_prefix, "filename prefix")
    full_folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder)
    while True:  # the counter is one past the highest; step over any file created since
        path = os.path.join(full_folder, f"{filename}_{counter:05}_{EXTENSION}")
        if not os.path.exists(path):
            return path
        counter += 1


def _inside(folder: str, name: str, what: str) -> str:
    path = os.path.abspath(os.path.join(folder, name))
    if not name or os.path.commonpath([folder, path]) != folder or path == folder:
        raise AdapterError(f"{what} {name!r} must name a file inside the output/loras folder")
    return path


def listed_name(path: str) -> str:
    """The name under which the loaders list `path` (relative to output/loras, with `/`)."""
    return os.path.relpath(path, output_loras_folder(create=False)).replace(os.sep, "/")


output_loras_folder(create=False)  # list earlier outputs in the loaders from ComfyUI's start
