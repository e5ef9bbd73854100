"""The training loop: the loss falls on a learnable task, and a run that is stopped and resumed
from a checkpoint continues the same loss curve, bit for bit, as one that never stopped (dropout,
shuffled batches, gradient accumulation, warmup and the caller's own noise included)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from comfyui_lycoris.demo import DemoSize, build_models, make_batches
from comfyui_lycoris.lycoris_core.errors import AdapterError
from comfyui_lycoris.lycoris_core.training import TrainingConfig, inject_adapters, learning_rate_at, read_checkpoint, train

SIZE = DemoSize(dim=24, ffn=48, heads=2, blocks=2, in_dim=8, text_dim=8, freq_dim=8, tokens=6, text_tokens=4, batch=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: one thread is much faster than two contending with other jobs on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task():
    base, teacher = build_models(3, SIZE)
    return base.state_dict(), make_batches(teacher, 5, 4)


def fresh(task, **options):
    """A new base model with adapters, and the loss function over it."""
    state, batches = task
    model = build_models(3, SIZE)[0]
    model.load_state_dict(state)
    config = TrainingConfig(**{"architecture": "wan", "rank": 2, "alpha": 1.0, "learning_rate": 1e-2, **options})
    adapters = inject_adapters(model, config)

    def loss_fn(batch):
        latents, timestep, text, target = batch
        # The caller's own randomness (as a diffusion loss draws noise) must resume too.
        noisy = latents + 0.01 * torch.randn_like(latents)
        return F.mse_loss(model(noisy, timestep, text), target)

    loss_fn.model = model
    return adapters, loss_fn, batches


@pytest.mark.parametrize("algorithm", ["lokr", "loha"])
def test_loss_falls_on_a_learnable_task(task, algorithm):
    adapters, loss_fn, batches = fresh(task, algorithm=algorithm, max_steps=60, warmup_steps=5)
    result = train(adapters, loss_fn, batches)
    assert result.steps == 60 and len(result.losses) == 60 and not result.cancelled
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


RESUME_OPTIONS = dict(
    max_steps=9, checkpoint_every=4, gradient_accumulation_steps=2, warmup_steps=3, lr_scheduler="cosine",
    rank_dropout=0.2, module_dropout=0.2, seed=11,
)


@pytest.mark.parametrize(
    "algorithm, optimizer, optimizer_args",
    [("lokr", "AdamW", {"weight_decay": 0.01}), ("loha", "SGD", {"momentum": 0.9}), ("lokr", "Adafactor", {})],
)
def test_stop_and_resume_continues_the_same_curve(task, tmp_path, algorithm, optimizer, optimizer_args):
    options = dict(RESUME_OPTIONS, algorithm=algorithm, optimizer=optimizer, optimizer_args=optimizer_args)
    adapters, loss_fn, batches = fresh(task, **options)
    straight = train(adapters, loss_fn, batches, checkpoint_dir=tmp_path / "straight")
    final = {k: v.clone() for k, v in adapters.state_dict().items()}
    assert [p.rsplit("-", 1)[1] for p in straight.checkpoints] == ["0000004.safetensors", "0000008.safetensors"]

    adapters, loss_fn, batches = fresh(task, **options)
    calls = iter(range(100))
    stopped = train(adapters, loss_fn, batches, should_stop=lambda: next(calls) >= 6, checkpoint_dir=tmp_path / "run")
    assert stopped.cancelled and stopped.steps == 6 and stopped.losses == straight.losses[:6]
    assert stopped.checkpoints[-1].endswith("checkpoint-0000006.safetensors")

    for checkpoint in stopped.checkpoints:  # from the periodic one (step 4) and the one at the stop (6)
        adapters, loss_fn, batches = fresh(task, **options)
        resumed = train(adapters, loss_fn, batches, resume_from=checkpoint)
        assert resumed.steps == 9 and resumed.resumed_from == str(checkpoint)
        assert resumed.losses == straight.losses  # bit-identical
        for key, value in adapters.state_dict().items():
            assert torch.equal(value, final[key]), key


def test_batch_function_resumes_too(task, tmp_path):
    options = dict(RESUME_OPTIONS, algorithm="lokr")
    adapters, loss_fn, batches = fresh(task, **options)
    straight = train(adapters, loss_fn, lambda i: batches[(3 * i) % 5])
    adapters, loss_fn, _ = fresh(task, **options)
    calls = iter(range(100))
    stopped = train(adapters, loss_fn, lambda i: batches[(3 * i) % 5], should_stop=lambda: next(calls) >= 5,
                    checkpoint_dir=tmp_path)
    adapters, loss_fn, _ = fresh(task, **options)
    resumed = train(adapters, loss_fn, lambda i: batches[(3 * i) % 5], resume_from=stopped.checkpoints[-1])
    assert resumed.losses == straight.losses


def test_gradient_checkpointing_gives_the_same_training(task):
    runs = []
    for checkpointing in (False, True):
        adapters, loss_fn, batches = fresh(task, max_steps=4, rank_dropout=0.2, module_dropout=0.2,
                                           gradient_checkpointing=checkpointing)
        runs.append((train(adapters, loss_fn, batches).losses, [p.detach().clone() for p in adapters.parameters()]))
    (losses_a, params_a), (losses_b, params_b) = runs
    assert losses_a == pytest.approx(losses_b, rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(params_a, params_b))


def test_checkpoint_holds_no_pickle_and_refuses_other_options(task, tmp_path):
    adapters, loss_fn, batches = fresh(task, max_steps=2, checkpoint_every=2)
    result = train(adapters, loss_fn, batches, checkpoint_dir=tmp_path)
    info, tensors = read_checkpoint(result.checkpoints[-1])
    assert info["step"] == 2 and len(info["losses"]) == 2 and "rng.cpu" in tensors
    adapters, loss_fn, batches = fresh(task, max_steps=4, rank=3)
    with pytest.raises(AdapterError, match="rank=2"):
        train(adapters, loss_fn, batches, resume_from=result.checkpoints[-1])
    with pytest.raises(AdapterError, match="not a comfyui-lycoris training checkpoint"):
        train(adapters, loss_fn, batches, resume_from=_plain_file(tmp_path))


def _plain_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    return path


def test_cancel_before_the_first_step_and_progress_reports(task, tmp_path):
    adapters, loss_fn, batches = fresh(task, max_steps=3)
    result = train(adapters, loss_fn, batches, should_stop=lambda: True, checkpoint_dir=tmp_path)
    assert result.cancelled and result.steps == 0 and result.checkpoints == []
    seen = []
    train(adapters, loss_fn, batches, progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3] and all(p.total == 3 and math.isfinite(p.loss) for p in seen)
    assert not adapters.training  # left in eval mode: no dropout when the model is used afterwards


def test_diverging_loss_is_an_error(task):
    adapters, _, batches = fresh(task, max_steps=3)
    with pytest.raises(AdapterError, match="diverged"):
        train(adapters, lambda batch: torch.tensor(float("nan"), requires_grad=True), batches)


def test_learning_rate_schedule():
    config = TrainingConfig(learning_rate=1.0, warmup_steps=3, max_steps=13, lr_scheduler="cosine")
    rates = [learning_rate_at(config, s) for s in range(13)]
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[8] == pytest.approx(0.5) and rates[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    linear = config.replace(lr_scheduler="linear")
    assert learning_rate_at(linear, 8) == pytest.approx(0.5)
    assert learning_rate_at(config.replace(lr_scheduler="constant"), 12) == 1.0


def test_adapters_hook_once_and_come_off_cleanly(task):
    adapters, loss_fn, batches = fresh(task, max_steps=1)
    model_state = {k: v.clone() for k, v in task[0].items()}
    with pytest.raises(AdapterError, match="already carries trainable adapters"):
        inject_adapters(loss_fn.model, adapters.config)
    with pytest.raises(AdapterError, match="rank"):
        train(adapters, loss_fn, batches, config=adapters.config.replace(rank=4))
    adapters.remove()
    model = loss_fn.model
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, model_state[k]) for k, v in model.state_dict().items())
    again = inject_adapters(model, adapters.config)  # possible again once removed
    again.remove()

