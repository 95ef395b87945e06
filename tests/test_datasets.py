"""Dataset readers on synthetic trees in the real layouts: columns, votes, splits, stems, errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import synthetic_datasets as sd
from conftest import make_picture

from percept_cli.evaluation.datasets import OddOneOut, first_per_group, load_dataset, subsample
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


def test_nights_vote_counts_and_fractions_give_the_same_probability(tmp_path):
    # left_vote/right_vote as vote counts (unfiltered NIGHTS) or as fractions: p = right / (left + right)
    rows = [{"id": 0, "left_vote": 1, "right_vote": 5, "votes": 6},   # 5 of 6 chose right
            {"id": 1, "left_vote": 5, "right_vote": 1, "votes": 6},   # 1 of 6 chose right
            {"id": 2, "left_vote": 0, "right_vote": 7, "votes": 7},
            {"id": 3, "left_vote": 0.0, "right_vote": 1.0, "votes": 6},
            {"id": 4, "left_vote": 1.0, "right_vote": 0.0, "votes": 6}]
    index = load_dataset("nights", sd.make_nights(tmp_path / "n", rows), "test")
    assert [t.p_right for t in index.items] == pytest.approx([5 / 6, 1 / 6, 1.0, 1.0, 0.0])
    assert [t.label for t in index.items] == [1, 0, 1, 1, 0]
    (tmp_path / "n" / "data.csv").write_text((tmp_path / "n" / "data.csv").read_text().replace(",0,7,7,", ",0,0,7,"))
    with pytest.raises(BadInputError, match="line 4: left_vote and right_vote"):
        load_dataset("nights", tmp_path / "n", "test")


def test_custom_half_label_is_left_and_majority_is_strict(tmp_path):
    index = load_dataset("custom", sd.make_custom(tmp_path / "c", labels=("0.5", "0.51", "0.49", "right")))
    # the majority needs more than half of the people: a 50/50 split is not a win for the right candidate
    assert [t.label for t in index.items] == [0, 1, 0, 1]
    assert index.items[0].p_right == 0.5


def test_bapps_items_in_sorted_path_order_not_numeric(tmp_path):
    # Python's sorted() on the file paths, as the authors' loader orders BAPPS: worked out by hand,
    # '-' (0x2D) < '.' (0x2E) < '0' (0x30), so "1-b.png" < "1.png" < "10.png" < "100.png" < "2.png" < "9.png"
    stems = ["2", "10", "100", "9", "1-b", "1"]
    index = load_dataset("bapps", sd.make_bapps(tmp_path / "b", subsets=("cnn", "color"), stems=stems))
    assert [t.id for t in index.items if t.group == "cnn"] == ["cnn/1-b", "cnn/1", "cnn/10", "cnn/100", "cnn/2",
                                                              "cnn/9"]
    first = first_per_group(index, 2)
    assert first == {"cnn/1-b", "cnn/1", "color/1-b", "color/1"}  # the first 2 of each subset
    nights = load_dataset("nights", sd.make_nights(tmp_path / "n", n=12), "test")  # rows 2, 3, 6, 7, 10, 11
    assert first_per_group(nights, 3) == {"2", "3", "6"}  # data.csv row order, one count for the split


def test_things_hebart_triplet_file(tmp_path):
    # rows: image1, image2, image3 (1-based into the 1854-line image list), choice = position of the odd one
    root = sd.make_things_hebart(tmp_path / "t", [(3, 1, 1854, 1, 950), (12, 40, 7, 3, 1200), (5, 6, 12, 2, 800)])
    index = load_dataset("things", root)
    assert index.task == "odd-one-out" and len(index.items) == 3  # the header line is not a triplet
    names = [[p.split("/")[-1] for p in item.images] for item in index.items]
    # our convention: the pair people kept together first, the odd one out last
    assert names == [["img0001.jpg", "img1854.jpg", "img0003.jpg"],
                     ["img0012.jpg", "img0040.jpg", "img0007.jpg"],
                     ["img0005.jpg", "img0012.jpg", "img0006.jpg"]]
    no_header = sd.make_things_hebart(tmp_path / "u", [(3, 1, 1854, 1)], header=None)
    assert len(load_dataset("things", no_header).items) == 1


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "image_paths.txt").write_text("a.jpg\n" * 1853), r"expected 1854 image paths.*found 1853"),
    (lambda r: (r / "image_paths.txt").unlink(), "need the list of the 1854 image paths"),
    (lambda r: (r / "triplets.txt").write_text("1\t2\t1855\t1\n"), r"line 1: image index 1855 is outside 1..1854"),
    (lambda r: (r / "triplets.txt").write_text("image1\timage2\timage3\tchoice\n1\t2\t3\t4\n"),
     "line 2: choice 4 is not a position 1, 2 or 3"),
    (lambda r: (r / "triplets.txt").write_text("1\t2\t3\t1\n1\t2\tx\t1\n"), "line 2: expected tab-separated"),
    (lambda r: (r / "images" / "concept0002" / "img0002.jpg").unlink(),
     r"line 2 \(image 2 = .*image_paths.txt, line 2\): image not found"),
])
def test_things_hebart_errors_name_file_and_line(tmp_path, damage, message):
    root = sd.make_things_hebart(tmp_path / "t", [(1, 2, 3, 1)])
    damage(root)
    with pytest.raises(BadInputError, match=message):
        load_dataset("things", root)


def test_things_image_list_option(tmp_path):
    root = sd.make_things_hebart(tmp_path / "t", [(1, 2, 3, 2)], list_name="things_images.txt")
    with pytest.raises(BadInputError, match="need the list of the 1854 image paths"):
        load_dataset("things", root)
    index = load_dataset("things", root, image_list=root / "things_images.txt")
    assert [p.split("/")[-1] for p in index.items[0].images] == ["img0001.jpg", "img0003.jpg", "img0002.jpg"]
