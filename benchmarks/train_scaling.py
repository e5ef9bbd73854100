"""Training as a job: steps/s and peak memory of the `train` command's data parallelism at 1 and 2 processes on the
CPU (scaling efficiency), and Train LyCORIS against ComfyUI core's Train LoRA node (LoKr and LoHa).

Scaling: the `train` command's engine without ComfyUI's model — `Ranks` (torch.distributed, gloo), DDP over the
adapters (`Ranks.data_parallel`), the core loop, a global batch split between the processes as `objective.batch_plan`
splits it, one forward pass per sample as the denoising objective does — on the built-in demo model (demo.py, a
Wan-shaped DiT) learning its teacher. Three ways on the same cores: 1 process with 1 thread, 2 processes with 1 thread
each (under torchrun), 1 process with 2 threads. Time per step: the median interval between optimizer steps (rank 0);
peak memory: the peak RSS of every process of the job, summed. The 2-process run must record the 1-process run's
losses (the same training, split): a difference is noted on the case.

Train nodes: ComfyUI's Wan 2.1 model, loaded from a file by ComfyUI's own loader, trained by each node in a fresh
ComfyUI process with the same latents, caption, rank, steps, batch size 1, fp32 and gradient checkpointing: time per
step is the median interval between optimizer steps (torch's global optimizer hook), peak memory the growth of peak
RSS (or CUDA memory) over the node's run. They do not train the same layers (Train LyCORIS: Musubi Tuner's for Wan;
Train LoRA: every weight) nor the same factors (Train LoRA's LoKr takes the rank as its Kronecker factor): each node
as a user runs it. Needs a ComfyUI: COMFYUI_PATH, and ComfyUI's Python.

    python -m comfyui_lycoris.benchmarks.train_scaling {rank,node} 'JSON PARAMS'

is the entry of this module's own subprocesses (a rank, under torchrun or alone; one train node in ComfyUI).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from ..demo import DemoSize
from .harness import MB, Result, proc_status, reset_peak_rss, unavailable

GROUP = "train_scaling"
NO_COMFYUI = 3  # the node worker's exit code when ComfyUI does not import
WAN_TEXT_DIM = 4096  # ComfyUI's Wan 2.1 detection fixes the text width, and reads the head count as width / 128


@dataclass(frozen=True)
class ScalingSize:
    """How big the group runs. The defaults are the smallest that still train (tests); QUICK and FULL below."""

    demo: DemoSize = field(default_factory=DemoSize)  # the demo model (demo.py's own size by default)
    samples: int = 8
    batch: int = 4  # global batch: split between the processes
    steps: int = 4
    runs: int = 1  # rounds of the three ways, interleaved
    node_dim: int = 128  # ComfyUI Wan model for the node comparison: width (128 per head), blocks, latent size
    node_blocks: int = 1
    node_latent: int = 8  # latent height and width (16 channels, 1 frame)
    node_text_tokens: int = 8
    node_rank: int = 4
    node_steps: int = 3
    node_threads: int = 1  # torch threads of each node's process (0: torch's default); tiny tensors: one is steadiest


QUICK_SIZE = ScalingSize(DemoSize(dim=256, ffn=1024, heads=4, blocks=4, tokens=128, text_tokens=16, batch=4), samples=8,
                         batch=4, steps=10, runs=1, node_dim=256, node_blocks=2, node_latent=16, node_text_tokens=16,
                         node_rank=8, node_steps=12)
FULL_SIZE = ScalingSize(DemoSize(dim=384, ffn=1536, heads=6, blocks=4, tokens=256, text_tokens=32, batch=8), samples=16,
                        batch=8, steps=12, runs=2, node_dim=1536, node_blocks=4, node_latent=32, node_text_tokens=64,
                        node_rank=16, node_steps=10, node_threads=0)
WAYS = {  # name: (processes, threads per process)
    "1 process": (1, 1),
    "2 processes": (2, 1),
    "1 process, 2 threads": (1, 2),
}


def run(size: ScalingSize, device: torch.device, log, temp_dir: str | None = None) -> list[Result]:
    return scaling(size, log, temp_dir) + nodes(size, device, log, temp_dir)


# ---------------------------------------------------------------------------------------------
# Scaling


def _job_command(processes: int, params: dict) -> list[str]:
    worker = ["-m", f"{__package__}.train_scaling", "rank", json.dumps(params)]
    if processes == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *worker]


def _run_job(size: ScalingSize, processes: int, threads: int, folder: str) -> dict:
    """One training job; {"seconds": [per step], "peak_bytes": peak RSS summed over the processes, "growth_bytes": the
    same less each process's RSS before training, "losses": [...]}."""
    answer = os.path.join(folder, f"answer-{processes}x{threads}")
    params = {"demo": asdict(size.demo), "samples": size.samples, "batch": size.batch, "steps": size.steps,
              "threads": threads, "answer": answer}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(_job_command(processes, params), capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"{processes}-process job exited {done.returncode}: {tail[-1] if tail else 'no output'}")
    ranks = []
    for rank in range(processes):
        with open(f"{answer}.rank{rank}") as f:
            ranks.append(json.load(f))
        os.remove(f"{answer}.rank{rank}")
    times = ranks[0]["times"]
    return {"seconds": [b - a for a, b in zip(times, times[1:])], "peak_bytes": sum(r["peak_bytes"] for r in ranks),
            "growth_bytes": sum(r["growth_bytes"] for r in ranks), "losses": ranks[0]["losses"]}


def scaling(size: ScalingSize, log, temp_dir: str | None = None) -> list[Result]:
    demo = size.demo
    log(f"{GROUP}: demo model {demo.dim} wide, {demo.blocks} blocks, {demo.tokens} tokens, batch {size.batch}, "
        f"{size.steps} steps, 1 and 2 processes")
    seconds: dict[str, list[float]] = {name: [] for name in WAYS}
    peaks: dict[str, int] = {}
    growth: dict[str, int] = {}
    losses: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=temp_dir) as folder:
        for round_ in range(size.runs):
            names = list(WAYS)
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                job = _run_job(size, *WAYS[name], folder)
                seconds[name] += job["seconds"]
                peaks[name] = max(peaks.get(name, 0), job["peak_bytes"])
                growth[name] = max(growth.get(name, 0), job["growth_bytes"])
                losses[name] = job["losses"]
    median = {name: statistics.median(s) for name, s in seconds.items()}
    worst = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses["2 processes"], losses["1 process"]))
    same = "" if worst <= 1e-5 else f"the 2-process losses differ from the 1-process ones by {worst:.2g} (relative); "
    results = []
    for baseline in ("1 process", "1 process, 2 threads"):
        ours, base = median["2 processes"], median[baseline]
        efficiency = base / (WAYS["2 processes"][0] * ours) if baseline == "1 process" else base / ours
        what = ("scaling efficiency (steps/s per process against 1 process)" if baseline == "1 process"
                else "speed-up over threads on the same cores")
        params = {"model": "demo DiT", "dim": demo.dim, "blocks": demo.blocks, "tokens": demo.tokens, "batch": size.batch,
                  "steps": size.steps, "processes": 2, "threads_per_process": 1, "baseline": baseline,
                  "steps_per_second": round(1 / ours, 4), "baseline_steps_per_second": round(1 / base, 4),
                  "efficiency": round(efficiency, 4), "training_bytes": growth["2 processes"],
                  "baseline_training_bytes": growth[baseline]}
        results.append(Result(
            GROUP, f"train demo 2 processes vs {baseline}", params, "2 processes (DDP, gloo), 1 thread each", baseline,
            seconds=ours, baseline_seconds=base, runs=len(seconds["2 processes"]), peak_bytes=peaks["2 processes"],
            baseline_peak_bytes=peaks[baseline],
            note=f"{1 / base:.3g} -> {1 / ours:.3g} steps/s: {what} {efficiency:.0%}; peak memory = peak RSS of every "
                 f"process of the job, summed (of which training: {growth['2 processes'] / MB:.0f} MB against "
                 f"{growth[baseline] / MB:.0f} MB); {same}").finish())
    return results


