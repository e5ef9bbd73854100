"""The pack inside a running ComfyUI server: it imports cleanly, /object_info lists its nodes, its
example workflows are served and run through POST /prompt, and errors reach the UI.

The server runs from the ComfyUI checkout with `--base-directory` set to a temporary folder that holds
a `custom_nodes/comfyui-lycoris` link to this repository and a few model files, so nothing is left in
the ComfyUI tree.

The diffusion model is a tiny Wan 2.1 t2v that every release's UNETLoader detects from its weights alone:
detection takes num_heads = dim // 128, freq_dim 256 and the default text_dim 4096 (0.3.64 reads no
`config` metadata for Wan), so it is 128 wide with one head, two blocks (1.1M weights, 4.4 MB). Its LoKr is
made here: the Musubi fixtures are 10 wide.
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
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from comfyui_host import REPO, example_workflow, require_comfyui
from helpers import MUSUBI
from safetensors.torch import save_file

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

PACK = "comfyui-lycoris"
NODE_IDS = ("LycorisLoaderModelOnly", "LycorisLoader", "LycorisLoaderWan22Pair", "LycorisCreateHook", "LycorisInspect",
            "LycorisConvert", "LycorisMerge", "LycorisToLora", "LycorisResize", "LycorisExtract", "LycorisEma",
            "LycorisTrain", "LycorisSave", "LycorisApply", "LycorisSaveDataset", "LycorisTrainJob")
CATEGORIES = ("loaders/lycoris", "loaders/lycoris/tools", "training/lycoris")
ADAPTER_INPUTS = ("lora_name", "lora_high_noise", "lora_low_noise")  # combos listing models/loras
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the frontend, never sent to the server
TINY_WAN = "tiny_wan_t2v.safetensors"
TINY_WAN_LOKR = "tiny_wan_lokr.safetensors"
TINY_WAN_CONFIG = dict(image_model="wan2.1", model_type="t2v", dim=128, num_heads=1, ffn_dim=256, num_layers=2, in_dim=16,
                       out_dim=16, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True,
                       cross_attn_norm=True, eps=1e-6)
# The layers Musubi trains in each Wan block (t2v: no k_img/v_img): 2 blocks x 10 = 20 LoKr modules.
WAN_LAYERS = [f"{attn}.{x}" for attn in ("self_attn", "cross_attn") for x in "qkvo"] + ["ffn.0", "ffn.2"]


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


def tiny_wan(env) -> dict[str, torch.Tensor]:
    """The weights of ComfyUI's Wan 2.1 t2v model at TINY_WAN_CONFIG, seeded random."""
    model = env.new_model(env.model_class("WAN21_T2V"), TINY_WAN_CONFIG)
    gen = torch.Generator().manual_seed(9)
    return {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in model.diffusion_model.state_dict().items()}


