"""ComfyUI's side of a training step, shared by the Train LyCORIS node and the `train` command: a model's
denoised (x0) prediction for a noised latent and one conditioning entry, computed the way ComfyUI's sampling
computes it (the entry turned into the model's inputs by `process_conds`, the prediction by `calc_cond_batch`:
the model's own extra inputs, patches and wrappers), the model's latent scaling, and `model_sampling` for the
noise schedule. Also loading a diffusion-model file through ComfyUI, for the command.

The objective itself (noise, sigma, loss, batches) is the core's: lycoris_core/training/objective.py.
"""

from __future__ import annotations

import contextlib

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd
import torch

from ..lycoris_core.architectures import describe_architecture
from ..lycoris_core.errors import AdapterError

WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
                 "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ComfyDenoiser:
    """`denoiser(xt, sigma, entry, x0)`: the ModelPatcher's denoised prediction of `xt` (noised from the clean
    latent `x0`, which some models' inputs are made from) given one conditioning entry."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.model = patcher.model
        self.model_sampling = self.model.model_sampling
        self.device = patcher.load_device

    @contextlib.contextmanager
    def loaded(self):
        """The model on its device, whole (training needs every weight there), set up as for sampling, in
        ComfyUI's training mode (it then avoids in-place operations autograd cannot handle)."""
        # Everything else leaves the device first, as in ComfyUI's TrainLoraNode: training needs the memory.
        comfy.model_management.load_models_gpu([self.patcher], memory_required=1e20, force_full_load=True)
        comfy.samplers.cast_to_load_options(self.patcher.model_options, device=self.device, dtype=self.patcher.model_dtype())
        self.patcher.pre_run()
        comfy.model_management.in_training = True
        try:
            yield self
        finally:
            comfy.model_management.in_training = False
            self.patcher.cleanup()

    def latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        """A VAE latent as the model works on it (the latent format's scale and shift)."""
        return self.model.process_latent_in(latent)

    def __call__(self, xt: torch.Tensor, sigma: torch.Tensor, entry, x0: torch.Tensor) -> torch.Tensor:
        conds = comfy.sampler_helpers.convert_cond([entry])
        conds = comfy.samplers.process_conds(self.model, xt, {"positive": conds}, self.device, latent_image=x0)["positive"]
        return comfy.samplers.calc_cond_batch(self.model, [conds], xt, sigma, self.patcher.model_options)[0]


def load_model_file(path: str, weight_dtype: str = "default"):
    """A diffusion-model file loaded by ComfyUI (its detection, model classes, fp8 and quantized weights), as
    its Load Diffusion Model node does; a ModelPatcher."""
    options = {} if WEIGHT_DTYPES[weight_dtype] is None else {"dtype": WEIGHT_DTYPES[weight_dtype]}
    try:
        patcher = comfy.sd.load_diffusion_model(path, model_options=options)
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(f"{path}: ComfyUI cannot load this diffusion model ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if patcher is None:
        raise AdapterError(f"{path}: ComfyUI does not recognise this diffusion model")
    return patcher


def in_place_hint(error: RuntimeError, config) -> AdapterError | None:
    """What to do when the backward pass fails because the model added into an activation it still needed (ComfyUI's
    Flux and HunyuanVideo blocks do `x += ...`; gradient checkpointing runs them on copies); None for other errors."""
    if config.gradient_checkpointing or "modified by an inplace operation" not in str(error):
        return None
    return AdapterError(f"ComfyUI's {describe_architecture(config.architecture)} model adds into activations in place, "
                        "which the backward pass still needs: turn gradient_checkpointing on")
