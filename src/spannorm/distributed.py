"""Several processes under ``torchrun``: PyTorch's process group, which part of the global batch each rank
trains on, and the values every rank must agree on.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; ``train.distributed: ddp`` then wraps
the model in DistributedDataParallel (gloo on the CPU, NCCL on CUDA). Every rank draws the same global batch
from the same data RNG and trains on its own rows of it, so a run's numbers do not depend on how many
processes share it (up to the order of floating-point sums). Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError
from .run_config import Distributed, TrainConfig


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    joined: bool = False  # in torchrun's process group (then DDP or FSDP2 wraps the model, even for one rank)
    device: str = "cpu"  # where the tensors handed to collectives live: gloo's CPU, or NCCL's cuda:LOCAL_RANK

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes logs, checkpoints, the summary and the progress display."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` (a multiple of the world size)."""
        per_rank = n // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def mean(self, x: float) -> float:
        """The mean of ``x`` over the ranks (``x`` itself for one process)."""
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)  # (NCCL reduces only CUDA tensors)
        dist.all_reduce(t)
        return t.item() / self.world

    def mean_and_any(self, x: float, flag: bool) -> tuple[float, bool]:
        """The mean of ``x`` over the ranks and whether any rank's ``flag`` is set, in one all-reduce (``x`` and
        ``flag`` themselves for one process)."""
        if self.world == 1:
            return x, flag
        t = torch.tensor([x, float(flag)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        total, flags = t.tolist()  # (one copy to the host)
        return total / self.world, flags > 0

    def share(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def launched() -> bool:
    """Whether torchrun started this process (it sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def start(t: TrainConfig, device: torch.device) -> Ranks:
    """Join torchrun's process group when ``train.distributed`` asks for it; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if t.distributed is Distributed.NONE:
        if world > 1:
            raise ConfigError(
                f"torchrun started {world} processes but train.distributed is none: set train.distributed=ddp"
            )
        return Ranks()
    if not launched():
        return Ranks()  # (train.distributed=ddp in one plain process: one rank)
    collectives = "cpu"
    if device.type == "cuda":  # one GPU a process: its own, set before NCCL starts (its barriers and object
        local = int(os.environ.get("LOCAL_RANK", "0"))  # broadcasts run on the current device, else all on cuda:0)
        torch.cuda.set_device(local)
        collectives = f"cuda:{local}"
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=t.dist_timeout_s))
    return Ranks(dist.get_rank(), dist.get_world_size(), joined=True, device=collectives)


def stop(together: bool = False) -> None:
    """Leave the process group (if this process joined one). ``together``: at a barrier first, when the run ended
    on every rank (gloo's teardown can hang a rank that destroys its group while another is still busy)."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
