"""Evaluation engine: score formulas, agreement with a direct computation, robust bounds, 2AFC ties,
BAPPS protocol (binarised accuracy, bilinear upsampling), batch-independent random starts, each
image decoded once per run, results independent of the attack batch size."""

from __future__ import annotations

import csv
from dataclasses import replace

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
    assert summary["overall"]["clean_score"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert summary["overall"]["n"] == len(index.items) == 12


def test_bapps_overall_is_mean_over_subsets(metric, tmp_path):
    root = sd.make_bapps(tmp_path / "b", subsets=("cnn",), n=2)
    sd.make_bapps(root, subsets=("color",), n=6)
    index = load_dataset("bapps", root)
    records = evaluate_model(metric, index, EvalPlan([], None), {}, Dist())
    summary = summarize(index, records, [])
    groups = summary["groups"]
    assert summary["overall"]["clean"] == pytest.approx((groups["cnn"]["clean"] + groups["color"]["clean"]) / 2)
    assert summary["overall"]["clean_score"] == pytest.approx(
        (groups["cnn"]["clean_score"] + groups["color"]["clean_score"]) / 2)
    assert (groups["cnn"]["n"], groups["color"]["n"]) == (2, 6)


def test_robust_accuracy_bounded_by_clean_and_zero_at_huge_eps(metric, tmp_path):
    root = sd.make_nights(tmp_path / "n", n=32)
    relabel_like_model(root, metric, flip_every=4)
    index = load_dataset("nights", root, "test")
    plan = EvalPlan([0.05, 0.3, 1000.0], AttackSettings(norm="l2", iters=10), batch_size=4)
    records = evaluate_model(metric, index, plan, {}, Dist())
    overall = summarize(index, records, plan.radii)["overall"]
    robust = overall["robust"]
    assert overall["clean"] == pytest.approx(0.75)  # every 4th label flipped against the model
    assert robust[0] <= overall["clean"] and robust == sorted(robust, reverse=True)
    assert robust[-1] == 0.0 and robust[0] > 0.0
    broken_before_last = 0
    for rec in records.values():
        if not rec["clean_correct"]:
            assert rec["robust_correct"] == [False, False, False]
        rob, margin = rec["robust_correct"], rec["margin"]
        assert rob == sorted(rob, reverse=True)  # broken inside a small ball: broken inside every larger one
        k = rob.index(False)
        # survivors only: a triplet broken at radius k is not attacked again, its adversarial margin stays
        assert margin[k] <= 0 and margin[k:] == [margin[k]] * (len(rob) - k)
        broken_before_last += rec["clean_correct"] and k < len(rob) - 1
    assert broken_before_last > 0  # the property above was exercised by attacked triplets


def test_things_clean_equals_direct_computation(metric, tmp_path):
    index = load_dataset("things", sd.make_things(tmp_path / "t"))
    records = evaluate_model(metric, index, EvalPlan([], None), {}, Dist())
    for item in index.items:
        e = metric.embed(list(item.images))
        sims = [float(e[0] @ e[1]), float(e[0] @ e[2]), float(e[1] @ e[2])]
        assert records[item.id]["clean_score"] == (1.0 if sims[0] > max(sims[1:]) else 0.0)


def write_custom(root, rows):
    """custom CSV from rows of (ref seed, left seed, right seed, label); equal seeds = the same file."""
    from conftest import make_picture

    root.mkdir(parents=True, exist_ok=True)
    lines = ["ref,left,right,label"]
    for row in rows:
        for seed in row[:3]:
            if not (root / f"img{seed}.png").exists():
                make_picture(seed, (48, 48)).save(root / f"img{seed}.png")
        lines.append(",".join([f"img{seed}.png" for seed in row[:3]] + [str(row[3])]))
    (root / "triplets.csv").write_text("\n".join(lines) + "\n")
    return root / "triplets.csv"


def test_identical_candidates_are_a_tie_that_picks_the_left_one(metric, tmp_path):
    # rows 1 and 3: both candidates are the same file, an exact tie (label right, then left);
    # row 2: the left candidate is the reference itself. A tie picks the left candidate (the authors' rule).
    rows = [(1, 2, 2, "right"), (3, 3, 4, "left"), (5, 6, 6, "left")]
    index = load_dataset("custom", write_custom(tmp_path / "c", rows))
    records = evaluate_model(metric, index, EvalPlan([], None), {}, Dist())
    tie_right, sure, tie_left = records["1"], records["2"], records["3"]
    assert tie_right["d_left"] == tie_right["d_right"] and tie_left["d_left"] == tie_left["d_right"]
    assert tie_right["clean_correct"] is False and tie_right["clean_score"] == 0.5
    assert tie_left["clean_correct"] is True and tie_left["clean_score"] == 0.5  # the score still halves a tie
    assert sure["clean_correct"] is True and sure["clean_score"] == 1.0
    summary = summarize(index, records, [])["overall"]
    assert summary["clean"] == pytest.approx(2 / 3) and summary["clean_score"] == pytest.approx(2 / 3)


def test_a_tie_cannot_be_broken_and_a_wrong_tie_is_never_attacked(metric, tmp_path):
    # identical candidates stay tied whatever the reference becomes: left wins a tie at every radius
    rows = [(1, 2, 2, "right"), (5, 6, 6, "left")]
    index = load_dataset("custom", write_custom(tmp_path / "c", rows))
    plan = EvalPlan([0.1, 50.0], AttackSettings(norm="l2", iters=2), batch_size=4)
    records = evaluate_model(metric, index, plan, {}, Dist())
    assert records["1"]["clean_correct"] is False and records["1"]["robust_correct"] == [False, False]
    assert records["2"]["clean_correct"] is True and records["2"]["robust_correct"] == [True, True]
    assert records["2"]["margin"] == [0.0, 0.0]


def test_attack_on_identical_candidates_follows_the_tie_rule(metric, tmp_path):
    from percept_cli.attacks.tasks import attack_2afc

    make = __import__("conftest").make_picture
    x = metric.pixels([make(5, (48, 48)), make(6, (48, 48))])
    settings = AttackSettings(norm="l2", eps=0.05, iters=2)
    right = attack_2afc(metric, x[:1], x[1:], x[1:], torch.tensor([1]), settings)
    assert not bool(right.clean_correct[0]) and not bool(right.robust_correct[0])  # a tie never picks right
    for label in (torch.tensor([0]), None):  # None: attack the model's own decision, which a tie makes "left"
        left = attack_2afc(metric, x[:1], x[1:], x[1:], label, settings)
        assert int(left.label[0]) == 0  # as the authors' pred = (sim_right > sim_left)
        assert bool(left.clean_correct[0]) and bool(left.robust_correct[0])  # no perturbation can untie them


class _ClampMetric:
    """A 2-d embedding [a(x), 1] with a = clamp(2 (0.75 - mean x), 0, 1): candidates [1,0] and [0,1] tie exactly
    once the attack has pushed the mean pixel below 0.25 (a = 1); clean (mean 0.5) the right one is nearer."""

    device = torch.device("cpu")

    def encoder(self, x):
        a = (2 * (0.75 - x.mean(dim=(1, 2, 3)))).clamp(0.0, 1.0)
        return torch.stack((a, torch.ones_like(a)), dim=-1)

    def embed_pixels(self, x, check=True):
        return torch.nn.functional.normalize(self.encoder(x), dim=-1)


def test_attack_that_reaches_an_exact_tie_has_broken_the_decision():
    from percept_cli.attacks.tasks import attack_2afc_embedded

    clamp = _ClampMetric()
    ref = torch.full((1, 3, 8, 8), 0.5)
    left, right = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    report = attack_2afc_embedded(clamp, ref, left, right, torch.tensor([1]),
                                  AttackSettings(norm="linf", eps=0.3, iters=3, random_start=False))
    assert bool(report.clean_correct[0])
    assert float(report.adv_similarity[0, 0]) == float(report.adv_similarity[0, 1])  # the attack reached a tie
    assert not bool(report.robust_correct[0]) and float(report.margin[0]) == 0.0


def test_nights_vote_counts_give_fraction_scores(metric, tmp_path):
    rows = [{"id": 0, "left_vote": 1, "right_vote": 5, "votes": 6}, {"id": 1, "left_vote": 5, "right_vote": 1,
                                                                      "votes": 6},
            {"id": 2, "left_vote": 2, "right_vote": 4, "votes": 6}]
    root = sd.make_nights(tmp_path / "n", rows)
    index = load_dataset("nights", root, "test")
    records = evaluate_model(metric, index, EvalPlan([], None), {}, Dist())
    for row, p in zip(rows, (5 / 6, 1 / 6, 4 / 6)):  # fraction of the people who chose the right candidate
        t = index.items[row["id"]]
        d = metric.distance(t.ref, [t.left, t.right])
        expected = (1 - p) if float(d[0]) < float(d[1]) else p
        assert 0.0 <= records[str(row["id"])]["clean_score"] <= 1.0
        assert records[str(row["id"])]["clean_score"] == pytest.approx(expected, abs=1e-6)


def test_bapps_binarised_accuracy_by_hand(metric, tmp_path):
    # a candidate with the reference's own picture is the nearer one; judgement = fraction choosing p1
    root = sd.make_bapps_triplets(tmp_path / "b", "cnn", [
        ("000000", 10, 10, 11, 0.3),   # model: p0; majority p0 (0.3)   -> correct, score 0.7
        ("000001", 12, 13, 12, 0.8),   # model: p1; majority p1 (0.8)   -> correct, score 0.8
        ("000002", 14, 14, 15, 0.6),   # model: p0; majority p1 (0.6)   -> wrong,   score 0.4
        ("000003", 16, 17, 16, 0.5)])  # model: p1; 0.5 is no majority for p1 -> wrong, score 0.5
    sd.make_bapps_triplets(root, "color", [
        ("000000", 20, 21, 20, 0.9),   # model: p1; majority p1 -> correct, score 0.9
        ("000001", 22, 22, 23, 0.0)])  # model: p0; majority p0 -> correct, score 1.0
    index = load_dataset("bapps", root)
    summary = summarize(index, evaluate_model(metric, index, EvalPlan([], None), {}, Dist()), [])
    cnn, color = summary["groups"]["cnn"], summary["groups"]["color"]
    assert (cnn["clean"], cnn["clean_score"]) == (pytest.approx(2 / 4), pytest.approx((0.7 + 0.8 + 0.4 + 0.5) / 4))
    assert (color["clean"], color["clean_score"]) == (pytest.approx(1.0), pytest.approx(0.95))
    # overall = mean over the subsets (0.75), not over the 6 triplets (4/6)
    assert summary["overall"]["clean"] == pytest.approx(0.75)
    assert summary["overall"]["clean_score"] == pytest.approx((0.6 + 0.95) / 2)
    assert summary["overall"]["n"] == 6


def test_bapps_paper_protocol_upsamples_like_torchvision_resize(metric, tmp_path, monkeypatch):
    from PIL import Image
    from torchvision import transforms

    from percept_cli.evaluation import twoafc

    root = sd.make_bapps(tmp_path / "b", subsets=("cnn",), n=3)
    index = load_dataset("bapps", root)
    reference = transforms.Compose([transforms.Resize(metric.image_size), transforms.ToTensor()])  # bilinear

    def torchvision_pixels(paths):
        return torch.stack([reference(Image.open(p).convert("RGB")) for p in paths])

    attacked = []
    real = twoafc.attack_2afc_embedded
    monkeypatch.setattr(twoafc, "attack_2afc_embedded",
                        lambda m, ref, *a, **k: attacked.append(ref) or real(m, ref, *a, **k))
    plan = EvalPlan([0.01], AttackSettings(norm="l2", iters=1), batch_size=8)
    paper = evaluate_model(metric, index, plan, {}, Dist())
    native = evaluate_model(metric, index, EvalPlan([], None, protocol="native"), {}, Dist())
    for t in index.items:
        e = metric.embed_pixels(torchvision_pixels([t.ref, t.left, t.right]))
        d = [1 - float(e[0] @ e[1]), 1 - float(e[0] @ e[2])]
        assert [paper[t.id]["d_left"], paper[t.id]["d_right"]] == pytest.approx(d, abs=1e-6)
        own = metric.embed([t.ref, t.left, t.right])  # the model's own (bicubic) preprocessing
        assert native[t.id]["d_left"] == pytest.approx(1 - float(own[0] @ own[1]), abs=1e-6)
    assert max(abs(paper[t.id]["d_left"] - native[t.id]["d_left"]) for t in index.items) > 1e-4
    targets = [t for t in index.items if paper[t.id]["clean_correct"]]
    assert targets and torch.equal(attacked[0].cpu(), torchvision_pixels([t.ref for t in targets]))


def test_random_starts_depend_on_the_triplet_not_on_the_batch(metric, tmp_path):
    # the same triplet three times (rows 1, 3, 5) among others; the left candidate is the reference itself
    rows = [(30, 30, 31, "left"), (32, 33, 32, "right"), (30, 30, 31, "left"), (34, 34, 35, "left"),
            (30, 30, 31, "left")]
    index = load_dataset("custom", write_custom(tmp_path / "c", rows))
    settings = AttackSettings(norm="linf", eps=2 / 255, iters=1)
    small, large = (evaluate_model(metric, index, EvalPlan([settings.eps], settings, batch_size=b), {}, Dist())
                    for b in (2, 3))
    margins = {key: small[key]["margin"][0] for key in small}
    twins = [margins[k] for k in ("1", "3", "5")]
    assert all(small[k]["robust_correct"] == [True] for k in ("1", "3", "5"))  # unbroken: margins show the starts
    # same images, different triplets: different random starts, so different adversarial margins
    assert min(abs(a - b) for a, b in [(twins[0], twins[1]), (twins[0], twins[2]), (twins[1], twins[2])]) > 5e-6
    for key in small:  # the batches of 2 and of 3 differ, each triplet's outcome does not
        assert large[key]["robust_correct"] == small[key]["robust_correct"]
        assert large[key]["margin"][0] == pytest.approx(margins[key], abs=1e-6)


TIE_ROWS = [(30, 30, 31, "left"), (32, 33, 32, "right"), (34, 34, 35, "left"), (30, 30, 31, "right")]


def test_fp32_confirmations_are_recorded_per_radius(metric, tmp_path, monkeypatch):
    from percept_cli.evaluation import twoafc

    real = twoafc.attack_2afc_embedded

    def flagging(*args, **kwargs):  # pretend: every attacked row needed a check, fp32 refused one where it held
        report = real(*args, **kwargs)
        report.fp32_checked = torch.ones_like(report.robust_correct)
        report.fp32_rejected = report.robust_correct.clone()
        return report

    index = load_dataset("custom", write_custom(tmp_path / "c", TIE_ROWS))  # the last one is wrong when clean
    plan = EvalPlan([0.5 / 255, 2 / 255], AttackSettings(norm="linf", iters=2), batch_size=8)
    plain = evaluate_model(metric, index, plan, {}, Dist())  # an fp32 attack: no confirmations, nothing counted
    assert all(r["fp32_checked"] is None and r["fp32_rejected"] is None for r in plain.values())
    assert "fp32_checked" not in summarize(index, plain, plan.radii)["overall"]
    monkeypatch.setattr(twoafc, "attack_2afc_embedded", flagging)
    records = evaluate_model(metric, index, plan, {}, Dist())
    for rec in records.values():  # radius r attacks the survivors of the smaller radii only
        if not rec["clean_correct"]:  # never attacked
            assert rec["fp32_checked"] is None and rec["fp32_rejected"] is None
            continue
        assert rec["fp32_checked"] == [all(rec["robust_correct"][:r]) for r in range(2)]
        assert rec["fp32_rejected"] == [all(rec["robust_correct"][:r + 1]) for r in range(2)]
    overall = summarize(index, records, plan.radii)["overall"]
    survivors = [round(v * overall["n_attacked"]) for v in overall["robust"]]
    assert overall["fp32_checked"] == [round(overall["clean"] * overall["n"]), survivors[0]]
    assert overall["fp32_rejected"] == survivors
    assert overall["fp32_rejected"][0] > overall["fp32_rejected"][1] > 0  # some held, some broken


def test_bf16_attack_records_its_fp32_confirmations(metric, tmp_path):
    index = load_dataset("custom", write_custom(tmp_path / "c", TIE_ROWS))
    settings = AttackSettings(norm="linf", iters=3, autocast_dtype="bf16")
    plan = EvalPlan([1 / 255, 16 / 255], settings, batch_size=8)
    records = evaluate_model(metric, index, plan, {}, Dist())
    overall = summarize(index, records, plan.radii)["overall"]
    for rec in records.values():
        if rec["clean_correct"]:  # attacked: one flag per radius; fp32 can only reject a claim it checked
            assert len(rec["fp32_checked"]) == len(rec["fp32_rejected"]) == 2
            assert all(c or not r for c, r in zip(rec["fp32_checked"], rec["fp32_rejected"]))
    assert overall["robust"][-1] < overall["clean"]  # 16/255 breaks some triplets ...
    assert len(overall["fp32_checked"]) == 2 and sum(overall["fp32_checked"]) > 0  # ... claims confirmed in fp32
    assert all(r <= c for c, r in zip(overall["fp32_checked"], overall["fp32_rejected"]))


def test_runner_reports_through_events_and_prints_nothing(metric, tmp_path, capfd):
    from percept_cli.evaluation import runner

    table = write_custom(tmp_path / "c", TIE_ROWS)
    out = tmp_path / "r.json"
    settings = AttackSettings(norm="l2", eps=0.05, iters=1)
    request = runner.EvalRequest("custom", table, models=["tiny", "tiny"], attack=settings, radii=[0.05], out=out,
                                 batch_size=2)
    job = runner.prepare(request)
    assert job.models == ["tiny"] and job.repeated == {"tiny": 2}
    events, loads = [], []
    record = runner.run(job, lambda name: loads.append(name) or metric, on_event=events.append)
    assert capfd.readouterr() == ("", "")  # the library never prints
    assert loads == ["tiny"] and list(record["models"]) == ["tiny"] and record["status"] == "complete"
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and set(kinds[1:-1]) == {"advanced"}
    # units of work: the 6 distinct images (img30 ... img35), then the clean-correct triplets, attacked with
    # running accuracies; the total announced counts every triplet to attack (correctness is not known yet)
    right = sum(t["clean_correct"] for t in record["models"]["tiny"]["triplets"])
    assert events[0].total == 6 + 4 and 0 < right < 4
    assert sum(e.done for e in events[1:-1] if e.robust is None) == 6
    assert sum(e.done for e in events[1:-1] if e.robust is not None) == right

    resumed = runner.prepare(replace(request, out=None, resume=out))  # a finished model is not evaluated again
    events.clear()
    runner.run(resumed, lambda name: pytest.fail("loaded a finished model"), on_event=events.append)
    assert [(e.kind, e.model) for e in events] == [("skipped", "tiny")]


@pytest.mark.parametrize("dataset, protocol, cache", [("nights", "paper", None), ("bapps", "paper", None),
                                                      ("bapps", "native", None), ("bapps", "paper", 0)],
                         ids=["nights", "bapps-bilinear", "bapps-native", "bapps-no-cache"])
def test_attack_pass_attacks_the_pixels_the_clean_pass_decoded(metric, tmp_path, monkeypatch, dataset, protocol,
                                                              cache):
    """Each image is decoded once per run; the attacked references are those very pixels, equal to
    ``metric.pixels`` of the files with the protocol's geometry. With no memory for them (cache 0) the
    references are decoded again through the DataLoader path, never one by one by ``metric.pixels``."""
    from collections import Counter

    from percept_cli import metric as metric_module
    from percept_cli.evaluation import twoafc
    from percept_cli.io import data

    if dataset == "nights":
        index = load_dataset("nights", sd.make_nights(tmp_path / "n", n=24), "test")
    else:
        index = load_dataset("bapps", sd.make_bapps(tmp_path / "b", n=5))
    by_loader, by_main = Counter(), Counter()
    real_read, real_attack = data.read_image, twoafc.attack_2afc_embedded
    monkeypatch.setattr(data, "read_image", lambda path: by_loader.update([str(path)]) or real_read(path))
    monkeypatch.setattr(metric_module, "read_image", lambda path: by_main.update([str(path)]) or real_read(path))
    monkeypatch.setattr(metric, "num_workers", 0)  # decode in this process, where the counters are
    attacked = []
    monkeypatch.setattr(twoafc, "attack_2afc_embedded",
                        lambda m, ref, *a, **k: attacked.append(ref.clone()) or real_attack(m, ref, *a, **k))
    plan = EvalPlan([0.01], AttackSettings(norm="l2", iters=1), batch_size=4, protocol=protocol, attack_batch_size=3,
                    **({} if cache is None else {"pixel_cache_bytes": cache}))
    records = evaluate_model(metric, index, plan, {}, Dist())
    refs = [t.ref for t in index.items if records[t.id]["clean_correct"]]
    batches = [3] * (len(refs) // 3) + ([len(refs) % 3] if len(refs) % 3 else [])
    assert len(refs) >= 3 and [len(x) for x in attacked] == batches  # cut by attack_batch_size, not batch_size
    again = Counter(refs) if cache == 0 else Counter()
    assert by_loader == Counter(index.distinct_images()) + again and not by_main
    expected = metric.pixels(refs, preprocess=twoafc.input_preprocess(metric, index, protocol))
    assert torch.equal(torch.cat(attacked), expected)


def test_attack_batch_size_does_not_change_any_result(metric, tmp_path, monkeypatch):
    from percept_cli.evaluation import twoafc

    index = load_dataset("nights", sd.make_nights(tmp_path / "n", n=24), "test")
    sizes, real = [], twoafc.attack_2afc_embedded
    monkeypatch.setattr(twoafc, "attack_2afc_embedded",
                        lambda m, ref, *a, **k: sizes.append(len(ref)) or real(m, ref, *a, **k))
    settings = AttackSettings(norm="linf", iters=2, restarts=2)
    runs = {}
    for size in (2, 5):
        sizes.clear()
        runs[size] = evaluate_model(metric, index, EvalPlan([1 / 255, 2 / 255], settings, batch_size=4,
                                                            attack_batch_size=size), {}, Dist())
        assert max(sizes) == size  # 5 clean-correct triplets: batches of 2, 2, 1, or one of 5
    for key, one in runs[2].items():  # decisions identical; margins up to float32 rounding of batched matmuls
        other = runs[5][key]
        assert {k: v for k, v in one.items() if k != "margin"} == {k: v for k, v in other.items() if k != "margin"}
        assert one["margin"] == pytest.approx(other["margin"], abs=1e-6)
    robust = [r["robust_correct"] for r in runs[2].values() if r["clean_correct"]]
    assert {r[0] for r in robust} == {True, False}  # at the smaller radius some held (attacked again), some broke
