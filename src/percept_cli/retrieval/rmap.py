"""Revisited Oxford and Paris: mean average precision, clean and under attack (``percept retrieve map``).

The protocol is that of Radenović, Iscen, Tolias, Avrithis and Chum, "Revisiting Oxford and Paris:
Large-Scale Image Retrieval Benchmarking" (CVPR 2018), as their evaluation code defines it:

* Layout: ``ROOT/jpg/<name>.jpg`` for every database and query image, ``ROOT/gnd_<dataset>.pkl``
  with ``imlist`` (database names, no extension), ``qimlist`` (query names; the queries are not in
  the database) and ``gnd``: one entry per query with ``bbx`` (x1, y1, x2, y2 in the stored pixel
  frame), and ``easy``, ``hard``, ``junk`` (0-based database indices).
* Queries are cropped to ``bbx`` before any processing (PIL's ``crop``: coordinates rounded, area
  outside the image black), in the stored orientation of the file.
* Three setups. Easy: positives ``easy``, ignored ``junk`` + ``hard``. Medium: positives
  ``easy`` + ``hard``, ignored ``junk``. Hard: positives ``hard``, ignored ``junk`` + ``easy``.
* Ignored images are removed from the ranking before scoring. AP is the area under the
  precision-recall curve by trapezoids: the j-th positive (0-based) at rank r (0-based, ignored
  images removed) adds ``(p0 + p1) / (2 n)`` with ``p0 = j / r`` (1 when r = 0), ``p1 = (j+1) / (r+1)``
  and ``n`` the number of positives.
* mP@k (k = 1, 5, 10): with ``q`` the 1-based ranks of the positives (ignored images removed) and
  ``k' = min(k, max(q))``, precision ``#{q <= k'} / k'``.
* A query without positives in a setup is left out of that setup's means.

The robust-CLIP paper (Croce et al., SaTML 2025) evaluates single-scale at the model's input size
(the model's own preprocessing of the cropped query and of each database image), by cosine
similarity of normalised embeddings; its untargeted attack (Eq. 6) pushes each query away from its
own clean embedding, the database staying clean.

Results are in percent, as the papers report them.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import BadInputError, ImageReadError

DATASETS = ("roxford5k", "rparis6k")
SETUPS = ("easy", "medium", "hard")
KAPPAS = (1, 5, 10)
IMAGE_EXT = ".jpg"

# setup -> (lists whose union is the positives, lists whose union is ignored)
_SETUP_LISTS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}

Progress = Callable[[int], None]


# -- ground truth ------------------------------------------------------------------------------

def _numpy_globals() -> dict[tuple[str, str], object]:
    """The numpy callables an array or numpy scalar pickle names, under their old and new module names.

    Taken from numpy's own reductions so no private module is imported by name.
    """
    reconstruct = np.arange(2).__reduce__()[0]
    scalar = np.int64(1).__reduce__()[0]
    frombuffer = np.arange(2).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles only plain data: containers, numbers and strings (pickle opcodes, no globals), bytes as
    protocol 2 writes them (``_codecs.encode``, ``bytes``), and numpy arrays/scalars (their reconstruct,
    dtype and buffer functions). Any other global is refused before it is looked up."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # Python 2 pickles of numpy arrays need latin1
        self._path = path
        self._allowed = {("_codecs", "encode"): __import__("_codecs").encode, ("builtins", "bytes"): bytes,
                         **_numpy_globals()}

    def find_class(self, module: str, name: str):
        # protocols 0-2 name Python 2 modules (``__builtin__``); no other renamed module is admitted
        found = self._allowed.get(("builtins" if module == "__builtin__" else module, name))
        if found is None:
            raise BadInputError(f"{self._path}: refusing to load global {module}.{name}: a ground-truth file holds "
                                "only lists, numbers, strings and numpy arrays.")
        return found


@dataclass(frozen=True)
class GroundTruth:
    """A revisited Oxford/Paris ground truth, checked.

    Attributes:
        imlist: database image names (no extension), in database-index order.
        qimlist: query image names (no extension).
        bbx: (n_queries, 4) float64 query boxes x1, y1, x2, y2.
        easy, hard, junk: per query, int64 arrays of database indices.
        path: the file it was read from (None when built in memory).
    """

    imlist: list[str]
    qimlist: list[str]
    bbx: np.ndarray
    easy: list[np.ndarray]
    hard: list[np.ndarray]
    junk: list[np.ndarray]
    path: str | None = None

    @property
    def n_database(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    def setup(self, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, (positives, ignored) database indices of setup ``easy``, ``medium`` or ``hard``.

        Raises:
            BadInputError: an unknown setup.
        """
        key = str(name).strip().lower()
        if key not in _SETUP_LISTS:
            raise BadInputError(f"setup must be one of {', '.join(SETUPS)}; got {name!r}.")
        positive_keys, ignored_keys = _SETUP_LISTS[key]
        out = []
        for q in range(self.n_queries):
            positives = np.unique(np.concatenate([getattr(self, k)[q] for k in positive_keys]))
            ignored = np.unique(np.concatenate([getattr(self, k)[q] for k in ignored_keys]))
            out.append((positives, ignored))
        return out


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read and check a ``gnd_<dataset>.pkl`` file with a restricted unpickler.

    Raises:
        BadInputError: missing or unreadable file, a refused global (named), or a structure other
            than the protocol's (wrong keys, lengths, types, indices out of range, a bad box).
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: ground-truth file not found.")
    try:
        data = _GroundTruthUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except BadInputError:
        raise
    except OSError as exc:
        raise BadInputError(f"{path}: cannot be read ({exc}).") from exc
    except Exception as exc:  # a damaged pickle raises many types (UnpicklingError, EOFError, ValueError...)
        raise BadInputError(f"{path}: not a readable ground-truth pickle ({type(exc).__name__}: {exc}).") from exc
    return ground_truth_from_dict(data, path)