def rank_worker(params: dict) -> None:
    """Inside a job's process: train the demo model's LoKr, data-parallel when started by torchrun."""
    import torch.nn.functional as F

    from ..demo import build_models
    from ..lycoris_core.training.config import TrainingConfig
    from ..lycoris_core.training.distributed import Ranks
    from ..lycoris_core.training.inject import inject_adapters
    from ..lycoris_core.training.loop import train
    from ..lycoris_core.training.objective import batch_plan

    torch.set_num_threads(params["threads"])
    ranks = Ranks.start("cpu")
    size = DemoSize(**params["demo"])
    base, teacher = build_models(0, size)
    gen = torch.Generator().manual_seed(1)
    n = params["samples"]
    latents = torch.randn(n, size.tokens, size.in_dim, generator=gen)
    timestep = torch.rand(n, generator=gen) * 1000
    text = torch.randn(n, size.text_tokens, size.text_dim, generator=gen)
    with torch.no_grad():
        target = torch.cat([teacher(latents[i:i + 1], timestep[i:i + 1], text[i:i + 1]) for i in range(n)])
    del teacher
    config = TrainingConfig(algorithm="lokr", rank=8, alpha=4.0, architecture="wan", learning_rate=1e-3,
                            max_steps=params["steps"], seed=1)
    adapters = inject_adapters(base, config)
    before = proc_status().get("VmRSS", 0)  # the interpreter, torch, the model and the data

    def loss_fn(batch):  # as the denoising objective: one forward pass per sample, the whole batch's mean
        total = torch.zeros(())
        for i in batch.indices:
            total = total + F.mse_loss(base(latents[i:i + 1], timestep[i:i + 1], text[i:i + 1]), target[i:i + 1])
        return total / batch.size

    times = []
    result = train(adapters, ranks.data_parallel(adapters, loss_fn),
                   batch_plan(n, params["batch"], config.seed, ranks.rank, ranks.world), config,
                   progress=lambda p: times.append(time.perf_counter()))
    with open(f"{params['answer']}.rank{ranks.rank}", "w") as f:
        peak = proc_status().get("VmHWM", 0)
        json.dump({"times": times, "peak_bytes": peak, "growth_bytes": peak - before, "losses": result.losses}, f)
    ranks.close()


