"""Outputs never destroy inputs or results: every command and output option, checked before model work.

The refusal tests use a model that is not in the (empty, offline) Hub cache: loading it would exit 3,
so exit 2 also proves that the check ran before any model work.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import synthetic_datasets as sd
import tiny_models
from conftest import make_picture
from typer.testing import CliRunner

from percept_cli.cli.app import app

runner = CliRunner()
UNCACHED = ["--model", "hf-hub:nobody/not-cached", "--device", "cpu"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder where no file can be created (a read-only folder; /proc when running as root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return folder
    (folder / "probe").unlink()
    return Path("/proc")


@pytest.fixture
def files(tmp_path):
    """Images, a pairs CSV, a custom dataset, a NIGHTS root, and symlinks / `..` paths onto them."""
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate("abc"):
        make_picture(i).save(images / f"{name}.png")
    (images / "pairs.csv").write_text("a,b\na.png,b.png\n")
    custom = sd.make_custom(tmp_path / "custom", labels=("left", "right"))
    nights = sd.make_nights(tmp_path / "nights", n=4)
    (tmp_path / "sub").mkdir()
    (tmp_path / "pairs-link.csv").symlink_to(images / "pairs.csv")
    (tmp_path / "a-link.png").symlink_to(images / "a.png")
    return {"images": images, "custom": custom, "nights": nights, "tmp": tmp_path}


def _cases(f):
    """(command line, protected input) for every command and output option."""
    img, tmp = f["images"], f["tmp"]
    custom, nights, custom_img = f["custom"], f["nights"], f["custom"].parent / "imgs" / "0_r.png"
    two_afc = ["attack", "2afc", "--ref", img / "a.png", "--left", img / "b.png", "--right", img / "c.png"]
    return {
        "distance --out = the pairs CSV": (["distance", "--pairs", img / "pairs.csv", "--out", img / "pairs.csv"],
                                           img / "pairs.csv"),
        "distance --out via a symlink": (["distance", "--pairs", img / "pairs.csv", "--out", tmp / "pairs-link.csv"],
                                         img / "pairs.csv"),
        "distance --out via ..": (["distance", "--pairs", img / "pairs.csv", "--out",
                                   tmp / "sub" / ".." / "images" / "pairs.csv"], img / "pairs.csv"),
        "distance --out inside an input folder": (["distance", img, "--out", img / "m.npy"], img / "a.png"),
        "attack 2afc --out = the reference via ..": ([*two_afc, "--out", img / ".." / "images" / "a.png"],
                                                     img / "a.png"),
        "attack embed --out = a target via a symlink": (["attack", "embed", img / "b.png", "--target", img / "a.png",
                                                         "--out", tmp / "a-link.png"], img / "a.png"),
        "eval-2afc --out = the dataset CSV": (["eval-2afc", "--dataset", "custom", "--root", custom, "--out", custom],
                                              custom),
        "eval-2afc --out = a dataset image": (["eval-2afc", "--dataset", "custom", "--root", custom,
                                               "--out", custom_img], custom_img),
        "eval-2afc --resume = the dataset CSV": (["eval-2afc", "--dataset", "custom", "--root", custom,
                                                  "--resume", custom], custom),
        "eval-2afc --out inside the dataset root": (["eval-2afc", "--dataset", "nights", "--root", nights,
                                                     "--out", nights / "results.json"], nights / "data.csv"),
        "eval-2afc --plot = a dataset image via a symlink": (
            ["eval-2afc", "--dataset", "custom", "--root", custom, "--attack", "linf", "--plot",
             _link(tmp / "plot.png", custom_img)], custom_img),
        "eval-2afc --save-adv = the dataset root": (["eval-2afc", "--dataset", "nights", "--root", nights,
                                                     "--attack", "linf", "--save-adv", nights], nights / "data.csv"),
        "eval-2afc --save-adv inside the dataset root via ..": (
            ["eval-2afc", "--dataset", "nights", "--root", nights, "--attack", "linf", "--save-adv",
             tmp / "sub" / ".." / "nights" / "adv"], nights / "data.csv"),
    }


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


CASES = ["distance --out = the pairs CSV", "distance --out via a symlink", "distance --out via ..",
         "distance --out inside an input folder", "attack 2afc --out = the reference via ..",
         "attack embed --out = a target via a symlink", "eval-2afc --out = the dataset CSV",
         "eval-2afc --out = a dataset image", "eval-2afc --resume = the dataset CSV",
         "eval-2afc --out inside the dataset root", "eval-2afc --plot = a dataset image via a symlink",
         "eval-2afc --save-adv = the dataset root", "eval-2afc --save-adv inside the dataset root via .."]


@pytest.mark.parametrize("case", CASES)
def test_output_onto_an_input_is_refused_before_model_work(files, empty_offline_hub, case):
    args, protected = _cases(files)[case]
    before = {p: p.read_bytes() for p in protected.parent.rglob("*") if p.is_file()}
    result = run(*args, *UNCACHED)
    assert result.exit_code == 2, result.output
    option = next(a for a in args if str(a) in {"--out", "--plot", "--save-adv", "--resume"})
    assert f"error: {option} " in result.stderr, result.stderr
    assert "input file" in result.stderr or "input folder" in result.stderr, result.stderr
    assert {p: p.read_bytes() for p in protected.parent.rglob("*") if p.is_file()} == before


def test_invert_outputs_onto_inputs_are_refused(files, tiny_vit, empty_offline_hub):
    img, tmp = files["images"], files["tmp"]
    model = tiny_vit[0]
    before = (model / "open_clip_config.json").read_bytes()
    inside_model = run("invert", "--text", "a cat", "--out", model, "--model", model, "--device", "cpu")
    assert inside_model.exit_code == 2 and "--out" in inside_model.stderr and "input folder" in inside_model.stderr
    assert (model / "open_clip_config.json").read_bytes() == before and not list(model.glob("*.png"))
    # the files invert would write are symlinks onto the --image itself: --out and --grid refused
    out = tmp / "inv"
    out.mkdir()
    _link(out / "a-link_seed0.png", img / "a.png")
    seed_file = run("invert", "--image", tmp / "a-link.png", "--out", out, *UNCACHED)
    assert seed_file.exit_code == 2 and "error: --out" in seed_file.stderr and "input file" in seed_file.stderr
    (out / "a-link_seed0.png").unlink()
    _link(out / "a-link_grid.png", img / "a.png")
    grid = run("invert", "--image", tmp / "a-link.png", "--out", out, "--grid", *UNCACHED)
    assert grid.exit_code == 2 and "error: --grid" in grid.stderr and "input file" in grid.stderr
    assert (img / "a.png").read_bytes() == (tmp / "a-link.png").read_bytes() and (img / "a.png").stat().st_size > 100


@pytest.mark.parametrize("option", ["distance --out", "attack --out", "eval-2afc --out", "eval-2afc --plot",
                                    "eval-2afc --save-adv", "invert --out"])
def test_unwritable_output_exits_2_before_any_model_is_loaded(files, empty_offline_hub, tmp_path, option):
    img, nights = files["images"], files["nights"]
    folder = unwritable_folder(tmp_path)
    eval_args = ["eval-2afc", "--dataset", "nights", "--root", nights, "--attack", "linf"]
    args = {"distance --out": ["distance", img / "a.png", img / "b.png", "--out", folder / "d.csv"],
            "attack --out": ["attack", "embed", img / "a.png", "--untargeted", "--out", folder / "adv.png"],
            "eval-2afc --out": [*eval_args, "--out", folder / "r.json"],
            "eval-2afc --plot": [*eval_args, "--plot", folder / "curve.png"],
            "eval-2afc --save-adv": [*eval_args, "--save-adv", folder / "adv"],
            "invert --out": ["invert", "--image", img / "a.png", "--out", folder / "inv"]}[option]
    result = run(*args, *UNCACHED)
    assert result.exit_code == 2, result.output
    assert f"error: {option.split()[1]} " in result.stderr and "cannot write" in result.stderr


def test_plot_without_an_attack_is_refused(files, empty_offline_hub, tmp_path):
    result = run("eval-2afc", "--dataset", "nights", "--root", files["nights"], "--plot", tmp_path / "c.png",
                 *UNCACHED)
    assert result.exit_code == 2 and "--plot" in result.stderr and "--attack" in result.stderr
    assert not (tmp_path / "c.png").exists()


def test_output_files_follow_the_umask(files, tiny_vit, tmp_path):
    out = tmp_path / "d.csv"
    old = os.umask(0o022)
    try:
        result = run("distance", files["images"] / "a.png", files["images"] / "b.png", "--out", out,
                     "--model", tiny_vit[0], "--device", "cpu")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o644  # 0666 minus umask 022, as any program's new file
    assert f"wrote 1 distance to {out}" in result.stdout  # pair mode says where it wrote


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_distance_results_printed_when_the_final_write_fails(files, tiny_vit, tmp_path, monkeypatch):
    import percept_cli.io.outputs as outputs

    monkeypatch.setattr(outputs, "write_table", _disk_full)
    img = files["images"]
    result = run("distance", img / "a.png", img / "b.png", img / "c.png", "--out", tmp_path / "rank.csv",
                 "--model", tiny_vit[0], "--device", "cpu")
    assert result.exit_code == 1
    assert "b.png" in result.stdout and "c.png" in result.stdout  # the ranking is shown
    assert f"could not write --out {tmp_path / 'rank.csv'} (No space left on device)" in result.stderr
    assert "internal error" not in result.stderr


def test_attack_report_printed_when_the_png_cannot_be_saved(files, tiny_vit, tmp_path, monkeypatch):
    import percept_cli.io.outputs as outputs

    monkeypatch.setattr(outputs, "save_png", _disk_full)
    result = run("attack", "embed", files["images"] / "a.png", "--untargeted", "--out", tmp_path / "adv.png",
                 "--iters", "2", "--model", tiny_vit[0], "--device", "cpu", "--json")
    assert result.exit_code == 1
    doc, _ = json.JSONDecoder().raw_decode(result.stdout.lstrip())  # the report comes first
    assert doc["adv_distance"] >= 0 and "saved" not in doc
    assert doc["not_written"] == [{"option": "--out", "path": str(tmp_path / "adv.png"),
                                   "reason": "No space left on device"}]


def _same_pair_custom(root: Path, n: int = 3) -> Path:
    """A custom dataset whose left candidate is a copy of the reference: every model is right (label left)."""
    csv_path = sd.make_custom(root, labels=("left",) * n)
    for i in range(n):
        shutil.copy(root / "imgs" / f"{i}_r.png", root / "imgs" / f"{i}_a.png")
    return csv_path


def test_eval_results_printed_when_out_and_plot_cannot_be_written(tmp_path, tiny_vit, monkeypatch):
    from percept_cli.cli import eval_2afc
    from percept_cli.evaluation import results

    monkeypatch.setattr(results, "save", _disk_full)
    monkeypatch.setattr(eval_2afc, "_plot", _disk_full)
    out, plot = tmp_path / "r.json", tmp_path / "curve.png"
    result = run("eval-2afc", "--dataset", "custom", "--root", _same_pair_custom(tmp_path / "c"), "--attack", "linf",
                 "--eps", "1/255", "--iters", "1", "--out", out, "--plot", plot, "--model", tiny_vit[0],
                 "--device", "cpu")
    assert result.exit_code == 1
    assert "100.0" in result.stdout  # the summary table: every triplet right when clean
    assert f"--out {out} (No space left on device)" in result.stderr
    assert f"--plot {plot} (No space left on device)" in result.stderr


def test_save_adv_keeps_each_models_images(tmp_path, tiny_vit):
    second = tmp_path / "second-model"
    tiny_models.save_open_clip_dir(second, tiny_models.VIT_CFG, seed=1)
    adv = tmp_path / "adv"
    result = run("eval-2afc", "--dataset", "custom", "--root", _same_pair_custom(tmp_path / "c"), "--attack", "linf",
                 "--eps", "1/255", "--iters", "1", "--save-adv", adv, "--model", tiny_vit[0], "--model", second,
                 "--workers", "0", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    model_folders = sorted(p for p in adv.iterdir() if p.is_dir())
    assert len(model_folders) == 2  # one folder per model, named after the --model text
    names = [p.name for p in model_folders]
    assert sum(n.endswith("tiny-vit0") for n in names) == 1 and sum(n.endswith("second-model") for n in names) == 1
    for folder in model_folders:  # every triplet is right when clean, so all 3 are attacked, per model
        assert [p.name for p in folder.iterdir()] == ["1_255"]
        assert len(list((folder / "1_255").glob("*.png"))) == 3


def test_interrupted_says_how_to_resume(tmp_path, tiny_vit, monkeypatch):
    from percept_cli.evaluation import twoafc

    def interrupted(metric, index, plan, records, dist, progress=None, flush=None):
        if flush is not None:
            flush(records)
        raise KeyboardInterrupt

    monkeypatch.setattr(twoafc, "evaluate_model", interrupted)
    args = ["eval-2afc", "--dataset", "custom", "--root", _same_pair_custom(tmp_path / "c"), "--model", tiny_vit[0],
            "--device", "cpu"]
    with_out = run(*args, "--out", tmp_path / "r.json")
    assert with_out.exit_code == 130
    assert f"interrupted. Rerun the same command with --resume {tmp_path / 'r.json'} to continue." in with_out.stderr
    without_out = run(*args)
    assert without_out.exit_code == 130 and "with --out FILE to be able to resume" in without_out.stderr


def test_wall_time_after_resume_counts_both_parts(tmp_path, tiny_vit, monkeypatch):
    from types import SimpleNamespace

    from percept_cli.evaluation import runner, twoafc

    clock = {"t": 1000.0}
    monkeypatch.setattr(runner, "time", SimpleNamespace(monotonic=lambda: clock["t"]))
    real = twoafc.evaluate_model

    def killed_after_100s(metric, index, plan, records, dist, progress=None, flush=None):
        clock["t"] += 100.0
        flush(records)  # the last flush before the kill
        raise KeyboardInterrupt

    def takes_5s(*args, **kwargs):
        clock["t"] += 5.0
        return real(*args, **kwargs)

    out = tmp_path / "r.json"
    args = ["eval-2afc", "--dataset", "custom", "--root", _same_pair_custom(tmp_path / "c"), "--model", tiny_vit[0],
            "--device", "cpu"]
    monkeypatch.setattr(twoafc, "evaluate_model", killed_after_100s)
    assert run(*args, "--out", out).exit_code == 130
    monkeypatch.setattr(twoafc, "evaluate_model", takes_5s)
    resumed = run(*args, "--resume", out)
    assert resumed.exit_code == 0, resumed.output
    entry = json.loads(out.read_text())["models"][str(tiny_vit[0])]
    assert entry["wall_time_s"] == pytest.approx(105.0)
