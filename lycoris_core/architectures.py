"""The target architectures (SPEC §4), each a data record, and detection of a file's architecture."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    id: str
    title: str
    # Values of Musubi's `ss_base_model_version` that mean this architecture.
    musubi_versions: tuple[str, ...]


ARCHITECTURES: dict[str, Architecture] = {
    a.id: a
    for a in (
        Architecture("wan", "Wan 2.1/2.2", ("wan",)),
        Architecture("hunyuan_video", "HunyuanVideo", ("hunyuan_video",)),
        Architecture("hunyuan_video_1_5", "HunyuanVideo 1.5", ("hunyuan_video_1_5",)),
        Architecture("framepack", "FramePack", ("framepack",)),
        Architecture("flux", "FLUX.1 dev / Kontext", ("flux_kontext", "flux")),
        Architecture("flux2", "FLUX.2 dev / Klein", ("flux_2_dev", "flux_2_klein_4b", "flux_2_klein_9b", "flux_2")),
        Architecture("qwen_image", "Qwen-Image", ("qwen_image", "qwen_image_edit", "qwen_image_layered")),
        Architecture("z_image", "Z-Image", ("z_image",)),
    )
}

# Architectures Musubi knows but whose LoHa/LoKr files this pack refuses, with the reason.
REFUSED = {
    "kandinsky5": "Kandinsky 5 is not supported: Musubi Tuner does not train LoHa/LoKr for it",
}


def architecture_from_metadata(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "").strip().lower()
    if version in REFUSED:
        return version  # recognised, so loading can refuse it with the reason
    for arch in ARCHITECTURES.values():
        if version in arch.musubi_versions:
            return arch.id
    return None


def detect_file_architecture(adapter) -> str | None:
    """The architecture of an adapter file, or None when nothing identifies it."""
    return architecture_from_metadata(adapter.metadata)
