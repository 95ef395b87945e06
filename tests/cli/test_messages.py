"""What the CLI says: --json error documents, help texts, hints that fit the command, clear file errors."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from typer.testing import CliRunner

from percept_cli.cli.app import app

runner = CliRunner()


def run(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def _help_commands():
    """Every command path of the app (subcommands of groups included), from the assembled click tree."""
    import typer.main

    def walk(command, path):
        sub = getattr(command, "commands", None)
        if sub is None:
            yield path
            return
        yield path
        for name, child in sub.items():
            yield from walk(child, path + [name])

    return list(walk(typer.main.get_command(app), []))


# -- --json error documents ------------------------------------------------------------------------------
def _error_doc(result) -> dict:
    doc = json.loads(result.stdout)  # exactly one JSON document, nothing else on stdout
    assert set(doc) >= {"error", "hint", "exit_code"}
    assert doc["exit_code"] == result.exit_code
    return doc


def test_json_error_document_for_bad_input(image_dir):
    result = run("distance", image_dir / "a.png", image_dir / "missing.png", "--json")
    assert result.exit_code == 2
    doc = _error_doc(result)
    assert "missing.png" in doc["error"] and "file not found" in doc["error"]
    assert result.stderr.startswith("error: ") and "missing.png" in result.stderr  # the human line stays


def test_json_error_document_for_unavailable_model(empty_offline_hub):
    result = run("models", "download", "dino-vit-b16", "--json")
    assert result.exit_code == 3
    doc = _error_doc(result)
    assert "cannot be reached" in doc["error"] and doc["type"] == "ModelUnavailableError"


def test_json_error_document_for_a_command_line_error(image_dir):
    result = run("attack", "2afc", "--ref", image_dir / "a.png", "--json")  # --left and --right missing
    assert result.exit_code == 2
    doc = _error_doc(result)
    assert "--left" in doc["error"] and "Missing option" in doc["error"]


def test_no_json_document_without_json(image_dir):
    result = run("distance", image_dir / "a.png", image_dir / "missing.png")
    assert result.exit_code == 2 and result.stdout == ""


# -- help ------------------------------------------------------------------------------------------------
def test_robust_help_keeps_min_max():
    result = run("distance", "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    line = next(ln for ln in result.stdout.splitlines() if "--robust " in ln and "Also report" in ln)
    assert "report [min, max] distance" in line  # not eaten by rich markup, no double space left behind


@pytest.mark.parametrize("path", _help_commands(), ids=lambda p: " ".join(p) or "percept")
def test_help_has_plain_placeholders(path):
    result = run(*path, "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    for odd in ("<bool>", "<list[", "<str>", "<path>", "<int", "<float>"):
        assert odd not in text, f"{' '.join(path)}: {odd}"
    usage = next(ln for ln in text.splitlines() if "Usage:" in ln)
    assert not re.search(r"\{\w+\}", usage), usage  # IMAGE, not {image}
    assert "hf-hub:ORG/NAME" not in text or "hf-hub:ORG/NAME[@REV]" in text


def test_help_placeholders_where_values_go():
    embed = run("attack", "embed", "--help", env={"COLUMNS": "200"}).stdout
    assert "Usage: percept attack embed [OPTIONS] IMAGE" in embed
    assert re.search(r"--target\s+TARGET\s", embed) and re.search(r"--untargeted\s+Push", embed)
    distance = run("distance", "--help", env={"COLUMNS": "200"}).stdout
    assert "[OPTIONS] [INPUTS]..." in distance


def test_flush_every_is_documented_in_help():
    text = run("eval-2afc", "--help", env={"COLUMNS": "200"}).stdout
    line = next(ln for ln in text.splitlines() if "--flush-every" in ln)
    assert "seconds" in line


# -- hints that fit the command --------------------------------------------------------------------------
def test_bad_file_hint_names_skip_bad_only_where_it_exists(image_dir, tiny_vit):
    bad = image_dir / "bad.png"
    bad.write_bytes(b"not an image")
    distance = run("distance", image_dir / "a.png", bad, "--model", tiny_vit[0], "--device", "cpu")
    assert distance.exit_code == 2
    assert "bad.png" in distance.stderr and ". Use --skip-bad" in distance.stderr  # with its full stop
    attack = run("attack", "embed", bad, "--untargeted", "--model", tiny_vit[0], "--device", "cpu")
    assert attack.exit_code == 2 and "bad.png" in attack.stderr
    assert "--skip-bad" not in attack.stderr  # the attacked image cannot be skipped on any command


def test_option_hints_follow_the_command():
    from percept_cli.cli.errors import error_hint
    from percept_cli.errors import ImageReadError

    exc = ImageReadError("x.png", "file not found", "Check the path.",
                         option_hints={"--skip-bad": "Use --skip-bad to skip unreadable files."})
    assert error_hint(exc, {"--json"}) == "Check the path."
    assert error_hint(exc, {"--json", "--skip-bad"}) == "Check the path. Use --skip-bad to skip unreadable files."
    assert str(exc) == "x.png: file not found. Check the path."  # what library users see: no CLI flag


def test_recursive_hint_only_where_recursive_exists(image_dir, tmp_path, tiny_vit):
    empty = tmp_path / "nested"
    (empty / "sub").mkdir(parents=True)
    shutil.copy(image_dir / "a.png", empty / "sub" / "a.png")
    distance = run("distance", empty, "--model", tiny_vit[0], "--device", "cpu")
    assert distance.exit_code == 2 and "Use --recursive" in distance.stderr
    attack = run("attack", "embed", image_dir / "a.png", "--target", empty, "--model", tiny_vit[0],
                 "--device", "cpu")
    assert attack.exit_code == 2 and "no image files found" in attack.stderr
    assert "--recursive" not in attack.stderr


# -- files that are not what they seem -------------------------------------------------------------------
def test_pairs_dev_null_is_not_a_regular_file():
    result = run("distance", "--pairs", os.devnull)
    assert result.exit_code == 2
    assert "not a regular file" in result.stderr and "not found" not in result.stderr


def test_symlink_loop_is_named(tmp_path, image_dir):
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    result = run("distance", image_dir / "a.png", loop)
    assert result.exit_code == 2
    assert "symlink loop" in result.stderr and "not found" not in result.stderr
    pairs = tmp_path / "pairs.csv"
    pairs.symlink_to(pairs)
    result = run("distance", "--pairs", pairs)
    assert result.exit_code == 2 and "symlink loop" in result.stderr


def test_empty_pairs_csv_says_empty(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("")
    result = run("distance", "--pairs", pairs)
    assert result.exit_code == 2 and "file is empty" in result.stderr


def test_model_path_that_does_not_exist(image_dir, tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    result = run("distance", image_dir / "a.png", image_dir / "b.png", "-m", missing)
    assert result.exit_code == 2
    assert "no such directory" in result.stderr and "unknown model" not in result.stderr
    relative = run("distance", image_dir / "a.png", image_dir / "b.png", "-m", "./not-here")
    assert relative.exit_code == 2 and "no such directory" in relative.stderr


def test_pairs_row_with_missing_file_names_its_line(image_dir, tiny_vit):
    pairs = image_dir / "pairs.csv"
    pairs.write_text("a,b\na.png,b.png\n\nc.png,gone.png\n")  # the bad row is line 4 of the file
    result = run("distance", "--pairs", pairs, "--model", tiny_vit[0], "--device", "cpu")
    assert result.exit_code == 2
    assert "gone.png" in result.stderr and "line 4" in result.stderr


def test_things_table_is_titled_by_its_task(tmp_path, tiny_vit):
    import synthetic_datasets as sd

    root = sd.make_things(tmp_path / "t")
    result = run("eval-2afc", "--dataset", "things", "--root", root, "--model", tiny_vit[0], "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "odd-one-out agreement with people" in result.stdout and "2AFC" not in result.stdout
    assert "  " not in result.stdout.splitlines()[0].strip()  # no double space where the split is missing
    assert "nearer candidate" not in result.stdout  # the 2AFC legend does not describe odd-one-out


def test_rank_title_is_one_unbroken_line(image_dir, tiny_vit, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "reference-image-with-a-long-name.png"
    deep.parent.mkdir(parents=True)
    shutil.copy(image_dir / "a.png", deep)
    result = run("distance", deep, image_dir / "b.png", image_dir / "c.png", "--model", tiny_vit[0],
                 "--device", "cpu", env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    assert f"distance to {deep}" in result.stdout.splitlines()  # not wrapped in the middle of the path


# -- models download, attack messages --------------------------------------------------------------------
def test_failed_download_says_what_to_do_instead(empty_offline_hub):
    result = run("models", "download", "dino-vit-b16")
    assert result.exit_code == 3
    assert "percept models download" not in result.stderr  # running it again would not help
    assert "HF_HUB_OFFLINE" in result.stderr


def test_attack_embed_json_has_no_2afc_settings(tiny_vit, image_dir):
    result = run("attack", "embed", image_dir / "a.png", "--untargeted", "--iters", "2", "--json",
                 "--model", tiny_vit[0], "--device", "cpu")
    assert result.exit_code == 0, result.output
    threat = json.loads(result.stdout)["threat"]
    assert "loss" not in threat and "square_queries" not in threat and threat["iters"] == 2


def test_attack_2afc_tie_is_called_a_tie(tiny_vit, image_dir):
    # both candidates are the same picture: sim(ref, left) == sim(ref, right) exactly. The paper authors'
    # rule pred = (sim_right > sim_left) picks left on a tie, so the model's own label is left and correct,
    # and no perturbation of the reference can ever separate two identical candidates
    shutil.copy(image_dir / "b.png", image_dir / "b-copy.png")
    args = ["attack", "2afc", "--ref", image_dir / "a.png", "--left", image_dir / "b.png",
            "--right", image_dir / "b-copy.png", "--iters", "2", "--model", tiny_vit[0], "--device", "cpu"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "the clean similarities tie, and a tie picks the left candidate" in result.stdout
    assert "label: left (model's clean decision" in result.stdout and "decision held" in result.stdout
    doc = json.loads(run(*args, "--json").stdout)
    assert doc["clean"]["tie"] is True and doc["clean"]["sim_left"] == doc["clean"]["sim_right"]
    assert doc["clean"]["decision"] == doc["adversarial"]["decision"] == doc["label"] == "left"
    assert doc["clean_correct"] is True and doc["flipped"] is False
    given_right = run(*args, "--label", "right")  # a tie against a right label is wrong before any attack
    assert "label: right (given)" in given_right.stdout
    assert "already wrong before the attack (a tie picks the left candidate)" in given_right.stdout


@pytest.mark.parametrize("path", [["attack", "2afc"], ["attack", "embed"], ["distance"], ["embed"], ["invert"],
                                  ["eval-2afc"]], ids=" ".join)
def test_every_dtype_option_has_the_one_help_text(path):
    from percept_cli.cli.options import DTYPE_HELP

    text = run(*path, "--help", env={"COLUMNS": "100"}).stdout
    flat = " ".join(text.replace("\u2502", " ").split())  # the panel's borders and line breaks removed
    assert " ".join(DTYPE_HELP.split()) in flat


def test_square_finding_nothing_is_reported(tiny_vit, image_dir):
    # a radius too small to change anything: APGD and Square both fail, and the human output says so
    result = run("attack", "2afc", "--ref", image_dir / "a.png", "--left", image_dir / "a.png",
                 "--right", image_dir / "c.png", "--eps", "1e-6", "--iters", "2", "--square",
                 "--square-queries", "5", "--model", tiny_vit[0], "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "decision held" in result.stdout
    assert "Square Attack (5 queries) found nothing" in result.stdout
