"""Train LyCORIS (job) in a running ComfyUI server: while the job trains, the server answers (/system_stats, /queue)
at once, the nodes of the same prompt that do not need the adapter run, and more prompts wait in the queue until the
job ends (ComfyUI runs one prompt at a time); the Cancel button (POST /interrupt) stops the job with a checkpoint and no
adapter, and the next prompt runs.

The server runs from the ComfyUI checkout with `--base-directory` set to a temporary folder holding a
`custom_nodes/comfyui-lycoris` link to this repository, the model file and the dataset, as tests/integration/test_server.py
runs it (and, like it, needs the ComfyUI release's own comfyui-workflow-templates layout to start).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from comfyui_host import REPO, require_comfyui
from training_runs import TEXT_WIDTH, write_model

require_comfyui()  # skips this module, with the reason, when there is no ComfyUI

MODEL = "tiny_wan_t2v.safetensors"


def request(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(url: str) -> tuple[dict, float]:
    """The JSON answer and how long it took."""
    begin = time.monotonic()
    status, body = request(url)
    assert status == 200, (url, status, body[:500])
    return json.loads(body), time.monotonic() - begin


def wait_for(what: str, condition, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def templates_missing(env) -> str | None:
    """The folder this ComfyUI's server serves templates from, where it is missing (the server then stops at start-up:
    ComfyUI 0.3.64 with a later comfyui-workflow-templates than it pins), else None."""
    ask = ("from app.frontend_management import FrontendManager as F\n"
           "print(F.templates_path() if hasattr(F, 'templates_path') else '')")  # in ComfyUI's own process setup
    answer = subprocess.run([sys.executable, "-c", ask], cwd=env.root, capture_output=True, text=True, timeout=120)
    folder = (answer.stdout.strip().splitlines() or [""])[-1]
    return None if folder in ("", "None") or Path(folder).is_dir() else folder


@pytest.fixture(scope="module")
def server(comfy_env, tmp_path_factory):
    missing = templates_missing(comfy_env)
    if missing:  # a broken environment (CI sets it up): a failure, not a skip, as in test_server.py
        pytest.fail(f"ComfyUI {comfy_env.version}'s server cannot start in this environment: it serves {missing}, which the "
                    "installed comfyui-workflow-templates does not have (install the version its requirements.txt pins)")
    base = tmp_path_factory.mktemp("job_server")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-lycoris").symlink_to(REPO, target_is_directory=True)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    write_model(comfy_env, "wan", base / "models" / "diffusion_models" / MODEL)
    fp = comfy_env.folder_paths
    old = fp.get_output_directory()
    fp.set_output_directory(str(base / "output"))
    try:
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            latents = [{"samples": torch.randn(2, 16, 1, 8, 8, generator=gen)}]
            conditioning = [[[torch.randn(1, 6, TEXT_WIDTH["wan"], generator=gen), {}] for _ in range(2)]]
            comfy_env.node("LycorisSaveDataset").execute(latents=latents, conditioning=conditioning, name=["served"],
                                                         overwrite=[False], samples_per_shard=[2])
    finally:
        fp.set_output_directory(old)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = base / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
             "--disable-auto-launch", "--database-url", "sqlite:///:memory:"],
            cwd=comfy_env.root, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def answering():
        if proc.poll() is not None:
            pytest.fail(f"the ComfyUI server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            return request(url + "/object_info/LycorisTrainJob", timeout=5)[0] == 200
        except OSError:
            return False

    try:
        wait_for("the server", answering, timeout=300)
        yield url, base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def job_prompt(steps: int, name: str) -> dict:
    inputs = dict(unet_name=MODEL, weight_dtype="default", dataset="served", processes=1, algorithm="lokr", rank=4, alpha=2.0,
                  factor=-1, steps=steps, learning_rate=0.001, optimizer="AdamW", batch_size=2, seed=0, warmup_steps=0,
                  gradient_checkpointing=True, architecture="auto", rank_dropout=0.0, module_dropout=0.0, include="",
                  exclude="", filename_prefix=name, checkpoint_every=1, options="", resume_from="")
    return {"1": {"class_type": "LycorisTrainJob", "inputs": inputs}}


def queue(url: str, prompt: dict) -> str:
    status, body = request(url + "/prompt", {"prompt": prompt, "client_id": "lycoris-tests"})
    assert status == 200, body[:2000]
    return json.loads(body)["prompt_id"]


def history(url: str, prompt_id: str) -> dict | None:
    entry = get(f"{url}/history/{prompt_id}")[0].get(prompt_id)
    return entry if entry and entry.get("status", {}).get("completed") is not None else None


def test_server_answers_while_the_job_trains_and_cancel_stops_it(server):
    url, base = server
    # The job, and in the same prompt a branch that does not need it (an empty latent saved to output/latents).
    prompt = {**job_prompt(100000, "served_long"),
              "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "latents/side"}}}
    long_job = queue(url, prompt)
    checkpoints = base / "output" / "lycoris_checkpoints" / "served_long_00001_"
    wait_for("the first step", lambda: checkpoints.is_dir() and any(checkpoints.iterdir()))
    # ComfyUI starts an async node first; the other branch ran while the job trains.
    wait_for("the other branch", lambda: list((base / "output" / "latents").glob("side_*.latent")), timeout=30)
    waiting = queue(url, job_prompt(2, "served_next"))  # queued behind the job

    # Training, in other processes: every answer comes at once.
    slowest = 0.0
    for _ in range(10):
        stats, took = get(url + "/system_stats")
        assert stats["system"]["comfyui_version"]
        slowest = max(slowest, took)
        state, took = get(url + "/queue")
        slowest = max(slowest, took)
        assert [item[1] for item in state["queue_running"]] == [long_job]
        assert [item[1] for item in state["queue_pending"]] == [waiting]
        time.sleep(0.1)
    assert slowest < 2.0, slowest
    assert history(url, long_job) is None and history(url, waiting) is None

    assert request(url + "/interrupt", {})[0] == 200  # the Cancel button
    stopped = wait_for("the job to stop", lambda: history(url, long_job))
    assert stopped["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in stopped["status"]["messages"]), stopped["status"]
    assert not list((base / "output" / "loras").glob("served_long*.safetensors"))
    assert sorted(p.name for p in checkpoints.iterdir())[-1].startswith("checkpoint-")

    done = wait_for("the queued prompt", lambda: history(url, waiting))  # runs once the job has stopped
    assert done["status"]["status_str"] == "success", done["status"]
    assert (base / "output" / "loras" / "served_next_00001_.safetensors").is_file()
