"""`percept retrieve`: index → search / classify / filter / dedup through the CLI, on a labelled pool of
tiny synthetic pictures and a 1-layer ViT. Queries are lightly perturbed copies of pool pictures, so the
right answer (the pool picture each came from, and its class) is known without the code under test."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import make_picture
from PIL import Image
from typer.testing import CliRunner

from percept_cli.cli.app import app

runner = CliRunner()
CLASSES = {"safe": [0, 1, 2, 3], "unsafe": [10, 11, 12, 13], "buffer": [20, 21]}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def run_json(*args):
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def near_copy(seed: int, noise_seed: int) -> Image.Image:
    """The pool picture ``seed`` with +-2 grey levels of noise: nearest to its original by construction."""
    arr = np.asarray(make_picture(seed), dtype=np.int16)
    noise = np.random.default_rng(noise_seed).integers(-2, 3, arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


@pytest.fixture
def pool(tmp_path):
    root = tmp_path / "pool"
    for label, seeds in CLASSES.items():
        (root / label).mkdir(parents=True)
        for s in seeds:
            make_picture(s).save(root / label / f"p{s:02d}.png")
    return root


@pytest.fixture
def queries(tmp_path):
    """queries/<class>/q<seed>.png: near copies of the safe and unsafe pool pictures."""
    root = tmp_path / "queries"
    for label in ("safe", "unsafe"):
        (root / label).mkdir(parents=True)
        for s in CLASSES[label]:
            near_copy(s, 100 + s).save(root / label / f"q{s:02d}.png")
    return root


@pytest.fixture
def model_args(tiny_vit):
    return ["--model", str(tiny_vit[0]), "--device", "cpu", "--batch-size", "3"]


@pytest.fixture
def built(pool, tmp_path, model_args):
    index = tmp_path / "pool.idx"
    doc = run_json("retrieve", "index", pool, "--out", index, "--part-size", "4", "--faiss", "none", *model_args)
    return index, doc


def test_index_counts_labels_and_updates_incrementally(built, pool, model_args):
    index, doc = built
    assert (doc["ok"], doc["failed"], doc["new"]) == (10, 0, 10)
    assert doc["labels"] == {"safe": 4, "unsafe": 4, "buffer": 2}
    again = run_json("retrieve", "index", pool, "--out", index, "--part-size", "4", "--faiss", "none", *model_args)
    assert (again["new"], again["changed"], again["deleted"], again["parts_written"]) == (0, 0, 0, 0)
    make_picture(30).save(pool / "safe" / "p30.png")
    (pool / "buffer" / "p21.png").unlink()
    (pool / "unsafe" / "broken.png").write_bytes(b"not a png")
    grown = run_json("retrieve", "index", pool, "--out", index, "--part-size", "4", "--faiss", "none", *model_args)
    assert (grown["new"], grown["deleted"], grown["ok"], grown["failed"]) == (2, 1, 10, 1)  # broken.png counts as new
    assert [f["key"].endswith("broken.png") for f in grown["failures"]] == [True]


def test_search_finds_each_pool_picture_first(built, pool, model_args):
    index, _ = built
    picture = pool / "unsafe" / "p11.png"
    doc = run_json("retrieve", "search", picture, "--index", index, "-k", "3", "--device", "cpu")
    first = doc["results"][0]["neighbours"][0]
    assert first["key"] == str(picture) and first["label"] == "unsafe" and first["similarity"] > 0.999
    assert [n["rank"] for n in doc["results"][0]["neighbours"]] == [1, 2, 3]
    sims = [n["similarity"] for n in doc["results"][0]["neighbours"]]
    assert sims == sorted(sims, reverse=True)
    ranged = run_json("retrieve", "search", picture, "--index", index, "--threshold", str(sims[1] - 1e-3),
                      "--device", "cpu")
    assert {n["key"] for n in ranged["results"][0]["neighbours"]} >= {n["key"] for n in
                                                                       doc["results"][0]["neighbours"][:2]}
    assert all(n["similarity"] >= sims[1] - 1e-3 for n in ranged["results"][0]["neighbours"])


def test_search_under_attack_with_grid_and_saved_images(built, queries, tmp_path, model_args):
    index, _ = built
    grid, adv = tmp_path / "grid.png", tmp_path / "adv"
    doc = run_json("retrieve", "search", queries / "safe" / "q00.png", queries / "safe" / "q01.png", "--index", index,
                   "-k", "2", "--attack", "linf", "--eps", "8/255", "--iters", "3", "--grid", grid, "--save-adv", adv,
                   "--device", "cpu")
    assert doc["attack"]["norm"] == "linf" and len(doc["results"]) == 2
    for result in doc["results"]:
        assert len(result["attacked"]["neighbours"]) == 2 and 0.0 <= result["attacked"]["kept"] <= 1.0
    sheet = Image.open(grid)
    assert sheet.height > 2 * 160  # two queries x (clean row + attacked row)
    saved = sorted(p.name for p in adv.iterdir())
    assert saved == ["q00_adv.png", "q01_adv.png"]
    # saved images are 8-bit and inside the l_inf ball around the clean (preprocessed) query
    assert np.asarray(Image.open(adv / "q00_adv.png")).shape[-1] == 3


def test_classify_confusion_and_or_with(built, queries, tmp_path):
    index, _ = built
    doc = run_json("retrieve", "classify", queries, "--index", index, "--device", "cpu")
    conf = doc["confusion"]
    assert conf["true_classes"][:2] == ["safe", "unsafe"]
    for row, name in zip(conf["fractions"], conf["true_classes"]):
        assert row[conf["pred_classes"].index(name)] == 1.0  # every near copy retrieves its own class
    flags = tmp_path / "flags.csv"
    flags.write_text("path,flag\n" + f"{queries / 'safe' / 'q00.png'},1\n" +
                     "".join(f"{q},0\n" for q in sorted(queries.rglob('*.png')) if q.name != "q00.png"))
    combined = run_json("retrieve", "classify", queries, "--index", index, "--or-with", flags, "--device", "cpu")
    assert combined["counts"] == {"safe": 3, "unsafe": 5}
    partial = tmp_path / "partial.csv"
    partial.write_text("path,flag\n" + f"{queries / 'safe' / 'q00.png'},1\n")
    missing = run("retrieve", "classify", queries, "--index", index, "--or-with", partial, "--device", "cpu")
    assert missing.exit_code == 2 and "no flag for 7 of the 8 queries" in missing.output, missing.output


def test_classify_targeted_attack_reports_both_tables(built, queries, pool, tmp_path):
    index, _ = built
    targets = tmp_path / "targets"
    targets.mkdir()
    for s in (40, 41):
        make_picture(s).save(targets / f"t{s}.png")
    out = tmp_path / "per_query.csv"
    doc = run_json("retrieve", "classify", queries / "unsafe", "--index", index, "--truth", "none", "--attack", "linf",
                   "--eps", "8/255", "--iters", "2", "--attack-targets", targets, "--target-class", "safe",
                   "--out", out, "--device", "cpu")
    assert doc["attack"]["targeted"] and len(doc["attack"]["targets"]) == 2
    assert 0.0 <= doc["attack"]["success_rate"] <= 1.0
    assert sum(doc["attacked_counts"].values()) == 4
    lines = out.read_text().splitlines()
    assert lines[0].startswith("key,truth,predicted") and len(lines) == 5


def test_filter_flags_writes_report_and_copies_kept_without_touching_data(built, queries, tmp_path):
    index, _ = built
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in queries.rglob("*.png")}
    report, kept = tmp_path / "report.csv", tmp_path / "kept"
    doc = run_json("retrieve", "filter", queries, "--index", index, "--flag", "unsafe", "--report", report,
                   "--write-kept", kept, "--chunk", "3", "--device", "cpu")
    assert doc["decisions"] == {"flagged": 4, "kept": 4} and doc["chunks"] == 3
    rows = report.read_text().splitlines()
    assert len(rows) == 9
    flagged = {line.split(",")[0] for line in rows[1:] if ",flagged," in line}
    assert flagged == {str(p) for p in (queries / "unsafe").glob("*.png")}
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*.png")) == \
        [f"safe/q{s:02d}.png" for s in CLASSES["safe"]]
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in queries.rglob("*.png")}
    refused = run("retrieve", "filter", queries, "--index", index, "--flag", "nsfw", "--report", tmp_path / "r2.csv",
                  "--device", "cpu")
    assert refused.exit_code == 2 and "nsfw" in refused.output


def test_dedup_groups_copies(tmp_path, model_args):
    folder = tmp_path / "photos"
    folder.mkdir()
    for s in (0, 1, 2):
        make_picture(s).save(folder / f"{s}.png")
    (folder / "0_copy.png").write_bytes((folder / "0.png").read_bytes())
    kept = tmp_path / "kept.txt"
    doc = run_json("retrieve", "dedup", folder, "--threshold", "0.9999", "--kept-list", kept, *model_args)
    assert doc["group_members"] == [[str(folder / "0.png"), str(folder / "0_copy.png")]]
    assert kept.read_text().splitlines() == [str(folder / n) for n in ("0.png", "1.png", "2.png")]


def test_bad_index_and_other_model_are_refused(tmp_path, built, pool, other_vit):
    not_index = tmp_path / "empty"
    not_index.mkdir()
    result = run("retrieve", "search", pool / "safe" / "p00.png", "--index", not_index, "--device", "cpu")
    assert result.exit_code == 2 and "index" in result.output and "Traceback" not in result.output
    index, _ = built
    result = run("retrieve", "search", pool / "safe" / "p00.png", "--index", index, "--model", other_vit,
                 "--device", "cpu")
    assert result.exit_code == 2 and "Traceback" not in result.output
