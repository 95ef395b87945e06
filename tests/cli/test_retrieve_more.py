"""`percept retrieve` end to end, beyond tests/cli/test_retrieve.py: filter on WebDataset shards with
--write-kept and --resume, index from list files and shards with a labels CSV then `add`, classify with a
buffer class and a k-NN vote checked by hand, dedup against an index, map on a tiny revisited-Oxford
tree, and bad input (exit 2, one line, no traceback). Queries are near copies of pool pictures, so the
right answers are known without the code under test."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_picture
from PIL import Image
from test_retrieve import near_copy, run, run_json  # tests/cli is on sys.path (pytest's rootdir-relative import)

CLASSES = {"safe": [0, 1, 2, 3], "unsafe": [10, 11, 12, 13], "buffer": [20, 21]}
VOTE_SEED = 70  # the pool holds picture 70 as safe and two brighter versions of it as unsafe


def one_line_error(result, *needles: str) -> str:
    """Exit 2 with a single ``error: ...`` line on stderr naming ``needles``, and no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def brighter(seed: int, shift: int) -> Image.Image:
    arr = np.asarray(make_picture(seed), dtype=np.int16)
    return Image.fromarray(np.clip(arr + shift, 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A WebDataset shard written by webdataset's own TarWriter."""
    wds = pytest.importorskip("webdataset")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def digests(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_args(tiny_vit):
    return ["--model", str(tiny_vit[0]), "--device", "cpu", "--batch-size", "4", "--workers", "0"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """pool/<class>/pNN.png, plus picture 70 (safe) and two brighter copies of it (unsafe)."""
    root = tmp_path_factory.mktemp("more") / "pool"
    for label, seeds in CLASSES.items():
        (root / label).mkdir(parents=True)
        for s in seeds:
            make_picture(s).save(root / label / f"p{s:02d}.png")
    make_picture(VOTE_SEED).save(root / "safe" / f"p{VOTE_SEED}.png")
    for shift in (6, 9):
        brighter(VOTE_SEED, shift).save(root / "unsafe" / f"p{VOTE_SEED}_plus{shift}.png")
    return root


@pytest.fixture(scope="module")
def index(pool, model_args):
    """The pool's index, shared read-only by the tests of this module (copy it to change it)."""
    out = pool.parent / "pool.idx"
    doc = run_json("retrieve", "index", pool, "--out", out, "--part-size", "4", "--faiss", "none", *model_args)
    assert doc["labels"] == {"safe": 5, "unsafe": 6, "buffer": 2}
    return out


# -- 2. filter on shards, --write-kept, --resume ------------------------------------------------------

def test_filter_shards_write_kept_holds_exactly_the_kept_samples(index, tmp_path):
    shards = tmp_path / "shards"
    plan = {"a.tar": [("safe", 0), ("unsafe", 10), ("safe", 1)], "b.tar": [("unsafe", 11), ("safe", 2)]}
    for name, samples in plan.items():
        write_shard(shards / name, [{"__key__": f"{label}{s:02d}", "png": png_bytes(near_copy(s, 200 + s)),
                                     "cls": label.encode(), "json": json.dumps({"seed": s}).encode()}
                                    for label, s in samples])
    before = digests(shards)
    report, kept = tmp_path / "report.parquet", tmp_path / "kept"
    doc = run_json("retrieve", "filter", shards / "{a,b}.tar", "--index", index, "--flag", "unsafe", "--report",
                   report, "--write-kept", kept, "--chunk", "2", "--device", "cpu", "--workers", "0")
    assert doc["decisions"] == {"flagged": 2, "kept": 3} and doc["chunks"] == 3
    assert doc["written"] == {"files": 0, "shards": 2, "samples": 3}
    assert digests(shards) == before  # the data is only read
    assert sorted(p.name for p in kept.iterdir()) == ["a.tar", "b.tar"]
    for name, samples in plan.items():
        original = tar_members(shards / name)
        wanted = {f"{label}{s:02d}" for label, s in samples if label == "safe"}
        expected = {m: data for m, data in original.items() if m.split(".", 1)[0] in wanted}
        assert len(expected) == 3 * len(wanted)  # png, cls and json of every kept sample
        assert tar_members(kept / name) == expected  # exactly these members, byte for byte


def test_filter_resume_refuses_changed_settings_then_continues(index, pool, tmp_path, monkeypatch, other_vit):
    data = tmp_path / "data"
    data.mkdir()
    for s in CLASSES["safe"] + CLASSES["unsafe"]:
        near_copy(s, 300 + s).save(data / f"q{s:02d}.png")
    report = tmp_path / "report.csv"
    args = ["retrieve", "filter", data, "--index", index, "--flag", "unsafe", "--report", report, "--chunk", "3",
            "--device", "cpu", "--workers", "0"]

    from percept_cli.retrieval.reports import ChunkedReport, partial_folder

    one_line_error(run(*args, "--model", other_vit))  # refused after the report was opened: nothing is left behind
    assert not partial_folder(report).exists() and not report.exists()

    real_write = ChunkedReport.write

    def write_then_die(self, chunk, rows):
        if self.done():
            raise RuntimeError("simulated crash after the first chunk")
        return real_write(self, chunk, rows)

    with monkeypatch.context() as patch:
        patch.setattr(ChunkedReport, "write", write_then_die)
        crashed = run(*args)
    assert crashed.exit_code == 1 and not report.exists()
    one_line_error(run(*args), "unfinished report", "--resume")  # neither overwritten nor silently resumed
    one_line_error(run(*args, "--resume", "-k", "3"), "k (1 then, 3 now)")
    one_line_error(run(*args, "--resume", "--threshold", "0.5"), "threshold")
    (data / "q00.png").rename(data / "q00_renamed.png")  # as many images as before, but not the same ones
    one_line_error(run(*args, "--resume"), "listing")
    (data / "q00_renamed.png").rename(data / "q00.png")
    doc = run_json(*args, "--resume")
    assert doc["chunks"] == 3 and doc["chunks_resumed"] == 1
    assert doc["decisions"] == {"flagged": 4, "kept": 4}
    lines = report.read_text().splitlines()
    assert len(lines) == 9 and sorted(line.split(",")[0] for line in lines[1:]) == sorted(
        str(p) for p in data.glob("*.png"))


# -- 3. index from a list file and shards with a labels CSV; add; search --------------------------------

def test_index_from_list_file_and_shards_with_labels_csv_then_add(tmp_path, model_args):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for name, seed in (("a0.png", 0), ("a1.png", 10), ("sub/a2.png", 20)):
        make_picture(seed).save(imgs / name)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "list.txt").write_text(f"# pool images\n../imgs/a0.png\n\n{imgs / 'a1.png'}\n../imgs/sub/a2.png\n")
    for name, samples in {"000.tar": [("k0", 1), ("k1", 11)], "001.tar": [("k2", 2)]}.items():
        write_shard(tmp_path / "shards" / name, [{"__key__": k, "png": png_bytes(make_picture(s)), "cls": b"safe"}
                                                 for k, s in samples])
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nimgs/a0.png,safe\nimgs/a1.png,unsafe\nshards/000.tar#k1,unsafe\n")
    out = tmp_path / "web.idx"
    doc = run_json("retrieve", "index", lists / "list.txt", tmp_path / "shards" / "{000..001}.tar", "--labels",
                   labels, "--out", out, "--part-size", "4", "--faiss", "none", *model_args)
    assert (doc["ok"], doc["failed"]) == (6, 0)
    shard = lambda name, key: f"{tmp_path / 'shards' / name}#{key}"  # noqa: E731
    expected = {str(imgs / "a0.png"): "safe", str(imgs / "a1.png"): "unsafe", str(imgs / "sub" / "a2.png"): None,
                shard("000.tar", "k0"): "safe", shard("000.tar", "k1"): "unsafe",  # the CSV overrides the cls
                shard("001.tar", "k2"): "safe"}
    assert doc["labels"] == {"safe": 3, "unsafe": 2}

    from percept_cli.retrieval.index import open_index

    def contents(path):
        idx = open_index(path)
        meta = idx.metadata(("key", "label")).to_pydict()
        vectors = np.concatenate([np.asarray(v) for v in idx.vectors()])
        return dict(zip(meta["key"], meta["label"])), dict(zip(meta["key"], vectors))

    labels_before, vectors_before = contents(out)
    assert labels_before == expected

    more = tmp_path / "more"
    (more / "unsafe").mkdir(parents=True)
    make_picture(50).save(more / "unsafe" / "m50.png")
    added = run_json("retrieve", "add", out, more, "--faiss", "none", "--device", "cpu", "--workers", "0")
    assert (added["ok"], added["new"], added["deleted"]) == (7, 1, 0)
    labels_after, vectors_after = contents(out)
    assert labels_after == {**expected, str(more / "unsafe" / "m50.png"): "unsafe"}
    for key, vector in vectors_before.items():  # the old items are kept, embeddings untouched
        assert np.array_equal(vectors_after[key], vector)

    query = tmp_path / "q50.png"
    near_copy(50, 7).save(query)
    found = run_json("retrieve", "search", query, "--index", out, "-k", "2", "--device", "cpu")
    first = found["results"][0]["neighbours"][0]
    assert first["key"] == str(more / "unsafe" / "m50.png") and first["label"] == "unsafe"


# -- 4. classify: a buffer class, and the k-NN vote --------------------------------------------------

def hand_vote(neighbours: list[dict], weighted: bool) -> str:
    """The winning label of the neighbours (sum of similarities, or counts); a tie goes to the nearest."""
    scores: dict[str, float] = {}
    for n in neighbours:
        scores[n["label"]] = scores.get(n["label"], 0.0) + (n["similarity"] if weighted else 1.0)
    best = max(scores.values())
    return next(n["label"] for n in neighbours if scores[n["label"]] == best)


def test_classify_buffer_class_and_knn_vote_by_hand(index, tmp_path):
    queries = tmp_path / "queries"
    for label, seeds in CLASSES.items():
        (queries / label).mkdir(parents=True)
        for s in seeds:
            near_copy(s, 400 + s).save(queries / label / f"q{s:02d}.png")
    near_copy(VOTE_SEED, 470).save(queries / "safe" / f"q{VOTE_SEED}.png")
    doc = run_json("retrieve", "classify", queries, "--index", index, "--device", "cpu", "--workers", "0")
    predicted = {Path(q["key"]).name: q["predicted"] for q in doc["queries"]}
    assert {n: predicted[n] for n in ("q20.png", "q21.png")} == {"q20.png": "buffer", "q21.png": "buffer"}
    conf = doc["confusion"]
    assert "buffer" in conf["pred_classes"] and "buffer" in conf["true_classes"]
    buffer_row = conf["fractions"][conf["true_classes"].index("buffer")]
    assert buffer_row[conf["pred_classes"].index("buffer")] == 1.0
    assert predicted[f"q{VOTE_SEED}.png"] == "safe"  # k=1: its own original, labelled safe

    neighbours = {Path(r["query"]).name: r["neighbours"] for r in
                  run_json("retrieve", "search", queries, "--index", index, "-k", "3", "--device", "cpu",
                           "--workers", "0")["results"]}
    assert [Path(n["key"]).name for n in neighbours[f"q{VOTE_SEED}.png"]] == [
        f"p{VOTE_SEED}.png", f"p{VOTE_SEED}_plus6.png", f"p{VOTE_SEED}_plus9.png"]
    for weighted in (True, False):
        voted = run_json("retrieve", "classify", queries, "--index", index, "-k", "3",
                         "--weighted" if weighted else "--unweighted", "--device", "cpu", "--workers", "0")
        got = {Path(q["key"]).name: q["predicted"] for q in voted["queries"]}
        assert got == {name: hand_vote(ns, weighted) for name, ns in neighbours.items()}
        assert got[f"q{VOTE_SEED}.png"] == "unsafe"  # two unsafe neighbours outvote the nearest safe one


# -- 5. dedup against an index -----------------------------------------------------------------------

def test_dedup_against_an_index_reports_matches_and_drops_them(index, pool, tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    shutil.copyfile(pool / "safe" / "p01.png", new / "copy.png")
    shutil.copyfile(pool / "safe" / "p01.png", new / "copy2.png")  # a group whose every member is in the index
    make_picture(60).save(new / "n60.png")
    shutil.copyfile(new / "n60.png", new / "n60_copy.png")
    make_picture(61).save(new / "n61.png")
    report, kept = tmp_path / "matches.jsonl", tmp_path / "kept.txt"
    doc = run_json("retrieve", "dedup", new, "--index", index, "--threshold", "0.9995", "--report", report,
                   "--kept-list", kept, "--device", "cpu", "--workers", "0")
    assert doc["matched_index"] == 2 and doc["groups"] == 2
    assert kept.read_text().splitlines() == [str(new / "n60.png"), str(new / "n61.png")]
    assert doc["kept"] == 2
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    matches = {Path(r["key"]).name: r for r in rows if r["match"] is not None}
    assert set(matches) == {"copy.png", "copy2.png"}
    for row in matches.values():
        assert row["match"] == str(pool / "safe" / "p01.png") and row["similarity"] >= 0.9995
    kept_names = {Path(line).name for line in kept.read_text().splitlines()}
    for row in rows:  # every row agrees with the kept list
        assert row["kept"] == (Path(row["key"]).name in kept_names), row
    groups = {Path(r["key"]).name: r["group"] for r in rows if r["group"] is not None}
    assert groups["copy.png"] == groups["copy2.png"] != groups["n60.png"] == groups["n60_copy.png"]


# -- 6. map ------------------------------------------------------------------------------------------

def write_oxford_tree(root: Path) -> Path:
    """roxford5k layout, two scenes without junk: per scene two database copies (easy), an unrelated
    picture (hard); the query is the scene pasted into a noisy canvas, its box around the scene."""
    from synthetic_datasets import make_revisited

    return make_revisited(root, scenes=2, size=(120, 90), junk=False)


def test_map_clean_wrong_root_and_attacked(tmp_path, model_args):
    root = write_oxford_tree(tmp_path / "roxford5k")
    out = tmp_path / "map.json"
    doc = run_json("retrieve", "map", "--dataset", "roxford5k", "--root", root, "--out", out, *model_args)
    assert set(doc["clean"]) == {"easy", "medium", "hard"} and doc["attacked"] is None
    for setup in ("easy", "medium", "hard"):
        assert 0.0 <= doc["clean"][setup]["map"] <= 100.0 and doc["clean"][setup]["n_queries"] == 2
    # easy: each query's crop is its scene, whose two copies outrank the other scene's pictures by far
    assert doc["clean"]["easy"]["map"] == 100.0 and doc["clean"]["easy"]["mp@1"] == 100.0
    assert doc["n_database"] == 6 and doc["n_queries"] == 2
    assert json.loads(out.read_text())["clean"] == doc["clean"]

    one_line_error(run("retrieve", "map", "--dataset", "roxford5k", "--root", tmp_path / "nowhere", *model_args),
                   "nowhere")
    one_line_error(run("retrieve", "map", "--dataset", "rparis6k", "--root", root, *model_args), "gnd_rparis6k.pkl")

    attacked = run_json("retrieve", "map", "--dataset", "roxford5k", "--root", root, "--attack", "linf", "--iters",
                        "1", *model_args)
    assert set(attacked["attacked"]) == {"easy", "medium", "hard"}
    assert all(0.0 <= attacked["attacked"][s]["map"] <= 100.0 for s in ("easy", "medium", "hard"))
    assert attacked["attack"]["norm"] == "linf" and attacked["attack"]["iters"] == 1
    assert attacked["clean"] == doc["clean"]
    assert attacked["adversarial_distance"] > 0.0


# -- 7. bad input: exit 2, one line, no traceback -----------------------------------------------------

def test_search_grid_with_threshold_is_refused(index, pool, tmp_path):
    one_line_error(run("retrieve", "search", pool / "safe" / "p00.png", "--index", index, "--grid",
                       tmp_path / "g.png", "--threshold", "0.5", "--device", "cpu"), "--grid", "--threshold")
    assert not (tmp_path / "g.png").exists()


def test_target_class_without_targets_and_save_adv_without_attack(index, pool, tmp_path):
    query = pool / "safe" / "p00.png"
    one_line_error(run("retrieve", "classify", query, "--index", index, "--attack", "linf", "--target-class",
                       "safe", "--device", "cpu"), "--target-class", "--attack-targets")
    one_line_error(run("retrieve", "classify", query, "--index", index, "--target-class", "safe", "--device", "cpu"),
                   "--target-class", "--attack")
    one_line_error(run("retrieve", "search", query, "--index", index, "--save-adv", tmp_path / "adv", "--device",
                       "cpu"), "--save-adv needs --attack")
    one_line_error(run("retrieve", "classify", query, "--index", index, "--save-adv", tmp_path / "adv", "--device",
                       "cpu"), "--save-adv", "--attack")
    assert not (tmp_path / "adv").exists()


def test_truncated_vector_part_is_refused(index, pool, tmp_path):
    damaged = tmp_path / "damaged.idx"
    shutil.copytree(index, damaged)
    part = sorted((damaged / "parts").glob("*.npy"))[0]
    part.write_bytes(part.read_bytes()[:-10])
    for command in (["search", pool / "safe" / "p00.png"], ["classify", pool / "safe"]):
        one_line_error(run("retrieve", *command, "--index", damaged, "--device", "cpu"), part.name)
    assert os.path.getsize(index / "parts" / part.name) == os.path.getsize(part) + 10  # the original is intact


def test_labels_csv_naming_a_missing_file_is_refused(pool, tmp_path, model_args):
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{pool / 'safe' / 'p00.png'},safe\nnot_there.png,unsafe\n")
    out = tmp_path / "never.idx"
    one_line_error(run("retrieve", "index", pool, "--labels", labels, "--out", out, "--faiss", "none", *model_args),
                   "labels.csv", "not_there.png")
    assert not out.exists()


def test_ctrl_c_says_how_to_go_on(index, pool, tmp_path, monkeypatch):
    from percept_cli.retrieval import filtering
    from percept_cli.retrieval.reports import ChunkedReport

    data = tmp_path / "data"
    data.mkdir()
    for s in CLASSES["safe"]:
        near_copy(s, 400 + s).save(data / f"q{s:02d}.png")
    report = tmp_path / "report.csv"
    args = ["retrieve", "filter", data, "--index", index, "--flag", "unsafe", "--report", report, "--chunk", "2",
            "--device", "cpu", "--workers", "0"]
    real_write = ChunkedReport.write

    def write_then_interrupt(self, chunk, rows):
        real_write(self, chunk, rows)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ChunkedReport, "write", write_then_interrupt)
        stopped = run(*args)
    assert stopped.exit_code == 130 and "Traceback" not in stopped.output
    assert "--resume to continue from the finished chunks" in stopped.stderr
    with monkeypatch.context() as patch:  # before any chunk: nothing to resume
        patch.setattr(filtering, "run_filter", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        early = run(*args[:-4], "--report", tmp_path / "r2.csv", "--device", "cpu")
    assert early.exit_code == 130 and "Nothing was saved yet" in early.stderr

    from percept_cli.retrieval import index as pool_index

    with monkeypatch.context() as patch:
        patch.setattr(pool_index, "build_index", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        building = run("retrieve", "index", pool, "--out", tmp_path / "new.idx", "--model", index_model(index),
                       "--device", "cpu")
    assert building.exit_code == 130 and "Finished parts are kept; rerun the same command" in building.stderr


def index_model(index) -> str:
    return json.loads((Path(index) / "manifest.json").read_text())["model"]["location"]


def test_write_kept_keeps_shards_of_the_same_name_apart(tmp_path):
    from percept_cli.retrieval.filtering import write_kept
    from percept_cli.retrieval.reports import write_rows
    from percept_cli.retrieval.sources import collect_items

    for folder, seeds in (("a", (1, 2)), ("b", (3, 4))):
        write_shard(tmp_path / "shards" / folder / "000.tar",
                    [{"__key__": f"k{s}", "png": png_bytes(make_picture(s)), "cls": b"x"} for s in seeds])
    listing = collect_items([tmp_path / "shards" / "a" / "000.tar", tmp_path / "shards" / "b" / "000.tar"])
    keep = {listing.items[0].key, listing.items[3].key}  # k1 of a/000.tar, k4 of b/000.tar
    report = tmp_path / "report.csv"
    write_rows(report, [{"key": i.key, "decision": "kept" if i.key in keep else "flagged", "label": None,
                         "error": None} for i in listing.items])
    written = write_kept(report, tmp_path / "kept", listing)
    assert written == {"files": 0, "shards": 2, "samples": 2}
    assert set(tar_members(tmp_path / "kept" / "a" / "000.tar")) == {"k1.png", "k1.cls"}
    assert set(tar_members(tmp_path / "kept" / "b" / "000.tar")) == {"k4.png", "k4.cls"}


def test_resume_of_a_finished_report_is_refused_not_recomputed(index, pool, tmp_path):
    report = tmp_path / "done.csv"
    args = ["retrieve", "filter", pool / "safe", "--index", index, "--flag", "unsafe", "--report", report,
            "--device", "cpu", "--workers", "0"]
    assert run(*args).exit_code == 0
    before = report.read_bytes()
    one_line_error(run(*args, "--resume"), "already complete")
    assert report.read_bytes() == before
