"""Decoding image files in parallel with a torch DataLoader.

Workers decode and preprocess to uint8 (3,S,S) tensors (4x less to pass between
processes than float32); the main process converts on the device. By default every
core this process may use decodes but one, left to the main process that feeds the
model (:func:`default_workers`). A file that fails to decode comes back as a failure
record, never as an exception inside a worker, so the caller decides whether to stop
or skip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ImageReadError
from .images import read_image
from .preprocess import Preprocess


@dataclass(frozen=True)
class Failure:
    """A file that could not be used, and why."""

    path: str
    reason: str


class ImageFileDataset(Dataset):
    """Index -> (index, uint8 tensor or None, error reason or None).

    ``read`` turns one source into an RGB PIL image, raising :class:`ImageReadError` (default
    :func:`read_image` on file paths; e.g. ``retrieval.sources.read_item`` on shard members). It must be
    a module-level function: DataLoader workers receive it pickled.
    """

    def __init__(self, paths: Sequence, preprocess: Preprocess, read: Callable | None = None):
        self.paths = list(paths) if read is not None else [str(p) for p in paths]
        self.preprocess = preprocess
        self.read = read_image if read is None else read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.preprocess.uint8(self.read(self.paths[index])), None
        except ImageReadError as exc:
            return index, None, exc.reason


def _collate(items):
    ok = [(i, t) for i, t, err in items if t is not None]
    failed = [(i, err) for i, t, err in items if t is None]
    indices = [i for i, _ in ok]
    # NumPy copies: single-threaded, so a main process (workers=0) never waits on torch's thread pool
    batch = torch.from_numpy(np.stack([t.numpy() for _, t in ok])) if ok else None
    return indices, batch, failed


MAX_WORKERS = 32  # beyond this, process start-up and memory outgrow what a single GPU can take


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask (``taskset``, cgroups cpusets, SLURM), else
    ``os.cpu_count()``; shared evenly among the ``torchrun`` processes of this machine
    (``LOCAL_WORLD_SIZE``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores // local)


def default_workers(n_items: int, batch_size: int) -> int:
    """Decoding processes for ``n_items`` files in batches of ``batch_size``.

    None when everything fits one batch (process start-up would dominate); else one per available
    core less one for the main process (which feeds the model), at least 1, and at most one per
    batch and :data:`MAX_WORKERS`.

    >>> default_workers(10, 32)
    0
    """
    if n_items <= batch_size:
        return 0
    batches = -(-n_items // batch_size)
    return max(1, min(available_cores() - 1, batches, MAX_WORKERS))


def iter_file_batches(paths: Sequence[str | Path], preprocess: Preprocess, batch_size: int,
                      num_workers: int | None = None, pin_memory: bool = False
                      ) -> Iterator[tuple[list[int], torch.Tensor | None, list[Failure]]]:
    """Yield (indices, uint8 batch (B,3,S,S) or None, failures) in input order.

    ``num_workers``: decoding processes (None: :func:`default_workers`). ``pin_memory``: batches
    come in page-locked memory, so a ``.to("cuda", non_blocking=True)`` copy overlaps compute.
    Workers are not persistent: each call makes one pass over its files.
    """
    dataset = ImageFileDataset(paths, preprocess)
    loader = decoding_loader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
    for indices, batch, failed in loader:
        yield indices, batch, [Failure(dataset.paths[i], err) for i, err in failed]


def decoding_loader(dataset: ImageFileDataset, *, batch_size: int = 1, batch_sampler=None,
                    num_workers: int | None = None, pin_memory: bool = False) -> DataLoader:
    """A one-pass DataLoader over ``dataset`` yielding (indices, uint8 batch or None, [(index, reason)]):
    consecutive batches of ``batch_size`` in order, or the batches of ``batch_sampler``.

    ``num_workers`` None: :func:`default_workers` (for explicit batches: none for a single batch, else one
    per batch up to the cores available).
    """
    if batch_sampler is None:
        workers = default_workers(len(dataset), batch_size) if num_workers is None else num_workers
        batching = {"batch_size": batch_size, "shuffle": False}
    else:
        workers = default_workers(len(batch_sampler), 1) if num_workers is None else num_workers
        batching = {"batch_sampler": batch_sampler}
    # batches in flight: 4 per worker for one or two workers, 2 (torch's default) for more
    prefetch = (4 if workers <= 2 else 2) if workers else None
    return DataLoader(dataset, num_workers=workers, collate_fn=_collate, pin_memory=pin_memory,
                      prefetch_factor=prefetch, persistent_workers=False, **batching)
