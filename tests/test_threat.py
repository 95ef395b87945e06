"""Threat-model helpers: eps/norm parsing, projection, 8-bit saving (APGD's schedule: test_apgd.py)."""

from __future__ import annotations

import pytest
import torch

from percept_cli.attacks.threat import (format_eps, lp_norm, parse_eps, parse_norm, project,
                                        quantize_into_ball)
from percept_cli.errors import BadInputError


@pytest.mark.parametrize("text, value", [("4/255", 4 / 255), ("0.0157", 0.0157), ("3", 3.0), (" 8 / 255 ", 8 / 255),
                                         ("1e-2", 0.01), (".5", 0.5)])
def test_parse_eps(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0", "-1", "0/255", "abc", "4/0", "4/", "nan", "inf", "", "1/2/3"])
def test_bad_eps(text):
    with pytest.raises(BadInputError):
        parse_eps(text)


def test_norms_and_format():
    assert parse_norm("Linf") == parse_norm("l_inf") == "linf" and parse_norm("L2") == "l2"
    with pytest.raises(BadInputError, match="unknown norm"):
        parse_norm("l1")
    assert format_eps(4 / 255, "linf") == "4/255" and format_eps(3.0, "l2") == "3"


@pytest.mark.parametrize("norm, eps", [("linf", 4 / 255), ("l2", 0.5)])
def test_projection_is_feasible_and_idempotent(norm, eps):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g)
    far = x + torch.randn(4, 3, 16, 16, generator=g)
    p = project(far, x, eps, norm)
    assert bool((lp_norm(p - x, norm) <= eps * (1 + 1e-5) + 1e-6).all())
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    torch.testing.assert_close(project(p, x, eps, norm), p)
    inside = project(x + 0.01 * eps * torch.sign(torch.randn(4, 3, 16, 16, generator=g)) / 16, x, eps, norm)
    torch.testing.assert_close(project(inside, x, eps, norm), inside)


@pytest.mark.parametrize("norm, eps", [("linf", 4 / 255), ("linf", 1.5 / 255), ("l2", 1.0), ("l2", 3.0)])
def test_quantisation_stays_on_grid_and_in_ball(norm, eps):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 32, 32, generator=g)  # not on the 8-bit grid (a resized image)
    x_adv = project(x + torch.randn(3, 3, 32, 32, generator=g), x, eps, norm)
    q, in_ball = quantize_into_ball(x_adv, x, eps, norm)
    assert torch.equal(q * 255, torch.round(q * 255))
    assert bool(in_ball.all())
    assert bool((lp_norm(q - x, norm) <= eps + 1e-6).all())
    assert float((q - x_adv).abs().max()) <= 1 / 255 + 1e-6 or norm == "l2"


def test_quantisation_reports_impossible_ball():
    x = torch.full((1, 3, 4, 4), 0.5 / 255 + 0.3 / 255)  # between grid points
    q, in_ball = quantize_into_ball(x.clone(), x, 0.1 / 255, "linf")
    assert not bool(in_ball[0])


# -- one parser for norms and radii, used by the CLI and by AttackSettings alike ------------------------
LINF_SPELLINGS = ["linf", "Linf", "LINF", "l_inf", "L-inf", " linf ", "inf", "Inf", "infinity", "l∞", float("inf")]
L2_SPELLINGS = ["l2", "L2", "l_2", "2", 2]
NOT_NORMS = ["l1", "L1", "l_1", "l0", "li", "lin", "linf2", "l22", "l2inf", "", " ", "euclidean", None, 1, True]


@pytest.mark.parametrize("text", LINF_SPELLINGS + L2_SPELLINGS)
def test_norm_aliases_normalise_in_parser_and_settings(text):
    from percept_cli.attacks import AttackSettings

    expected = "linf" if text in LINF_SPELLINGS else "l2"
    assert parse_norm(text) == expected
    assert AttackSettings(norm=text, eps=0.5).norm == expected


@pytest.mark.parametrize("text", NOT_NORMS)
def test_unknown_norm_raises_in_parser_and_settings(text):
    from percept_cli.attacks import AttackSettings

    with pytest.raises(BadInputError, match="norm"):
        parse_norm(text)
    with pytest.raises(BadInputError, match="norm"):
        AttackSettings(norm=text)


@pytest.mark.parametrize("norm, text, value", [("linf", "4/255", 4 / 255), ("linf", " 8 / 255", 8 / 255),
                                               ("l2", "0.5", 0.5), ("l2", "3", 3.0)])
def test_settings_parse_eps_text(norm, text, value):
    from percept_cli.attacks import AttackSettings

    assert AttackSettings(norm=norm, eps=text).eps == pytest.approx(value)


@pytest.mark.parametrize("eps", ["abc", "4/0", "-1", "0", "", "4//255", None, True, [4 / 255], "nan"])
def test_settings_bad_eps_raises_naming_eps(eps):
    from percept_cli.attacks import AttackSettings

    with pytest.raises(BadInputError, match="eps"):
        AttackSettings(eps=eps)


def test_settings_unknown_loss_raises():
    from percept_cli.attacks import AttackSettings

    with pytest.raises(BadInputError, match="loss"):
        AttackSettings(loss="hinge")


@pytest.mark.parametrize("eps, hint", [(4, "4/255"), ("8", "8/255"), (2.5, "2.5/255")])
def test_linf_eps_above_one_refused_with_a_hint_unless_forced(eps, hint):
    from dataclasses import replace

    from percept_cli.attacks import AttackSettings

    with pytest.raises(BadInputError, match=f"did you mean {hint}\\?.*force=True"):
        AttackSettings(norm="linf", eps=eps)
    forced = AttackSettings(norm="linf", eps=eps, force=True)
    assert forced.eps == float(eps)
    assert replace(forced, eps=float(eps) * 2).eps == 2 * float(eps)  # the radius sweep re-creates settings
    assert AttackSettings(norm="l2", eps=eps).eps == float(eps)  # l2 radii above 1 are ordinary
    assert AttackSettings(norm="linf", eps=1.0).eps == 1.0  # the limit itself is allowed


def test_large_linf_radius_warning_threshold():
    from percept_cli.attacks.threat import radius_warning

    assert "40/255" in radius_warning(40 / 255, "linf")
    assert radius_warning(32 / 255, "linf") is None and radius_warning(4 / 255, "linf") is None
    assert radius_warning(3.0, "l2") is None
