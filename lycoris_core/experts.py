"""Wan 2.2's two experts: the high-noise model runs the first, noisiest steps, the low-noise model the rest.

Each expert is a model of its own, so each takes its own adapter. Trainers write them in two ways:
- one file per expert. Musubi Tuner trains one model at a time (`--dit` with the high- or the low-noise
  model and that expert's timestep range), or both at once (`--dit` low noise, `--dit_high_noise`,
  `--timestep_boundary`), which trains ONE adapter that both experts use: the same file on both models.
  ai-toolkit writes `<name>_high_noise.safetensors` and `<name>_low_noise.safetensors` by default.
- one file holding both (ai-toolkit with `split_multistage_loras: false`): its Wan 2.2 model holds the
  experts as `transformer_1` (high noise) and `transformer_2` (low noise), and the file's keys keep that
  segment: `diffusion_model.transformer_1.blocks.0.self_attn.q.lokr_w1`.

Such a file is read as two adapters: `select_expert` gives the one an expert's model takes. Without
an expert it is refused: both halves name the same layers, and loading them onto one model would add
the two experts together.
"""

from __future__ import annotations

import dataclasses
import os
import re

from .adapter_file import AdapterFile
from .errors import AdapterError
from .naming import DOTTED_FAMILIES

# expert -> the segment ai-toolkit's combined files put before its module paths
SEGMENTS = {"high_noise": "transformer_1", "low_noise": "transformer_2"}
WORDS = {"high_noise": "high-noise", "low_noise": "low-noise"}
_EXPERT_OF_SEGMENT = {segment: expert for expert, segment in SEGMENTS.items()}
# "..._high_noise.safetensors" (ai-toolkit), "wan2.2_t2v_high_noise_14B" (ComfyUI's model files), "HighNoise"
_NAMED = re.compile(r"(high|low)[ _.-]?noise", re.IGNORECASE)


def expert_of_stem(stem: str) -> str | None:
    """The expert a module stem belongs to in a combined file ("high_noise", "low_noise"), or None."""
    for family in DOTTED_FAMILIES:
        if stem.startswith(family):
            stem = stem[len(family) :]
            break
    return _EXPERT_OF_SEGMENT.get(stem.split(".", 1)[0])


def experts_in(adapter: AdapterFile) -> dict[str, list[str]]:
    """{expert: its module stems} of a file holding both experts; {} for an ordinary file."""
    found: dict[str, list[str]] = {}
    for stem in adapter.modules:
        found.setdefault(expert_of_stem(stem), []).append(stem)
    if set(found) == {None}:
        return {}
    if None in found:
        named = sum(len(stems) for expert, stems in found.items() if expert)
        raise AdapterError(
            f"{adapter.path}: {named} modules belong to a Wan 2.2 expert ({' or '.join(SEGMENTS.values())}) and "
            f"{len(found[None])} to neither (e.g. {found[None][0]}): which model those are for cannot be told")
    return found


def select_expert(adapter: AdapterFile, expert: str | None) -> AdapterFile:
    """The adapter the model of `expert` ("high_noise", "low_noise"; None: a model that is no Wan 2.2 expert)
    takes from `adapter`: an ordinary file whole, a file holding both experts only that expert's modules."""
    found = experts_in(adapter)
    if not found:
        return adapter
    if expert is None:
        raise AdapterError(
            f"{adapter.path} holds both Wan 2.2 experts ({len(found.get('high_noise', []))} high-noise modules under "
            f"{SEGMENTS['high_noise']}, {len(found.get('low_noise', []))} low-noise under {SEGMENTS['low_noise']}): "
            "load it onto the two expert models with the Wan 2.2 pair loader, each takes its own")
    stems = found.get(expert)
    if not stems:
        present = next(iter(found))
        raise AdapterError(f"{adapter.path} holds only the {WORDS[present]} expert ({SEGMENTS[present]}), "
                           f"nothing for the {WORDS[expert]} model")
    other = {key for e, s in found.items() if e != expert for stem in s for key in adapter.modules[stem].keys}
    return dataclasses.replace(
        adapter,
        modules={stem: adapter.modules[stem] for stem in stems},
        tensors={key: entry for key, entry in adapter.tensors.items() if key not in other},
    )


def named_expert(name: str) -> str | None:
    """The expert a file's name says it is for ("high_noise", "low_noise"), or None when it says neither or both."""
    said = {match.group(1).lower() for match in _NAMED.finditer(os.path.basename(name))}
    return f"{said.pop()}_noise" if len(said) == 1 else None
