"""The integration suite (tests/integration/) on every ComfyUI release named in COMFYUI_RELEASES.

ComfyUI needs its own environment (a torch with a matching torchvision, its requirements), which is
not the one the unit tests run in; so each release's suite runs as `COMFYUI_PATH=<release>
$COMFYUI_PYTHON -m pytest tests/integration`, and passes here only if it passes there. `.ci/run`
prepares both and sets the two variables; without them this test skips with the reason (and the
integration modules, run in a ComfyUI environment directly, find their ComfyUI as they always do).

COMFYUI_RELEASES lists ComfyUI folders separated by the path separator; `FOLDER=SITE` adds SITE in
front of that release's imports (a release pinning another version of a package than the shared
environment has, e.g. 0.3.64's comfyui-workflow-templates).

A skipped integration test fails here: every test must run on every release (where a release lacks a
model, the suite does not collect that model's tests and tests what is true there instead). pytest's
summary line is read for the counts; `-rfEs` puts a line per failure, error and skip (with its reason)
into the log (`-r` replaces pyproject's `-ra`, so failures and errors are named too).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RELEASES = [p for p in os.environ.get("COMFYUI_RELEASES", "").split(os.pathsep) if p]  # FOLDER or FOLDER=SITE
PYTHON = os.environ.get("COMFYUI_PYTHON", "")
# The counts on pytest's summary line, e.g. "239 passed, 2 skipped, 1 warning in 35.12s".
COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b")


@pytest.mark.skipif(not RELEASES or not PYTHON, reason="no COMFYUI_RELEASES / COMFYUI_PYTHON: the integration suite "
                    "runs in a ComfyUI environment (see .ci/run), or directly with COMFYUI_PATH there")
@pytest.mark.parametrize("entry", RELEASES, ids=[Path(r.split("=")[0]).name for r in RELEASES])
def test_integration_suite_passes_on(entry):
    release, _, site = entry.partition("=")
    env = dict(os.environ, COMFYUI_PATH=release)
    if site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "tests/integration"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    tail = "\n".join(lines[-40:])
    sys.stdout.write(f"\n--- tests/integration on {release} ---\n{tail}\n")
    assert done.returncode == 0, f"tests/integration failed on {release}:\n{tail}"
    summary = next((line for line in reversed(lines) if COUNT.search(line) and " in " in line), "")
    counts = {kind: int(n) for n, kind in COUNT.findall(summary)}
    assert counts.get("passed", 0) > 0, f"no summary line with passed tests on {release}:\n{tail}"
    assert not counts.get("skipped"), f"tests/integration skipped {counts['skipped']} tests on {release}:\n{tail}"


# ---------------------------------------------------------------------------------------------
# tests/browser (ComfyUI's frontend in Chromium) on the newest release: the first in COMFYUI_RELEASES.
# .ci/run installs Chromium and Playwright for it, so a skip there (a missing browser) is a failure here.


@pytest.mark.skipif(not RELEASES or not PYTHON, reason="no COMFYUI_RELEASES / COMFYUI_PYTHON: the browser suite "
                    "runs in a ComfyUI environment (see .ci/run), or directly with COMFYUI_PATH there")
def test_browser_suite_passes_on_the_newest_release(tmp_path):
    release = RELEASES[0].partition("=")[0]
    artifacts = os.environ.get("BROWSER_ARTIFACTS") or str(tmp_path / "browser")
    env = dict(os.environ, COMFYUI_PATH=release, BROWSER_ARTIFACTS=artifacts)
    done = subprocess.run([PYTHON, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "tests/browser"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    lines = (done.stdout + done.stderr).strip().splitlines()
    tail = "\n".join(lines[-40:])
    shots = sorted(p.name for p in Path(artifacts).glob("*.png")) if Path(artifacts).is_dir() else []
    sys.stdout.write(f"\n--- tests/browser on {release} ---\n{tail}\nscreenshots in {artifacts}: {shots}\n")
    assert done.returncode == 0, f"tests/browser failed on {release}:\n{tail}"
    summary = next((line for line in reversed(lines) if " passed" in line and " in " in line), "")
    assert summary and " skipped" not in summary, f"tests/browser skipped tests on {release}:\n{tail}"
