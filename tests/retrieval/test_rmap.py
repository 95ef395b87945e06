"""Revisited Oxford/Paris mAP (percept_cli.retrieval.rmap): AP/mAP/mP@k against hand-computed and
brute-force values, the Easy/Medium/Hard list semantics, the restricted ground-truth unpickler, the
dataset layout, query cropping, and an end-to-end run on a tiny synthetic dataset with a tiny model."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_picture
from percept_cli.errors import BadInputError
from percept_cli.retrieval import rmap
from percept_cli.retrieval.rmap import (GroundTruth, compute_ap, compute_map, crop_query, dataset_files, evaluate,
                                        ground_truth_from_dict, load_ground_truth, positive_ranks)


def make_gt(n_db: int, easy, hard, junk, boxes=None) -> GroundTruth:
    """A GroundTruth built through the checked path, one query per entry of ``easy``."""
    nq = len(easy)
    boxes = boxes or [[0.0, 0.0, 10.0, 10.0]] * nq
    data = {"imlist": [f"db{i}" for i in range(n_db)], "qimlist": [f"q{i}" for i in range(nq)],
            "gnd": [{"bbx": boxes[q], "easy": list(easy[q]), "hard": list(hard[q]), "junk": list(junk[q])}
                    for q in range(nq)]}
    return ground_truth_from_dict(data)


# -- AP, positions, mP@k: hand-computed ---------------------------------------------------------------

def test_ap_removes_junk_before_scoring():
    ranking = np.array([3, 0, 5, 1, 2, 4])
    # positives 0 (position 1) and 1 (position 3); junk 5 sits at position 2, so 1 moves up to rank 2
    ranks = positive_ranks(ranking, np.array([0, 1]), np.array([5]))
    assert ranks.tolist() == [1, 2]
    # trapezoids: (0/1 + 1/2)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 1/8 + 7/24 = 5/12
    assert compute_ap(ranks, 2) == pytest.approx(5 / 12)
    # without removing the junk: (0 + 1/2)/4 + (1/3 + 1/2)/4 = 1/3
    assert compute_ap(positive_ranks(ranking, np.array([0, 1]), np.array([], dtype=int)), 2) == pytest.approx(1 / 3)


def test_ap_edge_values():
    assert compute_ap([0], 1) == pytest.approx(1.0)
    assert compute_ap([0, 1, 2], 3) == pytest.approx(1.0)
    assert compute_ap([0], 2) == pytest.approx(0.5)  # a positive never ranked counts as missed
    assert compute_ap([], 3) == 0.0
    # one positive at rank 3 (0-based): (0/3 + 1/4)/2 = 1/8
    assert compute_ap([3], 1) == pytest.approx(1 / 8)
    with pytest.raises(BadInputError, match="n_positives"):
        compute_ap([0, 1], 1)
    with pytest.raises(BadInputError, match="n_positives"):
        compute_ap([], 0)


def test_setups_use_the_right_lists_hand_computed():
    # one query: easy = {0}, hard = {1}, junk = {2}; database of 4; ranking 1, 2, 3, 0
    gt = make_gt(4, [[0]], [[1]], [[2]])
    ranks = np.array([[1, 2, 3, 0]])
    easy = compute_map(ranks, gt, "easy")       # positive 0; ignore 2 and 1 -> 0 at rank 1
    medium = compute_map(ranks, gt, "medium")   # positives 0, 1; ignore 2 -> ranks 0 and 2
    hard = compute_map(ranks, gt, "hard")       # positive 1; ignore 2 and 0 -> rank 0
    assert easy["map"] == pytest.approx(25.0)                     # (0 + 1/2)/2
    assert medium["map"] == pytest.approx(100 * 19 / 24)          # (1 + 1)/4 + (1/2 + 2/3)/4
    assert hard["map"] == pytest.approx(100.0)
    # mP@k: k' = min(k, last positive's 1-based rank)
    assert (easy["mp@1"], easy["mp@5"], easy["mp@10"]) == pytest.approx((0.0, 50.0, 50.0))
    assert (medium["mp@1"], medium["mp@5"], medium["mp@10"]) == pytest.approx((100.0, 200 / 3, 200 / 3))
    assert (hard["mp@1"], hard["mp@5"]) == pytest.approx((100.0, 100.0))
    assert easy["n_queries"] == medium["n_queries"] == hard["n_queries"] == 1
    # the same ranking from a similarity matrix, and evaluate() over all three setups
    sim = np.array([[0.1, 0.9, 0.8, 0.5]])
    assert compute_map(sim, gt, "medium")["map"] == pytest.approx(medium["map"])
    result = evaluate(sim, gt)
    assert set(result) == {"easy", "medium", "hard"}
    assert [result[s]["map"] for s in ("easy", "medium", "hard")] == pytest.approx([25.0, 100 * 19 / 24, 100.0])


def test_setup_lists():
    gt = make_gt(6, [[0, 1]], [[2]], [[3, 4]])
    (easy_pos, easy_ign), = gt.setup("easy")
    (med_pos, med_ign), = gt.setup("Medium")
    (hard_pos, hard_ign), = gt.setup("hard")
    assert easy_pos.tolist() == [0, 1] and easy_ign.tolist() == [2, 3, 4]
    assert med_pos.tolist() == [0, 1, 2] and med_ign.tolist() == [3, 4]
    assert hard_pos.tolist() == [2] and hard_ign.tolist() == [0, 1, 3, 4]
    with pytest.raises(BadInputError, match="setup"):
        gt.setup("extreme")


def _brute_force(ranking, positives, ignored, kappas):
    """AP and precisions by walking the ranking with ignored images filtered out (independent path)."""
    positives, ignored = set(positives), set(ignored) - set(positives)
    kept = [i for i in ranking if i not in ignored]
    ap, found, ranks = 0.0, 0, []
    for r, idx in enumerate(kept):
        if idx in positives:
            before = 1.0 if r == 0 else found / r
            found += 1
            ap += (before + found / (r + 1)) / 2 / len(positives)
            ranks.append(r + 1)
    precisions = []
    for k in kappas:
        cut = min(k, max(ranks))
        precisions.append(sum(1 for r in ranks if r <= cut) / cut)
    return ap, precisions


def test_map_matches_brute_force_on_random_rankings():
    rng = np.random.default_rng(7)
    n_db, nq = 40, 6
    easy, hard, junk = [], [], []
    for _ in range(nq):
        perm = rng.permutation(n_db)
        a, b, c = rng.integers(1, 5, 3)
        easy.append(perm[:a].tolist())
        hard.append(perm[a:a + b].tolist())
        junk.append(perm[a + b:a + b + c].tolist())
    gt = make_gt(n_db, easy, hard, junk)
    sim = rng.standard_normal((nq, n_db))
    ranking = np.argsort(-sim, axis=1)
    lists = {"easy": (easy, [j + h for j, h in zip(junk, hard)]),
             "medium": ([e + h for e, h in zip(easy, hard)], junk),
             "hard": (hard, [j + e for j, e in zip(junk, easy)])}
    result = evaluate(sim, gt, per_query=True)
    for setup, (pos, ign) in lists.items():
        scored = [_brute_force(ranking[q], pos[q], ign[q], (1, 5, 10)) for q in range(nq)]
        assert result[setup]["ap"] == pytest.approx([100 * s[0] for s in scored])
        assert result[setup]["map"] == pytest.approx(100 * np.mean([s[0] for s in scored]))
        for i, k in enumerate((1, 5, 10)):
            assert result[setup][f"mp@{k}"] == pytest.approx(100 * np.mean([s[1][i] for s in scored]))


def test_query_without_positives_is_excluded():
    gt = make_gt(5, [[0], [1]], [[2], []], [[], [3]])
    ranks = np.array([[4, 2, 0, 1, 3], [1, 0, 2, 3, 4]])
    hard = compute_map(ranks, gt, "hard", per_query=True)
    assert hard["n_queries"] == 1 and hard["n_excluded"] == 1
    # query 0: positive 2 at position 1, nothing ignored before it -> (0 + 1/2)/2 = 1/4
    assert hard["map"] == pytest.approx(25.0)
    assert hard["ap"][1] is None
    medium = compute_map(ranks, gt, "medium")
    assert medium["n_queries"] == 2 and medium["n_excluded"] == 0


def test_no_query_with_positives_gives_none_not_a_division_by_zero():
    gt = make_gt(4, [[0], [1]], [[], []], [[2], [3]])
    hard = compute_map(np.array([[0, 1, 2, 3], [3, 2, 1, 0]]), gt, "hard")
    assert hard == {"map": None, "mp@1": None, "mp@5": None, "mp@10": None, "n_queries": 0, "n_excluded": 2}


def test_kappas_and_truncated_rankings():
    gt = make_gt(6, [[4, 5]], [[]], [[]])
    # positives at 1-based ranks 2 and 3
    res = compute_map(np.array([[0, 4, 5, 1, 2, 3]]), gt, "easy", kappas=(1, 2, 5))
    assert (res["mp@1"], res["mp@2"], res["mp@5"]) == pytest.approx((0.0, 50.0, 200 / 3))
    # a truncated ranking that misses positive 5: AP counts it as missed
    trunc = compute_map(np.array([[0, 4, 1]]), gt, "easy")
    assert trunc["map"] == pytest.approx(100 * (0 + 1 / 2) / 2 / 2)


def test_bad_rankings_and_similarities():
    gt = make_gt(3, [[0], [1]], [[], []], [[], []])
    with pytest.raises(BadInputError, match="transposed"):
        evaluate(np.zeros((3, 2)), gt)
    with pytest.raises(BadInputError, match="twice"):
        compute_map(np.array([[0, 0, 1], [1, 2, 0]]), gt, "easy")
    with pytest.raises(BadInputError, match="0..2"):
        compute_map(np.array([[0, 1, 3], [1, 2, 0]]), gt, "easy")
    with pytest.raises(BadInputError, match="NaN"):
        evaluate(np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 2.0]]), gt)
    assert evaluate(torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]), gt)["easy"]["map"] == pytest.approx(100.0)


# -- the restricted unpickler --------------------------------------------------------------------

class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _legit(numpy_values: bool = False) -> dict:
    arr = np.array if numpy_values else list
    return {"imlist": ["a", "b", "c", "d"], "qimlist": ["q0", "q1"],
            "gnd": [{"bbx": arr([1.5, 2.0, 30.25, 40.0]), "easy": arr([0, 1]), "hard": arr([2]), "junk": arr([3])},
                    {"bbx": arr([0.0, 0.0, 8.0, 9.0]), "easy": arr([3]), "hard": arr([], dtype=np.int64)
                     if numpy_values else [], "junk": arr([0, 1])}]}


def test_unpickler_refuses_arbitrary_globals(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [_Exploit(marker)]}))
    with pytest.raises(BadInputError, match=r"gnd_roxford5k\.pkl.*refusing to load global \w+\.system"):
        load_ground_truth(path)
    assert not marker.exists()
    from collections import OrderedDict
    path.write_bytes(pickle.dumps(OrderedDict(imlist=["a"])))
    with pytest.raises(BadInputError, match="collections.OrderedDict"):
        load_ground_truth(path)


@pytest.mark.parametrize("numpy_values,protocol", [(False, 2), (False, 4), (True, 2), (True, 5)])
def test_unpickler_loads_legitimate_ground_truth(tmp_path, numpy_values, protocol):
    path = tmp_path / "gnd_rparis6k.pkl"
    path.write_bytes(pickle.dumps(_legit(numpy_values), protocol=protocol))
    gt = load_ground_truth(path)
    assert gt.imlist == ["a", "b", "c", "d"] and gt.qimlist == ["q0", "q1"]
    assert gt.bbx.tolist() == [[1.5, 2.0, 30.25, 40.0], [0.0, 0.0, 8.0, 9.0]]
    assert [e.tolist() for e in gt.easy] == [[0, 1], [3]]
    assert [h.tolist() for h in gt.hard] == [[2], []]
    assert [j.tolist() for j in gt.junk] == [[3], [0, 1]]
    assert gt.path == str(path) and gt.n_database == 4 and gt.n_queries == 2


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("qimlist"), "missing key.*qimlist"),
    (lambda d: d["gnd"].pop(), r"one entry per query \(2\); got 1"),
    (lambda d: d["gnd"][1].pop("junk"), r"gnd\[1\]: missing key.*junk"),
    (lambda d: d["gnd"][0].update(easy=[0, 4]), r"gnd\[0\]\['easy'\]: index 4 is outside the database \(0..3\)"),
    (lambda d: d["gnd"][0].update(hard=[-1]), r"index -1 is outside"),
    (lambda d: d["gnd"][0].update(junk=[1.5]), "must be integers"),
    (lambda d: d["gnd"][1].update(bbx=[5, 5, 5, 9]), r"gnd\[1\]\['bbx'\].*empty"),
    (lambda d: d["gnd"][1].update(bbx=[1, 2, 3]), "4 finite numbers"),
    (lambda d: d.update(imlist=["a", 3, "c", "d"]), r"imlist\[1\]"),
])
def test_ground_truth_structure_is_checked(tmp_path, change, message):
    data = _legit()
    change(data)
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(BadInputError, match=message):
        load_ground_truth(path)


def test_damaged_or_missing_ground_truth(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_ground_truth(tmp_path / "nope.pkl")
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(_legit())[:40])
    with pytest.raises(BadInputError, match="gnd_roxford5k.pkl: not a readable"):
        load_ground_truth(path)


# -- layout and cropping -------------------------------------------------------------------------

def test_crop_query_matches_array_slicing():
    img = make_picture(3, (50, 40))
    arr = np.asarray(img)
    assert np.array_equal(np.asarray(crop_query(img, [5, 7, 30, 33])), arr[7:33, 5:30])
    # float coordinates round to the nearest pixel, as PIL's crop does
    assert np.array_equal(np.asarray(crop_query(img, np.array([4.6, 7.2, 29.7, 32.9]))), arr[7:33, 5:30])
    # beyond the image: black
    out = np.asarray(crop_query(img, [40, 30, 60, 45]))
    assert out.shape == (15, 20, 3)
    assert np.array_equal(out[:10, :10], arr[30:40, 40:50]) and not out[10:, :].any() and not out[:, 10:].any()
    with pytest.raises(BadInputError, match="empty after rounding"):
        crop_query(img, [5.1, 5, 5.3, 9])


def _write_tree(root, n_db=3, n_q=1, extra_gnd=None):
    (root / "jpg").mkdir(parents=True)
    for i in range(n_db):
        make_picture(i, (40, 40)).save(root / "jpg" / f"db{i}.jpg")
    for q in range(n_q):
        make_picture(50 + q, (40, 40)).save(root / "jpg" / f"q{q}.jpg")
    data = {"imlist": [f"db{i}" for i in range(n_db)], "qimlist": [f"q{q}" for q in range(n_q)],
            "gnd": [{"bbx": [0, 0, 20, 20], "easy": [0], "hard": [], "junk": []} for _ in range(n_q)]}
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(data))
    return data


def test_dataset_files_layout(tmp_path):
    root = tmp_path / "roxford5k"
    _write_tree(root)
    db, queries, boxes, gt = dataset_files(root, "ROxford5k")
    assert db == [root / "jpg" / f"db{i}.jpg" for i in range(3)]
    assert queries == [root / "jpg" / "q0.jpg"]
    assert boxes.tolist() == [[0, 0, 20, 20]] and gt.n_database == 3
    assert dataset_files(tmp_path, "roxford5k")[0] == db  # the parent of the dataset folder works too
    with pytest.raises(BadInputError, match="roxford5k, rparis6k"):
        dataset_files(root, "holidays")
    with pytest.raises(BadInputError, match="gnd_rparis6k.pkl"):
        dataset_files(root, "rparis6k")
    (root / "jpg" / "db1.jpg").unlink()
    (root / "jpg" / "q0.jpg").unlink()
    with pytest.raises(BadInputError, match=r"2 of the 4 images named by gnd_roxford5k.pkl are missing: "
                                            r"db1.jpg, q0.jpg"):
        dataset_files(root, "roxford5k")
    for p in (root / "jpg").iterdir():
        p.unlink()
    (root / "jpg").rmdir()
    with pytest.raises(BadInputError, match=r"jpg: folder not found"):
        dataset_files(root, "roxford5k")


# -- end to end with a tiny model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Three scenes of synthetic_datasets.make_revisited (easy copies, mirrored junk, unrelated hard)."""
    from synthetic_datasets import make_revisited

    return make_revisited(tmp_path_factory.mktemp("rmap") / "roxford5k", scenes=3, size=(160, 120))


