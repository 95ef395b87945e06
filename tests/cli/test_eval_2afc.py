"""`percept eval-2afc` end to end: record schema, resume, torchrun, bad input, plot, square, --first, protocol."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import synthetic_datasets as sd
from typer.testing import CliRunner

from percept_cli.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def nights(tmp_path_factory, tiny_vit):
    """Built and relabelled once per module (one model load); no test writes into it."""
    from test_evaluation import relabel_like_model

    from percept_cli import load_metric

    root = sd.make_nights(tmp_path_factory.mktemp("nights-data") / "nights", n=40)
    relabel_like_model(root, load_metric(str(tiny_vit[0]), device="cpu"), flip_every=5)
    return root


def _model_args(tiny_vit):
    return ["--model", str(tiny_vit[0]), "--device", "cpu", "--batch-size", "4"]


@pytest.fixture
def model_args(tiny_vit):
    return _model_args(tiny_vit)


ATTACK = ["--attack", "l2", "--sweep-eps", "0.05,0.3", "--iters", "8"]


@pytest.fixture(scope="module")
def full_run(nights, tiny_vit, tmp_path_factory):
    """(results file, CLI result) of one uninterrupted single-process ATTACK run on ``nights``: the run the
    schema test reads and the resumed and two-process runs must equal (computed once, not three times)."""
    out = tmp_path_factory.mktemp("full-run") / "full.json"
    result = run("eval-2afc", "--dataset", "nights", "--root", nights, "--split", "test", *ATTACK, "--out", out,
                 *_model_args(tiny_vit))
    assert result.exit_code == 0, result.output
    return out, result


def _comparable(doc):
    models = {}
    for name, entry in doc["models"].items():
        models[name] = {k: v for k, v in entry.items() if k not in ("wall_time_s", "world_size")}
    return models


def test_record_schema(full_run, model_args):
    from percept_cli.attacks import AttackSettings

    out, result = full_run
    doc = json.loads(out.read_text())
    assert doc["schema"] == "percept.eval-2afc/3" and doc["status"] == "complete"
    # the attack entry rebuilds the run's settings (ATTACK plus the CLI defaults); the radii are stored once
    assert "eps" not in doc["attack"] and doc["attack"]["autocast"] is None
    assert AttackSettings.from_dict(doc["attack"], eps=0.3) == AttackSettings(
        norm="l2", eps=0.3, iters=8, restarts=1, random_start=True, seed=0, loss="ce", square_queries=0)
    assert set(doc["versions"]) >= {"percept", "torch", "open_clip"}
    assert doc["dataset"]["name"] == "nights" and doc["dataset"]["split"] == "test" and doc["seed"] == 0
    assert doc["protocol"] == "paper" and doc["dataset"]["first"] is None
    assert doc["attack"]["norm"] == "l2" and doc["attack"]["iters"] == 8 and doc["radii"] == [0.05, 0.3]
    entry = doc["models"][str(model_args[1])]
    assert entry["model"]["kind"] == "local-dir" and entry["device"] == "cpu" and entry["dtype"] == "fp32"
    assert entry["eval_preprocess"] == entry["preprocess"]  # NIGHTS: the model's own preprocessing
    assert entry["wall_time_s"] > 0 and len(entry["triplets"]) == doc["dataset"]["n_triplets"] == 20
    t = entry["triplets"][0]
    assert {"id", "group", "p_right", "d_left", "d_right", "clean_score", "clean_correct", "robust_correct",
            "margin"} <= set(t)
    # an fp32 attack needs no fp32 confirmations: nothing is counted
    assert all(t["fp32_checked"] is None and t["fp32_rejected"] is None for t in entry["triplets"])
    assert "fp32_checked" not in entry["summary"]["overall"] and "autocast" not in result.stdout
    robust = entry["summary"]["overall"]["robust"]
    assert len(robust) == 2 and robust[0] >= robust[1]
    assert entry["summary"]["overall"]["clean"] == pytest.approx(0.8)
    assert entry["summary"]["overall"]["n_attacked"] == 20
    assert not list(out.parent.glob("full.json.rank*"))  # partial flushes removed after completion
    assert "2AFC agreement" in result.stdout and "l2 0.05" in result.stdout


def test_resume_equals_uninterrupted_run(nights, full_run, model_args, tmp_path, monkeypatch):
    from percept_cli.evaluation import twoafc as evaluation

    full = full_run[0]

    calls = {"n": 0}
    real = evaluation._attack_batch

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "_attack_batch", crash_on_third)
    part = tmp_path / "part.json"
    interrupted = run("eval-2afc", "--dataset", "nights", "--root", nights, *ATTACK, "--out", part,
                      "--flush-every", "0", *model_args)
    assert interrupted.exit_code == 130
    assert list(tmp_path.glob("part.json.rank0.partial.json"))  # two finished batches were flushed

    calls["n"] = -100  # no more crashes; count the batches the resumed run recomputes
    resumed = run("eval-2afc", "--dataset", "nights", "--root", nights, *ATTACK, "--resume", part, *model_args)
    assert resumed.exit_code == 0, resumed.output
    batches_total = -(-sum(1 for t in json.loads(full.read_text())["models"][str(model_args[1])]["triplets"]
                          if t["clean_correct"]) // 4)
    assert calls["n"] + 100 == batches_total - 2  # finished batches were not recomputed
    assert _comparable(json.loads(part.read_text())) == _comparable(json.loads(full.read_text()))


def test_resume_with_other_settings_refused(nights, model_args, tmp_path):
    out = tmp_path / "r.json"
    assert run("eval-2afc", "--dataset", "nights", "--root", nights, "--out", out, *model_args).exit_code == 0
    other = run("eval-2afc", "--dataset", "nights", "--root", nights, *ATTACK, "--resume", out, *model_args)
    assert other.exit_code == 2 and f"--resume {out} was made with " in other.stderr
    made_with, now = other.stderr.split("; now ")
    assert "attack=none" in made_with and "norm=l2" in now and "iters=8" in now


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_equals_single_process(nights, full_run, model_args, tmp_path):
    single, double = full_run[0], tmp_path / "double.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "percept_cli", "eval-2afc", "--dataset", "nights", "--root", str(nights), *ATTACK,
           "--out", str(double), "--quiet", *[str(a) for a in model_args]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = json.loads(single.read_text()), json.loads(double.read_text())
    assert b["models"][str(model_args[1])]["world_size"] == 2
    assert _comparable(a) == _comparable(b)


@pytest.mark.parametrize("make, args, message", [
    (lambda p: p, ["--dataset", "nights"], "not a NIGHTS root"),
    (lambda p: sd.make_nights(p / "n", n=4), ["--dataset", "nights", "--split", "dev"], "unknown NIGHTS split"),
    (lambda p: (sd.make_nights(p / "n", n=4) / "ref" / "000" / "002.png").unlink() or p / "n",
     ["--dataset", "nights"], "image not found"),
    (lambda p: ((sd.make_nights(p / "n", n=4) / "data.csv").write_text("id,votes\n1,6\n"), p / "n")[1],
     ["--dataset", "nights"], "missing column"),
    (lambda p: sd.make_bapps(p / "b", subsets=("cnn",), n=2), ["--dataset", "bapps", "--subset", "deblur"],
     "no subset"),
    (lambda p: sd.make_bapps(p / "b", subsets=("cnn",), n=2), ["--dataset", "bapps", "--attack", "l2", "--first", "1",
                                                             "--n", "1"], "--first and --n cannot be combined"),
    (lambda p: sd.make_bapps(p / "b", subsets=("cnn",), n=2), ["--dataset", "bapps", "--first", "1"],
     "add --attack"),
    (lambda p: sd.make_bapps(p / "b", subsets=("cnn",), n=2), ["--dataset", "bapps", "--protocol", "lpips"],
     "unknown --protocol"),
    (lambda p: sd.make_things_hebart(p / "t", [(1, 2, 3, 1)], list_name="list.txt"), ["--dataset", "things"],
     "Pass it with --image-list FILE"),
])
def test_bad_datasets_exit_2_before_model_work(empty_offline_hub, tmp_path, make, args, message):
    root = make(tmp_path)
    # the default model is not cached: reaching model loading would exit 3, not 2
    result = run("eval-2afc", "--root", root, *args, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_plot_save_adv_square_and_two_models(nights, model_args, tmp_path, other_vit):
    plot, adv, out = tmp_path / "curve.png", tmp_path / "adv", tmp_path / "r.json"
    result = run("eval-2afc", "--dataset", "nights", "--root", nights, "--attack", "linf", "--attack", "square",
                 "--sweep-eps", "0,0.1,0.5/255", "--iters", "5", "--square-queries", "20", "--n", "6",
                 "--plot", plot, "--save-adv", adv, "--out", out, *model_args, "--model", other_vit)
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Square Attack found" in result.stdout and "0.1/255" in result.stdout
    models = json.loads(out.read_text())["models"]
    first, second = models[str(model_args[1])], models[str(other_vit)]
    assert first["model"]["location"] != second["model"]["location"]  # each entry describes its own model
    assert [t["id"] for t in first["triplets"]] == [t["id"] for t in second["triplets"]]  # the same 6 triplets
    assert [t["d_left"] for t in first["triplets"]] != [t["d_left"] for t in second["triplets"]]  # own numbers
    folders = {p.name: p for p in adv.iterdir()}
    assert len(folders) == 2  # one --save-adv folder per model, named after its --model text
    for name, entry in ((str(model_args[1]), first), (str(other_vit), second)):
        own = next(folder for key, folder in folders.items() if key.endswith(Path(name).name))
        # the first radius attacks exactly the triplets the model gets right: one PNG each, in its own folder
        right = {t["id"] for t in entry["triplets"] if t["clean_correct"]}
        assert right and {p.stem for p in (own / "0.1_255").glob("*.png")} == right
        assert name in result.stdout


def test_same_model_twice_is_evaluated_once(nights, model_args, tmp_path):
    models_file = tmp_path / "models.txt"
    models_file.write_text(f"# a comment\n{model_args[1]}\n")
    out = tmp_path / "r.json"
    result = run("eval-2afc", "--dataset", "nights", "--root", nights, "--out", out, *model_args,
                 "--model", model_args[1], "--models-file", models_file)
    assert result.exit_code == 0, result.output
    assert f"{model_args[1]} given 3 times; evaluated once" in result.stderr
    assert "resumed" not in result.stderr  # nothing was resumed
    doc = json.loads(out.read_text())
    assert list(doc["models"]) == [str(model_args[1])] and doc["model_options"]["models"] == [str(model_args[1])]
    assert result.stdout.count(str(model_args[1])) == 1  # one table row
    twice = run("eval-2afc", "--dataset", "nights", "--root", nights, "--json", *model_args, "-m", model_args[1])
    assert "given twice; evaluated once" in twice.stderr and len(json.loads(twice.stdout)["models"]) == 1


def test_things_refuses_attack_and_json_summary(tmp_path, model_args):
    root = sd.make_things(tmp_path / "t")
    refused = run("eval-2afc", "--dataset", "things", "--root", root, "--attack", "linf", *model_args)
    assert refused.exit_code == 2 and "clean only" in refused.stderr
    clean = run("eval-2afc", "--dataset", "things", "--root", root, "--json", *model_args)
    doc = json.loads(clean.stdout)
    entry = doc["models"][str(model_args[1])]
    assert "triplets" not in entry and entry["summary"]["overall"]["n"] == 3


def test_bapps_first_n_attacks_the_first_triplets_in_path_order(tmp_path, model_args):
    # sorted path order, worked out by hand: "1-b.png" < "1-c.png" < "1.png" < "10.png" < "2.png" < "9.png" (as
    # '-' < '.' < '0' < '2'); numeric order would start with 1, 2; sorting the stems with "1", "1-b"
    root = sd.make_bapps(tmp_path / "b", subsets=("cnn", "color"), stems=["9", "2", "10", "1", "1-b", "1-c"])
    out = tmp_path / "r.json"
    result = run("eval-2afc", "--dataset", "bapps", "--root", root, "--first", "2", "--attack", "l2", "--eps", "0.05",
                 "--iters", "2", "--out", out, *model_args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["protocol"] == "paper" and doc["dataset"]["first"] == 2
    entry = doc["models"][str(model_args[1])]
    assert entry["eval_preprocess"] == {"resize": 224, "crop": None, "interpolation": "bilinear"}
    triplets = entry["triplets"]
    assert {t["id"] for t in triplets if t["attacked"]} == {"cnn/1-b", "cnn/1-c", "color/1-b", "color/1-c"}
    for t in triplets:
        if not t["attacked"]:
            assert t["robust_correct"] is None
        elif not t["clean_correct"]:
            assert t["robust_correct"] == [False]  # wrong when clean: broken
    for group in ("cnn", "color"):
        recs = [t for t in triplets if t["group"] == group]
        hit = [t for t in recs if t["attacked"]]
        stats = entry["summary"]["groups"][group]
        assert (stats["n"], stats["n_attacked"]) == (6, 2)
        assert stats["clean"] == pytest.approx(sum(t["clean_correct"] for t in recs) / 6)  # clean: all 6
        assert stats["robust"] == [pytest.approx(sum(t["robust_correct"][0] for t in hit) / 2)]  # robust: the 2
    overall = entry["summary"]["overall"]
    assert (overall["n"], overall["n_attacked"]) == (12, 4)
    assert "score" in result.stdout and "robust accuracy over 4 attacked" in result.stdout

    native = run("eval-2afc", "--dataset", "bapps", "--root", root, "--protocol", "native", "--json", *model_args)
    assert native.exit_code == 0, native.output
    doc = json.loads(native.stdout)
    entry = doc["models"][str(model_args[1])]
    assert doc["protocol"] == "native" and entry["eval_preprocess"] == entry["preprocess"]
    assert entry["preprocess"]["interpolation"] == "bicubic"


def test_things_hebart_format_with_image_list(tmp_path, model_args):
    root = sd.make_things_hebart(tmp_path / "t", [(1, 2, 3, 3), (4, 5, 6, 1)], list_name="my_list.txt")
    result = run("eval-2afc", "--dataset", "things", "--root", root, "--image-list", root / "my_list.txt", "--json",
                 *model_args)
    assert result.exit_code == 0, result.output
    overall = json.loads(result.stdout)["models"][str(model_args[1])]["summary"]["overall"]
    assert overall["n"] == 2 and 0.0 <= overall["clean"] <= 1.0


def test_fp32_confirmations_are_counted_and_noted(tmp_path, model_args, monkeypatch):
    import torch

    from percept_cli.evaluation import twoafc

    real = twoafc.attack_2afc_embedded

    def flagging(*args, **kwargs):  # pretend: every attacked triplet needed a check, fp32 refused one where it held
        report = real(*args, **kwargs)
        report.fp32_checked = torch.ones_like(report.robust_correct)
        report.fp32_rejected = report.robust_correct.clone()
        return report

    monkeypatch.setattr(twoafc, "attack_2afc_embedded", flagging)
    table = sd.make_custom(tmp_path / "c", labels=("left", "right", "left", "right"))
    args = ["eval-2afc", "--dataset", "custom", "--root", table, "--attack", "l2", "--eps", "0.001", "--iters", "1",
            "--dtype", "bf16", *model_args]
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    overall = doc["models"][str(model_args[1])]["summary"]["overall"]
    attacked = round(overall["clean"] * overall["n"])  # clean-correct triplets: the ones the attack ran on
    held = round(overall["robust"][0] * overall["n_attacked"])
    assert doc["attack"]["autocast"] == "bf16" and 0 < held <= attacked
    assert overall["fp32_checked"] == [attacked] and overall["fp32_rejected"] == [held]
    shown = run(*args)
    assert (f"bf16 autocast: a claimed break counts only once fp32 confirms it; {attacked} triplet-radius pair(s) "
            f"needed that check, and in {held} fp32 rejected a claim") in " ".join(shown.stdout.split())


def test_all_bad_images_listed_before_model_work_then_skipped(tmp_path, model_args, empty_offline_hub):
    root = sd.make_nights(tmp_path / "nights", n=12)  # test split: triplets 2, 3, 6, 7, 10, 11
    bad = ["ref/000/002.png", "distort/000/003_1.png", "distort/000/006_0.png"]
    for rel in bad:
        (root / rel).write_bytes(b"not an image")
    # the default model is not cached: loading it would exit 3; exit 2 naming every bad file comes first
    refused = run("eval-2afc", "--dataset", "nights", "--root", root, "--device", "cpu")
    assert refused.exit_code == 2, refused.output
    assert "3 unreadable" in refused.stderr and all(rel in refused.stderr for rel in bad)

    out = tmp_path / "r.json"
    skipped = run("eval-2afc", "--dataset", "nights", "--root", root, "--skip-bad", "--out", out, *model_args)
    assert skipped.exit_code == 0, skipped.output
    assert "skipped 3 triplet(s)" in skipped.stderr and "left out 3 triplet(s)" in skipped.stdout
    doc = json.loads(out.read_text())
    assert sorted(doc["skipped"]["triplets"]) == ["2", "3", "6"]
    assert sorted(p["path"].split("nights/")[1] for p in doc["skipped"]["images"]) == sorted(bad)
    entry = doc["models"][str(model_args[1])]
    assert doc["dataset"]["n_triplets"] == 3 and entry["summary"]["overall"]["n"] == 3

    intact = sd.make_nights(tmp_path / "intact", n=12)  # the same pictures, none corrupted
    full = tmp_path / "full.json"
    assert run("eval-2afc", "--dataset", "nights", "--root", intact, "--out", full, *model_args).exit_code == 0
    kept = {t["id"]: t for t in json.loads(full.read_text())["models"][str(model_args[1])]["triplets"]}
    for t in entry["triplets"]:  # the surviving triplets are scored exactly as in a run without bad files
        assert t["d_left"] == pytest.approx(kept[t["id"]]["d_left"], abs=1e-6)
        assert t["d_right"] == pytest.approx(kept[t["id"]]["d_right"], abs=1e-6)
