"""Data-parallel training without ComfyUI: two processes under torchrun (gloo) train the adapters one process
trains, with gradient checkpointing and several forward passes per process and step (each parameter must reach
DDP's gradient averaging once per step); module dropout keeps the processes' adapters equal; every batch is
shared out whole; the train command's options are read by name and type."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from comfyui_lycoris.lycoris_core.errors import AdapterError
from comfyui_lycoris.lycoris_core.training.loop import batch_schedule
from comfyui_lycoris.lycoris_core.training.objective import batch_plan
from comfyui_lycoris.lycoris_core.training.options import job_options
from helpers import rel_err
from safetensors.torch import load_file

# Trains the demo's Wan-shaped model (adapters, checkpointing) on 6 samples, global batch 4, one forward pass per
# sample: loss = the sum over this process's samples of their MSE / the whole batch's size, as the objective does.
# Trains the demo's Wan-shaped model (adapters, checkpointing) on 6 samples, global batch 4, one forward pass per
# sample: loss = the sum over this process's samples of their MSE / the whole batch's size, as the objective does.
# Three jobs: LoKr, LoHa, and LoKr with module dropout; each process saves its adapters and losses.
SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import save_file
    from comfyui_lycoris.demo import DemoSize, build_models, make_batches
    from comfyui_lycoris.lycoris_core.training import TrainingConfig, inject_adapters, train
    from comfyui_lycoris.lycoris_core.training.distributed import Ranks
    from comfyui_lycoris.lycoris_core.training.objective import batch_plan

    torch.set_num_threads(1)
    ranks = Ranks.start("cpu")
    size = DemoSize(dim=24, ffn=48, heads=2, blocks=2, in_dim=8, text_dim=8, freq_dim=8, tokens=6, text_tokens=4, batch=1)
    for job, algorithm, dropout in (("lokr", "lokr", 0.0), ("loha", "loha", 0.0), ("dropout", "lokr", 0.5)):
        model, teacher = build_models(3, size)
        samples = make_batches(teacher, 6, 4)
        config = TrainingConfig(algorithm=algorithm, rank=2, architecture="wan", learning_rate=1e-2, max_steps=3, seed=5,
                                gradient_checkpointing=True, module_dropout=dropout)
        adapters = inject_adapters(model, config)

        def loss_fn(batch):
            total = 0.0
            for index in batch.indices:
                latents, timestep, text, target = samples[index]
                total = total + torch.nn.functional.mse_loss(model(latents, timestep, text), target)
            return total / batch.size

        losses = []
        train(adapters, ranks.data_parallel(adapters, loss_fn), batch_plan(6, 4, config.seed, ranks.rank, ranks.world),
              config, progress=lambda p: losses.append(p.loss))
        state = {k: v.detach().contiguous() for k, v in adapters.state_dict().items()}
        state["losses"] = torch.tensor(losses, dtype=torch.float64)
        save_file(state, f"{sys.argv[1]}/{job}.{ranks.rank}.safetensors")
    ranks.close()
""")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[int, dict[str, list[dict[str, torch.Tensor]]]]:
    """{processes: {job: [each rank's adapters and losses]}} for one process and for two (torchrun, gloo)."""
    base = tmp_path_factory.mktemp("ddp")
    script = base / "jobs.py"
    script.write_text(SCRIPT)
    runs = {}
    for processes in (1, 2):
        out = base / str(processes)
        out.mkdir()
        launch = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        runs[processes] = (out, subprocess.Popen([sys.executable, *launch, str(script), str(out)], stderr=subprocess.PIPE,
                                                 text=True, env=dict(os.environ, OMP_NUM_THREADS="1")))
    found = {}
    for processes, (out, process) in runs.items():
        _, err = process.communicate(timeout=180)
        assert process.returncode == 0, err[-3000:]
        found[processes] = {job: [load_file(str(out / f"{job}.{rank}.safetensors")) for rank in range(processes)]
                            for job in ("lokr", "loha", "dropout")}
    return found


@pytest.mark.parametrize("job", ["lokr", "loha"])
def test_two_processes_train_what_one_trains(jobs, job):
    (one,), (two, other) = jobs[1][job], jobs[2][job]
    assert all(torch.equal(two[k], other[k]) for k in two)  # the processes' adapters stay the same
    factors = [k for k in one if k != "losses" and not k.endswith("alpha")]
    assert all(one[k].abs().max() > 0 for k in factors)  # every factor moved (w2 / hada_w2_a start at 0)
    assert max(rel_err(two[k], one[k]) for k in factors) <= 1e-5
    assert one["losses"].shape == (3,) and rel_err(two["losses"], one["losses"]) <= 1e-6


def test_module_dropout_with_checkpointing_keeps_processes_equal(jobs):
    """Module dropout skips different layers on each process; DDP still needs a gradient for every parameter
    from every process, at every step."""
    two, other = jobs[2]["dropout"]
    assert all(torch.equal(two[k], other[k]) for k in two)
    assert not all(torch.equal(two[k], jobs[2]["lokr"][0][k]) for k in two)  # the dropout did change the training


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_batch_is_shared_out_whole(world):
    schedule = batch_schedule(7, 5, seed=3)
    plans = [batch_plan(7, 5, 3, rank, world) for rank in range(world)]
    for step in range(6):
        shares = [plan(step) for plan in plans]
        assert [p for share in shares for p in share.positions] == list(range(5))
        assert [i for share in shares for i in share.indices] == schedule(step)[1]
        assert {share.size for share in shares} == {5} and {len(share.indices) for share in shares} <= {5 // world, -(-5 // world)}


def test_options_by_name_and_type(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text('algorithm = "loha"\nrank = 8\nlearning_rate = 2e-4\nexclude = [".*cross_attn.*"]\n'
                    'optimizer_args = { weight_decay = 0.01 }\nbatch_size = 4\narchitecture = "wan"\n')
    config, batch_size = job_options(toml, ["rank=6", "alpha=3", "gradient_checkpointing=true", "include=a, b{1,2}",
                                            'optimizer_args={"betas": [0.8, 0.9]}', "architecture=", "max_steps=10"])
    assert batch_size == 4 and config.algorithm == "loha" and config.rank == 6 and config.alpha == 3.0
    assert config.learning_rate == 2e-4 and config.exclude == (".*cross_attn.*",) and config.include == ("a", "b{1,2}")
    assert config.gradient_checkpointing is True and config.optimizer_args == {"betas": [0.8, 0.9]}
    assert config.architecture is None and config.max_steps == 10
    for assignment, message in [
        ("ranks=4", "--set ranks=4: unknown training option 'ranks' (the options: algorithm, rank,"),
        ("rank=4.5", "--set rank=4.5: rank takes an integer, not 4.5"),
        ("gradient_checkpointing=yes", "gradient_checkpointing takes true or false, not 'yes'"),
        ("rank", "--set rank: expected FIELD=VALUE"),
        ("max_steps=0", "training option max_steps=0: must be a positive integer"),
        ("batch_size=0", "batch_size=0: must be at least 1"),
    ]:
        with pytest.raises(AdapterError) as e:
            job_options(None, [assignment])
        assert message in str(e.value), (assignment, str(e.value))
    toml.write_text("rank = 'eight'\n")
    with pytest.raises(AdapterError, match=r"train.toml: rank takes an integer, not 'eight'"):
        job_options(toml)
