"""LycorisCreateHook: an adapter file as ComfyUI hooks, for ComfyUI's own per-step schedules and per-prompt use.

ComfyUI's weight hooks (comfy/hooks.py) patch the model's weights while sampling, only for the conditionings
they are set on (Cond Set Props, Cond Pair Set Props), at a strength that keyframes (Create Hook Keyframe, Set
Hook Keyframes) change from step to step. Core's own hook reads a LoRA through its key map when the sampler
registers it, and so cannot place split q/k/v on fused weights. This hook carries the pack's plan instead: the
same `LycorisWeightPatch` objects on the same targets (row slices of fused weights; block weights as each
patch's strength) that the loader's patch mode gives `add_patches`, given to the sampled model's
`add_hook_patches`. ComfyUI then multiplies each patch's strength by the hook's keyframe strength of the step
and re-patches the weights when it changes.
"""

from __future__ import annotations

import comfy.hooks
import comfy.utils
from comfy_api.latest import io, ui

from ..lycoris_core.errors import AdapterError
from ..lycoris_core.experts import select_expert
from ..lycoris_core.finite import check_strength
from ..lycoris_core.loading import load_report, load_tensors, read_adapter_cached, weight_shapes
from ..lycoris_core.naming import is_text_encoder_stem
from .common import (
    CATEGORY,
    adapter_fingerprint,
    adapter_name_input,
    adapter_path,
    load_summary,
    lokr_full_matrix_alpha_input,
    show_text,
    showing_failures,
)
from .loader import STRENGTH, architecture_input, block_weights_input, plan_for_comfyui
from .patches import check_accepted, patch_rounds

MODE = "hook"  # the report's mode line: applied while sampling, not at load
HOW = ("hook: applied while sampling, only to the conditionings it is set on (Cond Set Props, Cond Pair Set Props); "
       "Set Hook Keyframes multiplies its strength per step")


class LycorisWeightHook(comfy.hooks.WeightHook):
    """A model-only WeightHook whose patches are planned already.

    `rounds` = [(block weight, {target: patch})] (`patches.patch_rounds` at strength 1), made on a model whose
    weights have the shapes in `shapes`. ComfyUI clones hooks through `type(hook)()` and then copies their fields
    (`clone`), so every field has a default and is copied there; the tensors are shared, never copied.
    """

    def __init__(self, strength_model: float = 1.0, path: str = "", rounds: list | None = None, shapes: dict | None = None):
        super().__init__(strength_model=strength_model, strength_clip=0.0)
        self.need_weight_init = False  # core's WeightHook would otherwise map `weights` as a LoRA state dict
        self.path = path
        self.rounds = rounds or []
        self.shapes = shapes or {}

    def add_hook_patches(self, model, model_options, target_dict, registered):
        """Called by ComfyUI when a sampler starts with a conditioning that carries this hook (and by Set CLIP Hooks)."""
        if target_dict.get("target") == comfy.hooks.EnumWeightTarget.Clip:
            return False  # the pack's adapters patch diffusion models; text-encoder modules go through Load LyCORIS + CLIP
        if not self.should_register(model, model_options, target_dict, registered):
            return False
        self._check(model)
        for factor, batch in self.rounds:
            check_accepted(self.path, batch, model.add_hook_patches(hook=self, patches=batch, strength_patch=self._strength_model * factor))
        registered.add(self)
        return True

    def _check(self, model) -> None:
        """The sampled model must have the weights the plan was made on; ComfyUI itself would only log a key it
        cannot find, and a weight of another shape would fail inside sampling."""
        if getattr(model, "is_dynamic", lambda: False)():
            # ComfyUI's dynamic-VRAM patcher raises inside sampling for every weight hook, core's included.
            raise AdapterError(f"{self.path}: this ComfyUI runs with dynamic VRAM, whose model patcher does not apply "
                               "weight hooks (core's or this pack's): start ComfyUI with --disable-dynamic-vram, or use "
                               "Load LyCORIS for one strength over all steps")
        have = weight_shapes(model.model_state_dict())
        for key, shape in self.shapes.items():
            if have.get(key) != shape:
                found = "has no such weight" if key not in have else f"has it as {list(have[key])}"
                raise AdapterError(f"{self.path}: the hook was made on another model ({key} {list(shape)}; the sampled "
                                   f"model {found}): connect the model you sample with to Create LyCORIS Hook")

    def clone(self):
        c = super().clone()
        c.path, c.rounds, c.shapes = self.path, self.rounds, self.shapes
        return c


