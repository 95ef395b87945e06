"""retrieval/reports.py: chunked, resumable, atomic reports in .parquet/.csv/.jsonl; one-shot writes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from percept_cli.errors import BadInputError
from percept_cli.retrieval import reports
from percept_cli.retrieval.reports import ChunkedReport, partial_folder, report_format, write_rows

COLUMNS = ["key", "sim", "flag", "label"]
SETTINGS = {"threshold": 0.8, "model": {"name": "tiny", "sha": "abc"}, "sources": ["a", "b"]}
FORMATS = ["parquet", "csv", "jsonl"]


def chunk_rows(number: int, size: int) -> dict[str, list]:
    """Distinct rows for chunk ``number``; chunk 1 has a label column that is all missing."""
    rng = np.random.default_rng(number)
    return {
        "key": [f"/pool/{number}/{i}.png" for i in range(size)],
        "sim": rng.random(size).tolist(),
        "flag": [bool(v) for v in rng.integers(0, 2, size)],
        "label": [None] * size if number == 1 else [f"c{(number + i) % 3}" for i in range(size)],
    }


def as_records(rows: dict[str, list]) -> list[dict]:
    return [dict(zip(rows, values)) for values in zip(*rows.values())]


def read_back(path, fmt) -> list[dict]:
    """The report's rows, read with pyarrow / csv / json; csv cells converted back by hand."""
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        return [{"key": r["key"], "sim": float(r["sim"]), "flag": {"true": True, "false": False}[r["flag"]],
                 "label": r["label"] or None} for r in reader]


