"""The one 2AFC decision rule (percept_cli.decision): a tie picks the left candidate, as the paper
authors' ``pred = (sim_right > sim_left)``; label 1 is the right candidate. The attacks' success flag
and the 2AFC report follow it, checked here on exact ties built from identical candidates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from percept_cli.attacks import AttackSettings, TwoAFCObjective, attack_2afc
from percept_cli.decision import LEFT, RIGHT, decision, human_label, is_correct, prefers_right
from percept_cli.metric import PerceptualMetric
from percept_cli.models.encoder import PixelEncoder
from percept_cli.models.loading import ModelSource


@pytest.mark.parametrize("sim_left, sim_right, choice", [(0.5, 0.5, 0), (0.4, 0.5, 1), (0.5, 0.4, 0),
                                                          (-0.2, -0.1, 1), (0.0, -0.0, 0), (1e-9, 0.0, 0)])
def test_decision_on_floats(sim_left, sim_right, choice):
    assert decision(sim_left, sim_right) == choice and isinstance(decision(sim_left, sim_right), int)
    assert prefers_right(sim_left, sim_right) is (choice == 1)
    assert is_correct(sim_left, sim_right, choice) and not is_correct(sim_left, sim_right, 1 - choice)


def test_a_tie_is_correct_exactly_when_the_label_is_left():
    assert (LEFT, RIGHT) == (0, 1)
    assert is_correct(0.3, 0.3, LEFT) and not is_correct(0.3, 0.3, RIGHT)


def test_rule_works_element_wise_on_tensors():
    left = torch.tensor([0.5, 0.4, 0.5, 0.7, 0.7])
    right = torch.tensor([0.5, 0.5, 0.4, 0.7, 0.9])
    label = torch.tensor([0, 0, 0, 1, 1])
    assert decision(left, right).dtype == torch.long
    assert decision(left, right).tolist() == [0, 1, 0, 0, 1]
    assert is_correct(left, right, label).tolist() == [True, False, True, False, True]


@pytest.mark.parametrize("p_right, label", [(0.0, 0), (0.5, 0), (0.51, 1), (1.0, 1), (0.49, 0)])
def test_human_label_needs_a_majority_for_right(p_right, label):
    assert human_label(p_right) == label


def _linear_metric(size=8) -> PerceptualMetric:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 6))
    return PerceptualMetric(PixelEncoder(backbone, [0.0] * 3, [1.0] * 3, size).eval(),
                            ModelSource("stub", "test", "-", "stub"))


def test_attacks_and_reports_follow_the_rule_on_exact_ties():
    # identical left and right candidates: sim_left == sim_right exactly for any reference, so the
    # metric always picks left whatever the attack does
    metric = _linear_metric()
    g = torch.Generator().manual_seed(3)
    ref, candidate = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g)
    label = torch.tensor([0, 1, 0, 1])
    report = attack_2afc(metric, ref, candidate, candidate, label, AttackSettings(norm="linf", eps=0.5, iters=3))
    assert torch.equal(report.clean_similarity[:, 0], report.clean_similarity[:, 1])
    assert torch.equal(report.adv_similarity[:, 0], report.adv_similarity[:, 1])
    assert report.clean_correct.tolist() == [True, False, True, False]
    assert report.robust_correct.tolist() == [True, False, True, False]  # a tie with label left cannot be broken
    assert not bool(report.flipped.any())
    with torch.no_grad():
        e = metric.embed_pixels(candidate)
    objective = TwoAFCObjective(metric.encoder, e, e, label)
    _, broken = objective(ref, torch.arange(4))
    assert broken.tolist() == [False, True, False, True]  # the attack's success flag on a tie
    own = attack_2afc(metric, ref, candidate, candidate, None, AttackSettings(norm="linf", eps=0.5, iters=3))
    assert own.label.tolist() == [0] * 4 and bool(own.clean_correct.all())  # no label: the tie's choice, left
