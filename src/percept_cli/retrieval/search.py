"""Nearest-neighbour search over a pool index: exact (torch, streaming) and FAISS backends.

Similarity is the inner product of L2-normalised embeddings (cosine), as in the paper's retrieval
experiments (Croce et al., SaTML 2025, Sec. V). Queries are ``(Q, D)`` float32; the pool is the
index's memory-mapped parts, ``(n_i, D)`` float16 or float32, whose rows in part order are the global
vector ids ``0 .. n-1``.

Exact search (:func:`exact_topk`, :func:`exact_range`) streams over the parts in chunks of
``chunk_rows`` rows: a background thread copies the next chunk out of the memory map (into pinned
memory when the device is CUDA) while the current one is converted to float32 on the device,
multiplied with the queries and reduced to its per-query top-k (or threshold hits), merged into a
running result. Memory is ``O(Q*k + chunk_rows*D + query_batch*chunk_rows)``; the index is never held
in memory as float32, and it is read once per call whatever the number of queries.

Order is deterministic in every backend: similarity descending, and **equal similarities in
increasing global id** (also at the k-th place: of several items tied for the last places, the ones
with the lowest ids are kept). Top-k results are padded with id ``-1`` and similarity ``-inf`` when
fewer than ``k`` items are found. Range results hold every item whose similarity, computed in
float32, is ``>= float32(threshold)``.

FAISS (optional extra ``percept[faiss]``, imported only when used) gives approximate search on big
pools: :func:`build_faiss` writes ``index.path/"faiss"/<kind>-<token>.faiss`` and records what it did
with ``index.set_faiss(info)``, including the recall@10 it measured against exact search. Reported
similarities are exact in every backend: "flat" and "ivf-flat" compute them from the same float32
values as exact search (up to float rounding order), and "ivf-pq" candidates are re-scored from the
stored vectors (top-k: ``k * refine_factor`` candidates re-ranked exactly). IVF backends may miss
items (only ``nprobe`` lists are visited); "flat" misses nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import BadInputError
from ..io.outputs import atomic_path

QUERY_BATCH = 1024                 # queries multiplied with one chunk at a time
FAISS_QUERY_BATCH = 1024
RESCORE_BLOCK = 32768              # (query, candidate) pairs re-scored at a time
FLAT_MAX_VECTORS = 2_000_000       # "flat" up to this many vectors (when it fits in memory)
MEMORY_SHARE = 0.5                 # an index "fits" when it needs at most this share of memory_bytes
MIN_POINTS_PER_CENTROID = 39       # faiss warns below 39 training points per centroid
MAX_POINTS_PER_CENTROID = 256      # faiss' k-means subsamples above 256 points per centroid
TRAIN_CAP = 1_000_000              # training sample cap (raised to 39*nlist when nlist needs more)
RECALL_K = 10
RECALL_QUERIES = 1000
TARGET_RECALL = 0.95               # the default nprobe is doubled until recall@10 reaches this,
RECALL_GAIN = 0.005                # or until doubling gains less than this
PQ_REFINE = 4                      # ivf-pq top-k: k*PQ_REFINE candidates re-ranked exactly
PQ_MARGIN_SAFETY = 1.5             # ivf-pq range: search below the threshold by 1.5x the worst PQ error seen
RANGE_EPS = 1e-5                   # slack for float rounding at the range threshold (filtered exactly after)
HNSW_M = 32                        # links per node of the HNSW coarse quantiser
FAISS_KINDS = ("flat", "ivf-flat", "ivf-pq")
BACKENDS = ("auto", "exact", "faiss")
FAISS_REBUILD_HINT = ("Rebuild it: run percept retrieve index again on the same sources with --out {path} --faiss flat "
                      "(or ivf-flat, ivf-pq; --faiss auto builds one only from 100,000 images).")
_BACKEND_HINT = {"--backend": "Use --backend exact to search without it."}


@dataclass
class Hits:
    """Top-k results: ``sims`` (Q, k) float32, descending; ``ids`` (Q, k) int64 global vector ids,
    ``-1`` (with similarity ``-inf``) where fewer than k items were found. CPU tensors."""

    sims: torch.Tensor
    ids: torch.Tensor


# -- checks -----------------------------------------------------------------------------------------

def _parts_dim(parts: Sequence[np.ndarray]) -> int | None:
    """The common row width of the parts (None without parts); BadInputError if they disagree."""
    dims = set()
    for k, part in enumerate(parts):
        if part.ndim != 2:
            raise BadInputError(f"vector part {k} has shape {tuple(part.shape)}; expected (rows, dim).")
        dims.add(int(part.shape[1]))
    if len(dims) > 1:
        raise BadInputError(f"vector parts have different widths {sorted(dims)}.")
    return dims.pop() if dims else None


def _check_queries(queries: Any, dim: int | None) -> torch.Tensor:
    """``queries`` as a (Q, D) float32 tensor (NumPy arrays accepted); BadInputError on a bad shape,
    a width other than the index's, or non-finite values."""
    if isinstance(queries, np.ndarray):
        queries = torch.from_numpy(np.ascontiguousarray(queries))
    if not isinstance(queries, torch.Tensor):
        raise BadInputError(f"queries must be a (Q, D) tensor, got {type(queries).__name__}.")
    if queries.ndim != 2:
        raise BadInputError(f"queries must be (Q, D); got shape {tuple(queries.shape)}.")
    if dim is not None and queries.shape[1] != dim:
        raise BadInputError(f"queries have dimension {queries.shape[1]}, the index holds {dim}-d vectors.")
    if not queries.is_floating_point():
        raise BadInputError(f"queries must be floating point, got {queries.dtype}.")
    queries = queries.detach().to(torch.float32)
    if queries.numel() and not bool(torch.isfinite(queries).all()):
        raise BadInputError("queries contain NaN or infinite values.")
    return queries


