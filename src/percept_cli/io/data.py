"""Decoding image files in parallel with a torch DataLoader.

Workers decode and preprocess to uint8 (3,S,S) tensors (4x less to pass between
processes than float32); the main process converts on the device. A file that
fails to decode comes back as a failure record, never as an exception inside a
worker, so the caller decides whether to stop or skip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

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
    """Index -> (index, uint8 tensor or None, error reason or None)."""

    def __init__(self, paths: Sequence[str | Path], preprocess: Preprocess):
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.preprocess.uint8(read_image(self.paths[index])), None
        except ImageReadError as exc:
            return index, None, exc.reason


def _collate(items):
    ok = [(i, t) for i, t, err in items if t is not None]
    failed = [(i, err) for i, t, err in items if t is None]
    indices = [i for i, _ in ok]
    batch = torch.stack([t for _, t in ok]) if ok else None
    return indices, batch, failed


def default_workers(n_items: int, batch_size: int) -> int:
    """Worker count: none for a batch or less (process start-up would dominate), else up to 8."""
    if n_items <= batch_size:
        return 0
    return max(1, min(8, (os.cpu_count() or 1)))


def iter_file_batches(paths: Sequence[str | Path], preprocess: Preprocess, batch_size: int,
                      num_workers: int | None = None, pin_memory: bool = False
                      ) -> Iterator[tuple[list[int], torch.Tensor | None, list[Failure]]]:
    """Yield (indices, uint8 batch (B,3,S,S) or None, failures) in input order."""
    workers = default_workers(len(paths), batch_size) if num_workers is None else num_workers
    dataset = ImageFileDataset(paths, preprocess)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate, pin_memory=pin_memory,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    for indices, batch, failed in loader:
        yield indices, batch, [Failure(dataset.paths[i], err) for i, err in failed]
