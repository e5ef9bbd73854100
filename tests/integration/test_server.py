"""The pack inside a running ComfyUI server: it imports cleanly, /object_info lists its nodes, its
example workflows are served and run through POST /prompt, and errors reach the UI.

The server runs from the ComfyUI checkout with `--base-directory` set to a temporary folder that holds
a `custom_nodes/comfyui-lycoris` link to this repository and a few model files, so nothing is left in
the ComfyUI tree.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import socket
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
from safetensors.torch import save_file

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

PACK = "comfyui-lycoris"
NODE_IDS = ("LycorisLoaderModelOnly", "LycorisLoader", "LycorisInspect", "LycorisConvert", "LycorisMerge")
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the frontend, never sent to the server
TINY_WAN = "tiny_wan_i2v.safetensors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: dict | None = None, timeout: float = 30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def server_blocker(env) -> str | None:
    """Why this ComfyUI's server cannot start in this environment, or None.

    ComfyUI 0.3.64's server serves the comfyui-workflow-templates package's `templates/` folder and stops at
    start-up when it is missing, as it is from the package's later versions (0.28's requirements pin 0.11.x,
    which has none; 0.28's server reads the new layout).
    """
    ask = ("from app.frontend_management import FrontendManager as F\n"
           "print(F.templates_path() if hasattr(F, 'templates_path') else '')")  # in ComfyUI's own process setup
    answer = subprocess.run([sys.executable, "-c", ask], cwd=env.root, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr[-2000:]
    folder = (answer.stdout.strip().splitlines() or [""])[-1]
    if folder in ("", "None") or Path(folder).is_dir():
        return None
    try:
        installed = importlib.metadata.version("comfyui-workflow-templates")
    except importlib.metadata.PackageNotFoundError:
        installed = "?"
    pin = next((line.strip() for line in (env.root / "requirements.txt").read_text().splitlines()
                if line.startswith("comfyui-workflow-templates")), "its own version")
    return (f"ComfyUI {env.version}'s server cannot start in this environment: it serves {folder}, which the installed "
            f"comfyui-workflow-templates {installed} does not have (ComfyUI {env.version} requires {pin})")


@pytest.fixture(scope="module")
def server(comfy_env, tmp_path_factory):
    blocker = server_blocker(comfy_env)
    if blocker:
        pytest.skip(blocker)
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    for name in ("wan_lokr_r3_a2.safetensors", "flux_kontext_lokr_r3_a2.safetensors"):
        shutil.copy(MUSUBI / name, loras / name)
    models = base / "models" / "diffusion_models"
    models.mkdir()
    # A fixture-sized Wan 2.1 i2v model that UNETLoader's detection accepts: the 'config' metadata
    # gives it what detection cannot infer at this size.
    weights = comfy_env.build("wan", seed=9).model.diffusion_model.state_dict()
    metadata = {"config": json.dumps({"transformer": {"num_heads": 1, "text_dim": 8, "freq_dim": 8}})}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(models / TINY_WAN), metadata=metadata)
    heads = comfy_env.comfy.model_detection.detect_unet_config(weights, "", metadata=metadata).get("num_heads")
    unet_loader_blocker = None if heads == 1 else (
        f"ComfyUI {comfy_env.version}'s UNETLoader cannot load the fixture-sized Wan test model: its detection makes "
        f"num_heads {heads} of dim {comfy_env.configs['wan'][1]['dim']} (dim // 128) and reads no 'config' metadata for Wan")

    port = free_port()
    log_path = base / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
             "--disable-auto-launch", "--database-url", "sqlite:///:memory:"],
            cwd=comfy_env.root, stdout=log, stderr=subprocess.STDOUT,
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
        yield SimpleNamespace(url=url, log=log_path, base=base, unet_loader_blocker=unet_loader_blocker)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get_json(server, path):
    status, body = request(server.url + path)
    assert status == 200, (path, status, body[:500])
    return json.loads(body)


def to_api(workflow: dict, object_info: dict) -> dict:
    """A UI workflow (what the frontend saves and the templates browser opens) as a /prompt request.

    Widget values are matched to the inputs in ComfyUI's own input order; a template whose values do
    not line up with the node's inputs fails here.
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = object_info[node["type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        values = list(node["widgets_values"])
        inputs = {}
        for name in order:
            kind, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            is_widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif is_widget:
                inputs[name] = values.pop(0)
                if options.get("control_after_generate"):
                    assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), (node["type"], name)
        assert not values, f"{node['type']} (node {node['id']}): widget values left over: {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def run_prompt(server, prompt: dict, targets: list[str] | None = None) -> dict:
    body = {"prompt": prompt, "client_id": "lycoris-tests"}
    if targets:
        body["partial_execution_targets"] = targets
    status, answer = request(server.url + "/prompt", body)
    assert status == 200, answer[:2000]
    prompt_id = json.loads(answer)["prompt_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        history = get_json(server, f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.25)
    pytest.fail(f"prompt {prompt_id} did not finish in 120 s")


def template(name: str) -> dict:
    return json.loads((REPO / "example_workflows" / f"{name}.json").read_text())


def test_pack_imports_cleanly(server):
    log = server.log.read_text()
    assert "Import times for custom nodes" in log
    lines = [line for line in log.splitlines() if line.rstrip().endswith(f"custom_nodes/{PACK}")]
    assert lines, log[-3000:]
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-3000:]


def test_object_info_lists_every_node_with_tooltips(server):
    everything = get_json(server, "/object_info")
    for node_id in NODE_IDS:
        info = everything[node_id]
        assert info["category"] == "loaders/lycoris" and info["description"]
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert "wan_lokr_r3_a2.safetensors" in info["input"]["required"]["lora_name"][1]["options"]
    loader = everything["LycorisLoaderModelOnly"]
    assert loader["input_order"]["required"][:4] == ["model", "lora_name", "strength_model", "architecture"]
    assert loader["output"] == ["MODEL", "STRING"]
    assert everything["LycorisLoader"]["output"] == ["MODEL", "CLIP", "STRING"]
    assert everything["LycorisLoader"]["input"]["optional"]["clip"][0] == "CLIP"


def test_example_workflows_are_served_as_templates(server):
    names = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    assert names and sorted(get_json(server, "/workflow_templates")[PACK]) == names
    for name in names:
        assert get_json(server, f"/api/workflow_templates/{PACK}/{name}.json") == template(name)


def require_unet_loader(server) -> None:
    """Skips a test that loads the tiny Wan model with ComfyUI's UNETLoader where this ComfyUI cannot."""
    if server.unet_loader_blocker:
        pytest.skip(server.unet_loader_blocker)


def test_loader_workflow_runs_through_post_prompt(server):
    object_info = get_json(server, "/object_info")
    workflow = template("lycoris_loader_wan_t2v")
    prompt = to_api(workflow, object_info)  # every node of the template, checked against the server's inputs
    by_type = {node["class_type"]: node_id for node_id, node in prompt.items()}
    assert {"LycorisLoaderModelOnly", "UNETLoader", "KSampler", "PreviewAny"} <= set(by_type)
    require_unet_loader(server)
    # Run the loader part on the test model: the template's own file names are placeholders, and there is
    # no text encoder or VAE here, so only the report preview (and what it needs) is executed.
    prompt[by_type["UNETLoader"]]["inputs"]["unet_name"] = TINY_WAN
    prompt[by_type["LycorisLoaderModelOnly"]]["inputs"]["lora_name"] = "wan_lokr_r3_a2.safetensors"
    entry = run_prompt(server, prompt, targets=[by_type["PreviewAny"]])
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"][by_type["PreviewAny"]]["text"][0]
    assert "applied       24 of 24 modules: 24 lokr (20 full-matrix, 4 low-rank)" in report
    assert "architecture  Wan 2.1/2.2 (wan)" in report and "unmatched     0" in report
    assert entry["outputs"][by_type["LycorisLoaderModelOnly"]]["text"] == [report]


def test_inspect_workflow_runs_through_post_prompt(server):
    prompt = to_api(template("lycoris_inspect"), get_json(server, "/object_info"))
    by_type = {node["class_type"]: node_id for node_id, node in prompt.items()}
    prompt[by_type["LycorisInspect"]]["inputs"]["lora_name"] = "flux_kontext_lokr_r3_a2.safetensors"
    entry = run_prompt(server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"][by_type["PreviewAny"]]["text"][0]
    assert "format        musubi" in report and "architecture  flux" in report
    assert entry["outputs"][by_type["LycorisInspect"]]["text"] == [report]


def test_errors_reach_the_ui_as_node_errors(server):
    require_unet_loader(server)
    loader = {"class_type": "LycorisLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": "flux_kontext_lokr_r3_a2.safetensors", "strength_model": 1.0,
                         "architecture": "auto", "mode": "patch", "lokr_full_matrix_alpha": False}}
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_WAN, "weight_dtype": "default"}},
              "2": loader, "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}
    entry = run_prompt(server, prompt)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "LycorisLoaderModelOnly" and errors[0]["exception_type"].endswith("AdapterError")
    assert "is an adapter for FLUX.1 dev / Kontext (flux), but the model is Wan 2.1/2.2 (wan)" in errors[0]["exception_message"]

    loader["inputs"]["lora_name"] = "not_there.safetensors"
    status, answer = request(server.url + "/prompt", {"prompt": prompt})
    assert status == 400
    node_errors = json.loads(answer)["node_errors"]["2"]["errors"]
    assert node_errors[0]["type"] == "value_not_in_list"


def test_bake_workflow_runs_through_post_prompt(server):
    prompt = to_api(template("lycoris_bake"), get_json(server, "/object_info"))
    by_type = {node["class_type"]: node_id for node_id, node in prompt.items()}
    merge = prompt[by_type["LycorisMerge"]]["inputs"]
    merge["unet_name"], merge["lora_name"] = TINY_WAN, "wan_lokr_r3_a2.safetensors"
    entry = run_prompt(server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"][by_type["PreviewAny"]]["text"][0]
    assert "24/24 modules matched (24 lokr)" in report
    baked = server.base / "output" / "diffusion_models" / "tiny_wan_i2v_wan_lokr_r3_a2.safetensors"
    assert baked.is_file() and str(baked) in report
    assert "tiny_wan_i2v_wan_lokr_r3_a2.safetensors" in get_json(server, "/object_info/UNETLoader")["UNETLoader"][
        "input"]["required"]["unet_name"][0]
