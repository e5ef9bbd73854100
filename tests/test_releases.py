"""The integration suite (tests/integration/) on every ComfyUI release named in COMFYUI_RELEASES.

ComfyUI needs its own environment (a torch with a matching torchvision, its requirements), which is
not the one the unit tests run in; so each release's suite runs as `COMFYUI_PATH=<release>
$COMFYUI_PYTHON -m pytest tests/integration`, and passes here only if it passes there. `.ci/run`
prepares both and sets the two variables; without them this test skips with the reason (and the
integration modules, run in a ComfyUI environment directly, find their ComfyUI as they always do).

COMFYUI_RELEASES lists ComfyUI folders separated by the path separator; `FOLDER=SITE` adds SITE in
front of that release's imports (a release pinning another version of a package than the shared
environment has, e.g. 0.3.64's comfyui-workflow-templates).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RELEASES = [p for p in os.environ.get("COMFYUI_RELEASES", "").split(os.pathsep) if p]  # FOLDER or FOLDER=SITE
PYTHON = os.environ.get("COMFYUI_PYTHON", "")


@pytest.mark.skipif(not RELEASES or not PYTHON, reason="no COMFYUI_RELEASES / COMFYUI_PYTHON: the integration suite "
                    "runs in a ComfyUI environment (see .ci/run), or directly with COMFYUI_PATH there")
@pytest.mark.parametrize("entry", RELEASES, ids=[Path(r.split("=")[0]).name for r in RELEASES])
def test_integration_suite_passes_on(entry):
    release, _, site = entry.partition("=")
    env = dict(os.environ, COMFYUI_PATH=release)
    if site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/integration"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
    sys.stdout.write(f"\n--- tests/integration on {release} ---\n{tail}\n")
    assert done.returncode == 0, f"tests/integration failed on {release}:\n{tail}"
    assert " passed" in tail, tail
