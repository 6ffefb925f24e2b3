"""Multi-process training under ``torchrun``: ranks, the process group, barriers.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (NCCL on CUDA, gloo on
CPU), both networks are wrapped in ``DistributedDataParallel``, warm-up batches are sharded by
rank, each rank draws its own patient-level rollout splits, and validation, EMA export, logs and
checkpoints happen on rank 0 only (the EMA is updated on every rank from the same all-reduced
leader, so it is identical everywhere). Explained in chapter 4.
"""

from __future__ import annotations

import os

import torch

__all__ = ["all_ranks_agree", "barrier", "dist_info", "init_distributed", "is_distributed"]


def dist_info() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the ``torchrun`` environment (0, 0, 1 without)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, local, world


def is_distributed() -> bool:
    return dist_info()[2] > 1


def init_distributed(device: torch.device) -> None:
    """Join the process group (once): NCCL with one GPU per process, gloo on CPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":  # one GPU per process, chosen by torchrun's LOCAL_RANK
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_ranks_agree(device: torch.device):
    """A reducer for :func:`fuse4seg.train.engine.check_finite`: true only if every rank's
    verdict is true (so all ranks stop together)."""
    import torch.distributed as dist

    def reduce(ok: bool) -> bool:
        flag = torch.tensor([int(ok)], dtype=torch.int32)
        if device.type == "cuda":
            flag = flag.to(device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    return reduce
