"""Everything that touches `torch.distributed`: process-group setup from torchrun's environment, the
autograd-aware all-gather used by the loss, small reductions, and the DDP wrapper.

One process (no `WORLD_SIZE` in the environment) is world size 1 and never creates a process group, so the
training loop is the same code with and without torchrun (as in nanoGPT).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. rank/world_size are global; local_rank indexes GPUs on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control: object = None  # a gloo group for small host-side agreements (no GPU sync under NCCL)
    owns_group: bool = False  # this code created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int) -> torch.device:
    """ "auto" -> this process's GPU when CUDA is available, else the CPU (`clip.runtime`'s one rule)."""
    from clip.runtime import resolve_device as resolve

    return resolve(device, local_rank)


def init_from_env(device: str = "auto") -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and join the process group.

    NCCL on GPUs, gloo on CPU. Rendezvous (MASTER_ADDR/PORT, several nodes) is torchrun's job: the default
    `env://` init reads what it exported.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size == 1:
        return DistInfo(device=dev)
    owns = not dist.is_initialized()
    if owns:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return DistInfo(rank, world_size, local_rank, dev, control, owns)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if `init_from_env` created it (a caller's own group is left alone)."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def agree(values: list[int], info: DistInfo) -> list[int]:
    """Element-wise sum of small host-side integers over ranks (on the gloo control group)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=info.control)
    return t.tolist()


def gather_objects(obj: object, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects, on the control group)."""
    if not info.distributed:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.control)
    return out


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's [n, ...] tensor into [world * n, ...], with the gradient routed home.

    Backward: rank r's input fed every rank's loss, so its gradient is the sum over ranks of the gradient
    w.r.t. rows [r * n, (r + 1) * n) of the gathered tensor: a reduce-scatter (sum).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.world, ctx.n = rank, world, x.shape[0]
        x = x.contiguous()
        if dist.get_backend() == "nccl":
            out = x.new_empty((world * x.shape[0], *x.shape[1:]))
            dist.all_gather_into_tensor(out, x)
            return out
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((ctx.n, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        # gloo has no reduce-scatter: all-reduce the whole gradient and keep this rank's rows.
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank -> [world * n, ...] in rank order; identity when not distributed.

    Every rank must pass the same shape (pad short batches and carry a mask).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGather.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks (a new tensor; no gradient). Identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach().clone()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach().clone()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around `module` when distributed; the module itself otherwise."""
    if not info.distributed:
        return module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # Buffers (BatchNorm statistics of ResNet towers) are synced once at start, then stay per rank: syncing them
    # every forward would cost a collective per micro-batch and still not make per-rank batches one large batch.
    try:
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
    except TypeError:  # torch < 2.14 names the switch broadcast_buffers
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
