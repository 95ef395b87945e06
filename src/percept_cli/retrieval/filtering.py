"""Dataset filtering (``percept retrieve filter``): every image of a dataset is compared with a labelled
pool, and flagged when it is retrieved as one of the flagged classes (the paper's NSFW use, Croce et
al., SaTML 2025, Sec. V: the label of the nearest pool item; with a threshold, the similarity to the
nearest item of a flagged class).

The images are processed in chunks of a fixed partition of the (sorted) listing; each finished chunk
is written to the report's partial folder at once, so an interrupted run resumes with the chunks
that are not done and loses at most the chunk in flight. The user's data is only read; kept images
are written elsewhere only when asked (:func:`write_kept`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import BadInputError
from ..io.outputs import atomic_path
from .classify import knn_vote
from .reports import ChunkedReport
from .sources import Item, Listing, iter_item_batches

COLUMNS = ["key", "path", "member", "decision", "label", "nearest_key", "nearest_label", "similarity",
           "flag_similarity", "error"]
CHUNK_ITEMS = 4096


@dataclass
class FilterSettings:
    """What makes an image flagged; recorded in the report's partial folder so a resume is consistent."""

    flags: tuple[str, ...]
    threshold: Optional[float] = None
    k: int = 1
    weighted: bool = True
    chunk_items: int = CHUNK_ITEMS

    def as_dict(self) -> dict:
        return {"flags": list(self.flags), "threshold": self.threshold, "k": self.k, "weighted": self.weighted,
                "chunk_items": self.chunk_items}


@dataclass
class FilterSummary:
    """Counts of a filter run (``decisions``: flagged / kept / error; ``labels``: predicted labels)."""

    items: int
    decisions: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    chunks: int = 0
    chunks_resumed: int = 0
    seconds: float = 0.0
    report: Optional[str] = None
    errors: list = field(default_factory=list)


def flag_vectors(index, flags: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, global ids) of the pool items whose label is one of ``flags`` (in RAM, storage dtype).

    Raises:
        BadInputError: a flag that no pool item carries (lists the pool's labels).
    """
    codes, names = index.label_codes()
    missing = [f for f in flags if f not in names]
    if missing:
        raise BadInputError(f"--flag {missing[0]}: no item of the index has this label; its labels are "
                            f"{', '.join(names) or 'none'}.")
    wanted = np.isin(codes, [names.index(f) for f in flags])
    ids = np.flatnonzero(wanted)
    rows, offset = [], 0
    for part in index.vectors():
        local = ids[(ids >= offset) & (ids < offset + len(part))] - offset
        rows.append(np.asarray(part[local]))
        offset += len(part)
    return np.concatenate(rows) if rows else np.zeros((0, index.dim), np.float16), ids


def listing_digest(items: Sequence[Item]) -> str:
    """sha256 over the items' keys, sizes and mtimes, in listing order: what a resumed run must see again
    (chunks are positions in the listing, so the same number of different items would mix reports)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.key}\0{item.size}\0{item.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def run_filter(metric, index, searcher, listing: Listing, report: ChunkedReport, settings: FilterSettings, *,
               batch_size: Optional[int] = None, num_workers: Optional[int] = None,
               progress: Optional[Callable[[int], None]] = None) -> FilterSummary:
    """Classify every item of ``listing`` against ``index`` and write one report row per item.

    Chunks already in ``report`` (a resumed run) are skipped. Returns the counts over all chunks,
    the resumed ones included (read back from the report at the end).
    """
    start = time.perf_counter()
    codes, names = index.label_codes()
    flagged_pool = None
    if settings.threshold is not None:  # the flag-class vectors, once, on the metric's device
        flagged_pool = torch.from_numpy(flag_vectors(index, settings.flags)[0]).to(metric.device, torch.float32)
    items = listing.items
    chunks = list(range(0, len(items), settings.chunk_items))
    done = report.done()
    bs = batch_size or metric.batch_size
    pending = []
    for number, first in enumerate(chunks):
        size = min(settings.chunk_items, len(items) - first)
        if number in done:
            if progress is not None:
                progress(size)
        else:
            pending.append((number, first, size))
    # one DataLoader for every pending chunk, in batches that never cross a chunk (no drain per chunk)
    batches = [range(first + b, first + min(b + bs, size)) for _, first, size in pending for b in range(0, size, bs)]
    if batches:
        pin = metric.device.type == "cuda"
        stream = iter_item_batches(items, metric.preprocess, bs, num_workers, pin, batches=batches)
        try:
            for number, first, size in pending:
                rows = _classify_chunk(metric, searcher, stream, items, first, size, bs, settings, codes, names,
                                       index, flagged_pool, progress)
                report.write(number, rows)
        finally:
            stream.close()
    path = report.finish()
    summary = summarize_report(path)
    summary.chunks, summary.chunks_resumed = len(chunks), len([c for c in done if c < len(chunks)])
    summary.seconds = time.perf_counter() - start
    return summary


def _classify_chunk(metric, searcher, stream, items: Sequence[Item], first: int, size: int, batch_size: int,
                    settings: FilterSettings, codes, names, index, flagged_pool, progress) -> dict:
    """The report rows of ``items[first:first+size]``, from the next batches of ``stream``."""
    rows = {name: [None] * size for name in COLUMNS}
    for i, item in enumerate(items[first:first + size]):
        rows["key"][i], rows["path"][i], rows["member"][i] = item.key, item.path, item.member
    embedded, local = [], []
    with torch.no_grad():
        for _ in range(0, size, batch_size):
            positions, batch, failures = next(stream)
            for position, reason in failures:
                rows["decision"][position - first], rows["error"][position - first] = "error", reason
            if batch is not None:
                x = batch.to(metric.device, non_blocking=True).to(torch.float32).div_(255.0)
                embedded.append(metric.embed_pixels(x, check=False).float())
                local += [p - first for p in positions]
            if progress is not None:
                progress(len(positions) + len(failures))
        if embedded:  # one search per chunk: the pool is streamed once per chunk, not once per batch
            _decide(torch.cat(embedded), local, rows, searcher, settings, codes, names, index, flagged_pool)
    return rows


def _decide(emb, positions, rows, searcher, settings, codes, names, index, flagged_pool) -> None:
    hits = searcher.topk(emb, max(settings.k, 1))
    sims, ids = hits.sims.cpu().numpy(), hits.ids.cpu().numpy()
    labels = knn_vote(sims, ids, codes, names, k=settings.k, weighted=settings.weighted)
    nearest_rows = index.rows(ids[:, 0].tolist(), ("key",))
    flag_sim = None
    if flagged_pool is not None:
        if len(flagged_pool):
            flag_sim = (emb @ flagged_pool.T).max(dim=1).values.cpu().numpy()
        else:
            flag_sim = np.full(len(positions), -1.0, np.float32)
    for j, position in enumerate(positions):
        nearest = int(ids[j, 0])
        rows["label"][position] = labels[j]
        rows["nearest_key"][position] = nearest_rows[j]["key"] if nearest >= 0 else None
        rows["nearest_label"][position] = names[codes[nearest]] if nearest >= 0 and codes[nearest] >= 0 else None
        rows["similarity"][position] = float(sims[j, 0]) if nearest >= 0 else None
        if flag_sim is not None:
            rows["flag_similarity"][position] = float(flag_sim[j])
            flagged = float(flag_sim[j]) >= settings.threshold
        else:
            flagged = labels[j] in settings.flags
        rows["decision"][position] = "flagged" if flagged else "kept"


def summarize_report(path: str | Path) -> FilterSummary:
    """Counts of decisions and labels in a finished report (any of its formats)."""
    table = read_report(path)
    decisions = table.column("decision").to_pylist()
    labels = table.column("label").to_pylist()
    errors = [(k, e) for k, d, e in zip(table.column("key").to_pylist(), decisions, table.column("error").to_pylist())
              if d == "error"]
    count = lambda values: {v: values.count(v) for v in sorted(set(values), key=str)}  # noqa: E731
    return FilterSummary(items=len(decisions), decisions=count(decisions),
                         labels=count([v for v in labels if v is not None]), report=str(path), errors=errors)


def read_report(path: str | Path):
    """A finished report as a pyarrow Table (Parquet, CSV or JSONL, from the suffix)."""
    import pyarrow as pa

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if suffix == ".csv":
        import pyarrow.csv as pcsv

        types = {name: pa.string() for name in ("key", "path", "member", "decision", "label", "nearest_key",
                                                 "nearest_label", "error")}
        return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types=types,
                                                                        strings_can_be_null=True))
    if suffix == ".jsonl":
        import json

        with open(path, encoding="utf-8") as fh:
            return pa.Table.from_pylist([json.loads(line) for line in fh if line.strip()])
    raise BadInputError(f"{path}: a report is .parquet, .csv or .jsonl.")


