"""The shared attack options: an l_inf --eps above 1 needs --force on every command; large radii warn."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from percept_cli.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _commands(images, tmp_path, model):
    """Every command taking --eps/--robust/--sweep-eps, asked for an l_inf radius of 4 (meant: 4/255)."""
    a, b, c = (images / f"{n}.png" for n in "abc")
    common = ["--model", model, "--device", "cpu"]
    return {
        "attack 2afc": ["attack", "2afc", "--ref", a, "--left", b, "--right", c, "--eps", "4", *common],
        "attack embed": ["attack", "embed", a, "--untargeted", "--eps", "4", *common],
        "distance --robust": ["distance", a, b, "--robust", "4", *common],
        "eval-2afc --eps": ["eval-2afc", "--dataset", "nights", "--root", tmp_path, "--attack", "linf", "--eps", "4",
                            *common],
        "eval-2afc --sweep-eps": ["eval-2afc", "--dataset", "nights", "--root", tmp_path, "--attack", "linf",
                                  "--sweep-eps", "1/255,4", *common],
    }


@pytest.mark.parametrize("command", ["attack 2afc", "attack embed", "distance --robust", "eval-2afc --eps",
                                     "eval-2afc --sweep-eps"])
def test_linf_eps_above_one_refused_with_hint(image_dir, tmp_path, command):
    # a model that does not exist: the refusal must come before any model work
    result = run(*_commands(image_dir, tmp_path, tmp_path / "no-such-model")[command])
    assert result.exit_code == 2, result.output
    assert "did you mean 4/255?" in result.stderr and "--force" in result.stderr


def test_force_runs_the_large_radius_and_warns(image_dir, tiny_vit):
    result = run("attack", "embed", image_dir / "a.png", "--untargeted", "--eps", "4", "--force", "--iters", "1",
                 "--model", tiny_vit[0], "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["threat"]["eps"] == 4.0
    assert "warning" in result.stderr


def test_eps_above_32_over_255_warns_on_stderr_before_any_work(tmp_path):
    missing = tmp_path / "no-such-dataset"
    for option in (["--eps", "40/255"], ["--sweep-eps", "4,40/255"]):
        result = run("eval-2afc", "--dataset", "nights", "--root", missing, "--attack", "linf", *option,
                     "--model", tmp_path / "no-such-model", "--device", "cpu")
        assert result.exit_code == 2 and "no-such-dataset" in result.stderr  # stopped at the dataset ...
        assert "warning" in result.stderr and "40/255" in result.stderr  # ... after warning about the radius
    quiet = run("eval-2afc", "--dataset", "nights", "--root", missing, "--attack", "linf", "--eps", "32/255",
                "--model", tmp_path / "no-such-model", "--device", "cpu")
    assert quiet.exit_code == 2 and "warning" not in quiet.stderr


def test_dtype_is_the_weights_for_embedding_and_the_autocast_for_attacks(image_dir, tiny_vit):
    a, b, c = (image_dir / f"{n}.png" for n in "abc")
    common = ["--model", tiny_vit[0], "--device", "cpu", "--dtype", "bf16", "--json"]

    def doc(*args):
        result = run(*args, *common)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    assert doc("distance", a, b)["dtype"] == "bf16"  # plain embedding: bf16 weights
    robust = doc("distance", a, b, "--robust", "2/255", "--iters", "2")
    assert robust["dtype"] == "fp32" and robust["robust"]["autocast"] == "bf16"
    two_afc = doc("attack", "2afc", "--ref", a, "--left", b, "--right", c, "--iters", "2")
    assert two_afc["dtype"] == "fp32" and two_afc["threat"]["autocast"] == "bf16"
    # a bf16 attack reports whether it needed fp32 to confirm (or reject) a claimed flip
    assert isinstance(two_afc["fp32_checked"], bool) and isinstance(two_afc["fp32_rejected"], bool)
    embedding = doc("attack", "embed", a, "--untargeted", "--iters", "2")
    assert embedding["dtype"] == "fp32" and embedding["threat"]["autocast"] == "bf16"


@pytest.mark.parametrize("command", [["distance", "{a}", "{b}"], ["embed", "{a}", "--out", "{out}"],
                                     ["attack", "embed", "{a}", "--untargeted", "--iters", "1"],
                                     ["attack", "2afc", "--ref", "{a}", "--left", "{b}", "--right", "{c}", "--iters", "1"],
                                     ["invert", "--image", "{a}", "--iters", "1", "--out", "{out_dir}"]])
def test_every_command_passes_compile_to_the_encoder(image_dir, tiny_vit, tmp_path, monkeypatch, command):
    """--compile reaches the loaded encoder in every command: its backbone forward goes through torch.compile
    (a recording stand-in: the real compile takes minutes on this CPU)."""
    import torch

    calls = []

    def recording_compile(module, **kwargs):
        return lambda *args, **kw: (calls.append(1), module(*args, **kw))[1]

    monkeypatch.setattr(torch, "compile", recording_compile)
    names = {"a": image_dir / "a.png", "b": image_dir / "b.png", "c": image_dir / "c.png",
             "out": tmp_path / "e.npy", "out_dir": tmp_path / "inv"}
    args = [part.format(**names) for part in command]
    result = run(*args, "-m", tiny_vit[0], "--device", "cpu", "--compile", "--json")
    assert result.exit_code == 0, result.output
    assert calls
