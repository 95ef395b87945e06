"""`--resume` of eval-2afc: every setting is checked against the results file AND the partial files.

The partial files come from the real code path: an eval-2afc run interrupted after its first
flushed attack batch (the normal state after a kill: no results file, only partial files).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import synthetic_datasets as sd
from typer.testing import CliRunner

from percept_cli.cli.app import app
from percept_cli.errors import BadInputError
from percept_cli.evaluation import results
from percept_cli.evaluation import twoafc as evaluation

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


BASE_ATTACK = ["--attack", "l2", "--sweep-eps", "0.05,0.3", "--iters", "2"]


@pytest.fixture(scope="module")
def interrupted(tiny_vit, tmp_path_factory):
    """(dataset root, model dir, folder holding only `part.json.rank0.partial.json`) of a killed run."""
    base = tmp_path_factory.mktemp("resume")
    root = sd.make_nights(base / "nights", rows=[{"id": i, "right_vote": i % 2, "split": "test" if i < 8 else "val"}
                                                     for i in range(10)])
    calls = {"n": 0}
    real = evaluation._attack_batch

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "_attack_batch", crash_on_second)
        result = run("eval-2afc", "--dataset", "nights", "--root", root, *BASE_ATTACK, "--out", base / "part.json",
                     "--flush-every", "0", "--model", tiny_vit[0], "--device", "cpu", "--batch-size", "1")
    assert result.exit_code == 130, result.output
    assert not (base / "part.json").exists() and (base / "part.json.rank0.partial.json").is_file()
    return root, tiny_vit[0], base


@pytest.fixture
def partial_only(interrupted, tmp_path):
    """A fresh copy of the interrupted run's partial file; returns (root, model, results path)."""
    root, model, base = interrupted
    shutil.copy(base / "part.json.rank0.partial.json", tmp_path / "part.json.rank0.partial.json")
    return root, model, tmp_path / "part.json"


def _resume(root, model, out, *extra, attack=BASE_ATTACK, dataset=("--dataset", "nights")):
    return run("eval-2afc", *dataset, "--root", root, *attack, "--resume", out, "--model", model,
               "--device", "cpu", "--batch-size", "1", *extra)


def test_partial_file_carries_the_settings(interrupted):
    _, model, base = interrupted
    data = json.loads((base / "part.json.rank0.partial.json").read_text())
    assert data["model"] == str(model) and data["records"]
    s = data["settings"]
    assert s["attack"]["norm"] == "l2" and s["attack"]["iters"] == 2 and s["radii"] == [0.05, 0.3]
    assert s["dataset"]["name"] == "nights" and s["seed"] == 0 and s["protocol"] == "paper"
    assert s["model_options"]["models"] == [str(model)] and s["model_options"]["dtype"] == "fp32"


# option(s) given on resume -> the setting the refusal must name, with its old and new value
CLI_CHANGES = [
    (["--split", "val"], "split=test", "split=val"),
    (["--n", "3"], "n=none", "n=3"),
    (["--first", "2"], "first=none", "first=2"),
    (["--seed", "1"], "seed=0", "seed=1"),
    (["--iters", "3"], "iters=2", "iters=3"),
    (["--restarts", "2"], "restarts=1", "restarts=2"),
    (["--loss", "margin"], "loss=ce", "loss=margin"),
    (["--no-random-start"], "random_start=true", "random_start=false"),
    (["--attack", "square", "--square-queries", "7"], "square_queries=0", "square_queries=7"),
    (["--dtype", "bf16"], "autocast=none", "autocast=bf16"),
    (["--protocol", "native"], "protocol=paper", "protocol=native"),
    (["--resize", "40"], "resize=default", "resize=40"),
    (["--crop", "none"], "crop=default", "crop=none"),
    (["--crop", "256"], "crop=default", "crop=256"),
    (["--pooling", "token"], "pooling=default", "pooling=token"),
]