@pytest.fixture(scope="module")
def tiny_metric(tiny_vit):
    from percept_cli.metric import load_metric

    return load_metric(str(tiny_vit[0]), device="cpu")


def test_run_map_end_to_end(tiny_dataset, tiny_metric):
    from percept_cli.attacks.settings import AttackSettings

    seen = []
    result = rmap.run_map(tiny_metric, tiny_dataset, "roxford5k", batch_size=4, progress=seen.append)
    assert result["clean"]["easy"]["map"] == pytest.approx(100.0)
    assert result["clean"]["easy"]["mp@1"] == pytest.approx(100.0)
    assert result["clean"]["easy"]["n_queries"] == 3 and result["n_database"] == 12
    assert result["attacked"] is None and result["attack"] is None
    assert sum(seen) == rmap.progress_total(load_ground_truth(tiny_dataset / "gnd_roxford5k.pkl"), False)

    # the clean numbers agree with an independent computation from the model's own embeddings
    db_paths, q_paths, boxes, gt = dataset_files(tiny_dataset, "roxford5k")
    db = tiny_metric.embed([str(p) for p in db_paths])
    crops = [Image.open(p).convert("RGB").crop(tuple(b)) for p, b in zip(q_paths, boxes)]
    sim = (tiny_metric.embed(crops) @ db.T).numpy()
    ranking = np.argsort(-sim, axis=1)
    lists = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
             "hard": (("hard",), ("junk", "easy"))}
    for setup, (pos_keys, ign_keys) in lists.items():
        scored = [_brute_force(ranking[q], sum((gnd_list(gt, k, q) for k in pos_keys), []),
                               sum((gnd_list(gt, k, q) for k in ign_keys), []), (1, 5)) for q in range(3)]
        assert result["clean"][setup]["map"] == pytest.approx(100 * np.mean([a for a, _ in scored]), abs=1e-4)
        assert result["clean"][setup]["mp@5"] == pytest.approx(100 * np.mean([p[1] for _, p in scored]), abs=1e-4)
    assert result["clean"]["hard"]["map"] < 100.0  # the unrelated "hard" pictures do not all come first

    weak = AttackSettings(norm="linf", eps=1e-6, iters=2)
    seen.clear()
    res_weak = rmap.run_map(tiny_metric, tiny_dataset, "roxford5k", settings=weak, batch_size=4,
                            attack_batch_size=2, progress=seen.append)
    assert sum(seen) == 12 + 2 * 3
    assert res_weak["attack"] == weak.to_dict()
    for setup in ("easy", "medium", "hard"):
        assert res_weak["attacked"][setup]["map"] <= res_weak["clean"][setup]["map"] + 1e-9
    assert res_weak["attacked"]["easy"]["map"] == pytest.approx(100.0)

    strong = AttackSettings(norm="linf", eps=64 / 255, iters=10)
    res_strong = rmap.run_map(tiny_metric, tiny_dataset, "roxford5k", settings=strong, batch_size=4)
    assert res_strong["attacked"]["easy"]["map"] < res_strong["clean"]["easy"]["map"]
    assert res_strong["adversarial_distance"] > res_weak["adversarial_distance"]


def gnd_list(gt: GroundTruth, key: str, q: int) -> list[int]:
    return getattr(gt, key)[q].tolist()


def test_run_map_attack_does_not_depend_on_the_attack_batch(tiny_dataset, tiny_metric):
    from percept_cli.attacks.settings import AttackSettings

    settings = AttackSettings(norm="l2", eps=2.0, iters=3, random_start=True)
    one = rmap.run_map(tiny_metric, tiny_dataset, "roxford5k", settings=settings, attack_batch_size=1)
    three = rmap.run_map(tiny_metric, tiny_dataset, "roxford5k", settings=settings, attack_batch_size=3)
    assert one["adversarial_distance"] == pytest.approx(three["adversarial_distance"], rel=1e-4)
    assert one["attacked"] == three["attacked"]