def _check_k(k: int) -> int:
    """``k`` as a positive int; BadInputError otherwise."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise BadInputError(f"k must be a positive integer, got {k!r}.")
    return int(k)


def _check_threshold(threshold: float) -> np.float32:
    """The threshold as float32 (comparisons are made in float32); BadInputError if not finite."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise BadInputError(f"threshold must be a number, got {threshold!r}.") from None
    if not math.isfinite(value):
        raise BadInputError(f"threshold must be finite, got {threshold!r}.")
    return np.float32(value)


def _check_chunk_rows(chunk_rows: int, name: str = "chunk_rows") -> int:
    """A positive row count; BadInputError otherwise."""
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise BadInputError(f"{name} must be a positive integer, got {chunk_rows!r}.")
    return int(chunk_rows)


# -- streaming the parts ----------------------------------------------------------------------------

def _chunk_plan(parts: Sequence[np.ndarray], chunk_rows: int) -> list[tuple[int, int, int, int]]:
    """(part, first row, end row, global id of the first row) of every chunk, in global id order."""
    plan, gid = [], 0
    for p, part in enumerate(parts):
        rows = int(part.shape[0])
        for r0 in range(0, rows, chunk_rows):
            plan.append((p, r0, min(rows, r0 + chunk_rows), gid + r0))
        gid += rows
    return plan


def _read_chunk(part: np.ndarray, r0: int, r1: int, pin: bool) -> torch.Tensor:
    """Rows ``r0:r1`` copied out of the memory map into a CPU tensor (page-locked when ``pin``)."""
    block = part[r0:r1]
    if block.dtype not in (np.float16, np.float32):
        block = block.astype(np.float32)
    if pin:
        dtype = torch.float16 if block.dtype == np.float16 else torch.float32
        host = torch.empty(block.shape, dtype=dtype, pin_memory=True)
        host.numpy()[...] = block
        return host
    return torch.from_numpy(np.array(block, copy=True))


