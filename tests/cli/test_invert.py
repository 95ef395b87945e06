"""`percept invert` through Typer's test runner: files written as reported, bad input exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from percept_cli.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def model_args(tiny_vit):
    return ["--model", str(tiny_vit[0]), "--device", "cpu", "--iters", "6"]


def test_image_inversion_writes_reported_files(model_args, image_dir, tmp_path):
    out = tmp_path / "inv"
    result = run("invert", "--image", image_dir / "a.png", "--seeds", "0,1", "--grid", "--save-every", "3",
                 "--judge", model_args[1], "--out", out, "--json", *model_args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [o["seed"] for o in doc["outputs"]] == [0, 1]
    for o in doc["outputs"]:
        img = Image.open(o["path"])
        assert img.size == (224, 224) and img.mode == "RGB"
        assert -1 <= o["similarity"] <= 1 and o["judge_similarity"] == pytest.approx(o["similarity"], abs=1e-4)
    assert Path(doc["grid"]).exists() and Image.open(doc["grid"]).size == (3 * (224 + 6) + 6, 224 + 22 + 12)
    assert len(doc["intermediate"]) == 4 and all(Path(p).exists() for p in doc["intermediate"])
    assert sorted(p.name for p in out.glob("*.png")) == ["a_grid.png", "a_seed0.png", "a_seed1.png"]


def test_text_inversion_human_output(model_args, tmp_path):
    result = run("invert", "--text", "a painting of a sunflower", "--out", tmp_path, "--size", "64", *model_args)
    assert result.exit_code == 0, result.output
    assert "a-painting-of-a-sunflower_seed0.png" in result.stdout
    assert Image.open(tmp_path / "a-painting-of-a-sunflower_seed0.png").size == (64, 64)


@pytest.mark.parametrize("args, message", [
    (["--text", "  "], "--text is empty"),
    ([], "exactly one target"),
    (["--text", "x", "--radius", "0"], "must be positive"),
    (["--text", "x", "--seeds", "a,b"], "--seeds must be integers"),
    (["--text", "x", "--method", "dream"], "unknown inversion method"),
])
def test_bad_input_exit_2(model_args, tmp_path, args, message):
    result = run("invert", *args, "--out", tmp_path, *model_args)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_unreadable_image_and_vision_only_text(model_args, tmp_path, offline_hub):
    (tmp_path / "bad.png").write_text("nope")
    bad = run("invert", "--image", tmp_path / "bad.png", "--out", tmp_path, *model_args)
    assert bad.exit_code == 2 and "bad.png" in bad.stderr
    vision_only = run("invert", "--text", "a cat", "--model", "dino-vit-b16", "--device", "cpu", "--out", tmp_path)
    assert vision_only.exit_code == 2 and "no text tower" in vision_only.stderr
    zero_iters = run("invert", "--text", "a cat", "--iters", "0", "--out", tmp_path, "--model", model_args[1])
    assert zero_iters.exit_code == 2


def test_skip_bad_with_an_unreadable_image_exits_2_before_model_work(tmp_path, empty_offline_hub):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    # the default model is not cached: loading it would exit 3
    result = run("invert", "--image", broken, "--skip-bad", "--out", tmp_path / "inv", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "broken.png" in result.output and "nothing is left to invert" in result.output
    assert not (tmp_path / "inv").exists()


def test_similarities_printed_when_the_pngs_cannot_be_written(model_args, tmp_path, monkeypatch):
    import errno

    import percept_cli.io.outputs as outputs

    def disk_full(path, pixels):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "save_png", disk_full)
    out = tmp_path / "inv"
    result = run("invert", "--text", "a cat", "--seeds", "0,1", "--grid", "--out", out, "--json", *model_args)
    assert result.exit_code == 1
    doc, _ = json.JSONDecoder().raw_decode(result.stdout.lstrip())  # the document comes first
    assert [o["path"] for o in doc["outputs"]] == [None, None] and doc["grid"] is None
    assert all(-1 <= o["similarity"] <= 1 for o in doc["outputs"])
    assert [(f["option"], f["path"]) for f in doc["not_written"]] == [
        ("--out", str(out / "a-cat_seed0.png")), ("--out", str(out / "a-cat_seed1.png")),
        ("--grid", str(out / "a-cat_grid.png"))]
    assert f"could not write --out {out / 'a-cat_seed0.png'}" in result.stderr