def ground_truth_from_dict(data: object, path: str | Path | None = None) -> GroundTruth:
    """Check the unpickled structure and build a :class:`GroundTruth` from it.

    Raises:
        BadInputError: naming the file (or ``ground truth``) and what is wrong.
    """
    where = str(path) if path is not None else "ground truth"
    if not isinstance(data, dict):
        raise BadInputError(f"{where}: expected a dictionary with imlist, qimlist and gnd; got {type(data).__name__}.")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in data]
    if missing:
        raise BadInputError(f"{where}: missing key(s) {', '.join(missing)}.")
    imlist = _names(data["imlist"], f"{where}: imlist")
    qimlist = _names(data["qimlist"], f"{where}: qimlist")
    if not imlist or not qimlist:
        raise BadInputError(f"{where}: imlist and qimlist must not be empty.")
    gnd = data["gnd"]
    if not isinstance(gnd, (list, tuple)) or len(gnd) != len(qimlist):
        n = len(gnd) if isinstance(gnd, (list, tuple)) else type(gnd).__name__
        raise BadInputError(f"{where}: gnd must be a list with one entry per query ({len(qimlist)}); got {n}.")
    boxes, lists = [], {"easy": [], "hard": [], "junk": []}
    for q, entry in enumerate(gnd):
        label = f"{where}: gnd[{q}]"
        if not isinstance(entry, dict):
            raise BadInputError(f"{label}: expected a dictionary; got {type(entry).__name__}.")
        absent = [k for k in ("bbx", "easy", "hard", "junk") if k not in entry]
        if absent:
            raise BadInputError(f"{label}: missing key(s) {', '.join(absent)}.")
        boxes.append(_box(entry["bbx"], f"{label}['bbx']"))
        for key in lists:
            lists[key].append(_indices(entry[key], len(imlist), f"{label}['{key}']"))
    return GroundTruth(imlist, qimlist, np.stack(boxes), lists["easy"], lists["hard"], lists["junk"],
                       None if path is None else str(path))


