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
