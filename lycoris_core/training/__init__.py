"""LoHa / LoKr training in the core (Musubi Tuner semantics), for the CLI and the ComfyUI nodes.

    config = TrainingConfig(algorithm="lokr", rank=16, architecture="wan", max_steps=500)
    adapters = inject_adapters(model, config)          # hooks trainable adapters into the Linears
    result = train(adapters, loss_fn, batches, progress=..., should_stop=...)
    save_musubi("out.safetensors", adapters, steps=result.steps)
    adapters.remove()                                  # the model is as it was

One module per concept: `config` (the options), `modules` (the trainable layers' math),
`inject` (which layers, Musubi names, hooks), `loop` (optimizer, schedule, checkpoints),
`checkpointing` (exact gradient checkpointing), `data` (samples from ComfyUI's inputs),
`musubi_file` (saving as Musubi does), `dataset` (samples in a folder: safetensors shards and a JSON
index), `objective` (the denoising loss and the batches, shared out between processes),
`distributed` (several processes: torch.distributed, DDP), `options` (a TOML file and --set).
"""

from .config import TrainingConfig
from .inject import AdapterSet, Target, inject_adapters, plan_targets, select_targets
from .loop import TrainProgress, TrainResult, learning_rate_at, read_checkpoint, train
from .modules import TRAINABLE, TrainableAdapter, TrainableLoHa, TrainableLoKr, make_adapter
from .musubi_file import musubi_hashes, musubi_metadata, network_description, network_metadata, save_musubi

__all__ = [
    "AdapterSet",
    "TRAINABLE",
    "Target",
    "TrainProgress",
    "TrainResult",
    "TrainableAdapter",
    "TrainableLoHa",
    "TrainableLoKr",
    "TrainingConfig",
    "inject_adapters",
    "learning_rate_at",
    "make_adapter",
    "musubi_hashes",
    "musubi_metadata",
    "network_description",
    "network_metadata",
    "plan_targets",
    "read_checkpoint",
    "save_musubi",
    "select_targets",
    "train",
]
