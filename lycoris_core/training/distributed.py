"""Several processes, one training job, on torch.distributed: data parallelism for the core loop.

Under `torchrun` (or `accelerate launch`, or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT) `Ranks.start` joins the job's process group: NCCL between GPUs (one per
process, by LOCAL_RANK), gloo on the CPU. Without a launcher it is one process and nothing is set up.

`Ranks.data_parallel` wraps the loss in DistributedDataParallel: every process computes its share of
each batch (`objective.batch_plan`), DDP averages the adapters' gradients during the backward pass, and
every process then takes the same optimizer step, so their adapters stay equal. The loss each process
reports is the whole batch's (all-reduced), and that is what the core loop records and checks.

Every process starts from the same seed, so the adapters start equal; checkpoints hold the job's state,
not any process's, so a run checkpointed by N processes resumes on M.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import AdapterError
from .inject import AdapterSet

HOST_BYTES = 64  # of a host name, as each process tells the others where it runs


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    peers: list[tuple[str, int]] = field(default_factory=list)  # (host, pid) of every rank

    @classmethod
    def start(cls, device: str = "auto") -> Ranks:
        """This process's place in the job (joining the process group when a launcher started several);
        `device`: cpu, cuda or auto (a GPU when there is one)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            if not torch.cuda.is_available():
                raise AdapterError("--device cuda: no GPU is available to torch")
            if local_rank >= torch.cuda.device_count():
                raise AdapterError(f"rank {rank}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs here")
            torch.cuda.set_device(local_rank)  # before anything picks the current device
            where = torch.device("cuda", local_rank)
        elif device == "cpu":
            where = torch.device("cpu")
        else:
            raise AdapterError(f"--device {device}: choose cpu, cuda or auto")
        ranks = cls(rank, world, local_rank, where, [(socket.gethostname(), os.getpid())])
        if world > 1:
            dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
            ranks.peers = ranks._gather_peers()
        return ranks

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this process writes the job's files (checkpoints, the adapter, the plot) and reports progress."""
        return self.rank == 0

    def name(self, rank: int | None = None) -> str:
        rank = self.rank if rank is None else rank
        host, pid = self.peers[rank] if rank < len(self.peers) else ("?", 0)
        return f"rank {rank} of {self.world} (pid {pid} on {host})"

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # --- agreeing ---------------------------------------------------------------------------------

    def _gather_peers(self) -> list[tuple[str, int]]:
        host = socket.gethostname().encode()[:HOST_BYTES].ljust(HOST_BYTES, b"\0")
        mine = torch.tensor([os.getpid(), *host], dtype=torch.int64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        peers = []
        for row in every:
            values = row.tolist()
            peers.append((bytes(values[1:]).rstrip(b"\0").decode(errors="replace"), values[0]))
        return peers

    def failed(self, failing: bool) -> list[int]:
        """The ranks for which `failing` is true (every rank asks at the same point)."""
        if not self.distributed:
            return [0] if failing else []
        flags = torch.zeros(self.world, dtype=torch.int64, device=self.device)
        flags[self.rank] = int(failing)
        dist.all_reduce(flags)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on some rank (every rank asks at the same point)."""
        return bool(self.failed(flag))

    def barrier(self) -> None:
        if self.distributed and self.device.type == "cuda":
            dist.barrier(device_ids=[self.local_rank])
        elif self.distributed:
            dist.barrier()

    def gone(self, wait: float = 3.0) -> list[int]:
        """The other ranks on this host whose process has ended, waiting up to `wait` seconds for one to end
        (the rank that broke the job may still be on its way out). Ranks on other hosts cannot be seen."""
        host = socket.gethostname()
        deadline = time.monotonic() + wait
        while True:
            ended = [r for r, (h, pid) in enumerate(self.peers) if r != self.rank and h == host and not _alive(pid)]
            if ended or time.monotonic() >= deadline:
                return ended
            time.sleep(0.1)

    # --- training ---------------------------------------------------------------------------------

    def data_parallel(self, adapters: AdapterSet, loss_fn):
        """loss_fn for the core loop: this process's share through DDP, reported as the whole batch's loss."""
        if not self.distributed:
            return loss_fn
        for adapter in adapters.adapters.values():
            adapter.dropped_in_graph = True  # DDP waits for every parameter's gradient
        step = nn.parallel.DistributedDataParallel(
            _Step(adapters, loss_fn), device_ids=[self.local_rank] if self.device.type == "cuda" else None,
        )

        def ddp_loss(batch) -> torch.Tensor:
            # DDP averages the gradients of the processes' losses; each is its share of the batch's mean, so
            # scaled by the number of processes the average is the gradient of the whole batch's mean.
            scaled = step(batch) * self.world
            whole = scaled.detach() / self.world
            dist.all_reduce(whole)
            return scaled + (whole - scaled).detach()  # the whole batch's value, this process's gradient

        return ddp_loss


class _Step(nn.Module):
    """What DDP wraps: the adapters (the only parameters) and the loss of a batch through the adapted model."""

    def __init__(self, adapters: AdapterSet, loss_fn):
        super().__init__()
        self.adapters = adapters
        self.loss_fn = loss_fn

    def forward(self, batch) -> torch.Tensor:
        return self.loss_fn(batch)


def _alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie, dead but not yet collected by its launcher, is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
