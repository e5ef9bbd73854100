"""comfyui-lycoris core: pure PyTorch + safetensors, no ComfyUI.

read → plan → algorithm: `read_adapter` gives an `AdapterFile` of `ModuleAdapter`s whose math lives in
`algorithms/` (one module per algorithm).
"""

from .adapter_file import AdapterFile, ModuleAdapter, read_adapter
from .algorithms import ALGORITHMS
from .errors import AdapterError
from .safetensors_io import SafetensorsWriter, atomic_output, read_header, save_tensors

__all__ = [
    "ALGORITHMS",
    "AdapterError",
    "AdapterFile",
    "ModuleAdapter",
    "SafetensorsWriter",
    "atomic_output",
    "read_adapter",
    "read_header",
    "save_tensors",
]