def listing(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_crash_resume_finish_gives_rows_in_chunk_order(tmp_path, fmt):
    out = tmp_path / f"report.{fmt}"
    sizes = {0: 3, 1: 2, 2: 4, 3: 1}
    first = ChunkedReport(out, COLUMNS, resume=False, settings=SETTINGS)
    assert first.done() == set()
    for number in (2, 0, 3):  # out of order, as parallel workers would
        first.write(number, chunk_rows(number, sizes[number]))
    assert first.done() == {0, 2, 3}
    del first  # the process dies here: no finish
    assert not out.exists()
    assert listing(tmp_path) == {out.name + ".partial"}  # nothing under the user's name, no temp files

    with pytest.raises(BadInputError, match="unfinished report") as info:
        ChunkedReport(out, COLUMNS, resume=False, settings=SETTINGS)
    assert "--resume" in info.value.option_hints and str(partial_folder(out)) in str(info.value)

    second = ChunkedReport(out, COLUMNS, resume=True, settings=json.loads(json.dumps(SETTINGS)))
    assert second.done() == {0, 2, 3}
    second.write(1, chunk_rows(1, sizes[1]))
    assert not out.exists()
    assert second.finish(expected=4) == out
    assert listing(tmp_path) == {out.name}  # the partial folder is gone

    expected = [row for number in range(4) for row in as_records(chunk_rows(number, sizes[number]))]
    got = read_back(out, fmt)
    assert got == expected
    if fmt == "parquet":
        assert pq.read_table(out).schema.field("label").type == "string"  # the null-only chunk unified
        assert pq.ParquetFile(out).num_row_groups == 4


def test_settings_and_columns_mismatch_refused(tmp_path):
    out = tmp_path / "r.parquet"
    ChunkedReport(out, COLUMNS, resume=False, settings=SETTINGS).write(0, chunk_rows(0, 2))
    other = {**SETTINGS, "threshold": 0.9, "new": 1}
    with pytest.raises(BadInputError) as info:
        ChunkedReport(out, COLUMNS, resume=True, settings=other)
    message = str(info.value)
    assert "threshold" in message and "new" in message and "model" not in message and "\n" not in message
    nested = {**SETTINGS, "model": {"name": "tiny", "sha": "def"}}
    with pytest.raises(BadInputError, match=r"model\.sha") as info:
        ChunkedReport(out, COLUMNS, resume=True, settings=nested)
    assert "model.name" not in str(info.value)
    with pytest.raises(BadInputError, match="columns"):
        ChunkedReport(out, ["key", "sim"], resume=True, settings=SETTINGS)
    # the refused runs left the unfinished report as it was
    assert ChunkedReport(out, COLUMNS, resume=True, settings=SETTINGS).done() == {0}


def test_crash_during_finish_keeps_old_file_and_chunks(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    out.write_text("old\n", encoding="utf-8")
    report = ChunkedReport(out, COLUMNS, resume=False, settings=SETTINGS)
    for number in range(3):
        report.write(number, chunk_rows(number, 2))
    calls = []
    real = ChunkedReport._read_chunk

    def dying(self, file):
        calls.append(file)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, file)

    monkeypatch.setattr(ChunkedReport, "_read_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        report.finish()
    assert out.read_text(encoding="utf-8") == "old\n"  # never half-written
    assert listing(tmp_path) == {out.name, out.name + ".partial"}  # no temporary file left behind
    monkeypatch.setattr(ChunkedReport, "_read_chunk", real)
    resumed = ChunkedReport(out, COLUMNS, resume=True, settings=SETTINGS)
    assert resumed.done() == {0, 1, 2}
    resumed.finish()
    assert len(read_back(out, "jsonl")) == 6


def test_finish_checks_expected_chunks_and_empty_report(tmp_path):
    out = tmp_path / "r.csv"
    report = ChunkedReport(out, COLUMNS, resume=False, settings=SETTINGS)
    report.write(0, chunk_rows(0, 1))
    with pytest.raises(BadInputError, match="1 of 2 chunks"):
        report.finish(expected=2)
    assert not out.exists()
    empty = tmp_path / "e.parquet"
    ChunkedReport(empty, COLUMNS, resume=True, settings={}).finish()  # resume with nothing to resume: fresh
    table = pq.read_table(empty)
    assert table.num_rows == 0 and table.column_names == COLUMNS


def test_damaged_chunk_and_temp_files(tmp_path):
    out = tmp_path / "r.parquet"
    report = ChunkedReport(out, COLUMNS, resume=False, settings=SETTINGS)
    report.write(0, chunk_rows(0, 2))
    folder = partial_folder(out)
    (folder / ".chunk-000001.parquet.0123456789ab.tmp").write_bytes(b"half")  # a write in flight
    assert ChunkedReport(out, COLUMNS, resume=True, settings=SETTINGS).done() == {0}
    (folder / "chunk-000002.parquet").write_bytes(b"not parquet")
    with pytest.raises(BadInputError, match="chunk-000002.parquet is unreadable"):
        ChunkedReport(out, COLUMNS, resume=True, settings=SETTINGS)


def test_write_refuses_wrong_rows(tmp_path):
    report = ChunkedReport(tmp_path / "r.csv", COLUMNS, resume=False, settings=SETTINGS)
    with pytest.raises(ValueError, match="columns"):
        report.write(0, {"key": ["a"]})
    with pytest.raises(ValueError, match="lengths"):
        report.write(0, {"key": ["a"], "sim": [1.0, 2.0], "flag": [True], "label": ["x"]})
    with pytest.raises(ValueError):
        report.write(-1, chunk_rows(0, 1))
    assert report.done() == set()


def test_formats_from_suffix(tmp_path):
    assert [report_format(f"x.{f}") for f in ("parquet", "CSV", "jsonl")] == ["parquet", "csv", "jsonl"]
    for bad in ("x.json", "x.txt", "x"):
        with pytest.raises(BadInputError, match="unsupported format"):
            report_format(bad)
    with pytest.raises(BadInputError):
        ChunkedReport(tmp_path / "r.xlsx", COLUMNS, resume=False, settings={})
    assert not (tmp_path / "r.xlsx.partial").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_rows_one_shot(tmp_path, fmt):
    out = tmp_path / f"rows.{fmt}"
    rows = [{"key": "a", "sim": 0.5, "flag": True, "label": "x"},
            {"key": "b", "sim": 0.25, "flag": False},  # label missing -> null
            {"key": "c", "sim": 1.0, "flag": True, "label": "y"}]
    assert write_rows(out, rows) == out
    assert read_back(out, fmt) == [{**r, "label": r.get("label")} for r in rows]
    assert listing(tmp_path) == {out.name}
    with pytest.raises(BadInputError):
        write_rows(tmp_path / "rows.tsv", rows)


def test_text_cells(tmp_path):
    out = tmp_path / "cells.jsonl"
    write_rows(out, [{"x": float("nan"), "y": [1, float("inf")], "z": {"a": None}}])
    assert json.loads(out.read_text(encoding="utf-8")) == {"x": None, "y": [1, None], "z": {"a": None}}
    assert reports._csv_cell([1, 2]) == "[1, 2]" and reports._csv_cell(None) == ""
