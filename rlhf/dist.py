"""Data-parallel training across processes (DDP), started by `accelerate launch` or `torchrun`.

Both launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; we read them and
initialize torch.distributed (NCCL on CUDA, gloo on CPU). With one process everything is a no-op, so
the same stage code runs alone, under `accelerate launch --multi_gpu --num_processes 2` on a CPU
machine, or on a multi-GPU node. Only rank 0 writes files; every rank computes on its shard of the
same global batch, so the global batch (and the results) do not depend on the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence) -> list:
        """This rank's share of a global batch: every world_size-th item, starting at rank."""
        return list(items[self.rank:: self.world_size])

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def mean(self, value: float) -> float:
        """Average of a scalar over ranks (for logging the global loss)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        tdist.all_reduce(t)
        return float(t) / self.world_size

    def average_gradients(self, model: torch.nn.Module) -> None:
        """All-reduce the gradients after `backward` so every rank takes the same optimizer step.

        Explicit rather than a DistributedDataParallel wrapper: stages call sub-modules directly
        (the reward head on the backbone's hidden states, the value head), which would bypass DDP's
        hooks. One flattened all-reduce per step costs the same as DDP's buckets at these sizes.
        """
        if not self.enabled:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def init_dist(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when launched with several processes; returns (Dist, this rank's device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank), device