def _stream_chunks(parts: Sequence[np.ndarray], chunk_rows: int,
                   device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (global id of the first row, (c, D) float32 chunk on ``device``), reading ahead by one chunk
    in a background thread; on CUDA the host copy is pinned and sent with ``non_blocking``."""
    plan = _chunk_plan(parts, chunk_rows)
    if not plan:
        return
    pin = device.type == "cuda"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="percept-chunks") as pool:
        def submit(j: int):
            p, r0, r1, _ = plan[j]
            return pool.submit(_read_chunk, parts[p], r0, r1, pin)

        pending = submit(0)
        for j, (_, _, _, gid0) in enumerate(plan):
            host = pending.result()
            if j + 1 < len(plan):
                pending = submit(j + 1)
            yield gid0, host.to(device, non_blocking=pin).float()


def _query_batches(queries: torch.Tensor, device: torch.device, size: int) -> list[tuple[int, torch.Tensor]]:
    """(first query position, batch on ``device``) for consecutive batches of ``size`` queries."""
    return [(s, queries[s:s + size].to(device)) for s in range(0, queries.shape[0], size)]


# -- exact top-k ------------------------------------------------------------------------------------

def _chunk_topk(sims: torch.Tensor, k: int, gid0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of each row of ``sims`` (ties at the k-th place: lowest columns), as
    (values, global ids), unordered. ``torch.topk`` picks arbitrarily among ties, so rows where it
    cut a tie are redone with a stable sort."""
    kk = min(k, sims.shape[1])
    vals, cols = torch.topk(sims, kk, dim=1, largest=True, sorted=False)
    if kk < sims.shape[1]:
        kth = vals.min(dim=1, keepdim=True).values
        cut = (sims == kth).sum(dim=1) > (vals == kth).sum(dim=1)
        if bool(cut.any()):
            rows = cut.nonzero().squeeze(1)
            s_vals, s_cols = torch.sort(sims[rows], dim=1, descending=True, stable=True)
            vals[rows] = s_vals[:, :kk]
            cols[rows] = s_cols[:, :kk]
    return vals, cols + gid0


def _order(vals: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row sorted by value descending, then id ascending."""
    by_id = torch.argsort(ids, dim=1)
    vals, ids = vals.gather(1, by_id), ids.gather(1, by_id)
    by_val = torch.argsort(vals, dim=1, descending=True, stable=True)
    return vals.gather(1, by_val), ids.gather(1, by_val)


def _merge(best: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor],
           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k merged with a chunk's candidates, ordered (value desc, id asc)."""
    vals, ids = _order(torch.cat([best[0], new[0]], dim=1), torch.cat([best[1], new[1]], dim=1))
    return vals[:, :k], ids[:, :k]


def _pad(vals: torch.Tensor, ids: torch.Tensor, k: int) -> Hits:
    """Hits padded to k columns with similarity -inf and id -1."""
    missing = k - vals.shape[1]
    if missing > 0:
        vals = torch.cat([vals, vals.new_full((vals.shape[0], missing), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], missing), -1)], dim=1)
    return Hits(sims=vals.contiguous(), ids=ids.contiguous())


def exact_topk(queries: torch.Tensor, parts: Sequence[np.ndarray], k: int, *, device: str | torch.device = "cpu",
               chunk_rows: int = 65536, query_batch: int = QUERY_BATCH) -> Hits:
    """The k most similar pool vectors of each query, by exact inner product.

    Args:
        queries: (Q, D) float32, L2-normalised (not checked).
        parts: the index's memory-mapped parts, (n_i, D) float16/float32; global ids follow part order.
        k: results per query; when the pool has fewer than k vectors the rest is padded (id -1, sim -inf).
        device: where the products are computed (``cpu``, ``cuda[:N]``, ``auto``).
        chunk_rows: pool rows converted to float32 and multiplied at a time.
        query_batch: queries multiplied with one chunk at a time.

    Returns:
        :class:`Hits` on the CPU, rows ordered by similarity descending, ties by increasing global id.
    """
    k, chunk_rows = _check_k(k), _check_chunk_rows(chunk_rows)
    query_batch = _check_chunk_rows(query_batch, "query_batch")
    dev = resolve_device(device)
    queries = _check_queries(queries, _parts_dim(parts))
    batches = _query_batches(queries, dev, query_batch)
    best = [(qb.new_empty((qb.shape[0], 0)), torch.empty((qb.shape[0], 0), dtype=torch.int64, device=dev))
            for _, qb in batches]
    for gid0, chunk in _stream_chunks(parts, chunk_rows, dev):
        for j, (_, qb) in enumerate(batches):
            best[j] = _merge(best[j], _chunk_topk(qb @ chunk.T, k, gid0), k)
    if not best:
        return Hits(torch.empty((0, k), dtype=torch.float32), torch.empty((0, k), dtype=torch.int64))
    vals = torch.cat([b[0] for b in best]).cpu()
    ids = torch.cat([b[1] for b in best]).cpu()
    return _pad(vals, ids, k)


# -- exact range ------------------------------------------------------------------------------------

