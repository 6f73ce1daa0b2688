"""The few collective steps kdcache needs under `torchrun` (or any launcher that sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT): which rank this is, and steps that end with every rank knowing
whether any rank failed. A rank that raises while the others wait in a collective would leave them
blocked until the backend's timeout; here its error reaches every rank, which all raise it.
Without a launcher everything is one rank and these are plain calls."""

from __future__ import annotations

import atexit
import os
import pickle
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

__all__ = ["rank_and_world", "local_device", "barrier", "on_rank0", "together", "first_error", "any_rank"]

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size), joining the process group the launcher describes if not joined yet.

    On GPUs each rank first takes its own device (LOCAL_RANK): NCCL collectives (object broadcasts
    included) run on the current device, which is otherwise GPU 0 for every rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device())
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave_group)
    return dist.get_rank(), dist.get_world_size()


def _leave_group() -> None:
    """At exit, destroy the process group this module joined: left to the interpreter's teardown, the backend's
    threads can die with the C++ runtime's "terminate called without an active exception" under a user's one-line
    error (seen once in CI)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group something else already tore down: nothing left to do at exit
            pass


def local_device() -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK) where there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier(world: int) -> None:
    """Wait for every rank (nothing with one process)."""
    if world > 1:
        dist.barrier()


def _portable(error: BaseException) -> BaseException:
    """``error`` as an object that survives pickling (to travel to the other ranks): itself, else the nearest of its
    base classes built from its message (an error whose __init__ takes other arguments does not unpickle)."""
    for cls in type(error).__mro__:
        if not issubclass(cls, BaseException):
            continue
        try:
            candidate = error if cls is type(error) else cls(str(error))
            pickle.loads(pickle.dumps(candidate))
        except Exception:  # noqa: BLE001 - a class that cannot be rebuilt from a message: try its base
            continue
        return candidate
    return RuntimeError(str(error))


def first_error(error: Optional[BaseException], world: int) -> Optional[BaseException]:
    """Collective: every rank passes its own error (or None) and gets the lowest failing rank's (or None)."""
    if world <= 1:
        return error
    errors: list[Optional[BaseException]] = [None] * world
    dist.all_gather_object(errors, _portable(error) if error is not None else None)
    rank = dist.get_rank()
    for source, found in enumerate(errors):
        if found is not None:
            return error if source == rank else found  # this rank's own keeps its traceback
    return None


def on_rank0(fn: Callable[[], T], world: int) -> T:
    """``fn()`` run on rank 0 while the others wait; every rank returns its result, or raises its error."""
    if world <= 1:
        return fn()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:
            dist.broadcast_object_list([("error", _portable(exc))], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def together(fn: Callable[[], T], world: int) -> T:
    """``fn()`` run on every rank, then a barrier that also tells every rank whether any failed: all raise the lowest
    failing rank's error, so none is left waiting for a rank that stopped."""
    error, result = None, None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    error = first_error(error, world)
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def any_rank(flag: torch.Tensor, world: int) -> bool:
    """Collective: whether ``flag`` (a 0-d bool tensor, on this rank's device) is true on any rank. One small
    all-reduce: cheap enough per training step, unlike an object exchange."""
    if world <= 1:
        return bool(flag)
    value = flag.to(torch.int32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
