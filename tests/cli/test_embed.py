"""`percept embed`: each export format round-trips (rows = paths = the library's embeddings), --skip-bad,
bad input before any model work, parquet without pyarrow; the labels sidecar of `distance --out m.npy`."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from percept_cli.cli.app import app
from percept_cli.embeddings import read_embeddings, sidecar_path

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def model_args(tiny_vit):
    return ["--model", str(tiny_vit[0]), "--device", "cpu", "--batch-size", "2"]


@pytest.fixture(scope="module")
def tiny_metric(tiny_vit):
    from percept_cli import load_metric

    return load_metric(str(tiny_vit[0]), device="cpu")


@pytest.mark.parametrize("suffix", [".safetensors", ".npy", ".parquet"])
def test_round_trip_rows_match_paths_and_library(suffix, model_args, image_dir, tmp_path, tiny_metric):
    # the directory plus a file inside it again: listed once, in the directory's sorted order
    out = tmp_path / f"emb{suffix}"
    result = run("embed", image_dir, image_dir / "c.png", "--out", out, *model_args)
    assert result.exit_code == 0, result.output
    assert "wrote 5 embeddings" in result.stdout
    emb, paths, meta = read_embeddings(out)
    assert paths == [str(image_dir / f"{c}.png") for c in "abcde"]
    expected = tiny_metric.embed(paths)  # the library, file by file in the same order
    assert emb.shape == expected.shape and torch.allclose(emb, expected, atol=1e-5)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert meta["model"]["kind"] == "local-dir" and meta["preprocess"] == tiny_metric.preprocess.as_dict()
    if suffix == ".npy":  # the matrix alone is a plain .npy; the paths are beside it
        assert np.load(out).shape == (5, emb.shape[1])
        assert json.loads(sidecar_path(out).read_text())["paths"] == paths


def test_json_and_skip_bad(model_args, image_dir, tmp_path):
    (image_dir / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "emb.safetensors"
    refused = run("embed", image_dir, "--out", out, *model_args)
    assert refused.exit_code == 2 and "broken.png" in refused.output and not out.exists()
    result = run("embed", image_dir, "--out", out, "--skip-bad", "--json", *model_args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["n"] == 5 and [s["path"] for s in doc["skipped"]] == [str(image_dir / "broken.png")]
    _, paths, _ = read_embeddings(out)
    assert len(paths) == 5 and not any(p.endswith("broken.png") for p in paths)


def test_bad_files_listed_before_loading_the_model(image_dir, tmp_path, empty_offline_hub):
    # an uncached zoo model would fail with exit 3; exit 2 naming every bad file proves the check came first
    for name in ("x.png", "y.png", "z.png"):
        (image_dir / name).write_bytes(b"garbage")
    result = run("embed", image_dir, "--out", tmp_path / "e.npy", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert all(n in result.output for n in ("x.png", "y.png", "z.png")) and "3 unreadable" in result.output


@pytest.mark.parametrize("out_name,message", [("emb.txt", "unsupported format"), ("missing/emb.npy", "does not exist")])
def test_bad_out_refused(out_name, message, model_args, image_dir, tmp_path):
    before = (image_dir / "a.png").read_bytes()
    result = run("embed", image_dir, "--out", tmp_path / out_name, *model_args)
    assert result.exit_code == 2 and message in result.output
    assert (image_dir / "a.png").read_bytes() == before


def test_parquet_without_pyarrow_exits_2(model_args, image_dir, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    result = run("embed", image_dir, "--out", tmp_path / "e.parquet", *model_args)
    assert result.exit_code == 2 and "pip install pyarrow" in result.output
    assert not (tmp_path / "e.parquet").exists()


def test_distance_npy_matrix_has_labels_sidecar(model_args, image_dir, tmp_path):
    out = tmp_path / "m.npy"
    result = run("distance", image_dir, "--out", out, *model_args)
    assert result.exit_code == 0, result.output
    labels = json.loads((tmp_path / "m.npy.labels.json").read_text())
    names = [f"{c}.png" for c in "abcde"]
    assert labels["rows"] == names and labels["cols"] == names and np.load(out).shape == (5, 5)


def test_out_inside_a_source_folder_is_refused(tiny_vit, image_dir):
    result = runner.invoke(app, ["embed", str(image_dir), "--out", str(image_dir / "emb.safetensors"),
                                 "--model", str(tiny_vit[0]), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert not (image_dir / "emb.safetensors").exists()
