"""Each image decoded once per run: the embedding pass keeps the references the attack pass needs.

The embedding pass decodes every distinct image (DataLoader workers) to uint8 (3,S,S) with the
protocol's geometry. :class:`ReferencePixels` keeps those uint8 rows for the references that will be
attacked, and gives them to the attack pass as float32 ``uint8 / 255``: the same operation, on the
same uint8 values, as ``metric.pixels`` (``Preprocess.__call__``), so the attacked pixels are
bit-identical to decoding the file again.

Memory: 3·S² bytes per kept reference (224 px: 150,528 B; NIGHTS' test split, 2,120 references:
about 320 MB while embedding, then only the clean-correct ones this process attacks), at most
``max_bytes`` (default :data:`PIXEL_CACHE_BYTES`). References beyond the cap, or decoded by another
``torchrun`` process, are decoded again when attacked, in parallel by DataLoader workers (never one
by one on the main process).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..errors import ImageReadError
from ..io.data import iter_file_batches
from ..io.preprocess import Preprocess

PIXEL_CACHE_BYTES = 2 * 2**30  # 2 GiB: about 14,000 references at 224 px


class ReferencePixels:
    """uint8 pixels of the ``wanted`` images, kept from the embedding pass (at most ``max_bytes``).

    ``geometry``, ``batch_size``, ``num_workers``: how images missing from the store are decoded.
    """

    def __init__(self, wanted: Iterable[str], geometry: Preprocess, *, max_bytes: int = PIXEL_CACHE_BYTES,
                 batch_size: int = 32, num_workers: Optional[int] = None):
        self.wanted = set(wanted)
        self.geometry, self.max_bytes = geometry, int(max_bytes)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.kept: dict[str, torch.Tensor] = {}
        self.nbytes = 0

    def offer(self, paths: Sequence[str], batch: torch.Tensor) -> None:
        """Keep copies of the rows of a uint8 batch (B,3,S,S) whose path is wanted, while they fit."""
        for path, row in zip(paths, batch):
            size = row.numel() * row.element_size()
            if path in self.wanted and path not in self.kept and self.nbytes + size <= self.max_bytes:
                # a copy, so the (possibly pinned) batch can be freed; NumPy's, single-threaded: torch's
                # goes through its thread pool, which stalls while decoding workers hold every core
                self.kept[path] = torch.from_numpy(row.numpy().copy())
                self.nbytes += size

    def retain(self, paths: Iterable[str]) -> None:
        """Forget every image but ``paths`` (the references still to be attacked by this process)."""
        self.wanted = set(paths)
        self.kept = {p: row for p, row in self.kept.items() if p in self.wanted}
        self.nbytes = sum(row.numel() * row.element_size() for row in self.kept.values())

    def batch(self, paths: Sequence[str]) -> torch.Tensor:
        """(N,3,S,S) float32 pixels in [0,1] (CPU) of ``paths``; those not kept are decoded by workers.

        Raises:
            ImageReadError: an image not kept that can no longer be decoded.
        """
        missing = list(dict.fromkeys(p for p in paths if p not in self.kept))
        decoded: dict[str, torch.Tensor] = {}
        if missing:
            for idx, chunk, failed in iter_file_batches(missing, self.geometry, self.batch_size, self.num_workers):
                if failed:
                    raise ImageReadError(failed[0].path, failed[0].reason)
                decoded.update((missing[i], row) for i, row in zip(idx, chunk))
        rows = [self.kept[p] if p in self.kept else decoded[p] for p in paths]
        stacked = torch.from_numpy(np.stack([row.numpy() for row in rows]))
        return stacked.to(torch.float32).div_(255.0)  # as Preprocess.__call__ (metric.pixels): CPU, true division
