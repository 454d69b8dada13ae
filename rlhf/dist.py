"""Data-parallel training across processes (DDP), started by `accelerate launch` or `torchrun`.

Both launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; we read them and
initialize torch.distributed (NCCL on CUDA, gloo on CPU). With one process everything is a no-op, so
the same stage code runs alone, under `accelerate launch --multi_gpu --num_processes 2` on a CPU
machine, or on a multi-GPU node. Only rank 0 writes files; every rank computes on its shard of the
same global batch, so the global batch (and the results) do not depend on the number of processes.

Fully sharded data parallel (`fsdp: true` in a stage's params; pretrain, sft, reward and ppo): every rank holds
1/world_size of the parameters, gradients and Adam state instead of a whole copy (torch's FSDP2
`fully_shard`, one unit per transformer block and one for the rest; gloo on CPU, NCCL on GPUs). The
batches, the loss and the global step are the same as under plain data parallel; FSDP's reduce-scatter
averages the gradients in place of `average_gradients`. Checkpoints are sharded too (rlhf.training,
torch.distributed.checkpoint), and the trained model is gathered whole on rank 0 (`gather_model`), which
saves it as an ordinary Hugging Face folder. docs/models.md has the launch lines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False
    """Parameters sharded across the processes (`shard_model`); False with one process."""

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

    def means(self, values: dict[str, float]) -> dict[str, float]:
        """`mean` of every value of a dict in one all-reduce (same keys, in the same order, on every rank)."""
        if not self.enabled:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        tdist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(values, t.tolist(), strict=True)}

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over ranks (the tensor itself with one process).

        Summed in float64 and cast back: statistics such as a masked mean then come out the same
        whatever the number of processes, up to rounding. Not differentiable (statistics only).
        """
        if not self.enabled:
            return x
        t = x.detach().to(torch.float64)
        tdist.all_reduce(t)
        return t.to(x.dtype)

    def all_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over ranks (the tensor itself with one process).

        As the denominator of a rank's loss, the ranks' mean token count N/world_size turns the
        average of their gradients (`average_gradients`) into the gradient of Σ loss / N over the
        whole global batch, as one process computes it, instead of an average of per-rank means.
        """
        if not self.enabled:
            return x
        mean = self.all_sum(x.to(torch.float64)) / self.world_size
        return mean.to(x.dtype if x.is_floating_point() else torch.get_default_dtype())

    def all_true(self, flag: bool, device: torch.device | None = None) -> bool:
        """Whether `flag` holds on every rank (`flag` itself with one process). Under FSDP every forward is a
        collective, so a loop that may stop early (sampling until every sequence has ended) stops on all ranks
        together or on none."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank ([obj] with one process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def same_weights(self, model: torch.nn.Module) -> bool:
        """Whether every rank holds bit-identical parameters (compared through float64 checksums).

        With averaged gradients and the same optimizer state every rank takes the same step, so the
        weights never drift apart; this checks that promise at the end of a run.
        """
        if not self.enabled:
            return True
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
        sums = torch.cat([sums, torch.stack([p.detach().double().square().sum() for p in model.parameters()])])
        lo, hi = sums.clone(), sums.clone()
        tdist.all_reduce(lo, op=tdist.ReduceOp.MIN)
        tdist.all_reduce(hi, op=tdist.ReduceOp.MAX)
        return bool(torch.equal(lo, hi))

    def average_gradients(self, model: torch.nn.Module) -> None:
        """All-reduce the gradients after `backward` so every rank takes the same optimizer step.

        Explicit rather than a DistributedDataParallel wrapper: stages call sub-modules directly
        (the reward head on the backbone's hidden states, the value head), which would bypass DDP's
        hooks. One flattened all-reduce per step costs the same as DDP's buckets at these sizes.
        """
        if not self.enabled or self.fsdp:  # FSDP's reduce-scatter has averaged them already
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def launched_processes() -> int:
    """How many processes the launcher started (its WORLD_SIZE; 1 without a launcher), known before joining."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_dist(device: torch.device, fsdp: bool = False) -> tuple[Dist, torch.device]:
    """Join the process group when launched with several processes; returns (Dist, this rank's device).
    `fsdp`: shard the models (`shard_model`) rather than replicate them; ignored with one process."""
    world_size = launched_processes()
    if world_size <= 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        # On GPUs NCCL carries the CUDA tensors and gloo the CPU ones (`Dist.mean`'s scalars, `gather`'s
        # pickled objects); NCCL alone refuses CPU tensors.
        tdist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, fsdp=fsdp), device


def start_stage(params) -> tuple[Dist, torch.device]:
    """The opening every training stage shares: the device `params.device` names, this process's place among
    the data-parallel processes (`init_dist`; sharded where the stage's params say `fsdp: true`), and torch's
    threads (`params.threads`) and numerics there."""
    from rlhf.devices import pick_device, setup_torch

    dist, device = init_dist(pick_device(params.device), fsdp=bool(getattr(params, "fsdp", False)))
    setup_torch(params.threads, device)
    return dist, device


# ----------------------------------------------------------------------------------------------
# Fully sharded data parallel (FSDP2)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face transformer (Llama/Qwen2 `layers`, GPT-2 `h`, GPT-NeoX `layers`):
    the longest ModuleList in the model, each of whose entries becomes one FSDP unit."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` holds FSDP-sharded parameters (DTensors): such a model runs only through its modules'
    forwards, on every rank at once."""
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def shard_model(model: torch.nn.Module, dist: Dist, device: torch.device, *, by_child: bool = True) -> torch.nn.Module:
    """`model` sharded across the processes when `dist.fsdp` (else `model` itself). Every rank must call it
    with the same model, before its optimizer is built. The FSDP units:
    - every transformer block;
    - (`by_child`) every direct child that shares no parameter with another (a reward model's backbone and
      score head, which rlhf.rm calls one after the other, so each must gather its own weights);
    - the whole model, for what is left: tied input and output embeddings, which must stay one parameter
      (a causal LM, always called through its own forward), or, without `by_child`, everything outside the
      blocks (PPO's value model, whose own forward runs the backbone and then reads the score head's weight).
    """
    if not (dist.fsdp and dist.enabled):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.world_size,))
    plain_class = type(model)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    children = [c for c in model.children() if any(True for _ in c.parameters())] if by_child else []
    owners: dict[int, int] = {}
    for i, child in enumerate(children):
        for p in child.parameters():
            owners[id(p)] = i if owners.get(id(p), i) == i else -1  # -1: shared by two children
    covered: set[int] = set()
    for i, child in enumerate(children):
        if all(owners[id(p)] == i for p in child.parameters()):
            fully_shard(child, mesh=mesh)
            covered |= {id(p) for p in child.parameters()}
    if any(id(p) not in covered for p in model.parameters()):
        fully_shard(model, mesh=mesh)
    model.plain_class = plain_class  # fully_shard swaps the class for a subclass; gather_model rebuilds the original
    return model


def gather_model(model: torch.nn.Module, dist: Dist, device: torch.device, *, part: str = "") -> torch.nn.Module | None:
    """The trained model whole: `model` itself unless it is sharded; for a sharded model, a collective (every
    rank calls it) that returns, on rank 0, an unsharded copy holding the full weights, and None elsewhere.
    `part`: return that submodule of `model` instead (PPO's value model wraps the reward model as `model`)."""
    if not (dist.fsdp and dist.enabled):
        return model.get_submodule(part) if part else model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        return None
    target = model.get_submodule(part) if part else model
    if part:
        state = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
    plain = getattr(target, "plain_class", type(target))(target.config)
    plain.load_state_dict(state)
    if getattr(target, "generation_config", None) is not None:  # causal LMs carry one, classifiers do not
        plain.generation_config = target.generation_config
    return plain.to(device).eval()
