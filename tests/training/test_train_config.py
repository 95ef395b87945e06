"""Run settings, the data order and the learning-rate schedule (no model)."""

from __future__ import annotations

import itertools
import math

import pytest

from percept_cli.errors import BadInputError
from percept_cli.training import data as tdata
from percept_cli.training.config import config_difference, read_toml, resolve_config
from percept_cli.training.loop import lr_factor


def test_published_recipes_are_the_defaults():
    fare = resolve_config("fare", {}, {"data": "d", "out": "o"})
    assert (fare.optimizer, fare.lr, fare.weight_decay, fare.steps, fare.batch_size) == ("adamw", 1e-5, 1e-4, 20000,
                                                                                        128)
    assert (fare.eps, fare.pgd_steps, fare.pgd_step_size, fare.norm) == (4 / 255, 10, 1 / 255, "linf")
    mlp = resolve_config("2afc", {}, {"root": "r", "out": "o"})
    assert (mlp.head, mlp.lr, mlp.batch_size, mlp.epochs, mlp.betas, mlp.margin) == ("mlp", 3e-4, 512, 20,
                                                                                    (0.5, 0.999), 0.05)
    lora = resolve_config("2afc", {}, {"root": "r", "out": "o", "head": "lora"})
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.batch_size, lora.epochs) == (16, 32.0, 0.2, 32, 8)
    assert (lora.resize, lora.crop) == (None, 0)  # the input size without a crop: DreamSim's 224x224


def test_toml_then_command_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nlr = 2e-5\neps = "8/255"\nsteps = 50\nbetas = [0.8, 0.9]\n')
    config = resolve_config("fare", read_toml(path), {"data": "d", "out": "o", "steps": 7})
    assert config.lr == 2e-5 and config.steps == 7 and config.betas == (0.8, 0.9)
    assert config.eps == pytest.approx(8 / 255)


@pytest.mark.parametrize("cli, needle", [
    ({"data": "d", "out": "o", "eps": "four"}, "eps"),
    ({"data": "d", "out": "o", "eps": "4"}, "255"),           # l_inf 4 is the whole range and more
    ({"data": "d", "out": "o", "lerning_rate": 1}, "lerning_rate"),
    ({"out": "o"}, "--data"),
    ({"data": "d"}, "--out"),
    ({"data": "d", "out": "o", "steps": 2.5}, "steps"),
    ({"data": "d", "out": "o", "dtype": "fp16"}, "loss scaling"),
])
def test_bad_settings_are_refused(cli, needle):
    with pytest.raises(BadInputError, match=needle):
        resolve_config("fare", {}, cli)


def test_bad_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("lr = = 1")
    with pytest.raises(BadInputError, match="TOML"):
        read_toml(path)
    with pytest.raises(BadInputError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")


def test_fingerprint_names_what_changed():
    a = resolve_config("fare", {}, {"data": "d", "out": "o1", "lr": 1e-5})
    b = resolve_config("fare", {}, {"data": "d", "out": "o2", "lr": 2e-5, "eval_every": 5, "workers": 3})
    assert config_difference(a.fingerprint(), b) == ["lr"]


def test_schedule_warmup_then_half_cosine():
    total, warm = 20, 4
    values = [lr_factor(s, total, warm, "cosine") for s in range(total)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    for s in range(warm, total):
        assert values[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    assert all(a >= b for a, b in itertools.pairwise(values[3:]))  # non-increasing after warm-up
    assert lr_factor(7, total, 0, "constant") == 1.0


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batches_do_not_depend_on_the_number_of_processes(world):
    n, batch = 37, 8
    plan = tdata.make_plan(n, batch, world, None, 9, None)
    reference = tdata.make_plan(n, batch, 1, None, 9, None)
    assert plan.steps_per_epoch == reference.steps_per_epoch == 4
    per_step = {}
    for rank in range(world):
        for step, micro, slots in tdata.step_batches(plan, rank, seed=3, start_step=0):
            rows = [r for m in micro for r in m]
            per_step.setdefault(step, {}).update(dict(zip([s for sl in slots for s in sl], rows)))
    single = {step: dict(zip(slots[0], micro[0]))
              for step, micro, slots in tdata.step_batches(reference, 0, seed=3, start_step=0)}
    assert per_step == single  # the same image at the same slot of the same step
    for step, rows in single.items():  # an epoch never repeats an image
        epoch = step // 4
        same_epoch = [r for s, rr in single.items() if s // 4 == epoch for r in rr.values()]
        assert len(same_epoch) == len(set(same_epoch))


def test_resume_skips_the_steps_taken():
    plan = tdata.make_plan(40, 8, 1, 4, 12, None)
    full = list(tdata.step_batches(plan, 0, 5, 0))
    later = list(tdata.step_batches(plan, 0, 5, 7))
    assert later == full[7:]
    assert all(len(micro) == 2 and all(len(m) == 4 for m in micro) for _, micro, _ in full)  # accumulation 2


def test_plans_that_cannot_split():
    with pytest.raises(BadInputError, match="does not split over 3 processes"):
        tdata.make_plan(100, 8, 3, None, 5, None)
    with pytest.raises(BadInputError, match="micro batch 3"):
        tdata.make_plan(100, 8, 1, 3, 5, None)
    with pytest.raises(BadInputError, match="fewer than one batch"):
        tdata.make_plan(5, 8, 1, None, 5, None)


def test_held_out_split_is_disjoint_seeded_and_complete():
    train, held = tdata.split_held_out(50, 0.2, seed=1)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == list(range(50))
    assert tdata.split_held_out(50, 0.2, seed=1) == (train, held)
    assert tdata.split_held_out(50, 0.2, seed=2)[1] != held


def test_classnames(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("a cat\na dog\n")
    assert tdata.read_classnames(names, ["cat", "dog"]) == ["a cat", "a dog"]
    mapped = tmp_path / "mapped.csv"
    mapped.write_text("dog,hound\ncat,kitty\n")
    assert tdata.read_classnames(mapped, ["cat", "dog"]) == ["kitty", "hound"]
    with pytest.raises(BadInputError, match="2 class names but the data has 3"):
        tdata.read_classnames(names, ["cat", "dog", "eel"])
    with pytest.raises(BadInputError, match="eel"):
        tdata.read_classnames(mapped, ["cat", "dog", "eel"])
