"""Retrieval as a classifier: the label of the nearest pool items, confusion tables, ``--or-with``.

The paper (Croce et al., SaTML 2025, Sec. V) classifies a query by the label of its nearest pool item
under the cosine similarity of a robust encoder. For NSFW detection the pool has three classes, safe,
unsafe and buffer, and a query whose nearest item is a buffer image is reported as its own outcome
"buffer" (Table III shows, for each true class, the fraction of queries retrieved as safe / buffer /
unsafe). Table IV combines the retrieval with another detector: a query that detector flags counts as
unsafe whatever the retrieval said (:func:`or_with`).

Pure logic on search results (:class:`~percept_cli.retrieval.search.Hits`) and label codes
(:meth:`~percept_cli.retrieval.index.PoolIndex.label_codes`); no model involved.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..errors import BadInputError

NONE_NAME = "none"
"""How a missing prediction (no labelled neighbour) is shown in a confusion table."""

_TRUE_WORDS = {"1", "true", "yes", "unsafe"}
_FALSE_WORDS = {"0", "false", "no", "safe"}
_MAX_SCORE_CELLS = 1 << 22  # queries x labels per block of the vote (about 32 MiB of float64)


def _as_numpy(values) -> np.ndarray:
    """A torch tensor (any device) or array-like as a NumPy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def knn_vote(sims, ids, codes, names: Sequence[str], k: int = 1, weighted: bool = True) -> list[Optional[str]]:
    """The label each query gets from its ``k`` nearest pool items.

    Args:
        sims: (Q, K) similarities of a search, descending along each row (torch tensor or array).
        ids: (Q, K) global pool ids of those neighbours; -1 marks padding (a pool smaller than K).
        codes: (N,) int label codes of the pool items into ``names``; -1 = unlabelled.
        names: the label names.
        k: how many of the K neighbours vote (1 <= k <= K).
        weighted: with k > 1, each labelled neighbour adds its similarity to its label's score;
            otherwise each adds 1 (a plain majority).

    Returns:
        One label per query, or None when none of its first ``k`` neighbours carries a label.
        Padding and unlabelled neighbours are ignored, so with ``k=1`` a query gets the nearest
        item's label (None if that item has none). The label with the highest score wins; a tie
        goes to the tied label of the highest-ranked neighbour (the nearest one among them).
        Labels absent from a query's neighbours never win, even when the present scores are
        negative (weighted votes with negative similarities).

    Raises:
        BadInputError: shapes that do not match, ``k`` out of range, ids or codes out of range.
    """
    sims_np = _as_numpy(sims).astype(np.float64, copy=False)
    ids_np = _as_numpy(ids).astype(np.int64, copy=False)
    codes_np = _as_numpy(codes).astype(np.int64, copy=False).reshape(-1)
    names = list(names)
    if sims_np.ndim != 2 or sims_np.shape != ids_np.shape:
        raise BadInputError(f"knn_vote: sims {tuple(sims_np.shape)} and ids {tuple(ids_np.shape)} must be "
                            "(queries, neighbours) of the same shape.")
    if not 1 <= int(k) <= sims_np.shape[1]:
        raise BadInputError(f"knn_vote: k={k} but the search returned {sims_np.shape[1]} neighbours per query.")
    k = int(k)
    if codes_np.size and (codes_np.min() < -1 or codes_np.max() >= len(names)):
        raise BadInputError(f"knn_vote: label codes must lie in [-1, {len(names) - 1}] (there are "
                            f"{len(names)} label names).")
    sims_np, ids_np = sims_np[:, :k], ids_np[:, :k]
    if ids_np.size and (ids_np.min() < -1 or ids_np.max() >= codes_np.size):
        raise BadInputError(f"knn_vote: neighbour ids must lie in [-1, {codes_np.size - 1}] (the pool has "
                            f"{codes_np.size} items).")
    labels = np.where(ids_np >= 0, codes_np[np.clip(ids_np, 0, None)] if codes_np.size else -1, -1)
    weights = sims_np if weighted else np.ones_like(sims_np)
    winners = np.full(len(labels), -1, dtype=np.int64)
    block = max(1, _MAX_SCORE_CELLS // max(1, len(names)))
    for start in range(0, len(labels), block):
        stop = start + block
        winners[start:stop] = _vote_block(labels[start:stop], weights[start:stop], len(names))
    return [names[w] if w >= 0 else None for w in winners]


def _vote_block(labels: np.ndarray, weights: np.ndarray, n_labels: int) -> np.ndarray:
    """Winning label code per row of (B, k) neighbour labels (-1 ignored) and weights; -1 if none."""
    rows, cols = labels.shape
    labelled = labels >= 0
    if n_labels == 0 or not labelled.any():
        return np.full(rows, -1, dtype=np.int64)
    scores = np.zeros((rows, n_labels), dtype=np.float64)
    present = np.zeros((rows, n_labels), dtype=bool)
    row_index = np.broadcast_to(np.arange(rows)[:, None], labels.shape)
    # np.add.at adds in index order, i.e. nearest neighbour first along each row.
    np.add.at(scores, (row_index[labelled], labels[labelled]), weights[labelled])
    present[row_index[labelled], labels[labelled]] = True
    scores[~present] = -np.inf
    best = scores.max(axis=1)
    safe_labels = np.clip(labels, 0, None)
    tied = labelled & (scores[row_index, safe_labels] == best[:, None])
    first = tied.argmax(axis=1)  # the highest-ranked neighbour whose label is among the best
    winner = labels[np.arange(rows), first]
    return np.where(labelled.any(axis=1), winner, -1)


@dataclass
class Confusion:
    """A confusion table: rows are true classes, columns predicted classes (the paper's Table III).

    Attributes:
        true_classes: row names.
        pred_classes: column names; a missing prediction is the column ``"none"`` (``"(none)"`` if a
            real class is called ``none``).
        counts: (T, P) int64 number of queries of each true class given each predicted class.
        fractions: (T, P) float64 ``counts`` divided by its row sum: the fraction of each true class
            assigned to each predicted class (a row with no queries is all zeros).
        accuracy: fraction of all queries whose prediction equals their true class (matched by name),
            or None when no predicted class is also a true class (e.g. safe/unsafe vs buffer only).
    """

    true_classes: list[str]
    pred_classes: list[str]
    counts: np.ndarray
    fractions: np.ndarray
    accuracy: Optional[float]

    @property
    def total(self) -> int:
        """Number of queries counted."""
        return int(self.counts.sum())

    def as_dict(self) -> dict:
        """A JSON-ready document: class names, counts, fractions, per-class support, accuracy."""
        return {
            "true_classes": list(self.true_classes),
            "pred_classes": list(self.pred_classes),
            "counts": self.counts.astype(int).tolist(),
            "fractions": self.fractions.astype(float).tolist(),
            "support": self.counts.sum(axis=1).astype(int).tolist(),
            "total": self.total,
            "accuracy": self.accuracy,
        }


def _default_order(values) -> list:
    """Distinct values sorted, None last."""
    distinct = set(values)
    return sorted(v for v in distinct if v is not None) + ([None] if None in distinct else [])


def confusion(true: Sequence[Optional[str]], pred: Sequence[Optional[str]], *,
              true_classes: Optional[Sequence[Optional[str]]] = None,
              pred_classes: Optional[Sequence[Optional[str]]] = None) -> Confusion:
    """Count true vs predicted classes.

    Args:
        true: each query's true class.
        pred: each query's predicted class (None: no prediction, e.g. no labelled neighbour).
        true_classes: the rows in this order (default: the true classes seen, sorted).
        pred_classes: the columns in this order (default: ``true_classes``, then any other predicted
            class, sorted); a None prediction adds the ``"none"`` column last if it is not listed.

    Raises:
        BadInputError: lengths differ, or a value not among the classes given.
    """
    true, pred = list(true), list(pred)
    if len(true) != len(pred):
        raise BadInputError(f"confusion: {len(true)} true labels but {len(pred)} predictions.")
    rows = list(true_classes) if true_classes is not None else _default_order(true)
    if pred_classes is not None:
        cols = list(pred_classes)
    else:
        cols = [c for c in rows if c is not None] + [c for c in _default_order(pred) if c not in rows and c is not None]
    if None in pred and None not in cols:
        cols.append(None)
    row_at = _positions(rows, "true_classes")
    col_at = _positions(cols, "pred_classes")
    counts = np.zeros((len(rows), len(cols)), dtype=np.int64)
    for t, p in zip(true, pred):
        if t not in row_at:
            raise BadInputError(f"confusion: true class {t!r} is not among true_classes {rows}.")
        if p not in col_at:
            raise BadInputError(f"confusion: predicted class {p!r} is not among pred_classes {cols}.")
        counts[row_at[t], col_at[p]] += 1
    support = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, support, out=np.zeros(counts.shape, dtype=np.float64), where=support > 0)
    shared = [c for c in rows if c in col_at]
    accuracy = None
    if shared and len(true):
        accuracy = float(sum(counts[row_at[c], col_at[c]] for c in shared) / len(true))
    none_name = NONE_NAME if NONE_NAME not in rows and NONE_NAME not in cols else "(none)"
    return Confusion([none_name if c is None else str(c) for c in rows],
                     [none_name if c is None else str(c) for c in cols], counts, fractions, accuracy)


