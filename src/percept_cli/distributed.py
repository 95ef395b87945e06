"""Data parallelism under ``torchrun``: process group set-up, sharding by whole batches, gathering.

percept does not start processes itself: ``torchrun --nproc_per_node=N -m percept_cli eval-2afc ...``
sets RANK / WORLD_SIZE / LOCAL_RANK, and :func:`init` joins the group (NCCL on GPUs, gloo on CPU).
Under SLURM, ``srun`` tasks are recognised by the variables open_clip's training reads too
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), with MASTER_ADDR / MASTER_PORT set by the job script.
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
    """This process's place in the job (rank 0 of 1, no process group, when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    joined: bool = False  # a member of a torch.distributed process group (torchrun, even with 1 process)

    @property
    def enabled(self) -> bool:
        """Whether collectives run: under torchrun, whatever the number of processes."""
        return self.joined

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        """Whether this process computes global batch ``batch_index`` (round robin)."""
        return batch_index % self.world == self.rank


def _wants_cuda(device: str) -> bool:
    text = (device or "auto").strip().lower()
    return torch.cuda.is_available() and (text == "auto" or text.startswith("cuda"))


def slurm_environment(env=None) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK for an ``srun`` task of a multi-task SLURM step ({} otherwise).

    Only when torchrun's variables are absent and SLURM_PROCID is set (srun sets it per task; an
    ``salloc`` shell does not) with SLURM_NTASKS > 1.

    >>> slurm_environment({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    {'RANK': '3', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1'}
    """
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    try:
        world = int(env.get("SLURM_NTASKS", "1"))
    except ValueError:
        return {}
    if world <= 1:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(world), "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    local = _slurm_tasks_on_this_node(env)
    if local:  # what torchrun sets too: io.data shares the node's cores among its processes by it
        out["LOCAL_WORLD_SIZE"] = str(local)
    return out


def _slurm_tasks_on_this_node(env) -> int | None:
    """The tasks of this job step on this node, from SLURM_STEP_TASKS_PER_NODE (or SLURM_TASKS_PER_NODE),
    a list such as ``4(x2),3`` indexed by SLURM_NODEID; None when SLURM does not say.

    >>> _slurm_tasks_on_this_node({"SLURM_STEP_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "2"})
    3
    """
    text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not text:
        return None
    counts: list[int] = []
    try:
        for group in text.split(","):
            number, _, repeat = group.partition("(x")
            counts += [int(number)] * (int(repeat.rstrip(")")) if repeat else 1)
        node = int(env.get("SLURM_NODEID", "0"))
    except ValueError:
        return None
    return counts[node] if 0 <= node < len(counts) else None


def init(device: str = "auto") -> Dist:
    """Join the torchrun process group if torchrun started this process (RANK and WORLD_SIZE set, also
    for a single process: the same code path as a multi-GPU job); returns Dist() otherwise.

    The backend is NCCL when this rank runs on CUDA, else gloo; each rank's current CUDA device is
    its LOCAL_RANK.

    Raises:
        BadInputError: an explicit ``cuda:N`` under torchrun with several processes (each rank takes
            its own GPU, cuda:LOCAL_RANK; pass --device cuda or auto).
    """
    from .errors import BadInputError

    slurm = slurm_environment()
    if slurm:
        if "MASTER_ADDR" not in os.environ:
            raise BadInputError("SLURM task without MASTER_ADDR: set MASTER_ADDR (the first node's host name) and "
                                "MASTER_PORT in the job script before srun, as for torchrun.")
        os.environ.update(slurm)
        os.environ.setdefault("MASTER_PORT", "29500")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    import torch.distributed as tdist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    text = (device or "auto").strip().lower()
    if world > 1 and text.startswith("cuda:"):
        raise BadInputError(f"--device {device} under torchrun with {world} processes: each process uses its own "
                            "GPU (cuda:LOCAL_RANK); pass --device cuda or auto.")
    use_cuda = _wants_cuda(device)
    if not tdist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, joined=True)


def device_for(dist: Dist, device: str) -> str:
    """The device this rank uses: its own GPU (cuda:LOCAL_RANK) under torchrun with ``auto``/``cuda``."""
    text = (device or "auto").strip().lower()
    if dist.enabled and text in ("auto", "cuda") and torch.cuda.is_available():
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


def barrier(dist: Dist) -> None:
    """Wait for every rank (nothing without torchrun)."""
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()


def shutdown(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
