"""Evaluation engine: score formulas, agreement with a direct computation, robust bounds."""

from __future__ import annotations

import csv

import pytest
import synthetic_datasets as sd
import torch

from percept_cli import load_metric
from percept_cli.attacks import AttackSettings
from percept_cli.evaluation.datasets import load_dataset
from percept_cli.distributed import Dist
from percept_cli.evaluation.twoafc import EvalPlan, evaluate_model, score_2afc, score_odd_one_out, summarize


@pytest.fixture(scope="module")
def metric(tiny_vit):
    return load_metric(str(tiny_vit[0]), device="cpu")


def relabel_like_model(root, metric, flip_every: int = 0):
    """Rewrite NIGHTS labels to the model's own clean decisions (optionally flipping some)."""
    with open(root / "data.csv") as fh:
        rows = list(csv.DictReader(fh))
    test_rows = 0
    for row in rows:
        d = metric.distance(str(root / row["ref_path"]), [str(root / row["left_path"]), str(root / row["right_path"])])
        right = int(float(d[1]) < float(d[0]))
        if row["split"] == "test":
            if flip_every and test_rows % flip_every == 0:
                right = 1 - right
            test_rows += 1
        row.update(right_vote=right, left_vote=1 - right)
    with open(root / "data.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_score_formulas():
    assert score_2afc(0.1, 0.2, 0.3) == pytest.approx(0.7)  # left closer: agrees with the 70% who chose left
    assert score_2afc(0.2, 0.1, 0.3) == pytest.approx(0.3)
    assert score_2afc(0.2, 0.2, 0.9) == 0.5  # a tie scores one half, whatever people said
    assert score_2afc(0.1, 0.2, 1.0) == 0.0 and score_2afc(0.1, 0.2, 0.0) == 1.0
    assert score_odd_one_out(0.9, 0.5, 0.4) == 1.0 and score_odd_one_out(0.5, 0.9, 0.4) == 0.0
    assert score_odd_one_out(0.9, 0.9, 0.1) == 0.5 and score_odd_one_out(0.9, 0.9, 0.9) == pytest.approx(1 / 3)


def test_clean_score_equals_direct_computation(metric, tmp_path):
    root = sd.make_nights(tmp_path / "n", n=24)
    index = load_dataset("nights", root, "test")
    records = evaluate_model(metric, index, EvalPlan([], None, batch_size=5), {}, Dist())
    expected = []
    for t in index.items:
        e = metric.embed([t.ref, t.left, t.right])
        d0, d1 = 1 - float(e[0] @ e[1]), 1 - float(e[0] @ e[2])
        p = t.p_right
        expected.append((1 - p) if d0 < d1 else p if d1 < d0 else 0.5)
    summary = summarize(index, records, [])
    assert summary["overall"]["clean"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert summary["overall"]["n"] == len(index.items) == 12


def test_bapps_overall_is_mean_over_subsets(metric, tmp_path):
    root = sd.make_bapps(tmp_path / "b", subsets=("cnn",), n=2)
    sd.make_bapps(root, subsets=("color",), n=6)
    index = load_dataset("bapps", root)
    records = evaluate_model(metric, index, EvalPlan([], None), {}, Dist())
    summary = summarize(index, records, [])
    groups = summary["groups"]
    assert summary["overall"]["clean"] == pytest.approx((groups["cnn"]["clean"] + groups["color"]["clean"]) / 2)
    assert (groups["cnn"]["n"], groups["color"]["n"]) == (2, 6)


def test_robust_accuracy_bounded_by_clean_and_zero_at_huge_eps(metric, tmp_path):
    root = sd.make_nights(tmp_path / "n", n=32)
    relabel_like_model(root, metric, flip_every=4)
    index = load_dataset("nights", root, "test")
    plan = EvalPlan([0.05, 0.3, 1000.0], AttackSettings(norm="l2", iters=10), batch_size=4)
    records = evaluate_model(metric, index, plan, {}, Dist())
    overall = summarize(index, records, plan.radii)["overall"]
    robust = overall["robust"]
    assert overall["clean_binary"] == pytest.approx(0.75)  # every 4th label flipped against the model
    assert robust[0] <= overall["clean_binary"] and robust == sorted(robust, reverse=True)
    assert robust[-1] == 0.0 and robust[0] > 0.0
    for rec in records.values():
        if not rec["clean_correct"]:
            assert rec["robust_correct"] == [False, False, False]


def test_things_clean_equals_direct_computation(metric, tmp_path):
    index = load_dataset("things", sd.make_things(tmp_path / "t"))
    records = evaluate_model(metric, index, EvalPlan([], None), {}, Dist())
    for item in index.items:
        e = metric.embed(list(item.images))
        sims = [float(e[0] @ e[1]), float(e[0] @ e[2]), float(e[1] @ e[2])]
        assert records[item.id]["clean_score"] == (1.0 if sims[0] > max(sims[1:]) else 0.0)
