"""comfyui-lycoris: LoHa / LoKr / LoRA adapters for ComfyUI, Musubi Tuner style.

ComfyUI imports this file as `custom_nodes/<folder>/__init__.py`. Importing it must work without
ComfyUI (the CLI and tests import it as `comfyui_lycoris`), so nothing ComfyUI-related is imported
here at module level.
"""

__version__ = "0.1.0"
