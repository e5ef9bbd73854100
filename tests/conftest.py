"""pytest fixtures shared by the tests."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from safetensors.torch import save_file

# tests/integration/ needs ComfyUI's own environment; where tests/test_releases.py runs it there (CI),
# this interpreter does not collect it at all (rather than listing every module as skipped).
collect_ignore_glob = (
    ["integration/*"] if os.environ.get("COMFYUI_RELEASES") and importlib.util.find_spec("torchvision") is None else []
)


@pytest.fixture
def write_safetensors(tmp_path):
    """Write a dict of tensors to a fresh safetensors file and return its path."""
    counter = iter(range(10**6))

    def write(tensors: dict[str, torch.Tensor], metadata: dict | None = None, name: str | None = None) -> str:
        path = tmp_path / (name or f"adapter_{next(counter)}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return str(path)

    return write


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Hypothesis profiles. `ci` (the default here, and what hypothesis itself loads where the CI variable
# is set) keeps every run reproducible and the fuzz tests (tests/test_fuzz.py) well under a minute on
# 2 cores; `long` (`pytest --hypothesis-profile=long tests/test_fuzz.py`, or HYPOTHESIS_PROFILE=long)
# runs them on over 100000 inputs in all (`python tests/test_fuzz.py` counts them). Tests that set their
# own @settings keep those values.
from datetime import timedelta  # noqa: E402

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

_FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
# No shrinking in CI: a failure is reported as found (derandomized, so every rerun finds it again);
# shrinking a slow or many-sided fuzz failure can take many minutes. `dev` is the same with shrinking,
# to get the minimal form of a CI failure locally.
settings.register_profile(
    "ci", settings.get_profile("ci"), max_examples=150, deadline=timedelta(seconds=5), derandomize=True,
    database=None, print_blob=True, suppress_health_check=_FUZZ_HEALTH,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
)
settings.register_profile("dev", settings.get_profile("ci"), phases=list(Phase))
settings.register_profile(
    "long", settings.get_profile("default"), max_examples=35_000, deadline=timedelta(seconds=30), derandomize=False,
    print_blob=True, suppress_health_check=_FUZZ_HEALTH,
)
# `--hypothesis-profile` is applied by hypothesis's pytest plugin when pytest configures, which is
# usually after this file is imported; where it came first, the profile it loaded is kept.
if settings.get_current_profile_name() in ("default", "ci"):
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")
