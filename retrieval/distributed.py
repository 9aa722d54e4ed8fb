"""Who am I in a distributed job: torch.distributed ranks and SLURM array tasks.

The core functions take ``rank``/``world_size`` explicitly (launcher-agnostic,
as in open_clip); these helpers read them from an initialised process group,
from ``accelerate launch``'s environment, and from SLURM array variables.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from shard_tools.convert import slurm_task

log = logging.getLogger(__name__)

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else of the launcher's env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_process_group_from_env() -> tuple[int, int]:
    """Join the process group that ``accelerate launch``/``torchrun`` set up (no-op alone).

    Uses accelerate's ``PartialState`` so the backend matches the machine (NCCL on
    GPUs, gloo on CPUs with ``ACCELERATE_USE_CPU=1``).
    """
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not (dist.is_available()
                                                          and dist.is_initialized()):
        from accelerate import PartialState

        PartialState()
    return rank_and_world()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leave_process_group() -> None:
    """Wait for every rank, then destroy the process group: call it on a clean finish.

    A process that exits with the group alive can abort in interpreter teardown
    (gloo's threads: "terminate called without an active exception", SIGABRT), so a
    finished job would fail at random. Not for the error path: a rank that failed
    must not wait in a barrier for ranks that may be waiting in a collective.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class PeerFailed(Exception):
    """Another rank failed a phase checked with ``checked_together`` (it prints the error);
    this rank stops without a message of its own."""


def in_group() -> bool:
    """An initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(value: int) -> int:
    """The largest ``value`` any rank passes (one small all-reduce); ``value`` alone."""
    if not in_group():
        return int(value)
    flag = torch.tensor([int(value)], dtype=torch.int64, device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def all_ok(ok: bool) -> bool:
    """True when every rank passes ``ok=True``; ``ok`` alone without a group."""
    return max_over_ranks(0 if ok else 1) == 0


@contextlib.contextmanager
def checked_together() -> Iterator[None]:
    """A phase (checks, reading inputs, rank 0's writes) after which every rank agrees on
    success, so a failure on one rank stops all of them at the same point instead of
    leaving the others blocked in a collective until gloo gives up with a traceback.

    The failing rank re-raises its error (marked ``all_ranks_know``, so it may leave the
    group); the others raise ``PeerFailed``. Without a group of several ranks: no-op."""
    try:
        yield
    except Exception as exc:
        if in_group():
            all_ok(False)
            exc.all_ranks_know = True   # type: ignore[attr-defined]
        raise
    if not all_ok(True):
        raise PeerFailed("another rank failed")


def leave_after_failure(exc: BaseException) -> None:
    """Leave the group after a failure every rank knows of (``checked_together``): all of
    them are here, so the barrier cannot hang, and the ranks exit together (a launcher
    kills the ranks still running when one exits); a live gloo group can abort at exit."""
    if (isinstance(exc, PeerFailed) or getattr(exc, "all_ranks_know", False)) and in_group():
        leave_process_group()


def array_task(task_index: int | None = None, num_tasks: int | None = None) -> tuple[int, int]:
    """(task index, task count) from arguments, else from a SLURM array (as in
    ``shard_tools convert``), else (0, 1)."""
    if (task_index is None) != (num_tasks is None):
        raise ValueError("--task-index and --num-tasks go together")
    if task_index is None:
        task_index, num_tasks = slurm_task()
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is not in [0, {num_tasks})")
    return task_index, num_tasks


def worker_part(rank: int = 0, world_size: int = 1, task_index: int = 0,
                num_tasks: int = 1) -> tuple[int, int]:
    """(part, parts): each (array task, rank) pair is one disjoint part of the work."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return task_index * world_size + rank, num_tasks * world_size


def take_part(items: Sequence[T], part: int, parts: int) -> list[T]:
    """Every ``parts``-th item starting at ``part``: balanced, disjoint, covering."""
    return list(items[part::parts])
