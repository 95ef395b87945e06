"""Report files of ``percept retrieve`` (filter, classify, dedup): ``.parquet``, ``.csv`` or ``.jsonl``.

A long ``retrieve filter`` run writes its rows chunk by chunk (:class:`ChunkedReport`): each chunk is
its own Parquet file, written atomically, in the sibling folder ``<report>.partial/`` together with
the run's settings (``settings.json``). A run that is killed keeps every finished chunk; the resumed
run (same settings, checked) skips them (:meth:`ChunkedReport.done`), and :meth:`ChunkedReport.finish`
streams the chunks in order into the final file, atomically, then removes the folder. The user's
file name therefore never holds a half-written report. :func:`write_rows` writes a small report in
one go, atomically too.

Cells in ``.csv``: empty for a missing value, ``true``/``false`` for booleans, JSON for lists and
dicts. ``.jsonl``: one JSON object per row, NaN and infinities written as null.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from ..errors import BadInputError
from ..io.outputs import atomic_path

REPORT_FORMATS = (".parquet", ".csv", ".jsonl")
PARTIAL_SCHEMA = "percept.report-partial/1"
_CHUNK = re.compile(r"^chunk-(\d+)\.parquet$")


def report_format(path: str | Path) -> str:
    """``"parquet"``, ``"csv"`` or ``"jsonl"`` from the file's suffix (case-insensitive).

    Raises:
        BadInputError: any other suffix, naming the path and the formats allowed.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in REPORT_FORMATS:
        raise BadInputError(f"report {path}: unsupported format '{suffix or '(none)'}'; "
                            f"use one of {', '.join(REPORT_FORMATS)}.")
    return suffix[1:]


def partial_folder(path: str | Path) -> Path:
    """Where the chunks of the report ``path`` wait: ``<path>.partial`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


# -- cell formatting -------------------------------------------------------------------------------

def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_json_safe(value), ensure_ascii=False)
    return value


def _json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None (JSON has no such numbers), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_text(tmp: Path, fmt: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``rows`` (dicts; missing keys = missing values) as csv or jsonl to ``tmp``, line by line."""
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        if fmt == "csv":
            writer = csv.writer(fh)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_csv_cell(row.get(c)) for c in columns])
        else:
            for row in rows:
                record = {c: _json_safe(row.get(c)) for c in columns}
                fh.write(json.dumps(record, ensure_ascii=False, allow_nan=False, default=str) + "\n")


def _table_rows(table) -> Iterator[dict]:
    """The rows of a pyarrow table as dicts, one record batch at a time."""
    for batch in table.to_batches():
        yield from batch.to_pylist()