def _create(model, lora_name, strength_model, architecture, lokr_full_matrix_alpha, block_weights, prev_hooks):
    """(hooks, report): plan against the model's weights, then one hook holding the planned patches."""
    path = adapter_path(lora_name)
    strength = check_strength(strength_model, path)  # the API takes any number, NaN included
    # a file holding both Wan 2.2 experts is refused, as by the single-model loaders
    adapter = select_expert(read_adapter_cached(path, lokr_full_matrix_alpha=lokr_full_matrix_alpha), None)
    plan = plan_for_comfyui(adapter, model, architecture, block_weights or "")
    notes = [HOW]
    text_encoder = [stem for stem in plan.unmatched if is_text_encoder_stem(stem)]
    if text_encoder:
        notes.append(f"{len(text_encoder)} unmatched modules are for a text encoder: a hook applies to the diffusion "
                     "model only (Load LyCORIS + CLIP applies them)")
    hooks = prev_hooks.clone() if prev_hooks is not None else comfy.hooks.HookGroup()
    if strength == 0:  # as core's Create Hook LoRA: nothing to add
        notes.append("strength 0: the file was checked against the model, no hook was added")
        return hooks, load_report(plan, strength, MODE, notes=notes)
    bar = comfy.utils.ProgressBar(len(plan.patches))
    tensors = load_tensors(plan, progress=lambda done, total: bar.update_absolute(done, total))
    shapes = weight_shapes(model.model_state_dict())
    keys = {p.target.key for p in plan.patches} | {p.bias_key for p in plan.patches if p.bias_key}
    hooks.add(LycorisWeightHook(strength, adapter.path, patch_rounds(plan.patches, tensors, 1.0), {k: shapes[k] for k in keys}))
    return hooks, load_report(plan, strength, MODE, notes=notes)


class LycorisCreateHook(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisCreateHook",
            display_name="Create LyCORIS Hook",
            category=CATEGORY,
            description="A LoHa, LoKr or LoRA file as ComfyUI hooks: with ComfyUI's hook nodes, schedule its strength "
            "over the sampling steps (Create Hook Keyframe, Set Hook Keyframes) or apply it to one prompt only "
            "(Cond Set Props). Split q/k/v onto fused weights and block weights included.",
            inputs=[
                io.Model.Input("model", tooltip="The model you sample with. The file is checked and planned against its "
                               "weights here, so errors and the report come now; this model is not changed."),
                adapter_name_input(),
                io.Float.Input("strength_model", **STRENGTH, tooltip="How strongly to apply the adapter: "
                               "W + strength·scale·ΔW. Hook keyframes multiply it per step."),
                architecture_input(),
                lokr_full_matrix_alpha_input(),
                block_weights_input(),
                io.Hooks.Input("prev_hooks", optional=True, tooltip="Hooks to keep: the new hook is added to them."),
            ],
            outputs=[
                io.Hooks.Output(display_name="HOOKS", tooltip="The hooks: connect to Set Hook Keyframes, Cond Set Props "
                                "or Cond Pair Set Props."),
                io.String.Output(display_name="report", tooltip="What the hook applies: format, architecture, counts, "
                                 "unmatched modules."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model, architecture="auto", lokr_full_matrix_alpha=False, block_weights="",
                prev_hooks=None) -> io.NodeOutput:
        with showing_failures(cls):
            hooks, report = _create(model, lora_name, strength_model, architecture, lokr_full_matrix_alpha, block_weights,
                                    prev_hooks)
        show_text(cls, load_summary(report))
        return io.NodeOutput(hooks, report, ui=ui.PreviewText(report))

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **kwargs):
        return adapter_fingerprint(lora_name)
