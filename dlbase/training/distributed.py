"""Data-parallel training under torchrun: PyTorch's own process group (NCCL on CUDA, gloo on CPU) and DDP.

Each rank holds the whole (small) set and trains on its slice of every global batch, so a run on W ranks with
train.batch_size B follows the single-process run with batch B; only rank 0 writes files.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dlbase.core.errors import ConfigError

STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a stop request (a collective each time)


@dataclass
class Group:
    """This process's place in the run: world size 1 when not launched by torchrun."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) a tensor in place across ranks; a no-op on one process."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on any (a collective: call it at the same point on all ranks)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())  # note: a sync, every STOP_CHECK_EVERY steps in distributed runs only

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of obj, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, together: bool = False) -> None:
        """Leave the process group. together: every rank got here the same way (a run that ended normally), so
        they wait for each other first: a rank that tore gloo down while another still used it was, about one
        run in twelve, killed by SIGABRT ("terminate called without an active exception") at its exit."""
        if self.enabled and dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()


def setup(device_spec: str) -> tuple[Group, str]:
    """Join torchrun's process group when WORLD_SIZE > 1; returns the group and the device spec for this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group(), device_spec
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device_spec!r} asked for under torchrun, but CUDA is not available here")
        device_spec = f"cuda:{local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(device_spec))
    else:
        device_spec = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return Group(rank=rank, world=world, local_rank=local_rank), device_spec
