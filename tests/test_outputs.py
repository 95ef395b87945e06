"""Atomic, format-checked output files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from percept_cli.errors import BadInputError
from percept_cli.io.outputs import (MATRIX_FORMATS, OutputNotWrittenError, OutputWrites, atomic_path,
                                    check_output_path, check_outputs, model_folder_names, output_file, output_folder,
                                    save_png, write_matrix, write_table)


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
    assert f"m{suffix}" in {p.name for p in tmp_path.iterdir()}
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


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
    with pytest.raises(BadInputError, match="is the input file"):
        check_output_path(img, (".png",), [img])


def test_an_output_that_resolves_to_an_input_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    csv_in = data / "in.csv"
    csv_in.write_text("a,b\n")
    (tmp_path / "link.csv").symlink_to(csv_in)
    os.link(csv_in, tmp_path / "hard.csv")
    for alias in (tmp_path / "link.csv", data / "sub" / ".." / "in.csv", tmp_path / "hard.csv"):
        with pytest.raises(BadInputError, match="is the input file"):
            check_outputs([output_file("--out", alias)], inputs=[csv_in])
    (tmp_path / "link-dir").symlink_to(data / "sub")
    for inside in (data / "new.json", data / "sub" / "new.json", tmp_path / "link-dir" / "new.json"):
        with pytest.raises(BadInputError, match="inside the input folder"):
            check_outputs([output_file("--out", inside)], input_dirs=[data])
    with pytest.raises(BadInputError, match="inside the input folder"):
        check_outputs([output_folder("--save-adv", data / "adv" / "model")], input_dirs=[data])
    check_outputs([output_file("--out", tmp_path / "new.json")], inputs=[csv_in], input_dirs=[data])  # allowed
    assert sorted(p.name for p in data.iterdir()) == ["in.csv", "sub"] and csv_in.read_text() == "a,b\n"


def test_two_outputs_on_one_path_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(BadInputError, match="--plot .* also the path given to --out"):
        check_outputs([output_file("--out", tmp_path / "r.png"), output_file("--plot", tmp_path / "x" / ".." / "r.png")])


def test_an_unwritable_folder_is_refused_before_work(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
        folder = Path("/proc")  # running as root: permissions do not stop us, /proc does
    except OSError:
        pass
    with pytest.raises(BadInputError, match="cannot write in"):
        check_outputs([output_file("--out", folder / "r.json")])
    with pytest.raises(BadInputError, match="cannot write in"):
        check_outputs([output_folder("--save-adv", folder / "adv" / "model")])
    check_outputs([output_folder("--save-adv", tmp_path / "new" / "deeper")])  # created later: fine
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_are_created_with_the_umask(tmp_path, umask):
    import torch

    old = os.umask(umask)
    try:
        paths = [write_table(tmp_path / "t.json", [{"a": 1}]), save_png(tmp_path / "x.png", torch.zeros(3, 4, 4)),
                 write_matrix(tmp_path / "m.csv", np.zeros((1, 1)), ["r"], ["c"])]
    finally:
        os.umask(old)
    for path in paths:  # as open(path, "w") would: 0666 without the umask's bits
        assert path.stat().st_mode & 0o777 == {0o022: 0o644, 0o077: 0o600, 0o002: 0o664}[umask]


def test_failed_writes_are_collected_then_raised():
    writes = OutputWrites()

    def full():
        raise OSError(28, "No space left on device")

    assert writes.attempt("--out", "r.json", lambda: "r.json") == "r.json"
    assert writes.attempt("--plot", "c.png", full) is None
    assert writes.attempt("--plot", "c.png", full) is None  # reported once
    assert writes.failures == [{"option": "--plot", "path": "c.png", "reason": "No space left on device"}]
    with pytest.raises(OutputNotWrittenError, match="could not write --plot c.png \\(No space left on device\\)"):
        writes.raise_if_failed()
    OutputWrites().raise_if_failed()  # nothing failed: no error


def test_model_folder_names_are_distinct_and_file_safe():
    names = model_folder_names(["clip-vit-b-16", "hf-hub:Org/Name@v1", "/runs/a/final", "/runs/b/final",
                                "Clip-ViT-B-16", "clip-vit-b-16"])
    assert names == {"clip-vit-b-16": "clip-vit-b-16", "hf-hub:Org/Name@v1": "hf-hub-org-name-v1",
                     "/runs/a/final": "runs-a-final", "/runs/b/final": "runs-b-final",
                     "Clip-ViT-B-16": "clip-vit-b-16-2"}
