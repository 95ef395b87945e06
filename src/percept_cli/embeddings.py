"""Embeddings exported to a file, with the paths of their rows: the work behind ``percept embed``.

Formats (chosen from the output's extension):

* ``.safetensors`` - tensor ``embeddings`` (N, D) float32; the metadata holds ``paths`` (JSON list),
  ``model``, ``preprocess`` and ``settings`` (JSON).
* ``.npy`` - the (N, D) float32 matrix; the row paths go to a sidecar ``<out>.paths.json``
  (a JSON list, so any file name survives) together with the same metadata.
* ``.parquet`` - one row per image: ``path`` (string) and ``embedding`` (list of float32), the
  metadata in the schema's ``percept`` key. Needs pyarrow (a dependency of percept).

Rows are L2-normalised embeddings, as :meth:`PerceptualMetric.embed` returns them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import BadInputError, ImageReadError
from .io.data import Failure
from .io.images import list_images
from .io.outputs import atomic_path

FORMATS = (".safetensors", ".npy", ".parquet")
FORMAT_ID = "percept.embeddings/1"


@dataclass
class EmbeddingExport:
    """What :func:`embed_to_file` wrote: the file, its row paths, shape, and the files left out."""

    path: Path
    paths: list[str]
    dim: int
    sidecar: Path | None = None
    skipped: list[Failure] = field(default_factory=list)


def sidecar_path(out: str | Path) -> Path:
    """The labels file written beside a ``.npy`` export: ``<out>.paths.json``."""
    out = Path(out)
    return out.with_name(out.name + ".paths.json")


def expand_sources(sources: Sequence[str | Path], recursive: bool = False) -> list[str]:
    """Image files from files and directories (sorted within a directory), each file once.

    A file named twice (directly or through an overlapping directory) keeps its first position.

    Raises:
        ImageReadError: a source that does not exist.
        BadInputError: no sources, or a directory without images.
    """
    if not sources:
        raise BadInputError("no images given.", "Usage: percept embed FILE_OR_DIR... --out emb.safetensors")
    files: list[str] = []
    seen: set[Path] = set()
    for item in sources:
        path = Path(item)
        if not path.exists():
            raise ImageReadError(path, "file not found")
        for f in (list_images(path, recursive) if path.is_dir() else [path]):
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(str(f))
    return files


def check_format(out: str | Path) -> str:
    """The export format of ``out`` (its lower-case suffix), before any work.

    Raises:
        BadInputError: an unknown extension, or ``.parquet`` without pyarrow installed.
    """
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise BadInputError(f"embeddings file {out}: unsupported format '{suffix or '(none)'}'; "
                            f"use one of {', '.join(FORMATS)}.")
    if suffix == ".parquet":
        _pyarrow()
    return suffix


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise BadInputError("writing .parquet needs pyarrow: pip install pyarrow "
                            "(or pip install 'percept[parquet]').") from None
    return pyarrow


def embed_to_file(metric, paths: Sequence[str], out: str | Path, *, skip_bad: bool = False,
                  skipped: Sequence[Failure] = (), progress: Callable[[int], None] | None = None,
                  settings: dict | None = None) -> EmbeddingExport:
    """Embed image files with ``metric`` and write the embeddings with their paths to ``out``.

    Args:
        paths: image files (see :func:`expand_sources`).
        skip_bad: leave out files that cannot be decoded (reported in ``skipped``) instead of raising.
        skipped: files already known to be bad (left out without reading).
        settings: extra JSON-ready metadata stored with the embeddings (e.g. the batch size).

    Raises:
        BadInputError: unknown format / missing pyarrow; no readable image left.
        ImageReadError: an unreadable file when ``skip_bad`` is False.
    """
    check_format(out)
    bad = {f.path for f in skipped}
    files = [p for p in paths if p not in bad]
    result = metric.embed_files(files, skip_bad=skip_bad, progress=progress) if files else None
    failures = list(skipped) + (list(result.failures) if result else [])
    if result is None or not result.indices:
        raise BadInputError("no readable images left to embed.")
    kept = [files[i] for i in result.indices]
    matrix = result.embeddings.float().cpu().numpy()
    meta = {"format": FORMAT_ID, "model": metric.source.as_dict(), "preprocess": metric.preprocess.as_dict(),
            "dtype": metric.dtype_name, "normalized": True, "settings": settings or {}}
    sidecar = write_embeddings(out, matrix, kept, meta)
    return EmbeddingExport(Path(out), kept, int(matrix.shape[1]), sidecar, failures)


def write_embeddings(out: str | Path, matrix: np.ndarray, paths: Sequence[str], meta: dict) -> Path | None:
    """Write ``matrix`` (N, D) and its row ``paths`` atomically; returns the sidecar path (``.npy``) or None.

    Raises:
        BadInputError: rows and paths disagree in number, or an unknown format.
    """
    target = Path(out)
    suffix = check_format(target)
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(paths):
        raise BadInputError(f"{matrix.shape[0] if matrix.ndim else 0} embedding rows for {len(paths)} paths.")
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        header = {"paths": json.dumps(list(paths)), **{k: json.dumps(v) for k, v in meta.items()}}
        with atomic_path(target) as tmp:
            save_file({"embeddings": torch.from_numpy(matrix)}, str(tmp), metadata=header)
        return None
    if suffix == ".npy":
        side = sidecar_path(target)
        with atomic_path(target) as tmp, atomic_path(side) as tmp_side:  # both written before either replace
            with open(tmp, "wb") as fh:
                np.save(fh, matrix)
            tmp_side.write_text(json.dumps({"paths": list(paths), **meta}, indent=1) + "\n", encoding="utf-8")
        return side
    pa = _pyarrow()
    import pyarrow.parquet as pq

    table = pa.table({"path": pa.array(list(paths), pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)),
                                                                     matrix.shape[1])})
    table = table.replace_schema_metadata({"percept": json.dumps(meta)})
    with atomic_path(target) as tmp:
        pq.write_table(table, str(tmp))
    return None


def read_embeddings(path: str | Path) -> tuple[torch.Tensor, list[str], dict]:
    """Read an export back: ``(embeddings (N, D) float32, row paths, metadata)``.

    Raises:
        BadInputError: a missing file, an unknown format, or a file not written by :func:`embed_to_file`.
    """
    path = Path(path)
    suffix = check_format(path)
    if not path.is_file():
        raise BadInputError(f"{path}: file not found.")
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                header = dict(fh.metadata() or {})
                emb = fh.get_tensor("embeddings")
            paths = json.loads(header.pop("paths"))
            meta = {k: json.loads(v) for k, v in header.items()}
        elif suffix == ".npy":
            emb = torch.from_numpy(np.load(path, allow_pickle=False))
            meta = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
            paths = meta.pop("paths")
        else:
            _pyarrow()
            import pyarrow.parquet as pq

            table = pq.read_table(str(path))
            paths = table.column("path").to_pylist()
            column = table.column("embedding").combine_chunks()
            flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
            emb = torch.from_numpy(flat.reshape(len(paths), column.type.list_size))
            meta = json.loads((table.schema.metadata or {})[b"percept"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise BadInputError(f"{path}: not a percept embeddings file ({exc}).") from exc
    if emb.dim() != 2 or emb.shape[0] != len(paths):
        raise BadInputError(f"{path}: {tuple(emb.shape)} embeddings for {len(paths)} paths.")
    return emb.float(), list(paths), meta
