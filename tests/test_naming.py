"""naming.py, the one reader of the architecture records: every name of every architecture, in every
naming and key family, lands where the records say, and the loader's plan, the merge and the
converter agree on it.

Models are ComfyUI's real weight names and shapes (tests/fixtures/comfyui_models/, dumped from
ComfyUI 0.28.0). For each naming of each architecture one file holds a rank-1 LoRA for every name of
that naming (block 0, img and txt); planned onto the ComfyUI model it must match completely, and its
conversions to the ComfyUI and Musubi layouts must merge to the same weights as the file itself.
"""

from __future__ import annotations

import string

import pytest
import torch
from comfyui_lycoris.convert import convert_file
from comfyui_lycoris.lycoris_core import AdapterError, read_adapter
from comfyui_lycoris.lycoris_core.architectures import ARCHITECTURES, COMFYUI, DIFFUSERS, MUSUBI, Part
from comfyui_lycoris.lycoris_core.merge import merge
from comfyui_lycoris.lycoris_core.naming import fill, flatten, naming_for, stem_paths
from comfyui_lycoris.lycoris_core.plan import make_plan
from helpers import COMFY_MODELS, comfy_names
from safetensors.torch import load_file, save_file

COMFY_ARCHS = sorted(p.stem for p in COMFY_MODELS.glob("*.json") if "." not in p.stem)
FAMILIES = {MUSUBI: lambda path: "lora_unet_" + flatten(path), DIFFUSERS: lambda path: "transformer." + path,
            COMFYUI: lambda path: "diffusion_model." + path}


def instances(template: str) -> list[dict[str, str]]:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    return [{"n": "0", "s": s} for s in (("img", "txt") if "s" in fields else ("img",))]


def names_in(arch_id: str, naming: str) -> dict[str, tuple[str, object]]:
    """{module path in `naming`: (ComfyUI weight, rows rule)} for block 0 of every name the model has."""
    model = comfy_names(arch_id)
    found = {}
    for name in naming_for(arch_id).names:
        if name.naming != naming:
            continue
        for groups in instances(name.template):
            weight = fill(name.weight, groups)
            if f"{weight}.weight" in model:  # model variants: Wan's T2V dump has no image embedder, ...
                found[fill(name.template, groups)] = (weight, name.rows)
    return found


def lora_file(tmp_path, arch_id: str, naming: str) -> tuple[str, dict]:
    model = comfy_names(arch_id)
    gen = torch.Generator().manual_seed(len(arch_id) + len(naming))
    tensors = {}
    paths = names_in(arch_id, naming)
    for path, (weight, rows) in paths.items():
        shape = model[f"{weight}.weight"]
        out = rows.rows(shape).size if isinstance(rows, Part) else shape[0]
        stem = FAMILIES[naming](path)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(out, 1, generator=gen)
        tensors[f"{stem}.lora_down.weight"] = torch.randn(1, int(torch.tensor(shape[1:]).prod()), generator=gen) * 0.1
    file = tmp_path / f"{arch_id}_{naming}.safetensors"
    save_file(tensors, str(file), metadata={"ss_base_model_version": ARCHITECTURES[arch_id].musubi_versions[0]})
    return str(file), paths


def base_file(tmp_path, arch_id: str) -> str:
    gen = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(shape, generator=gen) for k, shape in comfy_names(arch_id).items()}
    path = tmp_path / f"{arch_id}_base.safetensors"
    save_file(tensors, str(path))
    return str(path)


def merged(tmp_path, base: str, adapter: str, tag: str) -> dict[str, torch.Tensor]:
    out = tmp_path / f"merged_{tag}.safetensors"
    result = merge(base, out, [(adapter, 1.0)], progress=False)
    assert not result.plans[0].unmatched, (tag, result.plans[0].unmatched)
    return load_file(str(out))


@pytest.mark.parametrize("naming", [MUSUBI, DIFFUSERS, COMFYUI])
@pytest.mark.parametrize("arch_id", COMFY_ARCHS)
def test_every_name_lands_where_the_records_say_and_plan_and_convert_agree(arch_id, naming, tmp_path):
    file, paths = lora_file(tmp_path, arch_id, naming)
    if not paths:
        pytest.skip(f"{arch_id} has no {naming} names of its own")
    adapter = read_adapter(file)
    plan = make_plan(adapter, comfy_names(arch_id), arch_id)
    assert not plan.unmatched and plan.modules_applied == len(paths)
    landed = {}
    for patch in plan.patches:
        landed.setdefault(patch.stem, set()).add((patch.target.key, patch.target.rows))
    model = comfy_names(arch_id)
    for path, (weight, rows) in paths.items():
        stem = FAMILIES[naming](path)
        if rows is None:
            assert landed[stem] == {(f"{weight}.weight", None)}, stem
        elif isinstance(rows, Part):
            assert landed[stem] == {(f"{weight}.weight", rows.rows(model[f"{weight}.weight"]))}, stem
        else:  # swapped halves: both halves of the weight, each from the other half of the module
            assert {key for key, _ in landed[stem]} == {f"{weight}.weight"} and len(landed[stem]) == 2, stem

    base = base_file(tmp_path, arch_id)
    reference = merged(tmp_path, base, file, "file")
    for target in ("comfyui", "musubi"):
        out = tmp_path / f"{target}.safetensors"
        try:
            convert_file(file, out, target, arch=arch_id)
        except AdapterError as e:  # the layout cannot hold some module exactly: said, and nothing written
            assert "nothing written" in str(e) and not out.exists()
            continue
        again = merged(tmp_path, base, str(out), target)
        for key, tensor in reference.items():
            assert torch.allclose(again[key], tensor, rtol=1e-5, atol=1e-6), (target, key)


@pytest.mark.parametrize("arch_id", sorted(a for a in ARCHITECTURES if not ARCHITECTURES[a].refused))
def test_no_template_names_two_places(arch_id):
    """A module path (in any naming) that two entries read as different weights would be a record bug."""
    naming = naming_for(arch_id)
    for name in naming.names:
        for groups in instances(name.template):
            path = fill(name.template, groups)
            assert len(naming.places(path)) == 1, path


def test_one_stem_policy():
    paths = list(stem_paths("lora_unet_blocks_0_self_attn_q"))
    assert paths == [("blocks_0_self_attn_q", True)]  # a flattened family: its rest, flattened only
    dotted = [p for p, flat in stem_paths("my.prefix.blocks.0.attn1.to_q") if not flat]
    assert dotted[:3] == ["my.prefix.blocks.0.attn1.to_q", "prefix.blocks.0.attn1.to_q", "blocks.0.attn1.to_q"]
    # an unknown underscored prefix is not stripped: such a stem names nothing
    assert naming_for("wan").place_of_stem("lora_foo_blocks_0_self_attn_q") is None
    assert naming_for("wan").place_of_stem("lora_unet_blocks_0_self_attn_q").weight == "blocks.0.self_attn.q"