def _names(value: object, label: str) -> list[str]:
    """A list of image names (str; bytes decoded as latin-1 like the loader does)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise BadInputError(f"{label}: expected a list of image names; got {type(value).__name__}.")
    names = []
    for i, item in enumerate(value):
        if isinstance(item, bytes):
            item = item.decode("latin-1")
        if not isinstance(item, str) or not item:
            raise BadInputError(f"{label}[{i}]: expected an image name; got {item!r}.")
        names.append(item)
    return names


def _box(value: object, label: str) -> np.ndarray:
    """(4,) float64 x1, y1, x2, y2 with x1 < x2 and y1 < y2, all finite."""
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise BadInputError(f"{label}: expected 4 numbers x1, y1, x2, y2; got {value!r}.") from None
    if arr.shape != (4,) or not np.isfinite(arr).all():
        raise BadInputError(f"{label}: expected 4 finite numbers x1, y1, x2, y2; got {value!r}.")
    if not (arr[0] < arr[2] and arr[1] < arr[3]):
        raise BadInputError(f"{label}: the box {arr.tolist()} is empty (x1 < x2 and y1 < y2 are needed).")
    return arr


def _indices(value: object, n: int, label: str) -> np.ndarray:
    """(k,) int64 database indices in [0, n)."""
    try:
        arr = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    except ValueError:  # ragged nested lists
        arr = None
    if arr is None or arr.ndim == 0 or (arr.size and arr.size != max(arr.shape)):  # a vector, or (1, k) / (k, 1)
        raise BadInputError(f"{label}: expected a list of database indices; got {type(value).__name__}.")
    arr = arr.reshape(-1)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == object:
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr):
            raise BadInputError(f"{label}: database indices must be integers.")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise BadInputError(f"{label}: database indices must be integers; got {arr.dtype} values.")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise BadInputError(f"{label}: index {int(bad[0])} is outside the database (0..{n - 1}).")
    return arr


# -- the dataset on disk -----------------------------------------------------------------------

def dataset_files(root: str | Path, name: str) -> tuple[list[Path], list[Path], np.ndarray, GroundTruth]:
    """The database images, query images, query boxes and ground truth of ``name`` under ``root``.

    ``root`` is the dataset folder (holding ``jpg/`` and ``gnd_<name>.pkl``) or its parent (holding
    ``<name>/``, the layout of the authors' download script).

    Returns:
        (database paths in index order, query paths, (n_queries, 4) boxes, ground truth).

    Raises:
        BadInputError: an unknown dataset, or a layout that is not the protocol's: names what is missing
            (the ground-truth file, the ``jpg`` folder, up to five missing images and their count).
    """
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise BadInputError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}.")
    folder = _dataset_folder(Path(root), key)
    gt = load_ground_truth(folder / f"gnd_{key}.pkl")
    images = folder / "jpg"
    if not images.is_dir():
        raise BadInputError(f"{images}: folder not found; {key} keeps its images in ROOT/jpg/<name>{IMAGE_EXT}.")
    db = [images / f"{n}{IMAGE_EXT}" for n in gt.imlist]
    queries = [images / f"{n}{IMAGE_EXT}" for n in gt.qimlist]
    missing = [p.name for p in db + queries if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise BadInputError(f"{images}: {len(missing)} of the {len(db) + len(queries)} images named by "
                            f"gnd_{key}.pkl are missing: {shown}.")
    return db, queries, gt.bbx.copy(), gt


def _dataset_folder(root: Path, key: str) -> Path:
    """``root`` if it holds the ground truth, else ``root/<key>`` if that does; BadInputError otherwise."""
    if not root.is_dir():
        raise BadInputError(f"{root}: dataset folder not found.")
    for folder in (root, root / key):
        if (folder / f"gnd_{key}.pkl").is_file():
            return folder
    raise BadInputError(f"{root}: no gnd_{key}.pkl here or in {root / key}; expected ROOT/gnd_{key}.pkl and "
                        f"ROOT/jpg/ (the revisitop download layout).")


def read_query_image(path: str | Path) -> Image.Image:
    """A query image as RGB in its stored orientation (the frame its box is given in; no EXIF rotation).

    Raises:
        ImageReadError: missing, not an image, or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"cannot be read ({exc})") from exc


