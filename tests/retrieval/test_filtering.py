"""retrieval/filtering.py: run_filter end to end on a tiny labelled pool: resume after an interruption
decodes only the chunks not written and gives the uninterrupted report row for row; --threshold
semantics against a brute-force NumPy computation over the index vectors; unreadable images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_picture
from PIL import Image

import percept_cli.retrieval.filtering as filtering
from percept_cli.metric import load_metric
from percept_cli.retrieval.filtering import COLUMNS, FilterSettings, read_report, run_filter
from percept_cli.retrieval.index import build_index, open_index
from percept_cli.retrieval.reports import ChunkedReport, partial_folder
from percept_cli.retrieval.search import Searcher
from percept_cli.retrieval.sources import collect_items

CLASSES = {"safe": [0, 1, 2, 3], "unsafe": [10, 11, 12, 13], "buffer": [20, 21]}


def near_copy(seed: int, noise_seed: int) -> Image.Image:
    """Pool picture ``seed`` with +-2 grey levels of noise (nearest to its original by construction)."""
    arr = np.asarray(make_picture(seed), dtype=np.int16)
    noise = np.random.default_rng(noise_seed).integers(-2, 3, arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def metric(tiny_vit):
    return load_metric(str(tiny_vit[0]), device="cpu")


@pytest.fixture(scope="module")
def index(metric, tmp_path_factory):
    """An index of a pool labelled safe / unsafe / buffer (parts of 4)."""
    root = tmp_path_factory.mktemp("filter") / "pool"
    for label, seeds in CLASSES.items():
        (root / label).mkdir(parents=True)
        for s in seeds:
            make_picture(s).save(root / label / f"p{s:02d}.png")
    out = root.parent / "pool.idx"
    build_index(metric, collect_items([root], label_from_folder=True), out, part_size=4, batch_size=3, num_workers=0)
    return open_index(out)


@pytest.fixture
def data(tmp_path) -> Path:
    """Eight near copies (safe and unsafe pool pictures), two unrelated pictures and one unreadable file."""
    root = tmp_path / "data"
    root.mkdir()
    for label in ("safe", "unsafe"):
        for s in CLASSES[label]:
            near_copy(s, 100 + s).save(root / f"{label}_{s:02d}.png")
    for s in (60, 61):
        make_picture(s).save(root / f"other_{s}.png")
    (root / "safe_99_broken.png").write_bytes(b"this is not a png")
    return root


def _filter(metric, index, listing, report_path, settings, *, resume=False, progress=None):
    report = ChunkedReport(report_path, COLUMNS, resume=resume, settings=settings.as_dict())
    return run_filter(metric, index, Searcher(index, "exact"), listing, report, settings, batch_size=2,
                      num_workers=0, progress=progress)


def test_resume_decodes_only_the_missing_chunks_and_matches_an_uninterrupted_run(metric, index, data, tmp_path,
                                                                                 monkeypatch):
    listing = collect_items([data])
    assert len(listing.items) == 11  # 4 chunks of 3 (the last one holds 2)
    settings = FilterSettings(("unsafe",), chunk_items=3)
    whole = _filter(metric, index, listing, tmp_path / "whole.parquet", settings)
    expected = read_report(whole.report).to_pylist()
    assert whole.chunks == 4 and whole.chunks_resumed == 0 and len(expected) == 11

    report_path = tmp_path / "report.parquet"
    first_chunk = partial_folder(report_path) / "chunk-000000.parquet"

    def interrupt(n: int) -> None:
        if first_chunk.exists():  # chunk 0 is on disk: stop inside chunk 1
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _filter(metric, index, listing, report_path, settings, progress=interrupt)
    assert not report_path.exists()
    assert sorted(p.name for p in partial_folder(report_path).glob("chunk-*.parquet")) == ["chunk-000000.parquet"]

    decoded: list[str] = []
    real = filtering.iter_item_batches

    calls: list[int] = []

    def recording(items, *args, batches=None, **kwargs):  # the items of the batches asked for (all without)
        calls.append(1)
        decoded.extend(items[i].key for batch in (batches or [range(len(items))]) for i in batch)
        return real(items, *args, batches=batches, **kwargs)

    monkeypatch.setattr(filtering, "iter_item_batches", recording)
    seen: list[int] = []
    resumed = _filter(metric, index, listing, report_path, settings, resume=True, progress=seen.append)
    assert decoded == [item.key for item in listing.items[3:]]  # chunk 0 is not decoded again
    assert calls == [1]  # one decoding pass (one DataLoader) for all the remaining chunks
    assert sum(seen) == 11  # the progress still covers every item, the resumed chunk included
    assert resumed.chunks == 4 and resumed.chunks_resumed == 1
    assert read_report(report_path).to_pylist() == expected  # row for row, similarities bit for bit
    assert not partial_folder(report_path).exists()
    assert resumed.decisions == whole.decisions and resumed.labels == whole.labels


def _brute_force_flag_similarity(metric, index, paths, flag: str) -> np.ndarray:
    """max over the pool items labelled ``flag`` of the cosine similarity, from the raw index vectors."""
    vectors = np.concatenate([np.asarray(v, dtype=np.float64) for v in index.vectors()])
    labels = index.metadata(("label",)).column("label").to_pylist()
    flagged = vectors[[i for i, label in enumerate(labels) if label == flag]]
    queries = metric.embed([str(p) for p in paths]).numpy().astype(np.float64)
    return (queries @ flagged.T).max(axis=1)


def _threshold_with_safe_on_both_sides(brute: dict) -> float:
    """The midpoint of the widest gap between consecutive similarities with safe near copies on both sides."""
    sims = sorted(brute.values())
    safe = [s for k, s in brute.items() if Path(k).name.startswith("safe_")]
    gaps = [(b - a, (a + b) / 2) for a, b in zip(sims, sims[1:])
            if any(s < (a + b) / 2 for s in safe) and any(s > (a + b) / 2 for s in safe)]
    return float(max(gaps)[1])


def test_threshold_flags_by_similarity_to_the_nearest_flagged_item(metric, index, data, tmp_path):
    listing = collect_items([data])
    readable = [item for item in listing.items if "broken" not in item.key]
    brute = dict(zip([i.key for i in readable], _brute_force_flag_similarity(metric, index, [i.path for i in readable],
                                                                             "unsafe")))
    # T in the widest gap between sorted similarities that has a safe near copy on each side: a safe
    # image above T is flagged although its nearest pool item (its original) is safe, which the k-NN
    # label alone would keep
    threshold = _threshold_with_safe_on_both_sides(brute)
    assert min(abs(s - threshold) for s in brute.values()) > 1e-3  # no image sits on the threshold

    summary = _filter(metric, index, listing, tmp_path / "r.csv", FilterSettings(("unsafe",), threshold,
                                                                                  chunk_items=4))
    rows = {row["key"]: row for row in read_report(summary.report).to_pylist()}
    assert set(rows) == {item.key for item in listing.items}
    for key, sim in brute.items():
        assert rows[key]["flag_similarity"] == pytest.approx(sim, abs=2e-3)  # float16 storage
        assert rows[key]["decision"] == ("flagged" if sim >= threshold else "kept"), key
    safe_flagged = [r for k, r in rows.items() if Path(k).name.startswith("safe_0") and r["decision"] == "flagged"]
    assert safe_flagged and all(r["label"] == "safe" for r in safe_flagged)
    assert all(rows[k]["decision"] == "flagged" for k in rows if Path(k).name.startswith("unsafe_"))

    broken = next(k for k in rows if "broken" in k)
    assert rows[broken]["decision"] == "error" and rows[broken]["error"] and rows[broken]["label"] is None
    n_flagged = sum(s >= threshold for s in brute.values())
    assert summary.decisions == {"error": 1, "flagged": n_flagged, "kept": len(brute) - n_flagged}
    assert [k for k, _ in summary.errors] == [broken]


def test_label_rule_without_threshold_and_an_unknown_flag(metric, index, data, tmp_path):
    listing = collect_items([data])
    summary = _filter(metric, index, listing, tmp_path / "r.jsonl", FilterSettings(("unsafe", "buffer"),
                                                                                    chunk_items=5))
    rows = {Path(r["key"]).name: r for r in read_report(summary.report).to_pylist()}
    for s in CLASSES["safe"]:
        row = rows[f"safe_{s:02d}.png"]
        assert (row["decision"], row["label"], Path(row["nearest_key"]).name) == ("kept", "safe", f"p{s:02d}.png")
        assert row["flag_similarity"] is None
    for s in CLASSES["unsafe"]:
        assert (rows[f"unsafe_{s:02d}.png"]["decision"], rows[f"unsafe_{s:02d}.png"]["label"]) == ("flagged",
                                                                                                  "unsafe")
    for name in ("other_60.png", "other_61.png"):  # flagged iff the nearest pool item is unsafe or buffer
        assert (rows[name]["decision"] == "flagged") == (rows[name]["nearest_label"] in ("unsafe", "buffer"))
    assert summary.decisions["error"] == 1
    from percept_cli.errors import BadInputError

    with pytest.raises(BadInputError, match="nsfw"):
        filtering.flag_vectors(index, ["nsfw"])
