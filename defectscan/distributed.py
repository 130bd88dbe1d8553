"""Several processes under torchrun: which process this is, its share of the work, and exact reductions.

`torchrun --nproc_per_node N -m defectscan evaluate ...` starts N copies of a command with RANK / WORLD_SIZE /
LOCAL_RANK (and a rendezvous) in their environment; `current_shard()` joins them into one process group (gloo on
CPUs, nccl when the process runs on a GPU) and says which share of the images is this process's. Shares are
round-robin over the command's image order (image i belongs to rank i mod N): disjoint, stable for a given N, and
balanced when image sizes vary along the list. Results travel as Python objects (`Shard.gather`); every
reduction then replays the per-image results in image order, so sums come out bit for bit as in one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch

from defectscan.errors import DefectscanError

T = TypeVar("T")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Shard:
    """This process's place among `world` processes (rank 0 writes the shared outputs)."""

    rank: int
    world: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """(index, item) of this process's share of `items`: every `world`-th item from position `rank`."""
        return [(i, item) for i, item in enumerate(items) if i % self.world == self.rank]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process (pickled: peers of one job trust each other)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


SINGLE = Shard(0, 1)


def processes_on_this_node() -> int:
    """Processes torchrun started on this machine (LOCAL_WORLD_SIZE), 1 without torchrun: they share its cores."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def current_shard(device: str = "auto", timeout_minutes: float = 30.0) -> Shard:
    """The process group this process belongs to (joined on first call), or `SINGLE` outside torchrun.

    With `device` auto or cuda and GPUs present, rank r of a node takes GPU LOCAL_RANK (so "cuda" resolves to
    it) and the group talks nccl; otherwise gloo. The timeout bounds how long a rank waits for a slower peer."""
    if not launched_by_torchrun():
        return SINGLE
    rank, world, local = (int(os.environ[k]) for k in _ENV)
    if not torch.distributed.is_initialized():
        on_gpu = device != "cpu" and torch.cuda.is_available()
        if on_gpu:
            if local >= torch.cuda.device_count():
                raise DefectscanError(f"local rank {local} has no GPU (this node has {torch.cuda.device_count()}); "
                                      f"start at most that many processes per node, or pass --device cpu")
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if on_gpu else "gloo",
                                             timeout=datetime.timedelta(minutes=timeout_minutes))
    return Shard(rank, world, local)


def close() -> None:
    """Leave the process group (end of a distributed command), so the process exits without warnings."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