@pytest.mark.parametrize("extra, old, new", CLI_CHANGES,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_resume_with_a_different_option_is_refused_with_only_partials(partial_only, extra, old, new):
    root, model, out = partial_only
    before = (out.parent / "part.json.rank0.partial.json").read_bytes()
    result = _resume(root, model, out, *extra)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "part.json.rank0.partial.json was made with" in message
    made_with, now = message.split("; now ", 1)
    assert old in made_with and new in now
    assert not out.exists() and (out.parent / "part.json.rank0.partial.json").read_bytes() == before


def test_resume_with_another_attack_batch_size_gives_the_uninterrupted_results(partial_only, tmp_path):
    """APGD seeds each triplet by its dataset position: the attack batches may change on resume."""
    root, model, out = partial_only
    resumed = _resume(root, model, out, "--attack-batch-size", "3")  # the interrupted run attacked 1 at a time
    assert resumed.exit_code == 0, resumed.output
    full = tmp_path / "full.json"
    assert run("eval-2afc", "--dataset", "nights", "--root", root, *BASE_ATTACK, "--out", full, "--model", model,
               "--device", "cpu", "--batch-size", "1").exit_code == 0
    got, want = ({t["id"]: t for t in json.loads(p.read_text())["models"][str(model)]["triplets"]} for p in (out, full))
    assert got.keys() == want.keys() and any(t["attacked"] and t["clean_correct"] for t in want.values())
    for key, rec in want.items():  # decisions identical; margins up to float32 rounding of batched matmuls
        assert {k: v for k, v in got[key].items() if k != "margin"} == {k: v for k, v in rec.items() if k != "margin"}
        assert got[key]["margin"] == pytest.approx(rec["margin"], abs=1e-6)


def test_with_square_the_attack_batch_size_is_a_setting(interrupted, tmp_path):
    """Square Attack draws its random squares for a whole batch, so its outcomes depend on the batches:
    with --attack square the attack batch size (on a CPU, --batch-size by default) must match on resume."""
    root, model, _ = interrupted
    out = tmp_path / "square.json"
    attack = ["--attack", "l2", "--attack", "square", "--square-queries", "2", "--sweep-eps", "0.05", "--iters", "1"]
    first = run("eval-2afc", "--dataset", "nights", "--root", root, *attack, "--out", out, "--model", model,
                "--device", "cpu", "--batch-size", "2")
    assert first.exit_code == 0, first.output
    assert json.loads(out.read_text())["attack_batch_size"] == 2
    other = _resume(root, model, out, "--attack-batch-size", "3", attack=attack)
    assert other.exit_code == 2, other.output
    made_with, now = other.stderr.split("; now ")
    assert "attack_batch_size=2" in made_with and "attack_batch_size=3" in now


def test_resuming_l2_partials_with_linf_is_refused(partial_only):
    """The reported case: an l2 partial resumed as linf used to mix the two attacks."""
    root, model, out = partial_only
    result = _resume(root, model, out, attack=["--attack", "linf", "--sweep-eps", "1,2/255", "--iters", "2"])
    assert result.exit_code == 2
    made_with, now = result.stderr.split("; now ")
    assert "norm=l2" in made_with and "eps=0.05,0.3" in made_with
    assert "norm=linf" in now and "eps=1/255,2/255" in now
    assert "iters" not in result.stderr  # only what differs


@pytest.mark.parametrize("what", ["root", "model", "eps", "no attack"])
def test_resume_with_other_data_model_or_radii_is_refused(partial_only, tmp_path, what):
    root, model, out = partial_only
    if what == "root":
        other = shutil.copytree(root, tmp_path / "nights-copy")
        result = _resume(other, model, out)
        key = "root="
    elif what == "model":
        other = shutil.copytree(model, tmp_path / "model-copy")
        result = _resume(root, other, out)
        key = "models="
    elif what == "eps":
        result = _resume(root, model, out, attack=["--attack", "l2", "--sweep-eps", "0.05,0.4", "--iters", "2"])
        key = "eps="
    else:
        result = _resume(root, model, out, attack=[])
        key = "attack=none"
    assert result.exit_code == 2, result.output
    assert key in result.stderr.split("; now ")[1 if what == "no attack" else 0]


def test_truncated_partial_file_is_reported_not_ignored(partial_only):
    root, model, out = partial_only
    part = out.parent / "part.json.rank0.partial.json"
    part.write_bytes(part.read_bytes()[:-40])
    result = _resume(root, model, out)
    assert result.exit_code == 2
    assert "part.json.rank0.partial.json" in result.stderr and "truncated" in result.stderr


@pytest.mark.parametrize("content", ["[1, 2]", '"a string"', "{}", "null", "3", '{"schema": "something/1"}',
                                     json.dumps({"schema": results.SCHEMA, "models": [1, 2]}),
                                     json.dumps({"schema": results.SCHEMA, "models": {"m": {"triplets": [3]}}})])
def test_resume_file_that_is_not_a_results_document_exits_2(interrupted, tmp_path, content):
    root, model, _ = interrupted
    out = tmp_path / "r.json"
    out.write_text(content)
    result = _resume(root, model, out)
    assert result.exit_code == 2, result.output
    assert str(out) in result.stderr and "Traceback" not in result.output


# -- the checks themselves, on documents and partial files written by results.save/save_partial -------
SETTINGS = {"dataset": {"name": "nights", "root": "/data/nights", "split": "test", "subsets": ["test"], "n": None,
                        "first": None, "n_triplets": 8, "task": "2afc", "triplets": None, "image_list": None},
            "protocol": "paper",
            "attack": {"norm": "linf", "iters": 100, "restarts": 1, "random_start": True, "seed": 0, "loss": "ce",
                       "autocast": None, "square_queries": 5000, "square_p_init": 0.8, "force": False},
            "radii": [4 / 255], "seed": 0,
            "model_options": {"models": ["m"], "checkpoint": None, "dtype": "fp32", "resize": None, "crop": None,
                              "pooling": None}}

# (path into SETTINGS, new value, what the message says before and after)
CHANGES = [
    (("dataset", "name"), "bapps", "dataset=nights", "dataset=bapps"),
    (("dataset", "root"), "/data/other", "root=/data/nights", "root=/data/other"),
    (("dataset", "split"), "val", "split=test", "split=val"),
    (("dataset", "subsets"), ["cnn", "color"], "subsets=test", "subsets=cnn,color"),
    (("dataset", "n"), 50, "n=none", "n=50"),
    (("dataset", "first"), 5, "first=none", "first=5"),
    (("dataset", "n_triplets"), 9, "n_triplets=8", "n_triplets=9"),
    (("dataset", "triplets"), "/t.txt", "triplets=default", "triplets=/t.txt"),
    (("protocol",), "native", "protocol=paper", "protocol=native"),
    (("attack", "norm"), "l2", "norm=linf", "norm=l2"),
    (("attack", "iters"), 50, "iters=100", "iters=50"),
    (("attack", "restarts"), 3, "restarts=1", "restarts=3"),
    (("attack", "loss"), "margin", "loss=ce", "loss=margin"),
    (("attack", "random_start"), False, "random_start=true", "random_start=false"),
    (("attack", "square_queries"), 100, "square_queries=5000", "square_queries=100"),
    (("attack", "square_p_init"), 0.5, "square_p_init=0.8", "square_p_init=0.5"),
    (("attack", "autocast"), "bf16", "autocast=none", "autocast=bf16"),
    (("radii",), [4 / 255, 8 / 255], "eps=4/255", "eps=4/255,8/255"),
    (("seed",), 7, "seed=0", "seed=7"),
    (("model_options", "models"), ["m", "k"], "models=m", "models=m,k"),
    (("model_options", "checkpoint"), "/w.safetensors", "checkpoint=none", "checkpoint=/w.safetensors"),
    (("model_options", "dtype"), "bf16", "dtype=fp32", "dtype=bf16"),
    (("model_options", "resize"), 256, "resize=default", "resize=256"),
    (("model_options", "crop"), "none", "crop=default", "crop=none"),
    (("model_options", "pooling"), "token", "pooling=default", "pooling=token"),
    (("attack_batch_size",), 64, "attack_batch_size=default", "attack_batch_size=64"),  # recorded with Square only
]


def _changed(path, value):
    settings = copy.deepcopy(SETTINGS)
    target = settings
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return settings


def _flush(out, settings, model="m"):
    results.save_partial(out, 0, model, {"t1": {"id": "t1", "robust_correct": [True]}}, settings)


@pytest.mark.parametrize("path, value, old, new", CHANGES, ids=lambda v: ".".join(v) if isinstance(v, tuple) else None)
def test_every_setting_is_checked_in_partial_files(tmp_path, path, value, old, new):
    out = tmp_path / "r.json"
    _flush(out, SETTINGS)
    with pytest.raises(BadInputError) as err:
        results.load_for_resume(out, _changed(path, value))
    message = str(err.value)
    assert "\n" not in message and "r.json.rank0.partial.json was made with" in message
    made_with, now = message.split("; now ")
    assert old in made_with and new in now


@pytest.mark.parametrize("path, value, old, new", CHANGES, ids=lambda v: ".".join(v) if isinstance(v, tuple) else None)
def test_every_setting_is_checked_in_the_results_file(tmp_path, path, value, old, new):
    out = tmp_path / "r.json"
    results.save(out, results.new_record(SETTINGS))
    with pytest.raises(BadInputError) as err:
        results.load_for_resume(out, _changed(path, value))
    made_with, now = str(err.value).split("; now ")
    assert made_with.startswith(f"--resume {out} was made with") and old in made_with and new in now


def test_same_settings_merge_partial_records(tmp_path):
    out = tmp_path / "r.json"
    results.save(out, results.new_record(SETTINGS))
    _flush(out, SETTINGS)
    record = results.load_for_resume(out, copy.deepcopy(SETTINGS))
    assert record["models"]["m"]["triplets"] == [{"id": "t1", "robust_correct": [True]}]


def test_partial_differing_from_the_results_file_is_refused(tmp_path):
    """The results file matches, but a partial file beside it comes from another run."""
    out = tmp_path / "r.json"
    results.save(out, results.new_record(SETTINGS))
    _flush(out, _changed(("attack", "iters"), 10))
    with pytest.raises(BadInputError, match=r"rank0\.partial\.json was made with iters=10; now iters=100"):
        results.load_for_resume(out, SETTINGS)


@pytest.mark.parametrize("content", ['{"model": "m", "records": {}}',  # the old format: no settings to check
                                     json.dumps({"schema": "percept.eval-2afc-partial/1", "settings": SETTINGS,
                                                 "model": "m", "records": {}}),  # an older percept's
                                     json.dumps({"schema": results.PARTIAL_SCHEMA, "settings": {}, "model": "m",
                                                 "records": {"t1": 3}}),
                                     "[1, 2]", ""])
def test_foreign_or_damaged_partial_file_is_refused(tmp_path, content):
    out = tmp_path / "r.json"
    part = tmp_path / "r.json.rank0.partial.json"
    part.write_text(content)
    with pytest.raises(BadInputError, match=r"r\.json\.rank0\.partial\.json"):
        results.load_for_resume(out, SETTINGS)


def test_results_of_an_older_percept_are_named_as_such(tmp_path):
    """A results file of schema /2 (old tie rule, low_precision_only) is refused, not mixed with new records."""
    out = tmp_path / "r.json"
    results.save(out, {**results.new_record(SETTINGS), "schema": "percept.eval-2afc/2"})
    with pytest.raises(BadInputError, match=r"written by an older percept \(percept\.eval-2afc/2"):
        results.load_for_resume(out, SETTINGS)


@pytest.mark.parametrize("models", [[1, 2], {"m": [3]}, {"m": {"triplets": [3]}}, {"m": {"triplets": "abc"}}])
@pytest.mark.parametrize("with_partial", [False, True])
def test_results_document_with_damaged_models_is_refused(tmp_path, models, with_partial):
    """Matching settings, but 'models' is not what percept writes: exit 2, not a crash later on."""
    out = tmp_path / "r.json"
    record = results.new_record(SETTINGS)
    record["models"] = models
    results.save(out, record)
    if with_partial:
        _flush(out, SETTINGS)
    with pytest.raises(BadInputError, match="damaged results file"):
        results.load_for_resume(out, SETTINGS)