def _split_by_query(qrows: np.ndarray, ids: np.ndarray, sims: np.ndarray,
                    n_queries: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(query, id, sim) triples → per query (ids int64, sims float32), sims descending, ties by id."""
    qrows = np.asarray(qrows, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    sims = np.asarray(sims, dtype=np.float32)
    order = np.lexsort((ids, -sims, qrows))
    ids, sims = ids[order], sims[order]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(qrows, minlength=n_queries))])
    return [(ids[bounds[q]:bounds[q + 1]], sims[bounds[q]:bounds[q + 1]]) for q in range(n_queries)]


def exact_range(queries: torch.Tensor, parts: Sequence[np.ndarray], threshold: float, *,
                device: str | torch.device = "cpu", chunk_rows: int = 65536,
                query_batch: int = QUERY_BATCH) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every pool vector with similarity ``>= threshold`` (both in float32), per query.

    Returns:
        One ``(ids int64, sims float32)`` pair per query, sims descending, ties by increasing id.
        Memory grows with the number of hits: a low threshold on a big pool returns a lot.
    """
    chunk_rows = _check_chunk_rows(chunk_rows)
    query_batch = _check_chunk_rows(query_batch, "query_batch")
    thr = _check_threshold(threshold)
    dev = resolve_device(device)
    queries = _check_queries(queries, _parts_dim(parts))
    batches = _query_batches(queries, dev, query_batch)
    thr_t = torch.tensor(thr, dtype=torch.float32, device=dev)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for gid0, chunk in _stream_chunks(parts, chunk_rows, dev):
        for s, qb in batches:
            sims = qb @ chunk.T
            rows, cols = (sims >= thr_t).nonzero(as_tuple=True)
            if rows.numel():
                found.append(((rows + s).cpu().numpy(), (cols + gid0).cpu().numpy(), sims[rows, cols].cpu().numpy()))
    if not found:
        empty = np.empty(0, dtype=np.int64)
        return _split_by_query(empty, empty, np.empty(0, np.float32), queries.shape[0])
    return _split_by_query(*(np.concatenate([f[i] for f in found]) for i in range(3)), queries.shape[0])


# -- pool rows by global id -------------------------------------------------------------------------

class _Rows:
    """Global vector id → (part, row) over the memory-mapped parts, and exact re-scoring."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        sizes = [int(p.shape[0]) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.dim = _parts_dim(self.parts) or 0

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (any order, no -1) as (len, D) float32, read in row order."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        part_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for p in np.unique(part_of):
            where = np.nonzero(part_of == p)[0]
            rows = ids[where] - self.offsets[p]
            order = np.argsort(rows, kind="stable")
            out[where[order]] = self.parts[p][rows[order]]
        return out

    def rescore(self, queries: np.ndarray, qrows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact float32 similarity of each pair (queries[qrows[i]], vector ids[i])."""
        sims = np.empty(len(ids), dtype=np.float32)
        for s in range(0, len(ids), RESCORE_BLOCK):
            block = ids[s:s + RESCORE_BLOCK]
            uniq, inverse = np.unique(block, return_inverse=True)
            vectors = self.gather(uniq)[inverse.reshape(-1)]
            sims[s:s + RESCORE_BLOCK] = np.einsum("nd,nd->n", vectors, queries[qrows[s:s + RESCORE_BLOCK]])
        return sims


def _sort_rows(sims: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row by similarity descending, then id ascending; id -1 (no result) last with sim -inf."""
    n_rows, width = ids.shape
    missing = ids < 0
    sims = np.where(missing, -np.inf, sims).astype(np.float32)
    key = np.where(missing, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key.ravel(), -sims.ravel(), np.repeat(np.arange(n_rows), width)))
    return sims.ravel()[order].reshape(n_rows, width), ids.ravel()[order].reshape(n_rows, width)


# -- FAISS ------------------------------------------------------------------------------------------

def _import_faiss():
    """The faiss module; BadInputError saying how to install it when it is missing."""
    try:
        import faiss
    except ImportError as exc:
        raise BadInputError("the FAISS backend needs the faiss package, which is not installed",
                            "Install it with: pip install 'percept[faiss]'", option_hints=_BACKEND_HINT) from exc
    return faiss


def _available_memory() -> int:
    """Bytes of memory available now (Linux MemAvailable), else physical memory, else 0 (unknown)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, OSError, ValueError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return 0


def _fits(nbytes: int, memory_bytes: int) -> bool:
    """Whether an index of ``nbytes`` fits: at most MEMORY_SHARE of ``memory_bytes`` (0: unknown, fits)."""
    return memory_bytes <= 0 or nbytes <= MEMORY_SHARE * memory_bytes


def choose_faiss_kind(n: int, dim: int, memory_bytes: int | None = None) -> str:
    """The FAISS index kind for ``n`` vectors of ``dim`` floats.

    "flat" (exhaustive) up to :data:`FLAT_MAX_VECTORS` vectors when the float32 vectors fit; beyond,
    "ivf-flat" when they fit, else "ivf-pq". Fitting means ``n*(4*dim + 8)`` bytes (vectors and ids)
    at most half of ``memory_bytes`` (default: the memory available now).
    """
    memory = _available_memory() if memory_bytes is None else int(memory_bytes)
    fits = _fits(int(n) * (4 * int(dim) + 8), memory)
    if not fits:
        return "ivf-pq"
    return "flat" if n <= FLAT_MAX_VECTORS else "ivf-flat"


def _nlist(n: int) -> int:
    """IVF lists: 4*sqrt(n) rounded to the nearest power of two (in log scale), halved until the
    pool has at least 39 vectors per list (faiss' minimum for training), at least 1."""
    nlist = 2 ** max(0, round(math.log2(4 * math.sqrt(max(n, 1)))))
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > n:
        nlist //= 2
    return nlist


def _train_size(n: int, nlist: int) -> int:
    """Training sample size: up to 256 per list (capped at TRAIN_CAP, never below 39 per list), keeping
    min(1000, n/10) vectors out of training when the pool allows, for the recall measurement."""
    holdout = min(RECALL_QUERIES, n // 10)
    wanted = min(MAX_POINTS_PER_CENTROID * nlist, TRAIN_CAP, n - holdout)
    return min(n, max(MIN_POINTS_PER_CENTROID * nlist, wanted))


def _pq_shape(n: int, dim: int, n_train: int, memory_bytes: int) -> tuple[int, int]:
    """(m sub-quantisers, bits each) for IVF-PQ: 8 bits when training has 39*256 points (else fewer);
    m the largest divisor of dim up to dim/4 whose codes (n*(m*bits/8 + 8) bytes) fit, else the
    smallest such divisor."""
    nbits = min(8, math.floor(math.log2(max(n_train, 1) / MIN_POINTS_PER_CENTROID))) if n_train else 0
    if nbits < 1:
        raise BadInputError(f"too few vectors ({n}) for an ivf-pq FAISS index; use kind 'flat'.")
    divisors = [m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0]
    fitting = [m for m in divisors if _fits(n * (math.ceil(m * nbits / 8) + 8), memory_bytes)]
    return (fitting[-1] if fitting else divisors[0]), nbits


@dataclass
class _Plan:
    """What build_faiss makes: kind, factory string, lists, training size, PQ shape."""

    kind: str
    factory: str
    nlist: int | None
    n_train: int
    pq: dict | None


def _plan(kind: str, n: int, dim: int, memory_bytes: int) -> _Plan:
    """The factory string and sizes for ``kind`` (IVF kinds: HNSW coarse quantiser, inner product)."""
    if kind == "flat":
        return _Plan(kind, "Flat", None, 0, None)
    nlist = _nlist(n)
    n_train = _train_size(n, nlist)
    if kind == "ivf-flat":
        return _Plan(kind, f"IVF{nlist}_HNSW{HNSW_M},Flat", nlist, n_train, None)
    m, nbits = _pq_shape(n, dim, n_train, memory_bytes)
    return _Plan(kind, f"IVF{nlist}_HNSW{HNSW_M},PQ{m}x{nbits}", nlist, n_train, {"m": m, "nbits": nbits})


def _set_nprobe(faiss, fidx, nprobe: int) -> None:
    """Set the lists visited per query (and a wide enough HNSW search of the coarse quantiser)."""
    ivf = faiss.extract_index_ivf(fidx)
    ivf.nprobe = int(nprobe)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = max(64, 2 * int(nprobe))


class _FaissSearch:
    """Search through a loaded FAISS index, with results in this module's conventions."""

    def __init__(self, faiss, fidx, kind: str, rows: _Rows, *, nprobe: int | None = None,
                 refine: int = 1, margin: float = 0.0):
        self.faiss, self.fidx, self.kind, self.rows = faiss, fidx, kind, rows
        self.refine, self.margin = refine, margin
        if kind != "flat" and nprobe:
            _set_nprobe(faiss, fidx, nprobe)

    def raw(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss' own (similarities, ids) for the k best (ivf-pq: approximate similarities)."""
        return self.fidx.search(queries, min(k, self.fidx.ntotal))

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) exact similarities and ids, ordered and padded like :func:`exact_topk`."""
        sims, ids = self.raw(queries, k * self.refine)
        if self.kind == "ivf-pq":
            valid = ids >= 0
            qrows = np.nonzero(valid)[0]
            sims = np.full(ids.shape, -np.inf, dtype=np.float32)
            sims[valid] = self.rows.rescore(queries, qrows, ids[valid])
        sims, ids = _sort_rows(sims, ids)
        sims, ids = sims[:, :k], ids[:, :k]
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            sims = np.concatenate([sims, np.full((len(ids), pad), -np.inf, np.float32)], axis=1)
            ids = np.concatenate([ids, np.full((len(ids), pad), -1, np.int64)], axis=1)
        return sims, ids

    def range(self, queries: np.ndarray, thr: np.float32) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query (ids, sims) with sim >= thr. faiss returns sim > radius for inner product, so it
        is asked below the threshold (by RANGE_EPS, ivf-pq: by its measured error margin too) and the
        candidates are filtered at ``>= thr`` (ivf-pq: after exact re-scoring)."""
        radius = float(thr) - RANGE_EPS - (self.margin if self.kind == "ivf-pq" else 0.0)
        lims, sims, ids = self.fidx.range_search(queries, radius)
        qrows = np.repeat(np.arange(len(queries)), np.diff(lims.astype(np.int64)))
        if self.kind == "ivf-pq":
            sims = self.rows.rescore(queries, qrows, ids)
        keep = sims >= thr
        return _split_by_query(qrows[keep], ids[keep], sims[keep], len(queries))


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (ids -1 ignored; queries without truth skipped)."""
    scores = []
    for got, want in zip(found, truth):
        want = want[want >= 0]
        if len(want):
            scores.append(np.isin(got[got >= 0], want).sum() / len(want))
    return float(np.mean(scores)) if scores else 1.0


def _heldout_queries(rng: np.random.Generator, n: int, train_ids: np.ndarray) -> np.ndarray:
    """Up to RECALL_QUERIES ids for the recall measurement: outside the training sample when any are
    (``train_ids`` sorted). Big pools are sampled by rejection, without listing every id."""
    free = n - len(train_ids)
    if free <= 0 or len(train_ids) == 0:
        return np.sort(rng.choice(n, size=min(RECALL_QUERIES, n), replace=False)).astype(np.int64)
    want = min(RECALL_QUERIES, free)
    if n <= 10_000_000:
        pool = np.setdiff1d(np.arange(n, dtype=np.int64), train_ids, assume_unique=True)
        return np.sort(rng.choice(pool, size=want, replace=False)).astype(np.int64)
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < want:  # the training sample is a small share of a big pool: few rounds
        draw = rng.integers(0, n, size=4 * want, dtype=np.int64)
        at = np.minimum(np.searchsorted(train_ids, draw), len(train_ids) - 1)
        chosen = np.union1d(chosen, draw[train_ids[at] != draw])
    return np.sort(rng.choice(chosen, size=want, replace=False)).astype(np.int64)


def _add_all(fidx, parts: Sequence[np.ndarray], chunk_rows: int) -> None:
    """Add every vector, part by part in chunks (ids = global order)."""
    for p, r0, r1, _ in _chunk_plan(parts, chunk_rows):
        fidx.add(np.ascontiguousarray(parts[p][r0:r1], dtype=np.float32))


def _tune_nprobe(search: _FaissSearch, queries: np.ndarray, truth: np.ndarray, nlist: int,
                 nprobe: int | None) -> tuple[int, float]:
    """(nprobe, recall@10): the given nprobe, or max(1, nlist//16) doubled until recall reaches
    TARGET_RECALL, every list is visited, or doubling gains less than RECALL_GAIN (then the smaller
    nprobe is kept: the loss is the quantiser's, e.g. PQ's, not the lists')."""
    def measure(probe: int) -> float:
        _set_nprobe(search.faiss, search.fidx, probe)
        return _recall(search.topk(queries, RECALL_K)[1], truth)

    if nprobe is not None:
        probe = min(nlist, max(1, int(nprobe)))
        return probe, measure(probe)
    probe = max(1, nlist // 16)
    recall = measure(probe)
    while recall < TARGET_RECALL and probe < nlist:
        wider = min(nlist, probe * 2)
        gained = measure(wider)
        if gained - recall < RECALL_GAIN:
            _set_nprobe(search.faiss, search.fidx, probe)
            break
        probe, recall = wider, gained
    return probe, recall


def _pq_margin(search: _FaissSearch, queries: np.ndarray) -> float:
    """PQ_MARGIN_SAFETY times the largest |approximate - exact| similarity seen on the recall queries."""
    sims, ids = search.raw(queries, RECALL_K * search.refine)
    valid = ids >= 0
    exact = search.rows.rescore(queries, np.nonzero(valid)[0], ids[valid])
    error = float(np.max(np.abs(sims[valid] - exact))) if valid.any() else 0.0
    return PQ_MARGIN_SAFETY * error


def _write_files(faiss, fidx, folder: Path, stem: str, query_ids: np.ndarray) -> None:
    """The index and its recall query ids, each written to a temp name and os.replace'd."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{stem}.faiss", fsync=True) as tmp:
        faiss.write_index(fidx, str(tmp))
    with atomic_path(folder / f"{stem}.recall-queries.npy", fsync=True) as tmp, open(tmp, "wb") as fh:
        np.save(fh, query_ids)


def _remove_others(folder: Path, keep: set[str]) -> None:
    """Delete earlier FAISS files and left-over temp files in ``folder`` (not ``keep``)."""
    for entry in folder.iterdir():
        stale = entry.suffix == ".faiss" or entry.name.endswith((".recall-queries.npy", ".tmp"))
        if entry.is_file() and stale and entry.name not in keep:
            with contextlib.suppress(OSError):
                entry.unlink()


def build_faiss(index, kind: str = "auto", *, seed: int = 0, nprobe: int | None = None,
                memory_bytes: int | None = None, chunk_rows: int = 65536) -> dict:
    """Build the FAISS index of a pool index, measure its recall@10, and record it in the manifest.

    Kinds (inner product): "flat" (exhaustive), "ivf-flat" (``IVF{nlist}_HNSW32,Flat``) and "ivf-pq"
    (``IVF{nlist}_HNSW32,PQ{m}x{nbits}``); "auto" is :func:`choose_faiss_kind`. nlist: 4*sqrt(n)
    rounded to the nearest power of two, halved until there are 39 vectors per list. IVF training
    uses a seeded sample (up to 256 per list; some vectors are held out when the pool is small);
    vectors are then added part by part. nprobe (unless given): max(1, nlist//16), doubled until
    recall@10 reaches 0.95 (or stops improving by 0.005, or all lists are visited). Recall@10 is measured against exact search on up to 1,000 stored vectors
    (seeded, outside the training sample when possible) used as queries.

    Files go to ``index.path/"faiss"/`` (``<kind>-<token>.faiss`` and ``.recall-queries.npy``, written
    to temp names and os.replace'd), then ``index.set_faiss(info)``, then earlier files are removed.

    Returns:
        info: kind, factory, metric, file, queries_file, n, dim, nlist, nprobe, pq, refine_factor,
        range_margin, recall_at_10, recall_queries, trained_on, seed, generation, faiss_version.
    """
    faiss = _import_faiss()
    if kind not in ("auto", *FAISS_KINDS):
        raise BadInputError(f"unknown FAISS index kind '{kind}'; use auto, {', '.join(FAISS_KINDS)}.")
    n, dim = int(index.n), int(index.dim)
    if n == 0:
        raise BadInputError(f"{index.path}: the index holds no vectors; there is nothing to build a FAISS index of.")
    memory = _available_memory() if memory_bytes is None else int(memory_bytes)
    kind = choose_faiss_kind(n, dim, memory) if kind == "auto" else kind
    plan = _plan(kind, n, dim, memory)
    parts = list(index.vectors())
    rows = _Rows(parts)
    rng = np.random.default_rng(seed)
    train_ids = np.sort(rng.choice(n, size=plan.n_train, replace=False)).astype(np.int64)

    fidx = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.n_train:
        fidx.train(rows.gather(train_ids))
    _add_all(fidx, parts, _check_chunk_rows(chunk_rows))

    query_ids = _heldout_queries(rng, n, train_ids)
    queries = rows.gather(query_ids)
    truth = exact_topk(torch.from_numpy(queries), parts, RECALL_K, chunk_rows=chunk_rows).ids.numpy()
    refine = PQ_REFINE if kind == "ivf-pq" else 1
    search = _FaissSearch(faiss, fidx, kind, rows, refine=refine)
    if kind == "flat":
        probe, recall = None, _recall(search.topk(queries, RECALL_K)[1], truth)
    else:
        probe, recall = _tune_nprobe(search, queries, truth, plan.nlist, nprobe)
    margin = _pq_margin(search, queries) if kind == "ivf-pq" else 0.0

    folder = Path(index.path) / "faiss"
    stem = f"{kind}-{secrets.token_hex(6)}"
    _write_files(faiss, fidx, folder, stem, query_ids)
    info = {
        "kind": kind, "factory": plan.factory, "metric": "inner_product",
        "file": f"faiss/{stem}.faiss", "queries_file": f"faiss/{stem}.recall-queries.npy",
        "n": n, "dim": dim, "nlist": plan.nlist, "nprobe": probe, "pq": plan.pq,
        "refine_factor": refine, "range_margin": margin,
        "recall_at_10": recall, "recall_queries": len(query_ids), "trained_on": plan.n_train,
        "seed": int(seed), "generation": index.manifest["generation"], "faiss_version": faiss.__version__,
    }
    index.set_faiss(info)
    _remove_others(folder, {f"{stem}.faiss", f"{stem}.recall-queries.npy"})
    return info


def _faiss_refusal(index, reason: str) -> BadInputError:
    """The error for a FAISS index that cannot be used, with the command that rebuilds it."""
    return BadInputError(f"{index.path}: {reason}", FAISS_REBUILD_HINT.format(path=index.path),
                         option_hints=_BACKEND_HINT)


def _open_faiss(index, rows: _Rows) -> _FaissSearch:
    """The index's current FAISS index, loaded; BadInputError when there is none, it is stale
    (generation, size or width differ from the pool's), missing or unreadable, or faiss is missing."""
    info = index.manifest.get("faiss")
    if not info:
        raise _faiss_refusal(index, "the index has no FAISS index")
    if info.get("generation") != index.manifest.get("generation"):
        raise _faiss_refusal(index, "the FAISS index is stale: it was built before the index last changed")
    faiss = _import_faiss()
    path = Path(index.path) / info["file"]
    if not path.is_file():
        raise _faiss_refusal(index, f"the FAISS index file {path} is missing")
    try:
        fidx = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise _faiss_refusal(index, f"the FAISS index file {path} cannot be read ({str(exc).splitlines()[0]})")
    if fidx.ntotal != index.n or fidx.d != index.dim:
        raise _faiss_refusal(index, f"the FAISS index file {path} holds {fidx.ntotal} {fidx.d}-d vectors, "
                                    f"the index {index.n} {index.dim}-d")
    return _FaissSearch(faiss, fidx, info["kind"], rows, nprobe=info.get("nprobe"),
                        refine=int(info.get("refine_factor") or 1), margin=float(info.get("range_margin") or 0.0))


class Searcher:
    """Top-k and range search over a pool index with one backend.

    ``backend``: "exact" (torch, streaming, on ``device``), "faiss" (the index's FAISS index; refused
    when there is none or it is stale, i.e. built for another generation of the index), or "auto":
    faiss when a current, readable FAISS index exists and faiss is installed, else exact (``note``
    then says why). Results follow :func:`exact_topk` / :func:`exact_range` conventions in both.
    """

    def __init__(self, index, backend: str = "auto", device: str | torch.device = "cpu", *,
                 chunk_rows: int = 65536):
        if backend not in BACKENDS:
            raise BadInputError(f"unknown search backend '{backend}'; use {', '.join(BACKENDS)}.")
        self.index = index
        self.device = resolve_device(device)
        self.chunk_rows = _check_chunk_rows(chunk_rows)
        self.parts = list(index.vectors())
        self.dim = int(index.dim)
        self.note: str | None = None
        self._faiss: _FaissSearch | None = None
        if backend != "exact":
            try:
                self._faiss = _open_faiss(index, _Rows(self.parts))
            except BadInputError as exc:
                if backend == "faiss":
                    raise
                self.note = str(exc)
        self.backend = "faiss" if self._faiss is not None else "exact"

    def _queries(self, queries: Any) -> torch.Tensor:
        """Checked (Q, D) float32 queries."""
        return _check_queries(queries, self.dim)

    def topk(self, queries: torch.Tensor, k: int) -> Hits:
        """The k most similar pool vectors per query (see :class:`Hits`)."""
        k = _check_k(k)
        queries = self._queries(queries)
        if self._faiss is None:
            return exact_topk(queries, self.parts, k, device=self.device, chunk_rows=self.chunk_rows)
        q = queries.cpu().numpy()
        sims, ids = [], []
        for s in range(0, len(q), FAISS_QUERY_BATCH):
            batch_sims, batch_ids = self._faiss.topk(np.ascontiguousarray(q[s:s + FAISS_QUERY_BATCH]), k)
            sims.append(batch_sims)
            ids.append(batch_ids)
        if not sims:
            return Hits(torch.empty((0, k), dtype=torch.float32), torch.empty((0, k), dtype=torch.int64))
        return Hits(torch.from_numpy(np.concatenate(sims)), torch.from_numpy(np.concatenate(ids).astype(np.int64)))

    def range(self, queries: torch.Tensor, threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query ``(ids, sims)`` of every pool vector with similarity ``>= threshold``."""
        thr = _check_threshold(threshold)
        queries = self._queries(queries)
        if self._faiss is None:
            return exact_range(queries, self.parts, float(thr), device=self.device, chunk_rows=self.chunk_rows)
        q = queries.cpu().numpy()
        results: list[tuple[np.ndarray, np.ndarray]] = []
        for s in range(0, len(q), FAISS_QUERY_BATCH):
            results.extend(self._faiss.range(np.ascontiguousarray(q[s:s + FAISS_QUERY_BATCH]), thr))
        return results
