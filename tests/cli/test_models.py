"""`percept models list|info|download` through Typer's test runner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from percept_cli.models import zoo
from percept_cli.cli.app import app

runner = CliRunner()


def test_list_json_matches_zoo():
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["default"] == zoo.DEFAULT_MODEL
    assert [m["name"] for m in doc["models"]] == [s.name for s in zoo.list_models()]
    for entry in doc["models"]:
        spec = zoo.get_spec(entry["name"])
        for key, threat in (("clean", "clean"), ("linf", "linf 4/255"), ("l2", "l2 3")):
            published = spec.published_value("nights", threat)
            assert entry["nights"][key] == (None if published is None else published.value)
        assert len(entry["published"]) == len(spec.published)
    default = next(m for m in doc["models"] if m["name"] == zoo.DEFAULT_MODEL)
    assert None not in default["nights"].values()


def test_list_table():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    for spec in zoo.list_models():
        assert spec.name in result.stdout


def test_info_cached(offline_hub):
    result = runner.invoke(app, ["models", "info", "rclip-f", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["present"] is True and doc["path"].startswith(str(offline_hub)) and len(doc["revision"]) == 40


def _published_rows(spec):
    return {(r.benchmark, r.threat, r.value, r.source) for r in spec.published}


@pytest.mark.parametrize("name", [zoo.DEFAULT_MODEL, "rclip-t-vit-b16", "dino-vit-b16"])
def test_info_shows_every_published_number_with_its_source(empty_offline_hub, name):
    spec = zoo.get_spec(name)
    doc = json.loads(runner.invoke(app, ["models", "info", name, "--json"]).stdout)
    assert {(r["benchmark"], r["threat"], r["value"], r["source"]) for r in doc["published"]} == _published_rows(spec)
    human = runner.invoke(app, ["models", "info", name])
    assert human.exit_code == 0, human.output
    lines = human.stdout.splitlines()
    for benchmark, threat, value, source in _published_rows(spec):
        assert any(benchmark in ln and threat in ln and f"{value:.1f}" in ln and source in ln for ln in lines)
    if not spec.published:
        assert "none found" in human.stdout


def test_info_uncached_and_download_offline(empty_offline_hub):
    info = runner.invoke(app, ["models", "info", "dino-vit-b16"])
    assert info.exit_code == 0 and "not cached" in info.stdout
    download = runner.invoke(app, ["models", "download", "dino-vit-b16"])
    assert download.exit_code == 3 and "cannot be reached" in download.stderr


def test_download_cached_is_a_noop(offline_hub):
    result = runner.invoke(app, ["models", "download", "rclip-t-vit-b32", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["repo_id"] == "chs20/TeCoA4-ViT-B-32-laion2B-s34B-b79K"


def test_unknown_model_info():
    result = runner.invoke(app, ["models", "info", "nope"])
    assert result.exit_code == 2 and result.stderr.startswith("error: unknown model")


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).stdout.startswith("percept ")
    assert runner.invoke(app, ["--help"]).exit_code == 0