def _columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of the rows, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def write_rows(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> Path:
    """Write ``rows`` to ``path`` (.parquet, .csv or .jsonl) in one go, atomically.

    Args:
        path: the report file; its suffix picks the format.
        rows: one dict per row; a key missing from a row is a missing value.
        columns: the columns in order (default: every key, in order of first appearance).

    Raises:
        BadInputError: an unsupported suffix.
    """
    fmt = report_format(path)
    target = Path(path)
    columns = list(columns) if columns is not None else _columns_of(rows)
    with atomic_path(target) as tmp:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({c: [row.get(c) for row in rows] for c in columns}) if columns else pa.table({})
            pq.write_table(table, tmp)
        else:
            _write_text(tmp, fmt, columns, rows)
    return target


# -- chunked, resumable report -----------------------------------------------------------------------

def _flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values by dotted key: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if isinstance(settings, dict) and settings:
        flat: dict[str, Any] = {}
        for key, value in settings.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix or "(settings)": settings}


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ChunkedReport:
    """A report written in numbered chunks that survive a crash, assembled at the end.

    Args:
        path: the final report (.parquet, .csv or .jsonl).
        columns: its columns, in order; every chunk has exactly these.
        resume: continue an unfinished report of the same settings (a missing one starts afresh).
        settings: what must match for a resume (JSON-serialisable; nested dicts compared key by key).

    Chunks are ``<path>.partial/chunk-NNNNNN.parquet`` (Parquet whatever the final format), each written
    atomically, so a chunk file that exists is complete. Several processes may write distinct chunks
    into the same report; create it in one process first (the others then open it with ``resume=True``).

    Raises:
        BadInputError: an unsupported suffix; an unfinished report and ``resume=False`` (resume it or
            delete the folder); settings or columns that differ from the unfinished report's (naming
            the keys); a damaged partial folder.
    """

    def __init__(self, path: str | Path, columns: Sequence[str], *, resume: bool, settings: dict):
        self.format = report_format(path)
        self.path = Path(path)
        self.partial = partial_folder(self.path)
        self.columns = [str(c) for c in columns]
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"ChunkedReport: duplicate column names in {self.columns}.")
        self.settings = json.loads(json.dumps(settings, default=str))
        self._done: set[int] = set()
        if self.partial.exists():
            self._open_existing(resume)
        else:
            self.partial.mkdir()
            self._write_settings()

    # where the unfinished report's settings live
    @property
    def _settings_file(self) -> Path:
        return self.partial / "settings.json"

    def _write_settings(self) -> None:
        document = {"schema": PARTIAL_SCHEMA, "columns": self.columns, "settings": self.settings}
        with atomic_path(self._settings_file) as tmp:
            tmp.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")

    def _open_existing(self, resume: bool) -> None:
        """Adopt the unfinished report in ``self.partial`` after checking it matches."""
        if not self.partial.is_dir():
            raise BadInputError(f"report {self.path}: {self.partial} exists and is not a folder; remove it.")
        chunks = self._scan()
        if not resume:
            raise BadInputError(f"report {self.path}: an unfinished report of an interrupted run is in "
                                f"{self.partial}; resume it, or delete that folder to start over.",
                                option_hints={"--resume": "Pass --resume to continue it."})
        if not self._settings_file.exists() and not chunks:
            self._write_settings()  # a run killed right after creating the folder
            return
        self._check_settings()
        for file in chunks.values():
            self._check_chunk(file)
        self._done = set(chunks)

    def _damaged(self, what: str) -> BadInputError:
        return BadInputError(f"report {self.path}: {what}; delete {self.partial} to start over.")

    def _check_settings(self) -> None:
        """BadInputError naming each setting (and columns) that differs from the unfinished report's."""
        try:
            document = json.loads(self._settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise self._damaged(f"{self._settings_file} is missing or unreadable ({exc})") from None
        if not isinstance(document, dict) or document.get("schema") != PARTIAL_SCHEMA:
            raise self._damaged(f"{self._settings_file} is not a partial report of this percept version")
        old, new = _flatten(document.get("settings")), _flatten(self.settings)
        keys = list(new) + [k for k in old if k not in new]
        differ = [k for k in keys if old.get(k, "(not set)") != new.get(k, "(not set)")]
        shown = [f"{k} ({_short(old.get(k, '(not set)'))} then, {_short(new.get(k, '(not set)'))} now)"
                 for k in differ]
        if document.get("columns") != self.columns:
            shown.append("columns")
        if shown:
            raise BadInputError(f"report {self.path}: the unfinished report in {self.partial} was made with "
                                f"other settings: {'; '.join(shown)}. Rerun with the same settings, or delete "
                                "that folder to start over.")

    def _check_chunk(self, file: Path) -> None:
        """A chunk must be a readable Parquet file with this report's columns."""
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(file).names
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged file
            raise self._damaged(f"chunk {file} is unreadable ({exc})") from None
        if names != self.columns:
            raise self._damaged(f"chunk {file} has columns {names}, expected {self.columns}")

    def _scan(self) -> dict[int, Path]:
        """Completed chunk files by number (temporary files of writes in flight are not chunks)."""
        found = {}
        for file in self.partial.iterdir():
            match = _CHUNK.match(file.name)
            if match:
                found[int(match.group(1))] = file
        return dict(sorted(found.items()))

    def _chunk_file(self, chunk: int) -> Path:
        return self.partial / f"chunk-{chunk:06d}.parquet"

    def done(self) -> set[int]:
        """Numbers of the chunks already written (by this run or the interrupted one it resumes)."""
        return set(self._done)

    def write(self, chunk: int, rows: Mapping[str, Sequence[Any]]) -> Path:
        """Write chunk number ``chunk`` (>= 0) atomically; ``rows`` maps every column to its values.

        Raises:
            ValueError: a negative chunk number, columns other than the report's, or columns of
                different lengths.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        chunk = int(chunk)
        if chunk < 0:
            raise ValueError(f"ChunkedReport.write: chunk number {chunk} < 0.")
        if set(rows) != set(self.columns):
            raise ValueError(f"ChunkedReport.write: columns {sorted(rows)} differ from the report's {self.columns}.")
        lengths = {c: len(rows[c]) for c in self.columns}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"ChunkedReport.write: columns of different lengths {lengths}.")
        table = pa.table({c: rows[c] for c in self.columns}) if self.columns else pa.table({})
        file = self._chunk_file(chunk)
        with atomic_path(file) as tmp:
            pq.write_table(table, tmp)
        self._done.add(chunk)
        return file

    def finish(self, expected: Optional[int] = None) -> Path:
        """Assemble every chunk, in chunk order, into the final file (atomically), then remove the
        partial folder. Chunks are read one at a time (Parquet: one row group per chunk).

        Args:
            expected: if given, chunks ``0..expected-1`` must all be there.

        Raises:
            BadInputError: missing chunks (with ``expected``) or a damaged chunk.
        """
        chunks = self._scan()
        if expected is not None:
            missing = sorted(set(range(int(expected))) - set(chunks))
            if missing:
                shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
                raise BadInputError(f"report {self.path}: {len(missing)} of {expected} chunks are not written "
                                    f"yet ({shown}).")
        files = list(chunks.values())
        with atomic_path(self.path) as tmp:
            if self.format == "parquet":
                self._assemble_parquet(files, tmp)
            else:
                _write_text(tmp, self.format, self.columns, self._stream_rows(files))
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.path

    def _read_chunk(self, file: Path):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(file).select(self.columns)
        except Exception as exc:  # ArrowInvalid, OSError, KeyError for a damaged or foreign file
            raise self._damaged(f"chunk {file} is unreadable ({exc})") from None

    def _stream_rows(self, files: Sequence[Path]) -> Iterator[dict]:
        for file in files:
            yield from _table_rows(self._read_chunk(file))

    def _assemble_parquet(self, files: Sequence[Path], tmp: Path) -> None:
        """One row group per chunk, under the schema the chunks agree on (a null-only column of one
        chunk takes the type of the others; ints met with floats become floats)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schemas = []
        for file in files:
            try:
                schemas.append(pq.read_schema(file))
            except Exception as exc:
                raise self._damaged(f"chunk {file} is unreadable ({exc})") from None
        if schemas:
            try:
                schema = pa.unify_schemas(schemas, promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise self._damaged(f"the chunks disagree on column types ({exc})") from None
            schema = pa.schema([schema.field(c) for c in self.columns])
        else:
            schema = pa.schema([pa.field(c, pa.null()) for c in self.columns])
        with pq.ParquetWriter(tmp, schema) as writer:
            for file in files:
                writer.write_table(self._read_chunk(file).cast(schema))