def lokr_for(weights) -> dict[str, torch.Tensor]:
    """A Musubi-style LoKr on WAN_LAYERS of the tiny model: full-matrix w1 (4, 4) ⊗ w2 (out/4, in/4)."""
    gen = torch.Generator().manual_seed(10)
    tensors = {}
    for block in range(TINY_WAN_CONFIG["num_layers"]):
        for layer in WAN_LAYERS:
            rows, cols = weights[f"blocks.{block}.{layer}.weight"].shape
            stem = f"lora_unet_blocks_{block}_{layer.replace('.', '_')}"
            tensors[f"{stem}.lokr_w1"] = torch.randn(4, 4, generator=gen)
            tensors[f"{stem}.lokr_w2"] = torch.randn(rows // 4, cols // 4, generator=gen) * 0.01
    return tensors


@pytest.fixture(scope="module")
def server(comfy_env, tmp_path_factory):
    blocker = server_blocker(comfy_env)
    if blocker:  # a broken environment (CI sets it up): a failure, not a skip
        pytest.fail(blocker)
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    for name in ("wan_lokr_r3_a2.safetensors", "flux_kontext_lokr_r3_a2.safetensors"):
        shutil.copy(MUSUBI / name, loras / name)
    models = base / "models" / "diffusion_models"
    models.mkdir()
    weights = tiny_wan(comfy_env)
    save_file(weights, str(models / TINY_WAN))
    detected = comfy_env.comfy.model_detection.detect_unet_config(weights, "")
    assert {k: detected.get(k) for k in ("dim", "num_heads", "model_type")} == {"dim": 128, "num_heads": 1, "model_type": "t2v"}
    save_file(lokr_for(weights), str(loras / TINY_WAN_LOKR), metadata={"ss_base_model_version": "wan"})

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
        yield SimpleNamespace(url=url, log=log_path, base=base)
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
    not line up with the node's inputs fails here. A node the server does not have goes as it is, without
    inputs, for the server to report.
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        if node["type"] not in object_info:
            prompt[str(node["id"])] = {"class_type": node["type"], "inputs": {}}
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
    return finished(server, json.loads(answer)["prompt_id"])


def finished(server, prompt_id: str) -> dict:
    """The history entry of a queued prompt, once it has run."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        history = get_json(server, f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.25)
    pytest.fail(f"prompt {prompt_id} did not finish in 120 s")


def template(node_type: str) -> dict:
    return example_workflow(node_type)[1]


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
        assert info["category"] in CATEGORIES and info["description"], node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
                if name in ADAPTER_INPUTS:
                    assert "wan_lokr_r3_a2.safetensors" in spec[1]["options"], f"{node_id}.{name}"
    assert len([n for n, info in everything.items() if info.get("python_module", "").endswith(PACK)]) == len(NODE_IDS)
    loader = everything["LycorisLoaderModelOnly"]
    assert loader["input_order"]["required"][:4] == ["model", "lora_name", "strength_model", "architecture"]
    assert loader["output"] == ["MODEL", "STRING"]
    assert everything["LycorisLoader"]["output"] == ["MODEL", "CLIP", "STRING"]
    assert everything["LycorisLoader"]["input"]["optional"]["clip"][0] == "CLIP"


def test_example_workflows_are_served_as_templates(server):
    paths = sorted((REPO / "example_workflows").glob("*.json"))
    assert paths and sorted(get_json(server, "/workflow_templates")[PACK]) == [p.stem for p in paths]
    for path in paths:
        served = get_json(server, f"/api/workflow_templates/{PACK}/{urllib.parse.quote(path.name)}")
        assert served == json.loads(path.read_text()), path.name


def test_loader_workflow_runs_through_post_prompt(server):
    object_info = get_json(server, "/object_info")
    workflow = template("LycorisLoaderModelOnly")
    prompt = to_api(workflow, object_info)  # every node of the template, checked against the server's inputs
    by_type = {node["class_type"]: node_id for node_id, node in prompt.items()}
    assert {"LycorisLoaderModelOnly", "UNETLoader", "KSampler", "PreviewAny"} <= set(by_type)
    # Run the loader part on the test model: the template's own file names are placeholders, and there is
    # no text encoder or VAE here, so only the report preview (and what it needs) is executed.
    prompt[by_type["UNETLoader"]]["inputs"]["unet_name"] = TINY_WAN
    prompt[by_type["LycorisLoaderModelOnly"]]["inputs"]["lora_name"] = TINY_WAN_LOKR
    entry = run_prompt(server, prompt, targets=[by_type["PreviewAny"]])
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"][by_type["PreviewAny"]]["text"][0]
    assert "applied       20 of 20 modules: 20 lokr" in report
    assert "architecture  Wan 2.1/2.2 (wan)" in report and "unmatched     0" in report
    assert entry["outputs"][by_type["LycorisLoaderModelOnly"]]["text"] == [report]


def test_wan22_pair_workflow_runs_through_post_prompt(server):
    object_info = get_json(server, "/object_info")
    info = object_info["LycorisLoaderWan22Pair"]
    assert info["category"] == "loaders/lycoris" and info["output"] == ["MODEL", "MODEL", "STRING"]
    specs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert all(spec[1].get("tooltip") for spec in specs.values()), [name for name, spec in specs.items() if not spec[1].get("tooltip")]
    assert specs["lora_low_noise"][1]["options"][:1] == ["None"] and TINY_WAN_LOKR in specs["lora_low_noise"][1]["options"]
    prompt = to_api(template("LycorisLoaderWan22Pair"), object_info)
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    assert len(by_type["UNETLoader"]) == 2 and len(by_type["KSamplerAdvanced"]) == 2
    steps = sorted((prompt[n]["inputs"]["start_at_step"], prompt[n]["inputs"]["end_at_step"]) for n in by_type["KSamplerAdvanced"])
    assert steps == [(0, 10), (10, 10000)]  # high noise first, low noise to the end, as ComfyUI's Wan 2.2 templates
    for node_id in by_type["UNETLoader"]:
        prompt[node_id]["inputs"]["unet_name"] = TINY_WAN
    (pair_id,) = by_type["LycorisLoaderWan22Pair"]
    pair = prompt[pair_id]["inputs"]
    pair.update(lora_high_noise=TINY_WAN_LOKR, lora_low_noise=TINY_WAN_LOKR, strength_low_noise=0.5)
    (report_id,) = by_type["PreviewAny"]
    entry = run_prompt(server, prompt, targets=[report_id])
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"][report_id]["text"][0]
    high, low = report.split("\n\nlow-noise model\n")
    assert high.startswith("high-noise model\nfile          tiny_wan_lokr.safetensors")
    assert f"mode          {pair['mode']}, strength 1" in high and f"mode          {pair['mode']}, strength 0.5" in low
    assert high.count("applied       20 of 20 modules: 20 lokr") == 1 and low.count("applied       20 of 20 modules") == 1


def test_inspect_workflow_runs_through_post_prompt(server):
    prompt = to_api(template("LycorisInspect"), get_json(server, "/object_info"))
    by_type = {node["class_type"]: node_id for node_id, node in prompt.items()}
    prompt[by_type["LycorisInspect"]]["inputs"]["lora_name"] = "flux_kontext_lokr_r3_a2.safetensors"
    entry = run_prompt(server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"][by_type["PreviewAny"]]["text"][0]
    assert "format        musubi" in report and "architecture  flux" in report
    assert entry["outputs"][by_type["LycorisInspect"]]["text"] == [report]


def loader_error(entry) -> dict:
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "LycorisLoaderModelOnly", entry["status"]
    return errors[0]


def test_errors_reach_the_ui_as_node_errors(server):
    loader = {"class_type": "LycorisLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": "flux_kontext_lokr_r3_a2.safetensors", "strength_model": 1.0,
                         "architecture": "auto", "mode": "patch", "lokr_full_matrix_alpha": False}}
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_WAN, "weight_dtype": "default"}},
              "2": loader, "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}
    error = loader_error(run_prompt(server, prompt))
    assert error["exception_type"].endswith("AdapterError")
    assert "is an adapter for FLUX.1 dev / Kontext (flux), but the model is Wan 2.1/2.2 (wan)" in error["exception_message"]

    loader["inputs"]["lora_name"] = "not_there.safetensors"
    status, answer = request(server.url + "/prompt", {"prompt": prompt})
    if status == 400:  # releases that check V3 combo values when a prompt is queued (0.28) refuse it there
        node_errors = json.loads(answer)["node_errors"]["2"]["errors"]
        assert node_errors[0]["type"] == "value_not_in_list"
    else:  # 0.3.64 checks only V1 lists there: the prompt runs, and the loader fails naming the file
        assert status == 200, answer[:2000]
        error = loader_error(finished(server, json.loads(answer)["prompt_id"]))
        assert "not_there.safetensors" in error["exception_message"]


def test_training_workflow_is_checked_through_post_prompt(server):
    """Queued as it is, the training template is refused for what only the user or a newer ComfyUI can give it:
    core nodes this release lacks (0.3.64 has no dataset nodes), else the model files and dataset folder, which
    are the user's. Never for one of the pack's nodes."""
    object_info = get_json(server, "/object_info")
    workflow = template("LycorisTrain")
    missing = {node["type"] for node in workflow["nodes"]} - FRONTEND_ONLY - set(object_info)
    status, answer = request(server.url + "/prompt", {"prompt": to_api(workflow, object_info)})
    assert status == 400, answer[:2000]
    answer = json.loads(answer)
    if missing:
        assert not any(t.startswith("Lycoris") for t in missing), missing
        assert any(t in answer["error"]["message"] for t in missing), answer["error"]  # "node X does not exist"
        return
    refused = {(e["class_type"], error["extra_info"]["input_name"], error["type"])
               for e in answer["node_errors"].values() for error in e["errors"]}
    assert refused and all(kind == "value_not_in_list" and name in ("unet_name", "clip_name", "vae_name", "folder")
                           for _, name, kind in refused), refused


def test_bake_workflow_runs_through_post_prompt(server):
    prompt = to_api(template("LycorisMerge"), get_json(server, "/object_info"))
    by_type = {node["class_type"]: node_id for node_id, node in prompt.items()}
    merge = prompt[by_type["LycorisMerge"]]["inputs"]
    merge["unet_name"], merge["lora_name"] = TINY_WAN, TINY_WAN_LOKR
    entry = run_prompt(server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"][by_type["PreviewAny"]]["text"][0]
    assert "20/20 modules matched (20 lokr)" in report
    baked = server.base / "output" / "diffusion_models" / "tiny_wan_t2v_tiny_wan_lokr.safetensors"
    assert baked.is_file() and str(baked) in report
    assert baked.name in get_json(server, "/object_info/UNETLoader")["UNETLoader"][
        "input"]["required"]["unet_name"][0]
