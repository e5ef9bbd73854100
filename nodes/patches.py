"""How a load plan becomes ComfyUI patches: weight patches (patch mode), forward hooks (bypass mode),
and text-encoder modules handed to ComfyUI's own LoRA loader.

Patch mode registers one `LycorisWeightPatch` per module with `ModelPatcher.add_patches`; ComfyUI
calls its `calculate_weight` when it loads the model for sampling (lazily, with a backup to unpatch),
on the whole weight or on a row slice `(key, (0, offset, size))` of a fused one.
"""

from __future__ import annotations

import uuid

import comfy.lora
import comfy.weight_adapter
import torch
from comfy.patcher_extension import PatcherInjection

from ..lycoris_core.bypass import BypassSet
from ..lycoris_core.errors import AdapterError
from ..lycoris_core.loading import weight_shapes
from ..lycoris_core.module import BoundModule
from ..lycoris_core.plan import LoadPlan, Patch, make_plan
from ..lycoris_core.rows import Rows


def plan_on_model(adapter, model, architecture: str, block_weights: str = "") -> LoadPlan:
    """The core's plan of `adapter` on the ModelPatcher `model` (its weights' names and shapes only)."""
    return make_plan(adapter, weight_shapes(model.model_state_dict()), architecture, block_weights)


class LycorisWeightPatch(comfy.weight_adapter.WeightAdapterBase):
    """One adapter module as a ComfyUI weight patch; the math is the core's `BoundModule.apply_`.

    All state is in `weights` = (module record, the rows of its ΔW this weight takes or None for
    all, tensor names, *tensors as stored): ComfyUI
    rebuilds adapters as `type(a)(loaded_keys, weights)` with the tensors moved to another device
    (dynamic VRAM prefetch) and counts their memory from the tuple. Errors are raised, never logged
    away: a weight is patched exactly or the load fails.
    """

    name = "lycoris"

    def __init__(self, loaded_keys: set[str], weights: tuple):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def create(cls, module, tensors: dict[str, torch.Tensor], source_rows: Rows | None = None) -> LycorisWeightPatch:
        names = tuple(tensors)
        return cls(set(module.keys), (module, source_rows, names, *(tensors[n] for n in names)))

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        # `function` (a post-process of the added term) is only set by patches registered with one; ours never are.
        module, rows, names, *tensors = self.weights
        rows = None if rows is None else Rows(*rows)  # ComfyUI rebuilds nested tuples as plain ones
        bound = BoundModule(module, dict(zip(names, tensors)), weight.device)
        # fp32 whatever ComfyUI's intermediate dtype: one cast back into the (narrowed) weight.
        work = weight if weight.dtype == torch.float32 else weight.float()
        bound.apply_(work, strength, rows=rows)
        if work is not weight:
            weight.copy_(work)
        return weight


def _target(key: str, rows: Rows | None):
    """ComfyUI's name for a patch target: the key, or (key, (dim, offset, size)) for a row slice."""
    return key if rows is None else (key, (0, rows.start, rows.size))


def add_weight_patches(model, plan: LoadPlan, tensors: dict, strength: float):
    """A clone of `model` (a ModelPatcher) with every planned module as a lazy weight patch."""
    patched = model.clone()
    _patch_weights(patched, plan.adapter.path, plan.patches, tensors, strength)
    return patched


def patch_rounds(patches: list[Patch], tensors: dict, strength: float) -> list[tuple[float, dict]]:
    """The patches as ComfyUI takes them: [(strength, {target: patch})]. ComfyUI's patch calls take a dict and one
    strength: each patch goes in at strength × its block weight, and a target met twice at one strength goes in
    a later dict."""
    rounds: dict[float, list[dict]] = {}
    for patch in patches:
        target = patch.target
        items = [(_target(target.key, target.rows), LycorisWeightPatch.create(patch.module, tensors[patch.stem], target.source_rows))]
        if patch.bias_key:
            bias = BoundModule(patch.module, tensors[patch.stem]).delta_bias()
            if target.source_rows:
                bias = target.source_rows.of(bias)
            items.append((_target(patch.bias_key, target.rows), ("diff", (bias,))))
        batches = rounds.setdefault(strength * patch.factor, [])
        for target, value in items:
            for batch in batches:
                if target not in batch:
                    batch[target] = value
                    break
            else:
                batches.append({target: value})
    return [(applied, batch) for applied, batches in rounds.items() for batch in batches]


