"""`percept compare-paper`: results documents written by hand, differences worked out here."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from percept_cli.cli.app import app
from percept_cli.models import zoo

runner = CliRunner()
ZOO = zoo.DEFAULT_MODEL


def _doc(dataset="nights", split="test", norm="linf", radii=(4 / 255, 8 / 255), models=None):
    """An eval-2afc results document as `percept eval-2afc --out` writes it (only what is compared)."""
    return {"schema": "percept.eval-2afc/3", "status": "complete",
            "dataset": {"name": dataset, "split": split, "n_triplets": 40, "subsets": [split]},
            "attack": {"norm": norm, "iters": 100} if radii else None, "radii": list(radii), "seed": 0,
            "models": models if models is not None else {}}


def _entry(zoo_name, clean, robust=(), groups=None):
    overall = {"n": 40, "clean": clean, "clean_score": clean, "robust": list(robust)}
    return {"status": "complete", "model": {"name": zoo_name or "/some/dir", "zoo": zoo_name},
            "summary": {"overall": overall, "groups": groups or {}}}


def _run(tmp_path, doc, *extra):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    return runner.invoke(app, ["compare-paper", str(path), *extra])


def _paper(name, benchmark, threat):
    result = zoo.get_spec(name).published_value(benchmark, threat)
    return None if result is None else result.value


def test_json_rows_carry_ours_paper_and_the_difference(tmp_path):
    doc = _doc(models={"rclip-f": _entry(ZOO, 0.9123, robust=(0.701, 0.45)), "mine": _entry(None, 0.8, (0.1, 0.0))})
    result = _run(tmp_path, doc, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # exactly one JSON document
    fare, mine = report["models"]
    assert (fare["name"], fare["zoo"], mine["zoo"]) == ("rclip-f", ZOO, None)
    rows = {row["threat"]: row for row in fare["rows"]}
    assert set(rows) == {"clean", "linf 4/255", "linf 8/255"}
    for threat, ours in (("clean", 91.23), ("linf 4/255", 70.1)):
        paper = _paper(ZOO, "nights", threat)
        assert paper is not None and rows[threat]["paper"] == paper and rows[threat]["benchmark"] == "nights"
        assert rows[threat]["ours"] == pytest.approx(ours)
        assert rows[threat]["diff"] == pytest.approx(ours - paper, abs=0.006)
    assert rows["linf 8/255"]["paper"] is None and rows["linf 8/255"]["diff"] is None  # nothing published
    assert all(row["paper"] is None and row["diff"] is None for row in mine["rows"])  # not a zoo model


def test_human_table_shows_the_difference_in_points_and_dashes(tmp_path):
    result = _run(tmp_path, _doc(norm="l2", radii=(3.0,), models={"m": _entry(ZOO, 0.95, robust=(0.6,))}))
    assert result.exit_code == 0, result.output
    clean, l2 = _paper(ZOO, "nights", "clean"), _paper(ZOO, "nights", "l2 3")
    lines = result.stdout.splitlines()
    assert any("clean" in ln and "95.0" in ln and f"{95.0 - clean:+.1f}" in ln for ln in lines)
    assert any("l2 3" in ln and "60.0" in ln and f"{60.0 - l2:+.1f}" in ln for ln in lines)
    other = _run(tmp_path, _doc(models={"m": _entry(None, 0.95)}))
    assert any("clean" in ln and "95.0" in ln and "–" in ln for ln in other.stdout.splitlines())


@pytest.mark.parametrize("split, benchmark", [("test_imagenet", "nights_imagenet"),
                                              ("test_no_imagenet", "nights_no_imagenet"), ("val", "nights val")])
def test_nights_split_selects_the_benchmark(tmp_path, split, benchmark):
    result = _run(tmp_path, _doc(split=split, radii=(), models={"m": _entry(ZOO, 0.9)}), "--json")
    (row,) = json.loads(result.stdout)["models"][0]["rows"]
    published = None if " " in benchmark else _paper(ZOO, benchmark, "clean")
    assert row["benchmark"] == benchmark and row["paper"] == published


def test_bapps_rows_per_subset(tmp_path):
    groups = {"cnn": {"n": 5, "clean": 0.8, "robust": [0.5]}, "deblur": {"n": 5, "clean": 0.6, "robust": [0.3]}}
    doc = _doc(dataset="bapps", split="val", radii=(4 / 255,), models={"m": _entry(ZOO, 0.7, (0.4,), groups)})
    rows = json.loads(_run(tmp_path, doc, "--json").stdout)["models"][0]["rows"]
    assert [(r["benchmark"], r["threat"], r["ours"]) for r in rows] == [
        ("bapps", "clean", 70.0), ("bapps", "linf 4/255", 40.0), ("bapps_cnn", "clean", 80.0),
        ("bapps_cnn", "linf 4/255", 50.0), ("bapps_deblur", "clean", 60.0), ("bapps_deblur", "linf 4/255", 30.0)]
    for r in rows:
        assert r["paper"] == _paper(ZOO, r["benchmark"], r["threat"])


def test_unfinished_model_is_listed_without_rows(tmp_path):
    doc = _doc(models={"m": {"status": "partial", "triplets": []}})
    result = _run(tmp_path, doc)
    assert result.exit_code == 0 and "unfinished run" in result.stdout


@pytest.mark.parametrize("content", ['{"models": {}}', "not json at all", "[1, 2]",
                                     json.dumps({**_doc(), "schema": "other/1"}),
                                     json.dumps({**_doc(), "models": {"m": 3}})])
def test_not_a_results_file_exits_2_with_one_line(tmp_path, content):
    path = tmp_path / "x.json"
    path.write_text(content)
    result = runner.invoke(app, ["compare-paper", str(path)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_missing_file_exits_2(tmp_path):
    result = runner.invoke(app, ["compare-paper", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "not found" in result.stderr


def test_results_of_an_older_schema_are_named_as_such(tmp_path):
    old = {**_doc(models={ZOO: _entry(ZOO, 0.9)}), "schema": "percept.eval-2afc/1"}
    result = _run(tmp_path, old)
    assert result.exit_code == 2
    assert "older percept" in result.output and result.output.count("error:") == 1