# ---------------------------------------------------------------------------------------------
# Train LyCORIS against ComfyUI's Train LoRA

NODES = {  # contender: what the case calls it
    "lycoris": "LycorisTrain (this pack)",
    "comfyui": "TrainLoraNode (ComfyUI core)",
}
ALGORITHMS = {"lokr": "LoKr", "loha": "LoHa"}  # ours: ComfyUI's name


def comfyui_found() -> tuple[str | None, str]:
    """(ComfyUI root, '') or (None, why not)."""
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        return None, "ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (and run the bench with its Python)"
    if not (os.path.isfile(os.path.join(root, "comfy", "model_patcher.py")) and os.path.isfile(os.path.join(root, "nodes.py"))):
        return None, f"COMFYUI_PATH={root} is not a ComfyUI checkout (no comfy/model_patcher.py and nodes.py)"
    return root, ""


class NoComfyUI(RuntimeError):
    pass


def _node_run(root: str, params: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", f"{__package__}.train_scaling", "node", json.dumps(params)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600, cwd=root)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
        if done.returncode == NO_COMFYUI:
            raise NoComfyUI(f"{tail[-1]}; run the bench with ComfyUI's Python")
        raise RuntimeError(f"exited {done.returncode}: {tail[-1] if tail else 'no output'}")
    return json.loads(lines[-1])


def nodes(size: ScalingSize, device: torch.device, log, temp_dir: str | None = None) -> list[Result]:
    root, why = comfyui_found()
    results = []
    for algorithm, comfy_name in ALGORITHMS.items():
        name = f"train node {algorithm} r{size.node_rank} LycorisTrain vs TrainLoraNode"
        params = {"model": "ComfyUI Wan 2.1 t2v", "dim": size.node_dim, "blocks": size.node_blocks,
                  "latent": [16, 1, size.node_latent, size.node_latent], "text_tokens": size.node_text_tokens,
                  "rank": size.node_rank, "steps": size.node_steps, "batch": 1, "dtype": "fp32", "algorithm": algorithm,
                  "threads": size.node_threads or torch.get_num_threads()}
        if root is None:
            results.append(unavailable(GROUP, name, params, NODES["lycoris"], NODES["comfyui"], why, status="skipped"))
            continue
        log(f"{GROUP}: {name} (ComfyUI from {root})")
        measured, notes = {}, ""
        try:
            with tempfile.TemporaryDirectory(dir=temp_dir) as folder:
                for contender in ("lycoris", "comfyui"):
                    measured[contender] = _node_run(root, {**params, "contender": contender, "comfy_algorithm": comfy_name,
                                                           "size": asdict(size), "device": str(device), "folder": folder})
        except NoComfyUI as e:
            results.append(unavailable(GROUP, name, params, NODES["lycoris"], NODES["comfyui"], str(e), status="skipped"))
            continue
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            results.append(unavailable(GROUP, name, params, NODES["lycoris"], NODES["comfyui"],
                                       f"ComfyUI at {root}: {e}", status="error"))
            continue
        for contender, m in measured.items():
            if len(m["seconds"]) != size.node_steps - 1:
                notes += f"{contender} took {len(m['seconds']) + 1} optimizer steps, not {size.node_steps}; "
        results.append(Result(
            GROUP, name, {**params, "comfyui": measured["comfyui"]["version"], "device": str(device)},
            NODES["lycoris"], NODES["comfyui"],
            seconds=statistics.median(measured["lycoris"]["seconds"]),
            baseline_seconds=statistics.median(measured["comfyui"]["seconds"]), runs=len(measured["lycoris"]["seconds"]),
            peak_bytes=measured["lycoris"]["peak_bytes"], baseline_peak_bytes=measured["comfyui"]["peak_bytes"],
            note=notes + f"trained: ours {measured['lycoris']['parameters']:,} parameters in {measured['lycoris']['tensors']} "
                 f"tensors, ComfyUI's {measured['comfyui']['parameters']:,} in {measured['comfyui']['tensors']}; "
                 "time per step = median interval between optimizer steps; peak memory = growth of peak RSS "
                 "(CUDA: allocated) over the node's run, in a fresh ComfyUI process; ").finish())
    return results


def _node_inputs(node_cls, values: dict) -> dict:
    """Every input of a ComfyUI node: `values` where given, else the node's default (as the frontend would send)."""
    if hasattr(node_cls, "define_schema"):  # V3
        schema = node_cls.define_schema()
        wrap = (lambda v: [v]) if schema.is_input_list else (lambda v: v)
        return {i.id: wrap(values[i.id] if i.id in values else i.default) for i in schema.inputs}
    required = node_cls.INPUT_TYPES()["required"]
    return {k: values[k] if k in values else spec[1].get("default") for k, spec in required.items()}


def node_worker(params: dict) -> dict:
    """Inside a fresh ComfyUI process: one node trains; its time per step and peak memory."""
    import comfy.cli_args

    device = torch.device(params["device"])
    comfy.cli_args.args.cpu = device.type == "cpu"
    import comfy.model_management  # noqa: F401  (picks the device, after the line above)
    import comfy.sd
    import comfy.supported_models
    import comfyui_version
    from safetensors.torch import save_file
    from torch.optim.optimizer import register_optimizer_step_post_hook

    size = ScalingSize(**{**params["size"], "demo": DemoSize(**params["size"]["demo"])})
    if size.node_threads:
        torch.set_num_threads(size.node_threads)
    # The model file, as ComfyUI's Load Diffusion Model loads it (its detection, its own classes).
    unet_config = dict(image_model="wan2.1", model_type="t2v", dim=size.node_dim, num_heads=size.node_dim // 128,
                       ffn_dim=4 * size.node_dim, num_layers=size.node_blocks, in_dim=16, out_dim=16, text_dim=WAN_TEXT_DIM,
                       freq_dim=256, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)
    config = comfy.supported_models.WAN21_T2V(unet_config)
    config.set_inference_dtype(torch.float32, None)
    gen = torch.Generator().manual_seed(0)
    weights = {k: (torch.randn(v.shape, generator=gen) * 0.05 if v.is_floating_point() else v).contiguous()
               for k, v in config.get_model({}, "").diffusion_model.state_dict().items()}
    path = os.path.join(params["folder"], "wan.safetensors")
    if not os.path.exists(path):
        save_file(weights, path)
    del weights
    model = comfy.sd.load_diffusion_model(path)
    with torch.inference_mode():  # as ComfyUI's nodes make them
        latent = {"samples": torch.randn(2, 16, 1, size.node_latent, size.node_latent, generator=gen)}
        positive = [[torch.randn(1, size.node_text_tokens, WAN_TEXT_DIM, generator=gen), {}]]

    steps: list[float] = []
    trained = {}

    def stepped(optimizer, args, kwargs) -> None:  # every optimizer's step, whoever made it
        steps.append(time.perf_counter())
        tensors = [p for group in optimizer.param_groups for p in group["params"]]
        trained.update(tensors=len(tensors), parameters=sum(p.numel() for p in tensors))

    register_optimizer_step_post_hook(stepped)
    if params["contender"] == "lycoris":
        from ..nodes.training import LycorisTrain

        node = LycorisTrain
        values = dict(model=model, latents=latent, positive=positive, algorithm=params["algorithm"], rank=size.node_rank,
                      alpha=float(size.node_rank), steps=size.node_steps, learning_rate=1e-4, batch_size=1, seed=0,
                      gradient_checkpointing=True)
    else:
        from comfy_extras.nodes_train import TrainLoraNode

        node = TrainLoraNode
        values = dict(model=model, latents=latent, positive=positive, batch_size=1, steps=size.node_steps, learning_rate=1e-4,
                      rank=size.node_rank, seed=0, training_dtype="fp32", lora_dtype="fp32",
                      algorithm=params["comfy_algorithm"], gradient_checkpointing=True, existing_lora="[None]")
    inputs = _node_inputs(node, values)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        before = proc_status()["VmRSS"]
    with torch.inference_mode():  # ComfyUI's executor runs every node in inference mode
        if hasattr(node, "define_schema"):
            node.execute(**inputs)
        else:
            getattr(node(), node.FUNCTION)(**inputs)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_status()["VmHWM"]) - before
    return {"seconds": [b - a for a, b in zip(steps, steps[1:])], "peak_bytes": peak, "version": comfyui_version.__version__,
            **trained}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("rank", "node"):
        print("usage: train_scaling {rank,node} JSON", file=sys.stderr)
        return 2
    params = json.loads(argv[2])
    if argv[1] == "rank":
        rank_worker(params)
        return 0
    try:
        answer = node_worker(params)
    except ImportError as e:  # this Python is not ComfyUI's
        print(f"ComfyUI does not import with {sys.executable} ({e})", file=sys.stderr)
        return NO_COMFYUI
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
