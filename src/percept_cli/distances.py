"""The work behind ``percept distance``: plan, validate, embed each file once, compute.

Modes, decided from the inputs alone (before any model is loaded):

* ``pair``   - two image files: one distance.
* ``rank``   - a reference file and candidates (files and/or directories): nearest first; each
  file once (by identity: symlinks, ``..``, hard links), never the reference itself.
* ``pairs``  - a CSV of pairs (``--pairs``): one distance per row.
* ``matrix`` - one directory (against itself) or two directories: the full N x M matrix.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .io.data import Failure
from .errors import BadInputError, ImageReadError
from .io.images import check_image, list_images, path_problem
from .metric import embedding_distance, embedding_distance_matrix


@dataclass
class DistanceJob:
    """What to compute, resolved to files. ``rows``/``cols`` name matrix axes."""

    mode: str
    pairs: list[tuple[str, str]] = field(default_factory=list)
    reference: str | None = None
    candidates: list[str] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)
    cols: list[str] = field(default_factory=list)
    row_names: list[str] = field(default_factory=list)
    col_names: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)  # file -> where it was named ("pairs.csv, line 3")

    def files(self) -> list[str]:
        """Every distinct file the job reads, in first-use order."""
        seen: dict[str, None] = {}
        for a, b in self.pairs:
            seen.setdefault(a)
            seen.setdefault(b)
        for item in ([self.reference] if self.reference else []) + self.candidates + self.rows + self.cols:
            seen.setdefault(item)
        return list(seen)


@dataclass
class DistanceResult:
    """Distances computed for a job.

    ``records`` holds one dict per pair/candidate (``a``, ``b``, ``distance``; rank mode
    adds ``rank``); ``matrix`` is set in matrix mode (rows x cols, skipped files removed).
    """

    mode: str
    records: list[dict]
    matrix: torch.Tensor | None = None
    row_names: list[str] = field(default_factory=list)
    col_names: list[str] = field(default_factory=list)
    skipped: list[Failure] = field(default_factory=list)


def _expand(item: str, recursive: bool) -> list[str]:
    path = Path(item)
    return [str(p) for p in list_images(path, recursive)] if path.is_dir() else [item]


def _identity(path: str):
    """What makes two spellings the same file: (device, inode), or the resolved path."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return str(Path(path).resolve())


def distinct_candidates(reference: str, candidates: Sequence[str]) -> list[str]:
    """``candidates`` with each file once (first spelling kept) and the reference itself left out."""
    seen = {_identity(reference)}
    kept = []
    for item in candidates:
        key = _identity(item)
        if key not in seen:
            seen.add(key)
            kept.append(item)
    return kept


def _names(directory: str, files: Sequence[str]) -> list[str]:
    return [Path(f).relative_to(directory).as_posix() for f in files]


def plan_job(inputs: Sequence[str], pairs_csv: str | None = None, recursive: bool = False) -> DistanceJob:
    """Decide the mode and list the files, without reading any image.

    Raises:
        BadInputError: an impossible combination of inputs, a missing path, an empty directory.
    """
    if pairs_csv:
        if inputs:
            raise BadInputError("give either image paths or a pairs CSV, not both.")
        origin: dict[str, str] = {}
        return DistanceJob("pairs", pairs=read_pairs_csv(pairs_csv, origin), origin=origin)
    if not inputs:
        raise BadInputError("no images given.", "Usage: percept distance A.png B.png | REF.png C1 C2 ... | "
                                                "DIR_A DIR_B | --pairs pairs.csv")
    for item in inputs:
        if not Path(item).exists():
            raise ImageReadError(item, path_problem(item) or "file not found")
    dirs = [Path(i).is_dir() for i in inputs]
    if dirs[0]:
        if len(inputs) > 2 or not all(dirs):
            raise BadInputError("matrix mode takes one or two directories (DIR_A [DIR_B]); "
                                "to rank images against a reference, put the reference file first.")
        rows = _expand(inputs[0], recursive)
        cols = _expand(inputs[-1], recursive) if len(inputs) == 2 else rows
        return DistanceJob("matrix", rows=rows, cols=cols, row_names=_names(inputs[0], rows),
                           col_names=_names(inputs[-1], cols))
    if len(inputs) == 1:
        raise BadInputError("one image given; a distance needs a second image (or a directory of candidates).")
    if len(inputs) == 2 and not dirs[1]:
        return DistanceJob("pair", pairs=[(inputs[0], inputs[1])])
    candidates = distinct_candidates(inputs[0], [f for item in inputs[1:] for f in _expand(item, recursive)])
    if not candidates:
        raise BadInputError(f"no candidates to rank: every candidate is the reference {inputs[0]} itself.")
    return DistanceJob("rank", reference=inputs[0], candidates=candidates)