def _positions(classes: list, what: str) -> dict:
    """``{class: index}``; BadInputError for a class listed twice."""
    at: dict = {}
    for i, c in enumerate(classes):
        if c in at:
            raise BadInputError(f"confusion: {what} lists {c!r} twice.")
        at[c] = i
    return at


def parse_flag(text: str) -> Optional[bool]:
    """``1/true/yes/unsafe`` -> True, ``0/false/no/safe`` -> False (case-insensitive); else None."""
    word = text.strip().lower()
    return True if word in _TRUE_WORDS else False if word in _FALSE_WORDS else None


def read_flags_csv(path: str | Path) -> dict[str, bool]:
    """Another detector's verdicts: a CSV with a header holding ``path`` and ``flag`` columns.

    ``flag`` is 1/0, true/false, yes/no or unsafe/safe (case-insensitive). Paths are relative to the
    CSV's folder or absolute, and the result is keyed by ``os.path.abspath`` of them, the form of an
    item key (a shard sample's key ``shard.tar#sample`` resolves the same way). Blank lines are
    skipped; a path listed twice must carry the same flag.

    Raises:
        BadInputError: one line naming the file (and line) for a missing, unreadable or malformed file.
    """
    path = Path(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return _parse_flags(csv.reader(fh), path, folder)
    except FileNotFoundError:
        raise BadInputError(f"flags file {path}: not found.") from None
    except UnicodeDecodeError:
        raise BadInputError(f"flags file {path}: not a UTF-8 text file.") from None
    except csv.Error as exc:
        raise BadInputError(f"flags file {path}: malformed CSV ({exc}).") from None
    except OSError as exc:
        raise BadInputError(f"flags file {path}: cannot read ({exc.strerror or exc}).") from None


def _parse_flags(reader, path: Path, folder: str) -> dict[str, bool]:
    """The rows of a flags CSV; see :func:`read_flags_csv`."""
    header = next((row for row in reader if any(cell.strip() for cell in row)), None)
    if header is None:
        raise BadInputError(f"flags file {path}: empty; expected a header 'path,flag'.")
    columns = [cell.strip().lower() for cell in header]
    if "path" not in columns or "flag" not in columns:
        raise BadInputError(f"flags file {path} line {reader.line_num}: the header must name the columns "
                            f"'path' and 'flag' (found {','.join(header)}).")
    path_col, flag_col = columns.index("path"), columns.index("flag")
    flags: dict[str, bool] = {}
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        where = f"flags file {path} line {reader.line_num}"
        if len(row) <= max(path_col, flag_col):
            raise BadInputError(f"{where}: expected {len(header)} columns, found {len(row)}.")
        name, value = row[path_col].strip(), parse_flag(row[flag_col])
        if not name:
            raise BadInputError(f"{where}: empty path.")
        if value is None:
            raise BadInputError(f"{where}: flag {row[flag_col].strip()!r} is not one of 1/0, true/false, "
                                "yes/no, unsafe/safe.")
        key = os.path.abspath(os.path.join(folder, name))
        if flags.get(key, value) != value:
            raise BadInputError(f"{where}: {name} is listed again with another flag.")
        flags[key] = value
    return flags


def flags_for(keys: Sequence[str], flags: Mapping[str, bool], *, where: str = "flags") -> list[bool]:
    """``flags[key]`` for each query key, in order.

    Raises:
        BadInputError: naming ``where`` and up to 5 keys that have no flag.
    """
    missing = [key for key in keys if key not in flags]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise BadInputError(f"{where}: no flag for {len(missing)} of the {len(keys)} queries: {shown}.")
    return [bool(flags[key]) for key in keys]


def or_with(pred: Sequence[Optional[str]], flags: Sequence[bool], *, flag_label: str = "unsafe") -> list:
    """Combine the retrieval with another detector, as the paper's Table IV ("retrieval OR detector").

    A query the other detector flags gets ``flag_label`` whatever the retrieval said (also when the
    retrieval said buffer or had no labelled neighbour); an unflagged query keeps the retrieval's
    label (buffer and None included). So the combination can only add ``flag_label`` verdicts.

    Args:
        pred: the retrieval's label per query.
        flags: the other detector's verdict per query, aligned with ``pred`` (see :func:`flags_for`).
        flag_label: the label a flagged query gets.

    Raises:
        BadInputError: ``pred`` and ``flags`` of different lengths.
    """
    pred, flags = list(pred), list(flags)
    if len(pred) != len(flags):
        raise BadInputError(f"or_with: {len(pred)} predictions but {len(flags)} flags.")
    return [flag_label if bool(flag) else label for label, flag in zip(pred, flags)]
