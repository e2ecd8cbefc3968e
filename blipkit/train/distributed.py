"""Data parallelism from torchrun's environment variables; every helper is a no-op in a single process.

Run several processes with ``torchrun --nproc_per_node N -m blipkit.train stage1 --config FILE --out DIR``.
Each process computes its slice of the global batch; losses are normalised by global counts and gradients
are summed across processes after backward, so N processes take exactly the step one process would take.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed() -> DistEnv:
    """Join the process group described by torchrun's RANK / WORLD_SIZE / LOCAL_RANK (gloo/CPU, nccl/GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistEnv()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown_distributed(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_with_grad(x: Tensor, env: DistEnv) -> Tensor:
    """Concatenate every process's ``x`` along dim 0; gradients flow back to each process's slice."""
    if not env.enabled:
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a variant whose backward is not the sum we need
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


def sum_gradients(module: nn.Module, env: DistEnv) -> None:
    """Sum the gradients of ``module``'s trainable parameters over all processes (one flat all-reduce)."""
    if not env.enabled:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
