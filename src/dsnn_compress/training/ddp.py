"""Device choice and the few collective operations a data-parallel (``torchrun``) training run needs.

Each rank trains on its share of every global batch; gradients are averaged over the ranks by hand after *all* of a
step's per-level backward passes, the keep codes (which rank 0 may recompute on the gradual schedule) and the
initial weights are broadcast from rank 0, and the per-level losses are averaged so logs show the global batch.

Why not ``torch.nn.parallel.DistributedDataParallel``: one DSNN optimizer step runs several forward/backward passes
through ``torch.func.functional_call`` with *masked* parameters (``weight * (code >= k)``, one pass per sparsity
level, see :mod:`dsnn_compress.core.masked`). DDP's autograd hooks and gradient bucketing assume one forward of
the wrapped module per backward on its own parameters: functional calls bypass its forward, a parameter reaching
the loss only through a mask product is not "used" the way it expects, and several backwards per step would make
it all-reduce once per level (or need ``no_sync`` gymnastics). Frozen parameters (a Hugging Face feature encoder)
would also need ``find_unused_parameters``. Averaging the accumulated gradients once per step, after all levels'
backwards, is simple, exact, and does one all-reduce per parameter per step instead of one per level.

Every function is a no-op in a single process (world 1), so the trainer calls them unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError


@dataclass
class DistInfo:
    """Rank layout of this process (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the rank that writes files and prints."""
        return self.rank == 0

    def rank_device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: its own GPU under a multi-process CUDA run, else ``device``."""
        if device.type == "cuda" and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return device


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available", "use training.device: cpu")
    return device


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def broadcast_tensors(tensors: Iterable[torch.Tensor], dist_info: DistInfo) -> None:
    """Overwrite ``tensors`` in place with rank 0's values."""
    if dist_info.world > 1:
        import torch.distributed as dist

        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def average_gradients(params: Iterable[nn.Parameter], dist_info: DistInfo) -> None:
    """Average the accumulated gradients of the trainable ``params`` over the ranks (one all-reduce each)."""
    if dist_info.world <= 1:
        return
    import torch.distributed as dist

    for param in params:
        if not param.requires_grad:
            continue  # frozen (e.g. a Hugging Face feature encoder): no gradient, so no weight decay either
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad /= dist_info.world


def average_losses(losses: dict[int | str, float], dist_info: DistInfo,
                   device: torch.device) -> dict[int | str, float]:
    """Each level's loss averaged over the ranks (all train the same levels), so logs show the global batch."""
    if dist_info.world <= 1 or not losses:
        return losses
    import torch.distributed as dist

    keys: Sequence[int | str] = sorted(losses, key=str)
    values = torch.tensor([losses[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {k: v / dist_info.world for k, v in zip(keys, values.tolist())}


def barrier(dist_info: DistInfo) -> None:
    """Wait for every rank (e.g. while rank 0 evaluates or writes files)."""
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
