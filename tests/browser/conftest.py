"""ComfyUI's frontend in a real browser, with this pack: a ComfyUI server on 127.0.0.1 (like
tests/integration/test_server.py) and Debian's Chromium driven by Playwright.

Each of the three can be missing; the tests then skip with the reason (CI installs them and fails on a
skip: tests/test_releases.py). Chromium is `/usr/bin/chromium` or $CHROMIUM; Playwright's own browser
downloads are never used. Screenshots go to $BROWSER_ARTIFACTS (default: a folder under pytest's tmp dir).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from comfyui_host import REPO, require_comfyui
from helpers import MUSUBI

# Where tests/test_releases.py runs this suite in ComfyUI's environment (CI: COMFYUI_RELEASES set), the
# interpreter without ComfyUI's packages does not collect it at all (as tests/conftest.py does for integration/).
collect_ignore_glob = (
    ["test_*.py"] if os.environ.get("COMFYUI_RELEASES") and importlib.util.find_spec("torchvision") is None else []
)

PACK = "comfyui-lycoris"  # the folder name the pack has in custom_nodes (ComfyUI's name for its templates)
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TINY_WAN = "tiny_wan.safetensors"

# Model files the templates name, made here: a fixture-sized Wan that ComfyUI's loaders and the pack really
# load, placeholders (one tiny tensor) for the text encoder and VAE that only need to be listed, and the
# Musubi reference adapters under the templates' adapter names.
MODEL_FILES = {
    "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors": TINY_WAN,
    "diffusion_models/wan2.1_t2v_14B_fp8_e4m3fn.safetensors": TINY_WAN,
    "diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": TINY_WAN,
    "diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": TINY_WAN,
    "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors": None,
    "vae/wan_2.1_vae.safetensors": None,
    "loras/my_wan_lokr.safetensors": MUSUBI / "wan_lokr_r3_a2.safetensors",
    "loras/my_wan_loha.safetensors": MUSUBI / "wan_loha_r4_a2.safetensors",
    "loras/my_wan22_high_noise_lokr.safetensors": MUSUBI / "wan_lokr_r3_a2.safetensors",
    "loras/my_wan22_low_noise_lokr.safetensors": MUSUBI / "wan_lokr_r3_a2.diffusers.safetensors",
    "loras/flux_kontext_lokr_r3_a2.safetensors": MUSUBI / "flux_kontext_lokr_r3_a2.safetensors",
}

# A Wan 2.1 model at the Musubi fixtures' size (as tests/integration builds it), written by ComfyUI's own
# model class; the 'config' metadata gives UNETLoader's detection what it cannot infer at this size.
MAKE_TINY_WAN = """
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch
from comfy.cli_args import args
args.cpu = True
import comfy.supported_models
from safetensors.torch import save_file
h = 10
config = comfy.supported_models.WAN21_I2V(dict(
    image_model="wan2.1", model_type="i2v", dim=h, num_heads=1, ffn_dim=4 * h, num_layers=2, in_dim=36, out_dim=4,
    text_dim=8, freq_dim=8, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6))
config.set_inference_dtype(torch.float32, None)
model = config.get_model({}, "")
gen = torch.Generator().manual_seed(9)
sd = {k: (torch.randn(v.shape, generator=gen) * 0.1 if v.is_floating_point() else v).contiguous()
      for k, v in model.diffusion_model.state_dict().items()}
save_file(sd, sys.argv[1], metadata={"config": json.dumps({"transformer": {"num_heads": 1, "text_dim": 8, "freq_dim": 8}})})
"""


def _requirements() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"Playwright is not installed in {sys.executable} (pip install playwright; .ci/run does)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM; .ci/run installs it)"
    return None


def pytest_collection_modifyitems(config, items):
    why = _requirements()
    if why:
        for item in items:
            if Path(str(item.fspath)).parent == Path(__file__).parent:
                item.add_marker(pytest.mark.skip(reason=why))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url: str):
    """GET `url`'s JSON; None for a 404."""
    status, body = request(url)
    assert status in (200, 404), (url, status, body[:500])
    return json.loads(body) if status == 200 else None


def placeholder(path: Path) -> None:
    """A valid safetensors file with one tiny tensor: listed by the loaders, not a usable model."""
    header = json.dumps({"placeholder": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))


def make_base(root: Path, base: Path) -> None:
    """ComfyUI's --base-directory: the pack in custom_nodes, the model files, a one-image dataset, settings."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    tiny = base / TINY_WAN
    made = subprocess.run([sys.executable, "-c", MAKE_TINY_WAN, str(tiny)], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    for name, source in MODEL_FILES.items():
        target = base / "models" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source is None:
            placeholder(target)
        else:
            shutil.copy(base / source if source == TINY_WAN else source, target)
    (base / "models" / "loras" / "broken.safetensors").write_bytes(b"not a safetensors file" * 4)
    dataset = base / "input" / "my_dataset"
    dataset.mkdir(parents=True)
    from PIL import Image  # ComfyUI's own requirement

    Image.new("RGB", (96, 64), (180, 60, 40)).save(dataset / "one.png")
    (dataset / "one.txt").write_text("a picture")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    # No first-run template dialog; no minimap drawn over the graph in the screenshots.
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("BROWSER_ARTIFACTS") or tmp_path_factory.mktemp("browser_artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    root = require_comfyui()
    base = tmp_path_factory.mktemp("comfy_base")
    make_base(root, base)
    port = free_port()
    log_path = base / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
             str(base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:"],
            cwd=root, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the ComfyUI server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if request(url + "/object_info/LycorisInspect", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the ComfyUI server did not answer in 300 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield SimpleNamespace(url=url, base=base, log=log_path, pack=PACK, get=lambda path: get_json(url + path))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Frontend:
    """One ComfyUI page in Chromium, and what it logged."""

    def __init__(self, page, url: str, artifacts: Path):
        self.page, self.url, self.artifacts = page, url, artifacts
        self.console: list[str] = []  # "type: text" of every console message
        self.failed: list[str] = []  # "status url" of every response >= 400 and every failed request
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("requestfailed", lambda r: self.failed.append(f"failed {r.url}"))

    def open(self) -> None:
        self.page.goto(self.url)
        self.page.wait_for_function("() => window.app && app.graph && app.extensionManager && app.vueAppReady",
                                    timeout=120_000)

    def command(self, name: str) -> None:
        self.page.evaluate("(name) => app.extensionManager.command.execute(name)", name)

    def shot(self, name: str, locator=None) -> Path:
        path = self.artifacts / f"{name}.png"
        (locator or self.page).screenshot(path=str(path))
        print(f"screenshot: {path}")
        return path


@pytest.fixture(scope="session")
def frontend(server, artifacts):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(server.base / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000})
        context.set_default_timeout(60_000)
        try:
            ui = Frontend(context.new_page(), server.url, artifacts)
            ui.open()
            yield ui
        finally:
            context.close()
