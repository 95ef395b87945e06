"""What a training run reads, in which order.

* FARE: any images (folders, list files, WebDataset shards: :func:`percept_cli.retrieval.sources.collect_items`).
* TeCoA: a labelled image folder (class = first-level subfolder) and a class-names file.
* 2AFC: NIGHTS triplets (:func:`percept_cli.evaluation.datasets.load_dataset`), train split for training,
  val split for evaluation.

Order. Every epoch's order comes from :class:`torch.utils.data.DistributedSampler` (shuffled with the
run's seed, ``set_epoch(epoch)``, ``drop_last``): with W processes, process r takes every W-th
position of the epoch's permutation. A step's global batch is the next ``batch_size`` positions of
the permutation whatever W is (W divides the batch), and each process cuts its share into
micro-batches for gradient accumulation. A resumed run skips the steps already taken without
decoding them. Held-out images (FARE/TeCoA evaluation) are a seeded share of the images, never trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInputError
from ..io.preprocess import Preprocess


@dataclass(frozen=True)
class Plan:
    """How steps map onto the data: ``per_rank`` = batch_size / world rows per process and step, cut into
    ``accum`` micro-batches of ``micro`` rows."""

    n_train: int
    batch_size: int
    world: int
    micro: int
    accum: int
    steps_per_epoch: int
    total_steps: int

    @property
    def per_rank(self) -> int:
        return self.batch_size // self.world


def make_plan(n_train: int, batch_size: int, world: int, micro: int | None, steps: int | None,
              epochs: int | None) -> Plan:
    """Check that the global batch splits evenly over ``world`` processes and micro-batches.

    Raises:
        BadInputError: a batch that does not split, or fewer images than one batch.
    """
    if batch_size % world:
        raise BadInputError(f"batch size {batch_size} does not split over {world} processes; use a multiple "
                            f"of {world}.")
    per_rank = batch_size // world
    micro = per_rank if micro is None else min(int(micro), per_rank)
    if per_rank % micro:
        raise BadInputError(f"micro batch {micro} does not divide the {per_rank} rows each process takes per "
                            f"step (batch {batch_size} over {world} processes).")
    spe = (n_train - n_train % world) // batch_size
    if spe < 1:
        raise BadInputError(f"{n_train} training images are fewer than one batch of {batch_size}; lower "
                            "--batch-size or add images.")
    total = steps if steps is not None else int(epochs or 1) * spe
    return Plan(n_train, batch_size, world, micro, per_rank // micro, spe, total)


def epoch_order(n: int, world: int, rank: int, seed: int, epoch: int) -> list[int]:
    """This process's positions for ``epoch`` (torch's DistributedSampler, shuffled, drop_last)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


def step_batches(plan: Plan, rank: int, seed: int, start_step: int) -> Iterator[tuple[int, list[list[int]],
                                                                                  list[list[int]]]]:
    """(step, micro-batches of dataset positions, the same rows' positions within the global batch) for
    every step from ``start_step`` on, for process ``rank``."""
    step = start_step
    while step < plan.total_steps:
        epoch, first = divmod(step, plan.steps_per_epoch)
        order = epoch_order(plan.n_train, plan.world, rank, seed, epoch)
        for chunk in range(first, plan.steps_per_epoch):
            if step >= plan.total_steps:
                return
            rows = order[chunk * plan.per_rank:(chunk + 1) * plan.per_rank]
            in_batch = [rank + plan.world * j for j in range(plan.per_rank)]
            micro = [rows[i:i + plan.micro] for i in range(0, len(rows), plan.micro)]
            slots = [in_batch[i:i + plan.micro] for i in range(0, len(rows), plan.micro)]
            yield step, micro, slots
            step += 1


def split_held_out(n: int, fraction: float, seed: int, cap: int | None = None) -> tuple[list[int], list[int]]:
    """(training positions, held-out positions): a seeded ``fraction`` of ``range(n)`` held out (at least
    one, at most ``cap``), both in ascending order."""
    g = torch.Generator().manual_seed(seed + 7919)
    perm = torch.randperm(n, generator=g).tolist()
    k = max(1, min(round(n * fraction), cap or n, n - 1))
    return sorted(perm[k:]), sorted(perm[:k])


# -- sources ---------------------------------------------------------------------------------------


@dataclass
class ImageData:
    """Images (and, for TeCoA, class indices) of a training run."""

    items: list
    labels: list[int] | None = None
    classes: list[str] | None = None


def image_data(source: str, labelled: bool = False) -> ImageData:
    """The images of ``source`` (folder, list file or shards); with ``labelled``, class = first-level subfolder.

    Raises:
        BadInputError: a missing or empty source, or (labelled) images outside class folders.
    """
    from ..retrieval.sources import collect_items

    listing = collect_items([source], label_from_folder=labelled)
    items = listing.items
    if not labelled:
        return ImageData(items)
    loose = [it.key for it in items if it.label is None]
    if loose:
        raise BadInputError(f"{source}: {len(loose)} images are not in a class folder (e.g. {loose[0]}); "
                            "put every image in SOURCE/CLASS/.")
    classes = sorted({it.label for it in items})
    lookup = {c: i for i, c in enumerate(classes)}
    return ImageData(items, [lookup[it.label] for it in items], classes)


def read_classnames(path: str | Path, folders: Sequence[str]) -> list[str]:
    """The class names of a TeCoA run: one per line, in the sorted order of the class folders; a line
    ``folder<TAB>name`` or ``folder,name`` maps a folder to its name explicitly.

    Raises:
        BadInputError: a missing file, or names that do not match the folders in number or by folder.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"class-names file {path} does not exist.")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    mapped = [ln.replace("\t", ",", 1).split(",", 1) for ln in lines]
    if lines and all(len(m) == 2 for m in mapped):
        names = {m[0].strip(): m[1].strip() for m in mapped}
        missing = [f for f in folders if f not in names]
        if missing:
            raise BadInputError(f"{path} names no class for folder(s) {', '.join(missing[:5])}.")
        return [names[f] for f in folders]
    if len(lines) != len(folders):
        raise BadInputError(f"{path} has {len(lines)} class names but the data has {len(folders)} class folders "
                            f"({', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''}).",
                            "One name per line in sorted folder order, or 'folder,name' lines.")
    return lines


def decode_items(items: Sequence, preprocess: Preprocess, batches: Sequence[Sequence[int]], workers: int | None,
                 pin_memory: bool = False):
    """(positions, uint8 batch or None, failures) for each explicit batch, decoded by DataLoader workers."""
    from ..retrieval.sources import iter_item_batches

    if not batches:
        return iter(())
    return iter_item_batches(items, preprocess, 1, workers, pin_memory, batches=batches)


def check_readable(items: Sequence, preprocess: Preprocess, sample: int = 16) -> None:
    """Decode up to ``sample`` evenly spaced items; BadInputError when none of them can be read."""
    from ..errors import ImageReadError
    from ..retrieval.sources import read_item

    if not items:
        raise BadInputError("no training images.")
    stride = max(1, math.ceil(len(items) / sample))
    probe = list(items)[::stride][:sample]
    errors = []
    for item in probe:
        try:
            preprocess.uint8(read_item(item))
        except ImageReadError as exc:
            errors.append(f"{item.key}: {exc.reason}")
    if len(errors) == len(probe):
        raise BadInputError(f"none of {len(probe)} sampled training images can be read (e.g. {errors[0]}).")
