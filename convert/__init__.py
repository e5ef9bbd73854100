"""Key-layout conversion between Musubi, Diffusers and ComfyUI, exact and streamed.

    from comfyui_lycoris.convert import convert_file
    result = convert_file("in.safetensors", "out.safetensors", to="comfyui")
    print(result.summary())

`plan_conversion(adapter, to)` decides everything without writing (the output layout, what is
renamed, fused or split); `write_plan(plan, path)` streams it out.
"""

from .converter import (
    CONVERTED_FROM_KEY,
    TARGETS,
    ConversionPlan,
    ConversionResult,
    convert_file,
    plan_conversion,
    write_plan,
)

__all__ = [
    "CONVERTED_FROM_KEY",
    "TARGETS",
    "ConversionPlan",
    "ConversionResult",
    "convert_file",
    "plan_conversion",
    "write_plan",
]