def crop_query(img: Image.Image, bbx: Sequence[float] | np.ndarray) -> Image.Image:
    """The query region: PIL's ``crop`` of ``bbx`` = (x1, y1, x2, y2), as the reference crops
    (coordinates rounded to pixels; any part outside the image comes out black).

    Raises:
        BadInputError: a box that is not 4 finite numbers or is empty after rounding.
    """
    box = _box(bbx, "bbx")
    rounded = [int(round(v)) for v in box]
    if rounded[2] <= rounded[0] or rounded[3] <= rounded[1]:
        raise BadInputError(f"bbx: the box {box.tolist()} is empty after rounding to pixels.")
    return img.crop(tuple(float(v) for v in box))


# -- scoring -----------------------------------------------------------------------------------

def compute_ap(positions: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """Average precision (a fraction) from the sorted 0-based ranks of the positives, ignored images
    already removed from the ranking; ``n_positives`` counts all positives, ranked or not.

    Raises:
        BadInputError: ``n_positives`` < 1 or below the number of ranks given.
    """
    ranks = np.asarray(positions, dtype=np.float64).reshape(-1)
    if n_positives < 1 or n_positives < ranks.size:
        raise BadInputError(f"n_positives must be at least 1 and at least the {ranks.size} ranks given; "
                            f"got {n_positives}.")
    if ranks.size == 0:
        return 0.0
    j = np.arange(ranks.size, dtype=np.float64)
    before = np.divide(j, ranks, out=np.ones_like(ranks), where=ranks > 0)
    after = (j + 1.0) / (ranks + 1.0)
    return float((before + after).sum() / (2.0 * n_positives))


def positive_ranks(ranking: np.ndarray, positives: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives in ``ranking`` (database indices, best first) once the
    ignored images are taken out of it (an index both positive and ignored counts as positive)."""
    ranking = np.asarray(ranking)
    is_pos = np.isin(ranking, positives)
    is_ignored = np.isin(ranking, ignored)
    ignored_before = np.cumsum(is_ignored) - is_ignored  # strictly before each position
    return (np.flatnonzero(is_pos) - ignored_before[is_pos]).astype(np.int64)


def precision_at(ranks: np.ndarray, k: int) -> float:
    """The protocol's precision at ``k`` from 0-based positive ranks: ``k' = min(k, last positive's
    1-based rank)``, ``#{positives within k'} / k'`` (0 when no positive is ranked)."""
    if ranks.size == 0:
        return 0.0
    one_based = ranks + 1
    cut = min(int(one_based.max()), int(k))
    return float((one_based <= cut).sum() / cut)


def rankings_from_similarity(similarity: np.ndarray | torch.Tensor) -> np.ndarray:
    """(n_queries, n_database) database indices, most similar first (ties: lower index first).

    Raises:
        BadInputError: not a 2-D array of finite numbers.
    """
    sim = _as_numpy(similarity)
    if sim.ndim != 2 or sim.dtype.kind not in "fiu" or sim.size == 0:
        raise BadInputError(f"similarity: expected a non-empty (n_queries, n_database) matrix; got shape "
                            f"{tuple(sim.shape)} of {sim.dtype}.")
    if sim.dtype.kind == "f" and not np.isfinite(sim).all():
        raise BadInputError("similarity: it holds NaN or infinite values.")
    return np.argsort(-sim.astype(np.float64), axis=1, kind="stable")


def compute_map(ranks_or_similarity: np.ndarray | torch.Tensor, gt: GroundTruth, setup: str, *,
                kappas: Sequence[int] = KAPPAS, per_query: bool = False) -> dict:
    """mAP and mP@k of one setup, in percent.

    ``ranks_or_similarity``: an integer array is a ranking, (n_queries, n_ranked) database indices
    best first (n_ranked may be below the database size: unranked positives then count as missed);
    a floating-point array is a (n_queries, n_database) similarity matrix, ranked by
    :func:`rankings_from_similarity`.

    Returns:
        ``{"map", "mp@1", "mp@5", "mp@10", "n_queries", "n_excluded"}`` (one ``mp@k`` per kappa):
        means over the queries with at least one positive (``n_queries`` of them; ``n_excluded``
        had none); the means are None when no query has a positive. ``per_query`` adds ``"ap"``:
        each query's AP in percent, None for an excluded query.

    Raises:
        BadInputError: an unknown setup, bad kappas, or a matrix that does not fit ``gt``.
    """
    pairs = gt.setup(setup)
    kappas = _check_kappas(kappas)
    arr = _as_numpy(ranks_or_similarity)
    if arr.dtype.kind == "f":
        _check_similarity_shape(arr, gt)
        ranks = rankings_from_similarity(arr)
    else:
        ranks = _check_rankings(arr, gt)
    aps: list[float | None] = []
    precisions = []
    for q, (positives, ignored) in enumerate(pairs):
        if positives.size == 0:
            aps.append(None)
            continue
        found = positive_ranks(ranks[q], positives, ignored)
        aps.append(compute_ap(found, positives.size))
        precisions.append([precision_at(found, k) for k in kappas])
    scored = [a for a in aps if a is not None]
    result: dict = {"map": _percent_mean(scored)}
    for i, k in enumerate(kappas):
        result[f"mp@{k}"] = _percent_mean([p[i] for p in precisions])
    result["n_queries"] = len(scored)
    result["n_excluded"] = len(aps) - len(scored)
    if per_query:
        result["ap"] = [None if a is None else 100.0 * a for a in aps]
    return result


def evaluate(similarity: np.ndarray | torch.Tensor, gt: GroundTruth, *, kappas: Sequence[int] = KAPPAS,
             per_query: bool = False) -> dict:
    """The three setups from a (n_queries, n_database) similarity matrix (row q: query q against every
    database image, e.g. ``queries @ database.T``), in percent.

    Returns:
        ``{"easy": {...}, "medium": {...}, "hard": {...}}``, each as :func:`compute_map` returns.

    Raises:
        BadInputError: a matrix of another shape (a transposed one is named as such) or non-finite values.
    """
    sim = _as_numpy(similarity)
    _check_similarity_shape(sim, gt)
    ranks = rankings_from_similarity(sim)
    return {s: compute_map(ranks, gt, s, kappas=kappas, per_query=per_query) for s in SETUPS}


def _as_numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        return value.numpy()
    if not isinstance(value, np.ndarray):
        raise BadInputError(f"expected a NumPy array or torch tensor; got {type(value).__name__}.")
    return value


def _check_similarity_shape(sim: np.ndarray, gt: GroundTruth) -> None:
    want = (gt.n_queries, gt.n_database)
    if sim.shape == want:
        return
    hint = " (it looks transposed: pass similarity.T)" if sim.shape == want[::-1] else ""
    raise BadInputError(f"similarity: expected shape (n_queries, n_database) = {want}; got {tuple(sim.shape)}{hint}.")


def _check_rankings(ranks: np.ndarray, gt: GroundTruth) -> np.ndarray:
    """(n_queries, k) integer database indices, each row without repeats."""
    if ranks.ndim != 2 or ranks.shape[0] != gt.n_queries or ranks.dtype.kind not in "iu":
        raise BadInputError(f"ranks: expected (n_queries={gt.n_queries}, n_ranked) integer database indices; got "
                            f"shape {tuple(ranks.shape)} of {ranks.dtype}.")
    if ranks.size and (ranks.min() < 0 or ranks.max() >= gt.n_database):
        raise BadInputError(f"ranks: indices must lie in 0..{gt.n_database - 1}.")
    ordered = np.sort(ranks, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise BadInputError("ranks: a row names the same database image twice.")
    return ranks.astype(np.int64, copy=False)


def _check_kappas(kappas: Sequence[int]) -> list[int]:
    try:
        values = [int(k) for k in kappas]
    except (TypeError, ValueError):
        raise BadInputError(f"kappas must be positive integers; got {kappas!r}.") from None
    if any(k < 1 for k in values) or any(isinstance(k, bool) for k in kappas):
        raise BadInputError(f"kappas must be positive integers; got {kappas!r}.")
    return values


def _percent_mean(values: Sequence[float]) -> float | None:
    return 100.0 * float(np.mean(values)) if values else None


# -- the whole run -----------------------------------------------------------------------------

def progress_total(gt: GroundTruth, attacked: bool) -> int:
    """How many units ``run_map`` reports through ``progress``: the database, the queries, and the
    queries again when attacked."""
    return gt.n_database + gt.n_queries * (2 if attacked else 1)


def query_pixels(metric, paths: Sequence[Path], boxes: np.ndarray) -> torch.Tensor:
    """(n_queries, 3, S, S) [0,1] pixels on the CPU: each query decoded, cropped to its box, then the
    model's preprocessing (resize, center crop)."""
    crops = [crop_query(read_query_image(p), box) for p, box in zip(paths, boxes)]
    return metric.pixels(crops)


def run_map(metric, root: str | Path, name: str, *, settings=None, batch_size: int | None = None,
            attack_batch_size: int | None = None, progress: Progress | None = None) -> dict:
    """Revisited Oxford/Paris mAP of ``metric``, clean and, with ``settings``, under the untargeted
    attack on the queries (the paper's Eq. 6; the database stays clean).

    Args:
        metric: a :class:`percept_cli.metric.PerceptualMetric`.
        root, name: as :func:`dataset_files` takes them.
        settings: a :class:`percept_cli.attacks.settings.AttackSettings`; None: clean only.
        batch_size: embedding batch size (None: the metric's).
        attack_batch_size: queries attacked at once (None: ``batch_size``); each query's random
            start is seeded by its index, so results do not depend on it.
        progress: called with counts of images done (database embedded, queries embedded, queries
            attacked), :func:`progress_total` in all.

    Returns:
        ``{"dataset", "n_database", "n_queries", "clean": {easy, medium, hard}, "attacked": same or None,
        "attack": settings.to_dict() or None, "adversarial_distance": mean 1 - cos between each
        attacked query and its clean embedding, or None}``; scores in percent.

    Raises:
        BadInputError, ImageReadError: the dataset layout, the ground truth, an unreadable image.
    """
    db_paths, q_paths, boxes, gt = dataset_files(root, name)
    bs = int(batch_size or metric.batch_size)
    database = metric.embed_files([str(p) for p in db_paths], batch_size=bs, progress=progress).embeddings
    pixels = query_pixels(metric, q_paths, boxes)
    queries = _embed_batches(metric, pixels, bs, progress)
    result = {"dataset": str(name).strip().lower(), "n_database": gt.n_database, "n_queries": gt.n_queries,
              "clean": evaluate(queries @ database.T, gt), "attacked": None, "attack": None,
              "adversarial_distance": None}
    if settings is not None:
        adversarial, distance = _attack_queries(metric, pixels, settings, int(attack_batch_size or bs), progress)
        result["attacked"] = evaluate(adversarial @ database.T, gt)
        result["attack"] = settings.to_dict()
        result["adversarial_distance"] = distance
    return result


def _embed_batches(metric, pixels: torch.Tensor, batch_size: int, progress: Progress | None) -> torch.Tensor:
    """Normalised embeddings of CPU pixel batches, without gradient."""
    rows = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start:start + batch_size].to(metric.device)
            rows.append(metric.embed_pixels(chunk, check=False).float())
            if progress:
                progress(len(chunk))
    return torch.cat(rows)


def _attack_queries(metric, pixels: torch.Tensor, settings, batch_size: int,
                    progress: Progress | None) -> tuple[torch.Tensor, float | None]:
    """Embeddings of the attacked queries as saved images (8-bit, inside the ball: the attack
    ``search``/``classify`` run, :func:`.attack.attack_queries`), and the mean 1 - cos each moved
    from its clean embedding."""
    from .attack import attack_queries

    result = attack_queries(metric, pixels, settings, batch_size=batch_size, progress=progress)
    distance = float((1 - (result.clean * result.adversarial).sum(-1)).mean())
    return result.adversarial, (distance if math.isfinite(distance) else None)