def write_kept(report_path: str | Path, out_dir: str | Path, listing: Listing) -> dict:
    """Copy the images the report keeps into ``out_dir`` (created; existing files replaced atomically).

    Files keep their path relative to the common folder of the listing's files; shard samples are
    written to new shards of the same names (and sub-folders, relative to the shards' common folder)
    holding only the kept samples (every member of a kept sample). A shard with no kept sample gives
    no output shard. Returns {"files": n, "shards": n, "samples": n}.
    """
    table = read_report(report_path)
    kept = {k for k, d in zip(table.column("key").to_pylist(), table.column("decision").to_pylist()) if d == "kept"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [i for i in listing.items if i.member is None and i.key in kept]
    shards: dict[str, set[str]] = {}
    for item in listing.items:
        if item.member is not None and item.key in kept:
            shards.setdefault(item.path, set()).add(_sample_key(item.member))
    every_file = [os.path.dirname(i.path) for i in listing.items if i.member is None]
    root = os.path.commonpath(every_file) if every_file else ""  # the layout under the data's common folder
    for item in files:
        target = out / os.path.relpath(item.path, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(item.path, tmp)
    samples = 0
    shard_dirs = sorted({os.path.dirname(i.path) for i in listing.items if i.member is not None})
    shard_root = os.path.commonpath(shard_dirs) if shard_dirs else ""
    for shard, keys in sorted(shards.items()):  # shards keep their layout under the shards' common folder
        target = out / os.path.relpath(shard, shard_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        samples += _write_filtered_shard(shard, keys, target)
    return {"files": len(files), "shards": len(shards), "samples": samples}


def _sample_key(member: str) -> str:
    """WebDataset's sample key of a tar member: its path up to the first '.' of the file name."""
    folder, _, name = member.rpartition("/")
    stem = name.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def _write_filtered_shard(source: str, keys: set[str], target: Path) -> int:
    """A copy of shard ``source`` with only the members of samples ``keys``; returns samples written."""
    written: set[str] = set()
    with tarfile.open(source, "r") as src, atomic_path(target) as tmp:
        with tarfile.open(tmp, "w") as dst:
            for member in src:
                if not member.isfile() or _sample_key(member.name) not in keys:
                    continue
                dst.addfile(member, src.extractfile(member))
                written.add(_sample_key(member.name))
    return len(written)
