"""The few collective steps a multi-process dump needs under `torchrun`: which rank this is, and a
barrier. Without torchrun everything is one rank and these do nothing."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size), joining the process group torchrun describes if not joined yet."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def local_device() -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK) where there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
