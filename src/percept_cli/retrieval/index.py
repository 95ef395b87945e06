"""The on-disk pool index of ``percept retrieve``: built incrementally, resumable, under torchrun; read memory-mapped.

An index is a folder::

    POOL.idx/
      manifest.json         schema "percept.index/1"; written last, atomically, by rank 0
      parts/<name>.npy      (n_ok, D) L2-normalised embeddings (float16 by default, or float32)
      parts/<name>.parquet  one row per item of the part, in key order: key, path, member, size, mtime_ns,
                            label, status ("ok" | "error"), error, row (row in the .npy, -1 on error)
      parts/<name>.done     {fingerprint, n_items, n_ok, npy_bytes, parquet_bytes}: the part's completion marker
      faiss/                optional FAISS index (:mod:`percept_cli.retrieval.search`)

Global vector ids are the ok rows of the parts, in the manifest's order. The manifest's ``counts``:
``items``, ``ok`` (vectors), ``failed`` (items that could not be decoded, kept with status "error"),
``labels`` (vectors per label).

Building (:func:`build_index`) is a plan, then work, then a manifest:

* The plan (:func:`plan_parts`, a pure function) compares the listing with the existing index: an item
  is unchanged iff its key, size and mtime_ns match. An old part whose items are all present and unchanged
  (same labels too) is reused as is (when it holds at least half a part: smaller ones are merged, so
  repeated small updates do not fragment the index). The other kept items are *carried* (their stored
  embedding is copied, never recomputed) and, with the new and changed items, sorted by key and cut
  into new parts of ``part_size``. A part's fingerprint is a sha256 over its items' (key, size,
  mtime_ns, label), the model's identity and the storage dtype; its name is derived from the
  fingerprint, so a run killed and started again plans the same names.
* A process decodes the items of all the parts it builds in one pass (one DataLoader, whose workers
  start once and keep decoding across part boundaries), but each part in its own batches (a batch
  never crosses a part boundary, so a part is computed identically by whichever process computes it,
  alongside whichever other parts). A part's files are written as soon as its last batch is embedded,
  atomically, its ``.done`` marker last. A part whose marker holds the planned fingerprint (and whose
  files have the recorded sizes) is not built again: kill -9 at any moment loses at most the parts in
  flight.
* Under torchrun every rank makes the same plan, rank 0's view of the finished parts is shared, rank r
  builds the contiguous block ``parts[r*P//W:(r+1)*P//W]`` of the parts still to build; after a
  barrier rank 0 checks every marker, writes ``manifest.json`` (the old one stays in force until then)
  and deletes the part files it no longer references, then every rank returns the same summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..distributed import Dist, gather
from ..errors import BadInputError, PerceptError
from ..io.outputs import atomic_path
from .sources import Item, Listing, iter_item_batches

SCHEMA = "percept.index/1"
SCHEMA_PREFIX = "percept.index/"
MANIFEST = "manifest.json"
PARTS = "parts"
STORAGE_DTYPES = ("float16", "float32")
MODES = ("sync", "add")
DEFAULT_PART_SIZE = 4096
DEFAULT_STORAGE_DTYPE = "float16"
NAME_LENGTH = 24  # hex digits of the fingerprint that name a part
COLUMNS = ("key", "path", "member", "size", "mtime_ns", "label", "status", "error", "row")
PART_SCHEMA = pa.schema([("key", pa.string()), ("path", pa.string()), ("member", pa.string()),
                         ("size", pa.int64()), ("mtime_ns", pa.int64()), ("label", pa.string()),
                         ("status", pa.string()), ("error", pa.string()), ("row", pa.int64())])
_PART_NAME = re.compile(r"^[0-9a-f]{%d}$" % NAME_LENGTH)
# the manifest's model fields that decide the embeddings (name and location may differ for the same weights)
_EMBEDDING_FIELDS = ("family", "weights_sha256", "pooling", "head", "adapter", "preprocess", "compute_dtype")
_OPTIONAL_FIELDS = ("adapter",)  # left out of the model digest when None: indexes built before them keep their parts
_SOURCE_FIELDS = ("name", "location", "revision")  # compared too when a weights file could not be hashed

Progress = Callable[[int], None]


# -- model identity --------------------------------------------------------------------------------

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, streamed; cached in this process by (path, size, mtime_ns)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(real, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def _head_digest(head: torch.nn.Module) -> str | None:
    """sha256 over a head's parameters and buffers (None for no head)."""
    if isinstance(head, torch.nn.Identity):
        return None
    digest = hashlib.sha256(type(head).__name__.encode())
    for name, tensor in sorted(head.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _adapter_digest(adapter: str | None) -> str | None:
    """sha256 over the LoRA adapter folder(s) merged at load time (``ModelSource.adapter``: one folder, or
    several joined by ", "): each folder's adapter config and weights files. None without an adapter."""
    if not adapter:
        return None
    from ..models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    folders = [adapter] if os.path.isdir(adapter) else adapter.split(", ")
    digest = hashlib.sha256(b"lora")
    for folder in folders:
        files = [os.path.join(folder, name) for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS)]
        found = [f for f in files if os.path.isfile(f)]
        if not found:  # not readable now: the recorded location stands in for the content
            digest.update(f"location:{folder}".encode())
        for path in found:
            digest.update(os.path.basename(path).encode())
            digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def model_identity(metric) -> dict:
    """The manifest's ``model`` entry: where the model came from and what decides its embeddings.

    ``weights_sha256`` is the sha256 of ``metric.source.weights`` (None when that is not a file);
    ``head`` a sha256 of an attached head's parameters (None without one); ``adapter`` a sha256 of the LoRA
    adapter folder(s) merged at load time (None without one; manifests written before it lack the key,
    read as None); ``preprocess`` the encoder's geometry; ``compute_dtype`` ``fp32``/``bf16``/``fp16``.
    """
    source = metric.source
    weights = getattr(source, "weights", None)
    sha = file_sha256(weights) if weights and os.path.isfile(weights) else None
    pre = metric.encoder.preprocess
    return {"name": source.name, "location": source.location, "revision": source.revision,
            "family": source.family, "weights_sha256": sha, "pooling": getattr(source, "pooling", None),
            "head": _head_digest(metric.encoder.head),
            "adapter": _adapter_digest(getattr(source, "adapter", None)),
            "preprocess": {"image_size": pre.image_size, **pre.as_dict()},
            "compute_dtype": metric.dtype_name}


