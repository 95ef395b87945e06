"""Data parallelism under ``torchrun``: process group set-up, sharding by whole batches, gathering.

percept does not start processes itself: ``torchrun --nproc_per_node=N -m percept_cli eval-2afc ...``
sets RANK / WORLD_SIZE / LOCAL_RANK, and :func:`init` joins the group (NCCL on GPUs, gloo on CPU).
Work is split in whole batches of a fixed global partition, so every batch is computed exactly as
in a single-process run and the numbers agree exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        """Whether this process computes global batch ``batch_index`` (round robin)."""
        return batch_index % self.world == self.rank


def init(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one; returns Dist() otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if not tdist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank)


def device_for(dist: Dist, device: str) -> str:
    """The device this rank uses: its own GPU (cuda:LOCAL_RANK) when several processes share a node."""
    if dist.enabled and (device in ("auto", "cuda")) and torch.cuda.is_available():
        return f"cuda:{dist.local_rank}"
    return device


def gather(dist: Dist, obj: Any) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without torchrun."""
    if not dist.enabled:
        return [obj]
    import torch.distributed as tdist

    out: list = [None] * dist.world
    tdist.all_gather_object(out, obj)
    return out


def shutdown(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