def read_pairs_csv(path: str | Path, origin: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Pairs from a CSV: the first two columns, paths relative to the CSV's folder.

    A header row is recognised (and skipped) when its two cells are not existing files.
    ``origin``, when given, receives each file's first mention (``"pairs.csv, line 3"``).

    Raises:
        BadInputError: not a readable regular file, fewer than two columns, or no pairs.
    """
    csv_path = Path(path)
    problem = path_problem(csv_path)
    if problem is not None:
        raise BadInputError(f"pairs CSV {csv_path}: {problem}.")
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            rows = [(reader.line_num, r) for r in reader if any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInputError(f"pairs CSV {csv_path}: cannot read CSV ({exc}).") from exc
    pairs = []
    for k, (line_no, row) in enumerate(rows):
        if len(row) < 2:
            raise BadInputError(f"pairs CSV {csv_path}, line {line_no}: expected two columns (a,b), got {len(row)}.")
        a, b = (str(base / cell.strip()) for cell in row[:2])
        if k == 0 and not (Path(a).exists() or Path(b).exists()):
            continue  # header
        pairs.append((a, b))
        for item in (a, b):
            if origin is not None:
                origin.setdefault(item, f"{csv_path}, line {line_no}")
    if not pairs:
        empty = " (the file is empty)" if not rows else ""
        raise BadInputError(f"pairs CSV {csv_path}: no pairs found{empty}.")
    return pairs


def check_files(paths: Sequence[str], workers: int = 8) -> list[Failure]:
    """Header-level validation of every file (in parallel threads); returns the failures."""
    def one(path: str):
        try:
            check_image(path)
        except ImageReadError as exc:
            return Failure(path, exc.reason)
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [f for f in pool.map(one, paths) if f is not None]


def first_failure_error(failures: Sequence[Failure], origin: dict[str, str] | None = None) -> ImageReadError:
    """One error for a list of bad files: the first (with where it was named, from ``origin``), plus a count.

    The advice to skip bad files is an option hint: the CLI shows it where the command has ``--skip-bad``.
    """
    first = failures[0]
    more = f" (and {len(failures) - 1} more bad file(s))" if len(failures) > 1 else ""
    where = f" (named in {origin[first.path]})" if origin and first.path in origin else ""
    return ImageReadError(first.path, first.reason + where + more,
                          option_hints={"--skip-bad": "Use --skip-bad to skip unreadable files."})


def bad_files_error(failures: Sequence[Failure], shown: int = 5) -> BadInputError:
    """One error listing the first ``shown`` bad files (path: reason) and how many there are in all."""
    listed = "; ".join(f"{f.path}: {f.reason}" for f in failures[:shown])
    more = f"; and {len(failures) - shown} more" if len(failures) > shown else ""
    return BadInputError(f"{len(failures)} unreadable image file(s): {listed}{more}.",
                         option_hints={"--skip-bad": "Use --skip-bad to skip them."})


def select_ranked(records: list[dict], top: int | None = None, threshold: float | None = None) -> list[dict]:
    """The nearest ``top`` of ranked records with distance <= ``threshold`` (None: no limit), renumbered.

    Raises:
        BadInputError: ``top`` < 1 or ``threshold`` < 0.
    """
    if top is not None and top < 1:
        raise BadInputError(f"top must be at least 1; got {top}.")
    if threshold is not None and not threshold >= 0:
        raise BadInputError(f"threshold must be a distance >= 0; got {threshold}.")
    kept = [r for r in records if threshold is None or r["distance"] <= threshold][:top]
    return [{**r, "rank": i + 1} for i, r in enumerate(kept)]


def run_job(metric, job: DistanceJob, *, skip_bad: bool = False, skipped: Sequence[Failure] = (),
            progress: Callable[[int], None] | None = None, top: int | None = None,
            threshold: float | None = None) -> DistanceResult:
    """Embed every distinct file once and compute the job's distances (each in [0, 2]).

    Args:
        metric: a PerceptualMetric.
        skipped: files already known to be bad (left out without reading).
        progress: called with the number of files embedded so far, per batch.
        top, threshold: rank mode only: keep the nearest ``top`` candidates with distance <= ``threshold``.
    """
    if (top is not None or threshold is not None) and job.mode != "rank":
        raise BadInputError(f"top and threshold apply to ranking a reference's candidates, not to {job.mode} mode.")
    bad = {f.path for f in skipped}
    files = [f for f in job.files() if f not in bad]
    result = metric.embed_files(files, skip_bad=skip_bad, progress=progress)
    failures = list(skipped) + list(result.failures)
    index = {files[i]: row for row, i in enumerate(result.indices)}
    emb = result.embeddings

    if job.mode == "matrix":
        rows = [(f, n) for f, n in zip(job.rows, job.row_names) if f in index]
        cols = [(f, n) for f, n in zip(job.cols, job.col_names) if f in index]
        if not rows or not cols:
            raise BadInputError("no readable images left to compare.")
        row_ids = torch.tensor([index[f] for f, _ in rows], device=emb.device)
        col_ids = torch.tensor([index[f] for f, _ in cols], device=emb.device)
        matrix = embedding_distance_matrix(emb[row_ids], emb[col_ids])
        matrix[row_ids[:, None] == col_ids[None, :]] = 0.0  # a file against itself: exactly 0
        matrix = matrix.cpu()
        return DistanceResult("matrix", [], matrix, [n for _, n in rows], [n for _, n in cols], failures)

    if job.mode == "rank":
        if job.reference not in index:
            raise first_failure_error([f for f in failures if f.path == job.reference])
        cands = [c for c in job.candidates if c in index]
        d = embedding_distance(emb[[index[c] for c in cands]], emb[index[job.reference]]).cpu().tolist()
        order = sorted(range(len(cands)), key=lambda i: d[i])
        records = [{"rank": r + 1, "a": job.reference, "b": cands[i], "distance": d[i]}
                   for r, i in enumerate(order)]
        return DistanceResult("rank", select_ranked(records, top, threshold), skipped=failures)

    pairs = [(a, b) for a, b in job.pairs if a in index and b in index]
    if not pairs:
        raise BadInputError("no readable pairs left to compare.")
    ia = torch.tensor([index[a] for a, _ in pairs], device=emb.device)
    ib = torch.tensor([index[b] for _, b in pairs], device=emb.device)
    d = embedding_distance(emb[ia], emb[ib]).cpu().tolist()
    records = [{"a": a, "b": b, "distance": v} for (a, b), v in zip(pairs, d)]
    return DistanceResult(job.mode, records, skipped=failures)


def check_robust_mode(mode: str) -> None:
    """Raise BadInputError for modes where an attack per pair is not offered (matrix)."""
    if mode == "matrix":
        raise BadInputError("a robust interval is not available for a distance matrix; give pairs, or a reference and candidates.")


def robust_intervals(metric, result: DistanceResult, settings, *, batch_size: int = 32,
                     progress: Callable[[int], None] | None = None) -> DistanceResult:
    """Add ``low``/``high`` to each record: the distance range an attacker perturbing ``b`` reached.

    Two APGD runs per pair (minimise and maximise the distance); an empirical bound, not a
    certificate. Not available for matrix mode (N x M attacks).
    """
    from .attacks import distance_interval

    check_robust_mode(result.mode)
    for start in range(0, len(result.records), batch_size):
        chunk = result.records[start:start + batch_size]
        a = metric.pixels([r["a"] for r in chunk])
        b = metric.pixels([r["b"] for r in chunk])
        interval = distance_interval(metric, a, b, settings, progress=progress)
        for rec, d, low, high in zip(chunk, interval.distance.tolist(), interval.low.tolist(),
                                     interval.high.tolist()):
            rec.update(distance=d, low=low, high=high)
    return result
