"""Dataset readers on synthetic trees in the real layouts: columns, votes, splits, stems, errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import synthetic_datasets as sd
from conftest import make_picture

from percept_cli.evaluation.datasets import OddOneOut, load_dataset, subsample
from percept_cli.errors import BadInputError


def test_nights_splits_votes_and_labels(tmp_path):
    rows = [{"id": 0, "right_vote": 1, "votes": 6, "split": "test", "is_imagenet": True},
            {"id": 1, "right_vote": 0, "votes": 7, "split": "test", "is_imagenet": False},
            {"id": 2, "right_vote": 1, "votes": 5, "split": "test", "is_imagenet": False},  # too few votes
            {"id": 3, "right_vote": 1, "votes": 6, "split": "val", "is_imagenet": False},
            {"id": 4, "right_vote": 0, "votes": 9, "split": "train", "is_imagenet": True}]
    root = sd.make_nights(tmp_path / "nights", rows)
    test = load_dataset("nights", root, "test")
    assert [t.id for t in test.items] == ["0", "1"] and [t.label for t in test.items] == [1, 0]
    assert test.items[0].ref.endswith("ref/000/000.png") and test.items[0].right.endswith("000_1.png")
    assert [t.id for t in load_dataset("nights", root, "test_imagenet").items] == ["0"]
    assert [t.id for t in load_dataset("nights", root, "test_no_imagenet").items] == ["1"]
    assert [t.id for t in load_dataset("nights", root, "val").items] == ["3"]
    assert [t.id for t in load_dataset("nights", root, "train").items] == ["4"]


def test_nights_column_order_and_extra_columns(tmp_path):
    root = sd.make_nights(tmp_path / "n", n=8)
    with open(root / "data.csv") as fh:
        rows = list(csv.DictReader(fh))
    fields = list(reversed(list(rows[0]))) + ["unused"]
    with open(root / "data.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows({**r, "unused": "x"} for r in rows)
    assert len(load_dataset("nights", root, "test").items) == 4


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "data.csv").unlink(), "not a NIGHTS root"),
    (lambda r: (r / "data.csv").write_text("id,left_vote,right_vote,votes\n1,0,1,6\n"), r"missing column\(s\) ref_path"),
    (lambda r: (r / "distort" / "000" / "004_1.png").unlink(), "line 6: image not found"),
])
def test_nights_errors(tmp_path, damage, message):
    root = sd.make_nights(tmp_path / "n", n=8)
    damage(root)
    with pytest.raises(BadInputError, match=message):
        load_dataset("nights", root, "test" if "line" not in message else "train")


def test_unknown_split_and_dataset(tmp_path):
    root = sd.make_nights(tmp_path / "n", n=4)
    with pytest.raises(BadInputError, match="unknown NIGHTS split 'testing'"):
        load_dataset("nights", root, "testing")
    with pytest.raises(BadInputError, match="unknown dataset"):
        load_dataset("imagenet", root)


def test_bapps_pairs_by_stem_and_reads_judgements(tmp_path):
    root = sd.make_bapps(tmp_path / "b", subsets=("traditional", "cnn"), n=5)
    index = load_dataset("bapps", root)
    assert index.groups == ["cnn", "traditional"] and len(index.items) == 10
    for t in index.items:
        stem = t.id.split("/")[1]
        assert all(p.endswith(f"/{stem}.png") for p in (t.ref, t.left, t.right))
        assert t.p_right == pytest.approx(float(np.load(root / "2afc" / "val" / t.group / "judge" / f"{stem}.npy")[0]))
    assert len(load_dataset("bapps", root / "2afc", subsets=["cnn"]).items) == 5  # root may be the 2afc folder


def test_bapps_mismatched_folders_refused(tmp_path):
    root = sd.make_bapps(tmp_path / "b", subsets=("cnn",), n=3)
    make_picture(1, (64, 64)).save(root / "2afc" / "val" / "cnn" / "p1" / "000099.png")
    with pytest.raises(BadInputError, match="do not match.*000099"):
        load_dataset("bapps", root)
    with pytest.raises(BadInputError, match="no subset"):
        load_dataset("bapps", root, subsets=["color"])
    (root / "2afc" / "val" / "cnn" / "p1" / "000099.png").unlink()
    (root / "2afc" / "val" / "cnn" / "judge" / "000001.npy").unlink()
    with pytest.raises(BadInputError, match="do not match"):
        load_dataset("bapps", root)


def test_bapps_layout_errors(tmp_path):
    with pytest.raises(BadInputError, match="not a BAPPS root"):
        load_dataset("bapps", tmp_path)
    root = sd.make_bapps(tmp_path / "b", subsets=("cnn",), n=2)
    import shutil

    shutil.rmtree(root / "2afc" / "val" / "cnn" / "judge")
    with pytest.raises(BadInputError, match="missing folder"):
        load_dataset("bapps", root)


def test_things_names_and_errors(tmp_path):
    root = sd.make_things(tmp_path / "t")
    index = load_dataset("things", root)
    assert index.task == "odd-one-out" and isinstance(index.items[0], OddOneOut)
    assert index.items[0].images[2].endswith("img02.jpg")
    (root / "triplets.txt").write_text("img00.jpg img01.jpg\n")
    with pytest.raises(BadInputError, match="line 1: expected 3"):
        load_dataset("things", root)
    (root / "triplets.txt").write_text("img00.jpg img01.jpg nope.jpg\n")
    with pytest.raises(BadInputError, match="'nope.jpg' not found"):
        load_dataset("things", root)
    make_picture(1, (40, 40)).save(root / "images" / "concept2" / "img00.jpg")
    (root / "triplets.txt").write_text("img00.jpg img01.jpg img02.jpg\n")
    with pytest.raises(BadInputError, match="ambiguous"):
        load_dataset("things", root)


def test_custom_labels_and_errors(tmp_path):
    table = sd.make_custom(tmp_path / "c")
    index = load_dataset("custom", table)
    assert [t.p_right for t in index.items] == [0.0, 1.0, 0.0, 1.0, 0.25]
    text = table.read_text().replace("0.25", "maybe")
    table.write_text(text)
    with pytest.raises(BadInputError, match="line 6: column label"):
        load_dataset("custom", table)


def test_subsample_is_seeded_and_per_subset_for_bapps(tmp_path):
    root = sd.make_nights(tmp_path / "n", n=40)
    index = load_dataset("nights", root, "test")
    a, b = subsample(index, 5, seed=1), subsample(index, 5, seed=1)
    assert [t.id for t in a.items] == [t.id for t in b.items] and len(a.items) == 5
    assert [t.id for t in subsample(index, 5, seed=2).items] != [t.id for t in a.items]
    bapps = load_dataset("bapps", sd.make_bapps(tmp_path / "b", subsets=("cnn", "color"), n=6))
    chosen = subsample(bapps, 2, seed=0)
    assert sorted(t.group for t in chosen.items) == ["cnn", "cnn", "color", "color"]
