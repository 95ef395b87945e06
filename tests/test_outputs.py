"""Atomic, format-checked output files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from percept_cli.errors import BadInputError
from percept_cli.io.outputs import MATRIX_FORMATS, atomic_path, check_output_path, write_matrix, write_table


@pytest.mark.parametrize("suffix", MATRIX_FORMATS)
def test_matrix_roundtrip(tmp_path, suffix):
    matrix = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
    path = write_matrix(tmp_path / f"m{suffix}", matrix, ["r0", "r1"], ["c0", "c1", "c2"], {"model": "x"})
    if suffix == ".npy":
        np.testing.assert_allclose(np.load(path), matrix)
    elif suffix == ".csv":
        rows = list(csv.reader(open(path)))
        assert rows[0] == ["", "c0", "c1", "c2"] and rows[2][0] == "r1"
        np.testing.assert_allclose(np.array(rows[1][1:], dtype=float), matrix[0], rtol=1e-6)
    else:
        from safetensors import safe_open

        with safe_open(str(path), "np") as fh:
            np.testing.assert_allclose(fh.get_tensor("distance"), matrix)
            assert json.loads(fh.metadata()["cols"]) == ["c0", "c1", "c2"]
    assert [p.name for p in tmp_path.iterdir()] == [f"m{suffix}"]  # no temp file left behind


def test_failed_write_leaves_previous_file(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_table_formats(tmp_path):
    records = [{"a": "x.png", "b": "y.png", "distance": 0.25}]
    assert json.loads(write_table(tmp_path / "t.json", records).read_text()) == records
    rows = list(csv.DictReader(open(write_table(tmp_path / "t.csv", records))))
    assert rows[0]["distance"] == "0.25"


def test_output_checks(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    with pytest.raises(BadInputError, match="unsupported format"):
        check_output_path(tmp_path / "m.txt", MATRIX_FORMATS)
    with pytest.raises(BadInputError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "m.npy", MATRIX_FORMATS)
    with pytest.raises(BadInputError, match="one of the input files"):
        check_output_path(img, (".png",), [img])