def _model_fields(identity: dict) -> tuple[str, ...]:
    """The fields two identities must share for their embeddings to be interchangeable."""
    if identity.get("weights_sha256"):
        return _EMBEDDING_FIELDS
    return _EMBEDDING_FIELDS + _SOURCE_FIELDS


def model_digest(identity: dict, storage_dtype: str) -> str:
    """sha256 over what decides a part's stored vectors besides its items: the model and the storage dtype."""
    fields = {name: identity.get(name) for name in _model_fields(identity)
              if not (name in _OPTIONAL_FIELDS and identity.get(name) is None)}
    text = json.dumps({"model": fields, "storage_dtype": storage_dtype}, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _describe_model(identity: dict, differ: Sequence[str]) -> str:
    """``model NAME (weights sha256 0123456789ab, fp32, ...)`` with the fields that differ."""
    sha = identity.get("weights_sha256")
    details = [f"weights sha256 {sha[:12] if sha else 'unknown'}"]
    for name in differ:
        if name in ("weights_sha256", "name"):
            continue
        value = identity.get(name)
        if name in ("head", "adapter"):
            value = f"{value[:12]}" if value else "none"
        elif name == "preprocess" and isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        details.append(f"{name.replace('_', ' ')} {value}")
    return f"model {identity.get('name')} ({', '.join(details)})"


def refuse_other_model(built: dict, now: dict, where: str | Path) -> None:
    """BadInputError naming both models when ``now`` would not give the embeddings ``built`` gave."""
    fields = tuple(dict.fromkeys(_model_fields(built) + _model_fields(now)))
    differ = [name for name in fields if built.get(name) != now.get(name)]
    if differ:
        raise BadInputError(f"{where} was built with {_describe_model(built, differ)}; this run uses "
                            f"{_describe_model(now, differ)}.",
                            "Use the model (and dtype/preprocessing) the index was built with, or build a new index.")


# -- planning --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """Where a kept item's result is stored: an old part and its row there (-1 with a recorded failure)."""

    part: str
    row: int
    error: str | None = None


@dataclass(frozen=True)
class Entry:
    """One item of a planned part: the item as listed now, and its stored result (None: to embed)."""

    item: Item
    origin: Origin | None = None


@dataclass(frozen=True)
class OldPart:
    """A part of the existing index, as planning needs it: its name, fingerprint and records in row order."""

    name: str
    fingerprint: str
    entries: tuple[Entry, ...]  # each with its own Origin (this part, its row or -1 and the error)


@dataclass(frozen=True)
class PlannedPart:
    """A part of the index being built. ``reused``: an old part kept as it is (nothing to do)."""

    name: str
    fingerprint: str
    entries: tuple[Entry, ...]
    reused: bool = False

    @property
    def n_items(self) -> int:
        return len(self.entries)

    @property
    def to_embed(self) -> int:
        """Items whose embedding must be computed (new or changed)."""
        return sum(1 for entry in self.entries if entry.origin is None)


@dataclass
class BuildPlan:
    """The parts of the new index (reused parts first, in their old order, then new parts in key order)
    and what changed: ``new`` / ``changed`` items to embed, ``deleted`` (sync mode), ``kept`` (stored
    results kept)."""

    parts: list[PlannedPart]
    new: int = 0
    changed: int = 0
    deleted: int = 0
    kept: int = 0

    @property
    def generation(self) -> str:
        """sha256 over the parts' fingerprints, in order (the manifest's ``generation``)."""
        return generation_of(part.fingerprint for part in self.parts)

    @property
    def to_embed(self) -> int:
        return sum(part.to_embed for part in self.parts)


def generation_of(fingerprints: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()


def part_fingerprint(digest: str, items: Iterable[Item]) -> str:
    """sha256 over ``digest`` (:func:`model_digest`) and each item's (key, size, mtime_ns, label), in order."""
    h = hashlib.sha256(digest.encode())
    for item in items:
        h.update(json.dumps([item.key, item.size, item.mtime_ns, item.label], ensure_ascii=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def part_name(fingerprint: str) -> str:
    return fingerprint[:NAME_LENGTH]


def _unchanged(old: Item, now: Item) -> bool:
    return old.size == now.size and old.mtime_ns == now.mtime_ns


def plan_parts(old_parts: Sequence[OldPart], items: Sequence[Item], *, mode: str = "sync",
               part_size: int = DEFAULT_PART_SIZE, digest: str) -> BuildPlan:
    """The parts of the index after this update (pure: same inputs, same plan on every rank and every run).

    ``old_parts``: the existing index's parts in manifest order (empty for a new index); ``items``: the
    listing; ``mode`` ``sync`` drops old items that are no longer listed, ``add`` keeps them;
    ``digest``: :func:`model_digest`. An old part is reused iff its fingerprint, recomputed from its
    items as they are now, is unchanged (all present, same size/mtime/label) and it holds at least
    half a part; the other kept items are carried (their stored results copied) into new parts with
    the new and changed items, in key order, ``part_size`` items each.
    """
    if mode not in MODES:
        raise BadInputError(f"mode must be one of {', '.join(MODES)} (got {mode!r}).")
    if part_size < 1:
        raise BadInputError(f"part_size must be at least 1 (got {part_size}).")
    listed = {item.key: item for item in items}
    plan = BuildPlan(parts=[])
    pool: list[Entry] = []
    known: set[str] = set()
    for part in old_parts:
        current: list[Entry] = []
        for entry in part.entries:
            key = entry.item.key
            known.add(key)
            now = listed.get(key)
            if now is None and mode == "sync":
                plan.deleted += 1
            elif now is not None and not _unchanged(entry.item, now):
                plan.changed += 1
                current.append(Entry(now))
            else:
                plan.kept += 1
                current.append(Entry(now if now is not None else entry.item, entry.origin))
        fingerprint = part_fingerprint(digest, (e.item for e in current))
        if (fingerprint == part.fingerprint and len(current) == len(part.entries)
                and all(e.origin is not None for e in current) and 2 * len(current) >= part_size):
            plan.parts.append(PlannedPart(part.name, fingerprint, tuple(current), reused=True))
        else:
            pool.extend(current)
    fresh = [Entry(item) for key, item in listed.items() if key not in known]
    plan.new = len(fresh)
    pool.extend(fresh)
    pool.sort(key=lambda e: e.item.key)
    for start in range(0, len(pool), part_size):
        chunk = tuple(pool[start:start + part_size])
        fingerprint = part_fingerprint(digest, (e.item for e in chunk))
        plan.parts.append(PlannedPart(part_name(fingerprint), fingerprint, chunk))
    return plan


# -- reading ---------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: damaged {what} ({exc}).",
                            "Build the index again (delete the folder or choose another one).") from exc
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: damaged {what} (not a JSON object).")
    return data


def _check_manifest(manifest: dict, where: Path) -> None:
    """BadInputError unless ``manifest`` is a percept.index/1 manifest with well-formed fields."""
    schema = manifest.get("schema")
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_PREFIX):
        raise BadInputError(f"{where}: not a percept index manifest (schema {schema!r}).")
    if schema != SCHEMA:
        raise BadInputError(f"{where}: index schema {schema} is not readable by this percept (it reads {SCHEMA}); "
                            "it was probably written by a newer percept.", "Upgrade percept, or build the index again.")
    parts = manifest.get("parts")
    ok = (isinstance(parts, list) and isinstance(manifest.get("dim"), int) and manifest["dim"] > 0
          and manifest.get("storage_dtype") in STORAGE_DTYPES and isinstance(manifest.get("model"), dict)
          and all(isinstance(p, dict) and isinstance(p.get("name"), str) and _PART_NAME.match(p["name"])
                  and isinstance(p.get("n_items"), int) and isinstance(p.get("n_ok"), int)
                  and 0 <= p["n_ok"] <= p["n_items"] and isinstance(p.get("fingerprint"), str) for p in parts))
    if not ok:
        raise BadInputError(f"{where}: damaged manifest (its fields are not what percept writes).",
                            "Build the index again (delete the folder or choose another one).")


def _open_vectors(path: Path, n_ok: int, dim: int, dtype: str, where: Path) -> np.ndarray:
    """A part's vectors, memory-mapped, checked against the manifest (shape, dtype, file length)."""
    if not path.is_file():
        raise BadInputError(f"{where}: part file {path.name} is missing; build the index again.")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{where}: part file {path.name} is unreadable or truncated ({exc}); "
                            "build the index again.") from exc
    expected_bytes = getattr(array, "offset", 0) + array.nbytes
    if array.shape != (n_ok, dim) or array.dtype != np.dtype(dtype) or path.stat().st_size != expected_bytes:
        raise BadInputError(f"{where}: part file {path.name} holds {array.dtype}{list(array.shape)} in "
                            f"{path.stat().st_size} bytes; the manifest says {dtype}[{n_ok}, {dim}] "
                            "(truncated or replaced); build the index again.")
    return array


def _check_table(path: Path, n_items: int, where: Path) -> None:
    if not path.is_file():
        raise BadInputError(f"{where}: part file {path.name} is missing; build the index again.")
    try:
        rows = pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as exc:
        raise BadInputError(f"{where}: part file {path.name} is unreadable or truncated ({exc}); "
                            "build the index again.") from exc
    if rows != n_items:
        raise BadInputError(f"{where}: part file {path.name} has {rows} rows; the manifest says {n_items}; "
                            "build the index again.")


class PoolIndex:
    """An opened index (see :func:`open_index`): the manifest and memory-mapped vectors of its parts.

    Attributes: ``path``, ``manifest``, ``dim`` (D), ``n`` (ok vectors), ``storage_dtype``.
    """

    def __init__(self, path: Path, manifest: dict, vectors: list[np.ndarray]):
        self.path = Path(path)
        self.manifest = manifest
        self.dim: int = int(manifest["dim"])
        self.storage_dtype: str = manifest["storage_dtype"]
        self._vectors = vectors
        self.n: int = sum(int(p["n_ok"]) for p in manifest["parts"])

    def __repr__(self) -> str:
        return f"PoolIndex({str(self.path)!r}, n={self.n}, dim={self.dim}, parts={len(self.manifest['parts'])})"

    @property
    def part_names(self) -> list[str]:
        return [p["name"] for p in self.manifest["parts"]]

    def part_file(self, name: str, suffix: str) -> Path:
        return self.path / PARTS / f"{name}{suffix}"

    def vectors(self) -> list[np.ndarray]:
        """Per part, its (n_ok_i, D) vectors memory-mapped read-only, in the storage dtype (global id order)."""
        return list(self._vectors)

    def _tables(self, columns: Sequence[str]) -> Iterable[pa.Table]:
        for name in self.part_names:
            yield pq.read_table(self.part_file(name, ".parquet"), columns=list(columns))

    def metadata(self, columns: Sequence[str] = ("key", "path", "member", "label")) -> pa.Table:
        """The ok items' ``columns`` (any of :data:`COLUMNS`), one row per vector, in global id order."""
        columns = list(columns)
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown:
            raise BadInputError(f"unknown index column(s) {', '.join(unknown)}; use {', '.join(COLUMNS)}.")
        wanted = list(dict.fromkeys([*columns, "status"]))
        tables = []
        for part, table in zip(self.manifest["parts"], self._tables(wanted)):
            ok = table.filter(pc.equal(table.column("status"), "ok"))
            if ok.num_rows != part["n_ok"]:
                raise BadInputError(f"{self.path}: part file {part['name']}.parquet has {ok.num_rows} ok rows; "
                                    f"the manifest says {part['n_ok']}; build the index again.")
            tables.append(ok.select(columns))
        if not tables:
            return PART_SCHEMA.empty_table().select(columns)
        return pa.concat_tables(tables)

    def label_codes(self) -> tuple[np.ndarray, list[str]]:
        """((n,) int32 codes into ``names``, sorted label names); -1 for a vector without a label.

        Computed in Arrow (dictionary encoding): no Python object per item; once per index object."""
        cached = self.__dict__.get("_label_codes")
        if cached is not None:
            return cached
        column = self.metadata(("label",)).column("label").combine_chunks()
        encoded = pc.dictionary_encode(column)
        found = encoded.dictionary.to_pylist()
        names = sorted(found)
        remap = np.array([names.index(name) for name in found] or [0], dtype=np.int32)
        indices = np.asarray(encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
        codes = np.where(indices >= 0, remap[np.clip(indices, 0, None)], -1).astype(np.int32)
        self.__dict__["_label_codes"] = (codes, names)
        return codes, names

    def rows(self, ids: Sequence[int], columns: Sequence[str] = ("key", "path", "member", "label")) -> list[dict]:
        """Metadata of the vectors ``ids`` (global ids; -1 gives None): only these rows become Python objects.
        The columns are read once per index object and kept in Arrow memory."""
        key = tuple(columns)
        cache = self.__dict__.setdefault("_row_tables", {})
        if key not in cache:
            cache[key] = self.metadata(columns)
        table = cache[key]
        ids = [int(i) for i in ids]
        wanted = sorted({i for i in ids if i >= 0})
        taken = table.take(pa.array(wanted, type=pa.int64())).to_pylist() if wanted else []
        found = dict(zip(wanted, taken))
        return [found.get(i) for i in ids]

    def failures(self) -> list[tuple[str, str]]:
        """(key, reason) of every item that could not be embedded, in part order."""
        found: list[tuple[str, str]] = []
        for table in self._tables(("key", "status", "error")):
            bad = table.filter(pc.equal(table.column("status"), "error"))
            found.extend(zip(bad.column("key").to_pylist(), bad.column("error").to_pylist()))
        return found

    def check_model(self, metric) -> None:
        """BadInputError naming both models when ``metric`` is not the model this index was built with."""
        refuse_other_model(self.manifest["model"], model_identity(metric), self.path)

    def set_faiss(self, info: dict | None) -> None:
        """Rewrite the manifest (atomically) with ``faiss`` replaced by ``info``."""
        manifest = {**self.manifest, "faiss": info}
        write_manifest(self.path, manifest)
        self.manifest = manifest


def open_index(path: str | Path) -> PoolIndex:
    """Open the index folder at ``path``, checking its manifest and every part file.

    Raises:
        BadInputError: not a folder; no ``manifest.json`` (not an index, or a build that did not
            finish); a foreign, newer or damaged manifest; a part file missing, unreadable, or
            whose shape, dtype, size or row count disagrees with the manifest.
    """
    root = Path(path)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise BadInputError(f"{root} {what}; an index is a folder made by percept retrieve.")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BadInputError(f"{root}: not a percept index (no {MANIFEST}); was it built to completion?")
    manifest = _read_json(manifest_path, "index manifest")
    _check_manifest(manifest, manifest_path)
    dim, dtype = manifest["dim"], manifest["storage_dtype"]
    vectors = []
    for part in manifest["parts"]:
        base = root / PARTS / part["name"]
        vectors.append(_open_vectors(base.with_suffix(".npy"), part["n_ok"], dim, dtype, root))
        _check_table(base.with_suffix(".parquet"), part["n_items"], root)
    return PoolIndex(root, manifest, vectors)


def write_manifest(root: Path, manifest: dict) -> None:
    with atomic_path(Path(root) / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _old_parts(index: PoolIndex) -> list[OldPart]:
    """The existing index's parts with their records, for :func:`plan_parts`."""
    parts = []
    for part in index.manifest["parts"]:
        columns = pq.read_table(index.part_file(part["name"], ".parquet"), columns=list(COLUMNS)).to_pydict()
        entries = tuple(
            Entry(Item(key=key, path=path, member=member, size=size, mtime_ns=mtime, label=label),
                  Origin(part["name"], row if status == "ok" else -1, error))
            for key, path, member, size, mtime, label, status, error, row in zip(*(columns[c] for c in COLUMNS)))
        parts.append(OldPart(part["name"], part["fingerprint"], entries))
    return parts


# -- building --------------------------------------------------------------------------------------


@dataclass
class BuildSummary:
    """What a build did. ``new``/``changed``/``deleted``/``kept``: items, from the plan; ``embedded``:
    items decoded and embedded in this run (all processes), ``copied``: stored results copied into
    rewritten parts; ``failed``/``failures``: items of the index that could not be embedded;
    ``items``/``ok``: the index's items and vectors; ``parts_reused``: planned parts found complete."""

    new: int = 0
    changed: int = 0
    deleted: int = 0
    kept: int = 0
    failed: int = 0
    parts_written: int = 0
    parts_reused: int = 0
    parts_total: int = 0
    items: int = 0
    ok: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    embedded: int = 0
    copied: int = 0


def _marker_path(parts_dir: Path, name: str) -> Path:
    return parts_dir / f"{name}.done"


def _is_complete(parts_dir: Path, part: PlannedPart) -> bool:
    """Whether the part's marker holds the planned fingerprint and item count, and its files the recorded sizes."""
    try:
        marker = json.loads(_marker_path(parts_dir, part.name).read_text(encoding="utf-8"))
        return (isinstance(marker, dict) and marker.get("fingerprint") == part.fingerprint
                and marker.get("n_items") == part.n_items
                and (parts_dir / f"{part.name}.npy").stat().st_size == marker.get("npy_bytes")
                and (parts_dir / f"{part.name}.parquet").stat().st_size == marker.get("parquet_bytes"))
    except (OSError, ValueError):
        return False


def _existing_index(root: Path) -> PoolIndex | None:
    """The index already at ``root`` (None: a new folder, or the leftovers of an unfinished first build).

    Raises:
        BadInputError: ``root`` is a file, a folder holding other things, or a damaged/foreign index.
    """
    if not root.exists():
        return None
    if not root.is_dir():
        raise BadInputError(f"{root} exists and is not a folder (an index is a folder).")
    if (root / MANIFEST).exists():
        return open_index(root)
    others = [n for n in os.listdir(root) if n not in (PARTS, "faiss") and not _is_manifest_temp(n)]
    if others:
        raise BadInputError(f"{root} is not empty and is not a percept index (it holds {others[0]}); "
                            "choose a new folder for the index.")
    return None


def _is_manifest_temp(name: str) -> bool:
    return name.startswith(f".{MANIFEST}.") and name.endswith(".tmp")


def _embedding_pass(parts: Sequence[PlannedPart], batch_size: int) -> tuple[list[Item], list[range]]:
    """The items of ``parts`` that have no stored result, concatenated in part order, and their batches.

    Each part's items are cut into batches of ``batch_size`` on their own (a batch never crosses a part
    boundary), exactly as if the part were embedded alone: a part's vectors do not depend on which
    process builds it, nor on which other parts that process builds. (Batches as ranges: a few bytes each,
    however many items a process builds.)
    """
    items: list[Item] = []
    batches: list[range] = []
    for part in parts:
        start = len(items)
        items.extend(entry.item for entry in part.entries if entry.origin is None)
        batches.extend(range(first, min(first + batch_size, len(items)))
                       for first in range(start, len(items), batch_size))
    return items, batches


def _embed_part(metric, part: PlannedPart, stream: Iterator | None, start: int, batch_size: int, buffer: np.ndarray,
                status: list[str], errors: list, progress: Progress | None) -> int:
    """Embed the part's items that have no stored result into ``buffer`` rows; returns how many were tried.

    ``stream``: the pass of :func:`iter_item_batches` over the items of :func:`_embedding_pass`, whose
    next batches are this part's (positions ``start`` onwards, ``ceil(to_embed / batch_size)`` batches).
    """
    positions = [i for i, entry in enumerate(part.entries) if entry.origin is None]
    device = metric.device
    on_device = []  # (batch positions, embeddings): copied to the host once per part, not once per batch
    for _ in range(-(-len(positions) // batch_size)):
        try:
            done, batch, failed = next(stream)
        except StopIteration:
            raise PerceptError(f"part {part.name}: the decoding pass ended before the part's items") from None
        if not all(start <= p < start + len(positions) for p in [*done, *(p for p, _ in failed)]):
            raise PerceptError(f"part {part.name}: the decoding pass gave items of another part")
        for p, reason in failed:
            status[positions[p - start]], errors[positions[p - start]] = "error", reason
        if batch is not None:
            x = batch.to(device, non_blocking=True).to(torch.float32).div_(255.0)
            on_device.append((done, metric.embed_pixels(x, check=False).float()))
        if progress:
            progress(len(done) + len(failed))
    for done, emb in on_device:  # one wait for the device per part (a sync per batch would stall a GPU)
        for p, row in zip(done, emb.cpu().numpy()):
            buffer[positions[p - start]] = row
    return len(positions)


def _probe_dim(metric) -> int:
    """The model's embedding size, from one forward pass of a black image."""
    size = metric.image_size
    x = torch.zeros(1, 3, size, size, device=metric.device)
    return int(metric.embed_pixels(x, check=False).shape[-1])


def _write_part(parts_dir: Path, part: PlannedPart, vectors: np.ndarray, status: list[str],
                errors: list, rows: list[int]) -> None:
    """The part's .npy and .parquet, atomically, then its .done marker."""
    marker = _marker_path(parts_dir, part.name)
    marker.unlink(missing_ok=True)  # a stale marker must never vouch for files being replaced
    items = [entry.item for entry in part.entries]
    table = pa.table({"key": [i.key for i in items], "path": [i.path for i in items],
                      "member": [i.member for i in items], "size": [i.size for i in items],
                      "mtime_ns": [i.mtime_ns for i in items], "label": [i.label for i in items],
                      "status": status, "error": errors, "row": rows}, schema=PART_SCHEMA)
    npy, parquet = parts_dir / f"{part.name}.npy", parts_dir / f"{part.name}.parquet"
    with atomic_path(npy) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, vectors)
    with atomic_path(parquet) as tmp:
        pq.write_table(table, tmp)
    record = {"fingerprint": part.fingerprint, "n_items": part.n_items, "n_ok": int(vectors.shape[0]),
              "npy_bytes": npy.stat().st_size, "parquet_bytes": parquet.stat().st_size}
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")


class _Builder:
    """Builds planned parts: embeds what has no stored result, copies what has one, writes the files.

    :meth:`build` decodes the items of all the parts it is given in one pass of :func:`iter_item_batches`
    (one DataLoader: its workers start once and the decoding does not drain between parts) and writes
    each part as soon as its last batch is embedded.
    """

    def __init__(self, metric, parts_dir: Path, storage_dtype: str, old: PoolIndex | None,
                 batch_size: int, num_workers: int | None, progress: Progress | None):
        self.metric, self.parts_dir, self.storage_dtype = metric, parts_dir, storage_dtype
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.old_vectors = dict(zip(old.part_names, old.vectors())) if old is not None else {}
        self.dim: int | None = old.dim if old is not None else None
        self.embedded = self.copied = 0

    def build(self, parts: Sequence[PlannedPart]) -> None:
        """Build ``parts`` in their order (each written, ``.done`` last, before the next one starts)."""
        if not parts:
            return
        if self.dim is None:
            self.dim = _probe_dim(self.metric)
        items, batches = _embedding_pass(parts, self.batch_size)
        stream = None
        if items:
            stream = iter_item_batches(items, self.metric.preprocess, self.batch_size, self.num_workers,
                                       self.metric.device.type == "cuda", batches=batches)
        start = 0
        try:
            for part in parts:
                self._build_part(part, stream, start)
                start += part.to_embed
        finally:
            close = getattr(stream, "close", None)
            if close is not None:  # stops the decoding workers now (an error, or a pass left unfinished)
                close()

    def _build_part(self, part: PlannedPart, stream: Iterator | None, start: int) -> None:
        """Embed the part's new items (its batches of ``stream``), copy its stored results, write its files."""
        n = part.n_items
        buffer = np.zeros((n, self.dim), dtype=np.float32)
        status, errors = ["ok"] * n, [None] * n
        self.embedded += _embed_part(self.metric, part, stream, start, self.batch_size, buffer, status, errors,
                                     self.progress)
        for i, entry in enumerate(part.entries):
            if entry.origin is None:
                continue
            self.copied += 1
            if entry.origin.row < 0:
                status[i], errors[i] = "error", entry.origin.error
            else:
                buffer[i] = self.old_vectors[entry.origin.part][entry.origin.row]
        ok = [i for i in range(n) if status[i] == "ok"]
        rows = [-1] * n
        for row, i in enumerate(ok):
            rows[i] = row
        vectors = np.ascontiguousarray(buffer[ok], dtype=self.storage_dtype).reshape(len(ok), self.dim)
        _write_part(self.parts_dir, part, vectors, status, errors, rows)


def _agree_on_work(dist: Dist, plan: BuildPlan, parts_dir: Path) -> list[PlannedPart]:
    """The planned parts still to build, as rank 0 sees them (every rank checked its plan is the same)."""
    incomplete = [i for i, part in enumerate(plan.parts) if not part.reused and not _is_complete(parts_dir, part)]
    views = gather(dist, (plan.generation, incomplete))
    if len({generation for generation, _ in views}) != 1:
        raise BadInputError("the processes listed different items (the sources changed while they were read); "
                            "run the build again.")
    return [plan.parts[i] for i in views[0][1]]


def _finish(root: Path, plan: BuildPlan, manifest_base: dict) -> tuple[dict, list[tuple[str, str]]]:
    """Rank 0, after every part is built: check the markers, write the manifest, delete unreferenced files."""
    parts_dir = root / PARTS
    entries, labels, failures = [], {}, []
    for part in plan.parts:
        if part.reused:  # checked when the old index was opened
            n_ok = sum(1 for entry in part.entries if entry.origin is not None and entry.origin.row >= 0)
        elif _is_complete(parts_dir, part):
            n_ok = int(json.loads(_marker_path(parts_dir, part.name).read_text(encoding="utf-8"))["n_ok"])
        else:
            raise PerceptError(f"{root}: part {part.name} was not completed by any process; run the build again.")
        entries.append({"name": part.name, "n_items": part.n_items, "n_ok": n_ok, "fingerprint": part.fingerprint})
        table = pq.read_table(parts_dir / f"{part.name}.parquet", columns=["key", "label", "status", "error"])
        for key, label, status, error in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            if status != "ok":
                failures.append((key, error))
            elif label is not None:
                labels[label] = labels.get(label, 0) + 1
    dim = manifest_base.pop("dim", None)
    if dim is None and entries:
        dim = int(np.load(parts_dir / f"{entries[0]['name']}.npy", mmap_mode="r").shape[1])
    n_items, n_ok = sum(e["n_items"] for e in entries), sum(e["n_ok"] for e in entries)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = {"schema": SCHEMA, **manifest_base, "dim": dim, "parts": entries,
                "counts": {"items": n_items, "ok": n_ok, "failed": n_items - n_ok,
                           "labels": dict(sorted(labels.items()))},
                "generation": plan.generation, "created": manifest_base.get("created") or now, "updated": now}
    keys = ("schema", "percept_version", "model", "dim", "storage_dtype", "part_size", "parts", "counts",
            "problems", "generation", "faiss", "created", "updated")
    manifest = {key: manifest.get(key) for key in keys}
    write_manifest(root, manifest)
    _delete_unreferenced(root, {e["name"] for e in entries})
    return manifest, failures


def _delete_unreferenced(root: Path, names: set[str]) -> None:
    """Remove part files (and temp files) the manifest does not reference, and stale manifest temp files."""
    keep = {f"{name}{suffix}" for name in names for suffix in (".npy", ".parquet", ".done")}
    for entry in os.scandir(root / PARTS):
        if entry.is_file(follow_symlinks=False) and entry.name not in keep:
            os.unlink(entry.path)
    for entry in os.scandir(root):
        if _is_manifest_temp(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)


def _check_storage(old: PoolIndex | None, storage_dtype: str | None, root: Path) -> str:
    if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
        raise BadInputError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)} (got {storage_dtype!r}).")
    if old is None:
        return storage_dtype or DEFAULT_STORAGE_DTYPE
    if storage_dtype is not None and storage_dtype != old.storage_dtype:
        raise BadInputError(f"{root} stores {old.storage_dtype} vectors; this run asks for {storage_dtype}.",
                            f"Update it with {old.storage_dtype}, or build a new index.")
    return old.storage_dtype


@dataclass
class PreparedBuild:
    """What a build starts from: the existing index (or None), the model's identity, the settings, the plan
    (:func:`prepare_build`; ``plan.to_embed`` is e.g. a progress bar's total)."""

    old: PoolIndex | None
    identity: dict
    storage: str
    part_size: int
    plan: BuildPlan


def prepare_build(metric, listing: Listing, out: str | Path, *, mode: str = "sync", part_size: int | None = None,
                  storage_dtype: str | None = None) -> PreparedBuild:
    """Check the settings against the index at ``out`` and plan the build (nothing written); give the result
    to :func:`build_index` (``prepared=``) so the listing and the old metadata are planned once.

    Raises:
        BadInputError: as :func:`build_index` before any work.
    """
    root = Path(out)
    if mode not in MODES:
        raise BadInputError(f"mode must be one of {', '.join(MODES)} (got {mode!r}).")
    old = _existing_index(root)
    identity = model_identity(metric)
    if old is not None:
        refuse_other_model(old.manifest["model"], identity, root)
    storage = _check_storage(old, storage_dtype, root)
    size = int(part_size or (old.manifest.get("part_size") if old is not None else None) or DEFAULT_PART_SIZE)
    plan = plan_parts(_old_parts(old) if old is not None else [], listing.items, mode=mode, part_size=size,
                      digest=model_digest(identity, storage))
    return PreparedBuild(old, identity, storage, size, plan)


def plan_build(metric, listing: Listing, out: str | Path, *, mode: str = "sync", part_size: int | None = None,
               storage_dtype: str | None = None) -> BuildPlan:
    """The plan :func:`build_index` would follow (nothing written): e.g. ``plan.to_embed`` as a progress
    bar's total, or ``new``/``changed``/``deleted`` for a dry run. Parts already finished by a killed run
    are still counted in ``to_embed``.

    Raises:
        BadInputError: as :func:`build_index` before any work.
    """
    return prepare_build(metric, listing, out, mode=mode, part_size=part_size, storage_dtype=storage_dtype).plan


@torch.no_grad()
def build_index(metric, listing: Listing, out: str | Path, *, mode: str = "sync", part_size: int | None = None,
                storage_dtype: str | None = None, batch_size: int | None = None, num_workers: int | None = None,
                dist: Dist = Dist(), progress: Progress | None = None,
                prepared: PreparedBuild | None = None) -> BuildSummary:
    """Build or update the index at ``out`` from ``listing`` with ``metric``'s embeddings.

    Args:
        mode: ``sync`` (the index mirrors the listing: items no longer listed are dropped) or ``add``
            (items of the index that are not listed are kept).
        part_size: items per new part (None: the index's own, 4096 for a new index).
        storage_dtype: ``float16`` or ``float32`` (None: the index's own, float16 for a new index).
        batch_size, num_workers: embedding batches (None: the metric's) and decoding processes.
        dist: this process's place under torchrun (every rank calls this with the same listing).
        progress: called with the number of items this process has just decoded and embedded.
        prepared: :func:`prepare_build`'s result for these same arguments (None: planned here).

    Returns:
        The same :class:`BuildSummary` on every rank.

    Raises:
        BadInputError: an unknown mode/dtype, ``out`` not usable as an index folder, an existing index
            built with another model or storage dtype, or damaged.
    """
    start = time.perf_counter()
    root = Path(out)
    setup = prepared or prepare_build(metric, listing, root, mode=mode, part_size=part_size,
                                      storage_dtype=storage_dtype)
    old, identity, storage, size, plan = setup.old, setup.identity, setup.storage, setup.part_size, setup.plan
    parts_dir = root / PARTS
    parts_dir.mkdir(parents=True, exist_ok=True)
    todo = _agree_on_work(dist, plan, parts_dir)
    mine = todo[dist.rank * len(todo) // dist.world:(dist.rank + 1) * len(todo) // dist.world]
    builder = _Builder(metric, parts_dir, storage, old, int(batch_size or metric.batch_size), num_workers, progress)
    builder.build(mine)
    work = gather(dist, (builder.embedded, builder.copied))  # also the barrier before rank 0 finishes
    outcome, failure = None, None
    if dist.is_main:
        base = {"percept_version": _version(), "model": identity,
                "dim": old.dim if old is not None else builder.dim, "storage_dtype": storage, "part_size": size,
                "problems": [{"path": p.path, "reason": p.reason} for p in listing.problems],
                "faiss": old.manifest.get("faiss") if old is not None else None,
                "created": old.manifest.get("created") if old is not None else None}
        try:
            outcome = _finish(root, plan, base)
        except Exception as exc:  # the other ranks must not wait forever: they raise too
            failure = exc
    shared = gather(dist, ("ok", outcome) if failure is None else ("failed", str(failure)))[0]
    if failure is not None:
        raise failure
    if shared[0] != "ok":
        raise PerceptError(f"{root}: rank 0 could not finish the index ({shared[1]}).")
    manifest, failures = shared[1]
    return BuildSummary(new=plan.new, changed=plan.changed, deleted=plan.deleted, kept=plan.kept,
                        failed=len(failures), parts_written=len(todo),
                        parts_reused=len(plan.parts) - len(todo), parts_total=len(plan.parts),
                        items=manifest["counts"]["items"], ok=manifest["counts"]["ok"],
                        seconds=time.perf_counter() - start, failures=failures,
                        embedded=sum(w[0] for w in work), copied=sum(w[1] for w in work))


def _version() -> str:
    from .. import __version__

    return __version__
