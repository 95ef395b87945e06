"""retrieval/classify.py: k-NN votes against a brute-force reference, confusion tables, flags, --or-with."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from percept_cli.errors import BadInputError
from percept_cli.retrieval.classify import (confusion, flags_for, knn_vote, or_with, parse_flag,
                                            read_flags_csv)

NAMES = ["safe", "unsafe", "buffer", "other"]


def reference_vote(sims, ids, codes, names, k, weighted):
    """Plain-Python k-NN vote: one query at a time, neighbours in rank order."""
    out = []
    for row_s, row_i in zip(sims, ids):
        scores: dict[int, float] = {}
        order: list[int] = []  # labels in order of their first (highest-ranked) neighbour
        for s, i in zip(row_s[:k], row_i[:k]):
            if i < 0 or codes[i] < 0:
                continue
            label = int(codes[i])
            if label not in scores:
                scores[label] = 0.0
                order.append(label)
            scores[label] += float(s) if weighted else 1.0
        if not scores:
            out.append(None)
            continue
        best = max(scores.values())
        out.append(names[next(label for label in order if scores[label] == best)])
    return out


def random_search(rng, q, kk, n, pad_rows=10):
    """Sims drawn from a coarse grid (ties are common), sorted descending; some rows padded with -1."""
    sims = -np.sort(-rng.choice([-0.5, 0.0, 0.25, 0.5, 0.75, 1.0], size=(q, kk)), axis=1)
    ids = rng.integers(0, n, size=(q, kk))
    for row in range(pad_rows):
        cut = rng.integers(0, kk + 1)
        ids[row, cut:] = -1
        sims[row, cut:] = -np.inf
    return sims.astype(np.float32), ids


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("k", [1, 2, 5, 7])
def test_knn_vote_matches_brute_force(k, weighted):
    rng = np.random.default_rng(100 * k + weighted)
    n = 30
    codes = rng.integers(-1, len(NAMES), size=n).astype(np.int32)
    sims, ids = random_search(rng, 300, 7, n)
    got = knn_vote(sims, ids, codes, NAMES, k=k, weighted=weighted)
    assert got == reference_vote(sims, ids, codes, NAMES, k, weighted)
    assert None in got  # padding/unlabelled rows exercised


def test_knn_vote_accepts_torch_and_small_blocks(monkeypatch):
    import percept_cli.retrieval.classify as classify

    rng = np.random.default_rng(1)
    codes = rng.integers(-1, 3, size=20).astype(np.int32)
    sims, ids = random_search(rng, 50, 4, 20)
    expected = reference_vote(sims, ids, codes, NAMES[:3], 4, True)
    monkeypatch.setattr(classify, "_MAX_SCORE_CELLS", 7)  # several query blocks
    got = knn_vote(torch.from_numpy(sims), torch.from_numpy(ids), torch.from_numpy(codes), NAMES[:3], k=4)
    assert got == expected


def _one(labels_of_neighbours, sims, k, weighted=True):
    """Vote for a single query whose neighbours i have codes ``labels_of_neighbours[i]``."""
    codes = np.array(labels_of_neighbours, dtype=np.int32)
    ids = np.arange(len(codes))[None, :]
    return knn_vote(np.array([sims], dtype=np.float32), ids, codes, ["a", "b", "c"], k=k, weighted=weighted)[0]


def test_knn_vote_hand_examples():
    # unweighted majority, and a tie going to the label of the highest-ranked neighbour
    assert _one([0, 1, 1], [0.9, 0.8, 0.7], 3, weighted=False) == "b"
    assert _one([0, 1, 2], [0.9, 0.8, 0.7], 3, weighted=False) == "a"
    assert _one([1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6], 4, weighted=False) == "b"
    # weighted: two weaker neighbours outvote a strong one only when their sum is larger
    assert _one([0, 1, 1], [0.875, 0.5, 0.5], 3) == "b"
    assert _one([0, 1, 1], [0.75, 0.5, 0.25], 3) == "a"  # exact tie 0.75 = 0.75: the nearest label
    assert _one([2, 1, 1], [0.75, 0.5, 0.25], 3) == "c"
    # k=1: the nearest, whatever follows
    assert _one([2, 1, 1], [0.9, 0.8, 0.7], 1) == "c"
    # negative similarities: a label absent from the neighbours (score 0) never wins
    assert _one([0, 1], [-0.1, -0.2], 2) == "a"


def test_knn_vote_padding_and_unlabelled():
    codes = np.array([-1, 1, 0], dtype=np.int32)
    names = ["safe", "unsafe"]
    sims = np.array([[0.9, 0.8, 0.7], [0.9, 0.8, -np.inf], [-np.inf] * 3, [0.5, 0.4, 0.3]], dtype=np.float32)
    ids = np.array([[0, 1, 2], [2, 0, -1], [-1, -1, -1], [0, 0, 0]])
    assert knn_vote(sims, ids, codes, names, k=1) == [None, "safe", None, None]  # nearest unlabelled -> None
    assert knn_vote(sims, ids, codes, names, k=2) == ["unsafe", "safe", None, None]
    assert knn_vote(sims, ids, codes, names, k=3, weighted=False) == ["unsafe", "safe", None, None]


def test_knn_vote_refuses_bad_input():
    codes = np.zeros(3, dtype=np.int32)
    sims, ids = np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64)
    with pytest.raises(BadInputError, match="k=3"):
        knn_vote(sims, ids, codes, ["a"], k=3)
    with pytest.raises(BadInputError, match="same shape"):
        knn_vote(sims, ids[:, :1], codes, ["a"])
    with pytest.raises(BadInputError, match="ids"):
        knn_vote(sims, np.full((2, 2), 3), codes, ["a"])
    with pytest.raises(BadInputError, match="codes"):
        knn_vote(sims, ids, np.array([0, 1, 0]), ["a"])


def test_confusion_nsfw_hand_example():
    true = ["safe"] * 4 + ["unsafe"] * 3
    pred = ["safe", "safe", "buffer", "unsafe", "unsafe", "buffer", None]
    table = confusion(true, pred, true_classes=["safe", "unsafe"], pred_classes=["safe", "buffer", "unsafe"])
    assert table.true_classes == ["safe", "unsafe"]
    assert table.pred_classes == ["safe", "buffer", "unsafe", "none"]
    np.testing.assert_array_equal(table.counts, [[2, 1, 1, 0], [0, 1, 1, 1]])
    np.testing.assert_allclose(table.fractions, [[0.5, 0.25, 0.25, 0.0], [0.0, 1 / 3, 1 / 3, 1 / 3]])
    assert table.accuracy == pytest.approx(3 / 7)
    doc = json.loads(json.dumps(table.as_dict()))
    assert doc["counts"] == [[2, 1, 1, 0], [0, 1, 1, 1]]
    assert doc["support"] == [4, 3] and doc["total"] == 7
    assert doc["pred_classes"][-1] == "none"


def test_confusion_default_order_empty_rows_and_no_overlap():
    table = confusion(["b", "a", "b"], ["a", "c", "b"])
    assert table.true_classes == ["a", "b"]
    assert table.pred_classes == ["a", "b", "c"]
    np.testing.assert_array_equal(table.counts, [[0, 0, 1], [1, 1, 0]])
    assert table.accuracy == pytest.approx(1 / 3)
    table = confusion(["x"], ["y"], true_classes=["x", "z"])
    assert table.pred_classes == ["x", "z", "y"]  # the true classes first, then the others
    np.testing.assert_array_equal(table.fractions, [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # z has no queries
    assert confusion(["x"], ["y"], true_classes=["x"], pred_classes=["y"]).accuracy is None
    with pytest.raises(BadInputError, match="'q'"):
        confusion(["x"], ["q"], true_classes=["x"], pred_classes=["x"])
    with pytest.raises(BadInputError, match="2 true labels but 1"):
        confusion(["x", "x"], ["x"])


def test_or_with():
    pred = ["safe", "buffer", None, "unsafe", "safe", "buffer"]
    flags = [True, True, True, False, False, False]
    assert or_with(pred, flags) == ["unsafe", "unsafe", "unsafe", "unsafe", "safe", "buffer"]
    assert or_with(["a", "b"], np.array([False, True]), flag_label="nsfw") == ["a", "nsfw"]
    with pytest.raises(BadInputError):
        or_with(["a"], [True, False])


def test_parse_flag_words():
    for word in ["1", "TRUE", "Yes", "unsafe", " true "]:
        assert parse_flag(word) is True
    for word in ["0", "False", "NO", "Safe"]:
        assert parse_flag(word) is False
    assert parse_flag("maybe") is None and parse_flag("") is None


def test_read_flags_csv(tmp_path):
    folder = tmp_path / "sub"
    folder.mkdir()
    absolute = tmp_path / "elsewhere" / "c.jpg"
    flags_file = folder / "flags.csv"
    flags_file.write_text("\ufeffnote,flag,path\n"
                          f"x,UNSAFE,a.png\n"
                          "\n"
                          f"y,0,../b.png\n"
                          f"z,yes,{absolute}\n"
                          f"w,safe,shards/000.tar#s1\n"
                          f"v,1,a.png\n", encoding="utf-8")
    flags = read_flags_csv(flags_file)
    assert flags == {
        os.path.join(str(folder), "a.png"): True,
        os.path.join(str(tmp_path), "b.png"): False,
        str(absolute): True,
        os.path.join(str(folder), "shards", "000.tar#s1"): False,
    }
    keys = [os.path.join(str(folder), "a.png"), str(absolute)]
    assert flags_for(keys, flags) == [True, True]
    with pytest.raises(BadInputError, match="no flag for 1 of the 2 queries: /nowhere"):
        flags_for(["/nowhere", keys[0]], flags, where="--or-with f.csv")


@pytest.mark.parametrize("content, pattern", [
    ("path,flag\na.png,1\nb.png,maybe\n", "line 3: flag 'maybe'"),
    ("path,verdict\na.png,1\n", "line 1: the header"),
    ("", "empty"),
    ("path,flag\na.png,1\n,0\n", "line 3: empty path"),
    ("path,flag\na.png,1\nb.png\n", "line 3: expected 2 columns"),
    ("path,flag\na.png,1\na.png,0\n", "line 3: a.png is listed again"),
])
def test_read_flags_csv_errors(tmp_path, content, pattern):
    bad = tmp_path / "flags.csv"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(BadInputError, match=pattern) as info:
        read_flags_csv(bad)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message


def test_read_flags_csv_missing_and_binary(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        read_flags_csv(tmp_path / "nope.csv")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"path,flag\n\xff\xfe\x00\x81,1\n")
    with pytest.raises(BadInputError, match="UTF-8"):
        read_flags_csv(binary)
