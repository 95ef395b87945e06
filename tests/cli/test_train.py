"""``percept train`` on the command line: one JSON document, bad input as one line with exit code 2 before
any training step, ``push --dry-run``."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from percept_cli.cli.app import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _fare(tiny64, data, out, *extra):
    return ["train", "fare", "--data", data, "--model", tiny64, "--out", out, "--steps", "2", "--batch-size", "4",
            "--pgd-steps", "1", "--eval-iters", "2", "--eval-every", "0", "--save-every", "0", "--workers", "0",
            *extra]


def test_json_is_one_document_and_push_dry_run_lists_the_model(tiny64, train_images, tmp_path):
    out = tmp_path / "run"
    result = run(*_fare(tiny64, train_images, out, "--json", "--quiet"))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["steps"] == doc["total_steps"] == 2 and doc["method"] == "fare"
    assert doc["last_eval"]["kind"] == "eval" and "adv_distortion" in doc["last_eval"]
    info = run("models", "info", out, "--json")
    assert info.exit_code == 0 and json.loads(info.stdout)["fine_tuned"] == f"fare, from {tiny64}"
    pushed = run("train", "push", out, "--repo", "me/fare-tiny", "--dry-run", "--json")
    assert pushed.exit_code == 0, pushed.output
    files = json.loads(pushed.stdout)["files"]
    assert "open_clip_model.safetensors" in files and "percept_model.json" in files
    assert not any(f.startswith(("checkpoints", "tensorboard")) for f in files)


def test_set_reaches_the_saved_configuration(tiny64, train_images, tmp_path):
    out = tmp_path / "run"
    result = run(*_fare(tiny64, train_images, out, "--set", "val_fraction=0.25", "--set", "keep-checkpoints=1",
                        "--set", "betas=0.8,0.9", "--quiet"))
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "train_config.json").read_text())["config"]
    assert (saved["val_fraction"], saved["keep_checkpoints"], saved["betas"]) == (0.25, 1, [0.8, 0.9])
    for bad, needle in ((["--set", "val_fraction"], "KEY=VALUE"), (["--set", "steps=3"], "repeats a setting"),
                        (["--set", "colour=red"], "unknown setting 'colour'")):
        refused = run(*_fare(tiny64, train_images, tmp_path / "other", *bad))
        assert refused.exit_code == 2 and needle in refused.output, refused.output


def _names(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("only one\n")
    return names


@pytest.mark.parametrize("case", ["empty", "eps", "classnames", "exists", "no-out", "resume-other", "push-unfinished",
                                  "timm"])
def test_bad_input_is_one_line_and_exit_2(case, tiny64, train_images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    if case == "empty":
        args, needle = _fare(tiny64, empty, out), "no images found"
    elif case == "eps":
        args, needle = _fare(tiny64, train_images, out, "--eps", "4/0"), "eps"
    elif case == "classnames":
        args = ["train", "tecoa", "--data", train_images, "--classnames", _names(tmp_path), "--model", tiny64,
                "--out", out, "--steps", "1", "--batch-size", "4"]
        needle = "1 class names but the data has 2"
    elif case == "exists":
        out.mkdir()
        (out / "something").write_text("x")
        args, needle = _fare(tiny64, train_images, out), "not empty"
    elif case == "no-out":
        args, needle = ["train", "fare", "--data", train_images, "--model", tiny64], "--out"
    elif case == "resume-other":
        assert run(*_fare(tiny64, train_images, out)).exit_code == 0
        args, needle = _fare(tiny64, train_images, out, "--lr", "0.5", "--resume"), "other settings (lr)"
    elif case == "push-unfinished":
        out.mkdir()
        args, needle = ["train", "push", out, "--repo", "me/x", "--dry-run"], "no finished model"
    else:
        import tiny_models

        timm_dir = tmp_path / "timm"
        tiny_models.save_timm_dir(timm_dir)
        names = tmp_path / "two.txt"
        names.write_text("a cat\na dog\n")
        args = ["train", "tecoa", "--data", train_images, "--classnames", names, "--model", timm_dir, "--out", out,
                "--steps", "1", "--batch-size", "4"]
        needle = "needs a CLIP text tower"
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and needle in result.output, result.output
    assert "Traceback" not in result.output
    if case in ("empty", "eps", "classnames", "no-out"):
        assert not (out / "log.jsonl").exists()  # refused before any training step


def test_ctrl_c_keeps_the_checkpoint_and_says_how_to_resume(tiny64, train_images, tmp_path, monkeypatch):
    from percept_cli.training import loop

    real_save = loop.save_checkpoint

    def save_then_interrupt(directory, step, *args, **kwargs):
        path = real_save(directory, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_interrupt)
    out = tmp_path / "run"
    args = _fare(tiny64, train_images, out)
    args[args.index("--steps") + 1] = "3"
    args[args.index("--save-every") + 1] = "2"
    interrupted = run(*args)
    assert interrupted.exit_code == 130
    assert "Checkpoints are kept; rerun the same command with --resume" in interrupted.output
    resumed = run(*args, "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    doc = json.loads(resumed.stdout)
    assert doc["resumed_from"] == 2 and doc["steps"] == 3
