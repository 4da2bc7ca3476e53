"""torchrun DDP helpers: init from env (RANK/WORLD_SIZE/LOCAL_RANK), nccl on CUDA / gloo on CPU, wrap, gather.

BatchNorm: on CUDA the model is converted to SyncBatchNorm (statistics over the global batch, as the paper's SyncBN
projectors). torch's SyncBatchNorm does not run on CPU, so there the BatchNorm1d layers become `GlobalBatchNorm1d`
(the same statistics through a differentiable all_reduce): a gloo run then matches a single process on the global
batch, which tests/ovseg_core/test_distributed.py checks on the real `tiny` model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ovseg_core.numerics import at_least_float32


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device(pref)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group described by torchrun's env vars (no-op for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def current_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (N, C) whose training statistics cover the rows of all ranks (SyncBatchNorm for any backend).

    Sums, sums of squares and row counts go through torch.distributed.nn's all_reduce, whose backward sums the
    gradients over ranks, so forward and backward equal plain BatchNorm1d on the concatenated batch. Falls back to
    BatchNorm1d in eval mode, without torch.distributed, and for inputs other than (N, C).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and x.dim() == 2 and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = at_least_float32(x)
        count = torch.full((1,), float(x.shape[0]), device=x.device, dtype=xf.dtype)
        stats = all_reduce(torch.cat([xf.sum(0), (xf * xf).sum(0), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp(min=0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1.0), alpha=m)
        out = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every plain nn.BatchNorm1d of `module` into GlobalBatchNorm1d in place (same parameters and buffers)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = GlobalBatchNorm1d
    return module


def wrap_ddp(module: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """DistributedDataParallel with global-batch BatchNorm (SyncBatchNorm on CUDA, GlobalBatchNorm1d elsewhere);
    the module itself when not distributed."""
    if not info.is_distributed:
        return module
    if device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return nn.parallel.DistributedDataParallel(module, device_ids=[device.index], find_unused_parameters=True)
    # find_unused_parameters: stage-specific heads (mask loss, teacher) leave parameters without gradient.
    return nn.parallel.DistributedDataParallel(convert_global_batchnorm(module), find_unused_parameters=True)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x over ranks keeping gradients (for global-negative contrastive losses); x when single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any (e.g. a time limit reached by one rank stops all of them together)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