def check_accepted(path: str, batch: dict, accepted) -> None:
    """Raise when ComfyUI refused some of `batch`: the plan only names weights of the model, so a refusal means
    the model changed under us, and a silently partial adapter is worse than none."""
    accepted = set(accepted)
    refused = [t for t in batch if t not in accepted]
    if refused:
        raise AdapterError(f"{path}: ComfyUI did not accept patches for {refused[:3]}")


def _patch_weights(patched, path: str, patches: list[Patch], tensors: dict, strength: float) -> None:
    for applied, batch in patch_rounds(patches, tensors, strength):
        check_accepted(path, batch, patched.add_patches(batch, applied))


def _dequantized(layer: torch.nn.Module) -> torch.Tensor:
    """The weight a layer computes with, in fp32, read as ComfyUI's patcher reads it: quantized layers store
    it scaled (`scale_weight`) or as a QuantizedTensor, and their `convert_weight` gives the real one."""
    weight = layer.weight.to(torch.float32, copy=True)
    convert = getattr(layer, "convert_weight", None)
    return weight if convert is None else convert(weight, inplace=True)


def _is_linear(layer: torch.nn.Module) -> bool:
    # ComfyUI's mixed-precision (quantized) Linear is no torch.nn.Linear, but has its features.
    return isinstance(layer, torch.nn.Linear) or (hasattr(layer, "in_features") and hasattr(layer, "out_features"))


def add_bypass_hooks(model, plan: LoadPlan, tensors: dict, strength: float):
    """(A clone of `model` whose adapted Linear layers add the modules in their forward pass, the
    number of modules patched into weights instead). Only Linear layers can be hooked this way; the
    others (convolutions, norms, embeddings: never quantized) get ordinary weight patches."""
    hooks, in_weights = BypassSet(), []
    for patch in plan.patches:
        layer = patch.target.key.rsplit(".", 1)[0]  # `.weight`, or a norm's `.scale` (ComfyUI 0.3.64's FLUX)
        if _is_linear(model.model.get_submodule(layer)):
            hooks.add(layer, patch.module, tensors[patch.stem], strength * patch.factor, patch.target.rows,
                      patch.target.source_rows)
        else:
            in_weights.append(patch)
    patched = model.clone()
    _patch_weights(patched, plan.adapter.path, in_weights, tensors, strength)
    # One key per load: chained loaders each keep theirs, and ComfyUI tells models apart by these keys. Clones
    # share the set; each patcher injects and ejects it as its owner, so one leaving the model (or one ejecting
    # what it never injected, with the injected flag copied from its parent) leaves the others' hooks on.
    patched.set_injections(
        f"lycoris_bypass_{uuid.uuid4().hex[:12]}",
        [PatcherInjection(inject=lambda mp: hooks.attach(mp.model, _dequantized, owner=mp),
                          eject=lambda mp: hooks.detach(mp.model, owner=mp))],
    )
    return patched, len({patch.stem for patch in in_weights})


def apply_plan(model, plan: LoadPlan, tensors: dict, strength: float, mode: str):
    """(The model with the plan applied in `mode`, "patch" or "bypass"; notes for the report)."""
    if mode != "bypass":
        return add_weight_patches(model, plan, tensors, strength), []
    model, in_weights = add_bypass_hooks(model, plan, tensors, strength)
    notes = []
    if in_weights:
        notes.append(f"{in_weights} modules on layers other than Linear (convolutions, norms, embeddings) were "
                     "patched into their weights: bypass hooks Linear layers only")
    return model, notes


def delegate_text_encoder(clip, plan: LoadPlan, strength: float):
    """Hand the file's text-encoder modules to ComfyUI's own LoRA loader (this pack patches diffusion models).

    Returns (patched clip, {stem: what happened}) for the unmatched stems ComfyUI's CLIP key map knows.
    """
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    stems = [stem for stem in plan.unmatched if stem in key_map]
    if not stems:
        return clip, {}
    adapter = plan.adapter
    state_dict = {key: adapter.load(key) for stem in stems for key in adapter.modules[stem].keys}
    loaded = comfy.lora.load_lora(state_dict, {stem: key_map[stem] for stem in stems})
    patched = clip.clone()
    accepted = set(patched.add_patches(loaded, strength))
    done = {}
    for stem in stems:
        target = key_map[stem]
        if target in loaded and target in accepted:
            done[stem] = "text encoder, patched by ComfyUI core's LoRA loader"
    return patched, done
