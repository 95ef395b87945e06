"""`percept attack` and `percept distance --robust` through Typer's test runner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from percept_cli import load_metric
from percept_cli.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def model_args(tiny_vit):
    return ["--model", str(tiny_vit[0]), "--device", "cpu", "--iters", "5"]


def _png_embedding(metric, path):
    """The metric's embedding of a saved 224x224 PNG, read straight from the file (no preprocessing)."""
    pixels = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        return metric.embed_pixels(pixels[None])[0]


def test_2afc_json_and_saved_png(model_args, image_dir, tmp_path, tiny_vit):
    out = tmp_path / "adv.png"
    result = run("attack", "2afc", "--ref", image_dir / "a.png", "--left", image_dir / "b.png",
                 "--right", image_dir / "c.png", "--eps", "8/255", "--out", out, "--json", *model_args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["label_source"] == "model's clean decision" and doc["clean_correct"] is True
    assert doc["threat"] == {"norm": "linf", "eps": pytest.approx(8 / 255), "eps_text": "8/255", "iters": 5,
                             "restarts": 1, "random_start": True, "seed": 0, "loss": "ce", "autocast": None,
                             "square_queries": 0, "square_p_init": None, "force": False}
    assert doc["fp32_checked"] is None and doc["fp32_rejected"] is None  # an fp32 attack needs no confirmation
    assert doc["clean"]["tie"] is False and doc["dtype"] == "fp32"
    assert doc["perturbation_norm"] <= 8 / 255 + 1e-6
    assert doc["flipped"] == (doc["clean"]["decision"] != doc["adversarial"]["decision"])
    saved = np.asarray(Image.open(out))
    assert saved.shape == (224, 224, 3) and saved.dtype == np.uint8
    assert doc["saved"]["in_ball"] is True
    # the verdict on the saved file is the one a reader of the PNG gets
    metric = load_metric(str(tiny_vit[0]), device="cpu")
    e_saved = _png_embedding(metric, out)
    e_left, e_right = metric.embed([str(image_dir / "b.png"), str(image_dir / "c.png")])
    sim_left, sim_right = float(e_saved @ e_left), float(e_saved @ e_right)
    assert doc["saved"]["sim_left"] == pytest.approx(sim_left, abs=1e-5)
    assert doc["saved"]["sim_right"] == pytest.approx(sim_right, abs=1e-5)
    chosen = "right" if sim_right > sim_left else "left"  # the paper authors' rule: a tie picks left
    assert doc["saved"]["still_broken"] is (chosen != doc["label"])


def test_embed_saved_distance_is_measured_on_the_png(model_args, image_dir, tmp_path, tiny_vit):
    out = tmp_path / "adv.png"
    result = run("attack", "embed", image_dir / "a.png", "--untargeted", "--eps", "8/255", "--out", out, "--json",
                 *model_args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    metric = load_metric(str(tiny_vit[0]), device="cpu")
    clean = metric.embed([str(image_dir / "a.png")])[0]
    assert doc["saved"]["in_ball"] is True
    assert doc["saved"]["distance"] == pytest.approx(1 - float(_png_embedding(metric, out) @ clean), abs=1e-5)
    assert doc["saved"]["distance"] > 0  # the rounded image still moved
    # an embedding attack has no loss choice and no Square Attack: those keys are not reported
    assert doc["threat"] == {"norm": "linf", "eps": pytest.approx(8 / 255), "eps_text": "8/255", "iters": 5,
                             "restarts": 1, "random_start": True, "seed": 0, "autocast": None, "force": False}


def test_2afc_given_label_and_human_output(model_args, image_dir):
    result = run("attack", "2afc", "--ref", image_dir / "a.png", "--left", image_dir / "b.png",
                 "--right", image_dir / "c.png", "--label", "right", "--norm", "l2", "--eps", "0.5", *model_args)
    assert result.exit_code == 0, result.output
    assert "label: right (given)" in result.stdout and "sim(ref, left)" in result.stdout


def test_embed_untargeted_and_targeted(model_args, image_dir):
    u = json.loads(run("attack", "embed", image_dir / "a.png", "--untargeted", "--json", *model_args).stdout)
    assert u["mode"] == "untargeted" and u["adv_distance"] > u["clean_distance"]
    t = run("attack", "embed", image_dir / "a.png", "--target", image_dir / "b.png", "--target", image_dir / "c.png",
            "--json", *model_args)
    doc = json.loads(t.stdout)
    assert doc["mode"] == "targeted" and len(doc["adv_distance_per_target"]) == 2
    assert doc["adv_distance"] < doc["clean_distance"]


@pytest.mark.parametrize("extra, message", [
    (["--eps", "0"], "positive"),
    (["--eps", "four"], "malformed eps"),
    (["--norm", "l1"], "unknown norm"),
    (["--dtype", "int8"], "unknown dtype"),
])
def test_bad_attack_options_exit_2(model_args, image_dir, tmp_path, extra, message):
    out = tmp_path / "adv.png"
    result = run("attack", "embed", image_dir / "a.png", "--untargeted", "--out", out, *extra, *model_args)
    assert result.exit_code == 2 and message in result.stderr
    assert not out.exists() and "Traceback" not in result.output


def test_embed_needs_exactly_one_mode(model_args, image_dir):
    neither = run("attack", "embed", image_dir / "a.png", *model_args)
    both = run("attack", "embed", image_dir / "a.png", "--untargeted", "--target", image_dir / "b.png", *model_args)
    assert neither.exit_code == both.exit_code == 2 and "at least one target" in neither.stderr


def test_unreadable_image_and_bad_out(model_args, image_dir, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = run("attack", "2afc", "--ref", tmp_path / "broken.png", "--left", image_dir / "b.png",
              "--right", image_dir / "c.png", *model_args)
    assert bad.exit_code == 2 and "broken.png" in bad.stderr
    wrong_out = run("attack", "embed", image_dir / "a.png", "--untargeted", "--out", tmp_path / "adv.jpg", *model_args)
    assert wrong_out.exit_code == 2 and "unsupported format" in wrong_out.stderr
    self_out = run("attack", "embed", image_dir / "a.png", "--untargeted", "--out", image_dir / "a.png", *model_args)
    assert self_out.exit_code == 2 and "refusing to overwrite" in self_out.stderr


def test_distance_robust_interval(model_args, image_dir):
    result = run("distance", image_dir / "a.png", image_dir / "b.png", "--robust", "2/255", "--json", *model_args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rec = doc["results"][0]
    assert rec["low"] <= rec["distance"] <= rec["high"] and rec["low"] < rec["high"]
    assert doc["robust"]["eps_text"] == "2/255" and "not a certificate" in doc["robust"]["note"]
    assert doc["robust"]["iters"] == 5 and doc["robust"]["autocast"] is None and "loss" not in doc["robust"]
    human = run("distance", image_dir / "a.png", image_dir / "b.png", "--robust", "2/255", *model_args)
    assert "under linf 2/255" in human.stdout and human.stdout.startswith("d = ")


def test_distance_robust_rank_and_matrix_refused(model_args, image_dir):
    ranked = run("distance", image_dir / "a.png", image_dir / "b.png", image_dir / "c.png", "--robust", "0.5",
                 "--norm", "l2", "--json", *model_args)
    assert ranked.exit_code == 0, ranked.output
    assert all(r["low"] <= r["distance"] <= r["high"] for r in json.loads(ranked.stdout)["results"])
    matrix = run("distance", image_dir, "--robust", "4/255", *model_args)
    assert matrix.exit_code == 2 and "not available for a distance matrix" in matrix.stderr


def test_embed_skip_bad_leaves_out_unreadable_targets(model_args, image_dir, tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    for name in ("b.png", "c.png"):
        (targets / name).write_bytes((image_dir / name).read_bytes())
    (targets / "broken.png").write_bytes(b"not an image")
    base = ["attack", "embed", image_dir / "a.png", "--eps", "8/255", "--json", *model_args]
    refused = run(*base, "--target", targets)
    assert refused.exit_code == 2 and "broken.png" in refused.output
    skipped = run(*base, "--target", targets, "--skip-bad")
    assert skipped.exit_code == 0, skipped.output
    doc = json.loads(skipped.stdout)
    assert [s["path"] for s in doc["skipped"]] == [str(targets / "broken.png")]
    assert doc["targets"] == [str(targets / "b.png"), str(targets / "c.png")]
    # the same attack as one given only the readable targets (same seed): skipping is leaving out, nothing else
    explicit = json.loads(run(*base, "--target", targets / "b.png", "--target", targets / "c.png").stdout)
    assert doc["adv_distance"] == pytest.approx(explicit["adv_distance"], abs=1e-6)
    assert doc["clean_distance"] == pytest.approx(explicit["clean_distance"], abs=1e-6)


def test_skip_bad_with_nothing_usable_exits_2_before_model_work(image_dir, tmp_path, empty_offline_hub):
    # the default model is not cached: loading it would exit 3
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    only_bad = tmp_path / "bad_targets"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"garbage")
    cases = [
        (["embed", image_dir / "a.png", "--target", only_bad], "none of the 1 target"),
        (["embed", broken, "--target", image_dir / "b.png"], "broken.png"),
        (["2afc", "--ref", broken, "--left", image_dir / "b.png", "--right", image_dir / "c.png"], "broken.png"),
    ]
    for args, message in cases:
        result = run("attack", *args, "--skip-bad", "--device", "cpu")
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output
