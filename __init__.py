"""comfyui-lycoris: LoHa / LoKr / LoRA adapters for ComfyUI, Musubi Tuner style.

ComfyUI imports this file as `custom_nodes/<folder>/__init__.py`. Importing it must work without
ComfyUI (the CLI and tests import it as `comfyui_lycoris`), so nothing ComfyUI-related is imported
here at module level: the nodes are imported when ComfyUI calls `comfy_entrypoint`.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: returns the pack's ComfyExtension (the node list is in nodes/__init__.py)."""
    from .nodes import LycorisExtension

    return LycorisExtension()
