"""`percept distance` through Typer's test runner: modes, --json, --out, bad input, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from percept_cli.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def model_args(tiny_vit):
    return ["--model", str(tiny_vit[0]), "--device", "cpu"]


def test_pair_human_and_json(model_args, image_dir):
    a, b = image_dir / "a.png", image_dir / "b.png"
    human = run("distance", a, b, *model_args)
    assert human.exit_code == 0, human.output
    assert human.stdout.startswith("d = ")
    result = run("distance", a, b, *model_args, "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)  # exactly one JSON document, nothing else on stdout
    assert doc["mode"] == "pair" and len(doc["results"]) == 1
    assert doc["results"][0]["distance"] == pytest.approx(float(human.stdout.split("=")[1]), abs=1e-4)
    assert doc["model"]["kind"] == "local-dir" and doc["dtype"] == "fp32"


def test_rank_nearest_first(model_args, image_dir):
    result = run("distance", image_dir / "a.png", image_dir / "b.png", image_dir / "c.png", image_dir / "a.png",
                 *model_args, "--json")
    doc = json.loads(result.stdout)
    values = [r["distance"] for r in doc["results"]]
    assert values == sorted(values) and len(values) == 2  # the reference itself is not a candidate
    assert sorted(r["b"][-5:] for r in doc["results"]) == ["b.png", "c.png"]


def test_pairs_csv_to_out(model_args, image_dir, tmp_path):
    (image_dir / "pairs.csv").write_text("a,b\na.png,b.png\nb.png,c.png\n")
    out = tmp_path / "d.csv"
    result = run("distance", "--pairs", image_dir / "pairs.csv", "--out", out, *model_args)
    assert result.exit_code == 0, result.output
    assert "wrote 2 distances" in result.stdout
    assert out.read_text().splitlines()[0] == "a,b,distance"


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".safetensors"])
def test_matrix_out(model_args, image_dir, tmp_path, suffix):
    out = tmp_path / f"m{suffix}"
    result = run("distance", image_dir, image_dir, "--out", out, *model_args)
    assert result.exit_code == 0, result.output
    assert out.exists() and "5x5 distance matrix" in result.stdout
    if suffix == ".npy":
        m = np.load(out)
        assert m.shape == (5, 5) and np.allclose(np.diag(m), 0, atol=1e-5) and np.allclose(m, m.T, atol=1e-5)


def test_matrix_json_and_table(model_args, image_dir):
    doc = json.loads(run("distance", image_dir, *model_args, "--json").stdout)
    assert doc["shape"] == [5, 5] and len(doc["matrix"]) == 5 and doc["rows"][0] == "a.png"
    table = run("distance", image_dir, *model_args)
    assert table.exit_code == 0 and "e.png" in table.stdout


def test_bad_file_stops_before_work_and_skip_bad(model_args, image_dir, tmp_path):
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "m.npy"
    result = run("distance", image_dir, "--out", out, *model_args)
    assert result.exit_code == 2
    assert "broken.png" in result.stderr and "--skip-bad" in result.stderr
    assert "Traceback" not in result.output and not out.exists()
    skipped = run("distance", image_dir, "--out", out, "--skip-bad", *model_args, "--json")
    assert skipped.exit_code == 0, skipped.output
    doc = json.loads(skipped.stdout)
    assert doc["shape"] == [5, 5] and doc["skipped"][0]["path"].endswith("broken.png")
    assert "skipped" in skipped.stderr


@pytest.mark.parametrize("make", [
    lambda d: d / "missing.png",
    lambda d: (d / "t.txt").write_text("text") and d / "t.txt",
    lambda d: Image.new("RGB", (1, 1)).save(d / "dot.png") or d / "dot.png",
])
def test_bad_images_exit_2_one_line(model_args, image_dir, make):
    bad = make(image_dir)
    result = run("distance", image_dir / "a.png", bad, *model_args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and bad.name in lines[0]
    assert result.stdout == ""


def test_unknown_model_exit_2(image_dir):
    result = run("distance", image_dir / "a.png", image_dir / "b.png", "--model", "rclip-f-convnxt")
    assert result.exit_code == 2 and "unknown model" in result.stderr and "Traceback" not in result.output


def test_uncached_model_exit_3(empty_offline_hub, image_dir):
    result = run("distance", image_dir / "a.png", image_dir / "b.png", "--device", "cpu")
    assert result.exit_code == 3
    assert "not in the local Hugging Face cache" in result.stderr and "Traceback" not in result.output


def test_bad_options_exit_2(model_args, image_dir, tmp_path):
    a, b = image_dir / "a.png", image_dir / "b.png"
    assert run("distance", a, b, "--model", str(model_args[1]), "--device", "tpu").exit_code == 2
    assert run("distance", a, b, *model_args, "--dtype", "int4").exit_code == 2
    assert run("distance", a, b, *model_args, "--batch-size", "0").exit_code == 2
    assert run("distance", image_dir, *model_args, "--out", tmp_path / "m.txt").exit_code == 2
    assert run("distance", a, b, *model_args, "--out", a).exit_code == 2  # never overwrite an input
    assert run("distance", a, "--pairs", tmp_path / "p.csv", *model_args).exit_code == 2


def test_large_matrix_needs_out(model_args, tmp_path):
    from conftest import make_picture

    for i in range(41):
        make_picture(i, (16, 16)).save(tmp_path / f"{i:02d}.png")
    result = run("distance", tmp_path, tmp_path, *model_args)
    assert result.exit_code == 2 and "too large to print" in result.stderr


def test_zoo_model_from_offline_cache(offline_hub, image_dir):
    result = run("distance", image_dir / "a.png", image_dir / "b.png", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["model"]["zoo"] == "rclip-f-convnext-b" and len(doc["model"]["revision"]) == 40


def test_resize_and_crop_overrides_change_what_the_model_sees(model_args, image_dir, tiny_vit):
    from percept_cli import load_metric

    a, b = image_dir / "a.png", image_dir / "b.png"  # 96x64 pictures: the geometry matters
    size = load_metric(str(tiny_vit[0]), device="cpu").image_size
    default = json.loads(run("distance", a, b, *model_args, "--json").stdout)
    wider = run("distance", a, b, *model_args, "--resize", size + 16, "--json")
    assert wider.exit_code == 0, wider.output
    doc = json.loads(wider.stdout)
    assert doc["preprocess"] == {"resize": size + 16, "crop": size, "interpolation": "bicubic"}
    expected = float(load_metric(str(tiny_vit[0]), device="cpu", resize=size + 16).distance(str(a), str(b))[0])
    assert doc["results"][0]["distance"] == pytest.approx(expected, abs=1e-5)
    assert doc["results"][0]["distance"] != pytest.approx(default["results"][0]["distance"], abs=1e-6)
    squash = json.loads(run("distance", a, b, *model_args, "--crop", "none", "--json").stdout)
    assert squash["preprocess"]["crop"] is None and squash["preprocess"]["resize"] == size


@pytest.mark.parametrize("options", [["--crop", "big"], ["--resize", "8", "--crop", "32"], ["--pooling", "mean"]])
def test_bad_geometry_options_exit_2(model_args, image_dir, options):
    result = run("distance", image_dir / "a.png", image_dir / "b.png", *model_args, *options)
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1


def test_rank_top_threshold_and_overlapping_inputs(model_args, image_dir):
    ref = image_dir / "a.png"
    full = json.loads(run("distance", ref, image_dir, image_dir / "c.png", *model_args, "--json").stdout)["results"]
    assert sorted(r["b"][-5:] for r in full) == ["b.png", "c.png", "d.png", "e.png"]  # each once, no reference
    top = json.loads(run("distance", ref, image_dir, *model_args, "--top", "2", "--json").stdout)["results"]
    assert [(r["rank"], r["b"]) for r in top] == [(r["rank"], r["b"]) for r in full[:2]]
    cut = (full[0]["distance"] + full[1]["distance"]) / 2
    near = run("distance", ref, image_dir, *model_args, "--threshold", f"{cut:.6f}")
    assert near.exit_code == 0, near.output
    assert full[0]["b"] in near.stdout and full[1]["b"] not in near.stdout
    none = run("distance", ref, image_dir, *model_args, "--threshold", "0")
    assert none.exit_code == 0 and "no candidate" in none.stdout
    for bad in (["--top", "0"], ["--threshold", "-0.1"]):
        assert run("distance", ref, image_dir, *model_args, *bad).exit_code == 2
    wrong_mode = run("distance", ref, image_dir / "b.png", *model_args, "--top", "1")
    assert wrong_mode.exit_code == 2 and "ranking" in wrong_mode.output


def test_identical_pair_prints_zero_not_minus_zero(model_args, image_dir):
    result = run("distance", image_dir / "a.png", image_dir / "a.png", *model_args, "--json")
    assert json.loads(result.stdout)["results"][0]["distance"] == 0.0
