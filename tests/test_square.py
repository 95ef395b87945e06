"""Square Attack: the window schedule, what its queries look like, and the paper's gradient-masking
check as the 2AFC tasks and the CLI run it (margin loss, p_init 0.8, 5,000 queries)."""

from __future__ import annotations

import json

import pytest
import synthetic_datasets as sd
import torch
from torch import nn
from typer.testing import CliRunner

from percept_cli.attacks import AttackSettings, square
from percept_cli.attacks.objectives import twoafc_logits
from percept_cli.attacks.square import window_fraction
from percept_cli.attacks.tasks import SQUARE_P_INIT, SQUARE_QUERIES, attack_2afc
from percept_cli.cli.app import app
from percept_cli.metric import PerceptualMetric
from percept_cli.models.encoder import PixelEncoder
from percept_cli.models.loading import ModelSource


# The paper's schedule (Andriushchenko et al., ECCV 2020, stated for 10,000 queries): p_init until
# query 10, then halved after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000; for another
# budget N, query i is placed at int(i / N · 10000) on that scale.
@pytest.mark.parametrize("query, n_queries, expected", [
    (0, 10000, 0.8), (10, 10000, 0.8), (11, 10000, 0.4), (50, 10000, 0.4), (51, 10000, 0.2),
    (200, 10000, 0.2), (201, 10000, 0.1), (501, 10000, 0.05), (1001, 10000, 0.025), (2001, 10000, 0.0125),
    (4001, 10000, 0.00625), (6001, 10000, 0.003125), (8000, 10000, 0.003125), (8001, 10000, 0.0015625),
    (9999, 10000, 0.0015625),
    (5, 5000, 0.8),  # int(5/5000·10000) = 10: not past 10 yet
    (6, 5000, 0.4),  # 12
    (4000, 5000, 0.003125),  # 8000
    (4001, 5000, 0.0015625),  # 8002
])
def test_window_fraction_follows_the_papers_schedule(query, n_queries, expected):
    assert window_fraction(0.8, query, n_queries) == pytest.approx(expected)


class _Flat:
    """A constant loss that records every queried image: nothing is ever accepted, so each query
    differs from the initial point only inside its window."""

    has_success = False

    def __init__(self):
        self.queries = []

    def __call__(self, x, index):
        self.queries.append(x.clone())
        return torch.zeros(x.shape[0]), None


def _changed_pixels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: pixels where any channel differs."""
    return ((a - b).abs() > 1e-6).any(dim=0)


def test_square_windows_shrink_to_single_pixels():
    spy = _Flat()
    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    square(spy, x, 0.1, "linf", n_queries=100, p_init=0.8, seed=0)
    init, queries = spy.queries[0][0], [q[0] for q in spy.queries[1:]]
    assert len(queries) == 100
    # query 0: p = 0.8, side round(sqrt(0.8·400)) = 18; a window fills each channel with +-eps,
    # so about 7/8 of its 324 pixels differ from the initial stripes
    first = _changed_pixels(queries[0], init)
    rows, cols = first.any(1).nonzero().flatten(), first.any(0).nonzero().flatten()
    assert int(first.sum()) > 150 and int(rows[-1] - rows[0]) + 1 <= 18 and int(cols[-1] - cols[0]) + 1 <= 18
    # queries 81..99 sit past 8000 on the 10,000 scale: p = 0.8/512, side round(sqrt(0.625)) -> 1
    assert all(int(_changed_pixels(q, init).sum()) <= 1 for q in queries[81:])
    assert sum(int(_changed_pixels(q, init).sum()) for q in queries[81:]) > 0


# -- the check inside the 2AFC task ----------------------------------------------------------------------
class _Quantize(nn.Module):
    """Gradient masking: rounding has zero gradient, so APGD cannot move, but the decision can change."""

    def forward(self, x):
        return torch.round(x * 4) / 4


def _stub_metric(backbone: nn.Module, size: int) -> PerceptualMetric:
    encoder = PixelEncoder(backbone, [0.0] * 3, [1.0] * 3, size).eval()
    return PerceptualMetric(encoder, ModelSource("stub", "test", "-", "stub"))


def _masked_metric(size=8, seed=0) -> PerceptualMetric:
    torch.manual_seed(seed)
    return _stub_metric(nn.Sequential(_Quantize(), nn.Flatten(), nn.Linear(3 * size * size, 8)), size)


def test_points_square_breaks_are_reported_at_their_adversarial_image():
    metric = _masked_metric()
    g = torch.Generator().manual_seed(1)
    ref, left, right = (torch.rand(16, 3, 8, 8, generator=g) for _ in range(3))
    settings = AttackSettings(norm="linf", eps=0.2, iters=3, square_queries=200)
    report = attack_2afc(metric, ref, left, right, None, settings)
    hits = report.found_by_square
    assert int(hits.sum()) > 0  # the check finds what the masked gradients hid
    with torch.no_grad():  # independent fp32 recomputation at the reported images
        sims = twoafc_logits(metric.embed_pixels(report.x_adv), metric.embed_pixels(left),
                             metric.embed_pixels(right))
    torch.testing.assert_close(report.adv_similarity, sims)
    assert bool(report.flipped[hits].all()) and not bool(report.robust_correct[hits].any())
    assert bool((report.margin[hits] <= 0).all())


def test_square_check_defaults_are_the_papers():
    assert (SQUARE_QUERIES, SQUARE_P_INIT) == (5000, 0.8)
    settings = AttackSettings()
    assert settings.square_queries == 0 and settings.square_p_init == 0.8  # off unless asked for


def test_attack_2afc_square_flag_runs_the_papers_check(image_dir, monkeypatch):
    metric = _masked_metric(size=8)
    monkeypatch.setattr("percept_cli.metric.load_metric", lambda *a, **k: metric)
    result = CliRunner().invoke(app, [str(a) for a in (
        "attack", "2afc", "--ref", image_dir / "a.png", "--left", image_dir / "b.png", "--right",
        image_dir / "c.png", "--iters", "2", "--square", "--device", "cpu", "--json")])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["threat"]["square_queries"] == 5000 and doc["threat"]["square_p_init"] == 0.8
    assert isinstance(doc["found_by_square"], bool)
    without = json.loads(CliRunner().invoke(app, [str(a) for a in (
        "attack", "2afc", "--ref", image_dir / "a.png", "--left", image_dir / "b.png", "--right",
        image_dir / "c.png", "--iters", "2", "--device", "cpu", "--json")]).stdout)
    assert without["threat"]["square_queries"] == 0 and without["found_by_square"] is None


def test_eval_2afc_square_defaults_to_5000_queries(tmp_path, tiny_vit):
    root = sd.make_nights(tmp_path / "nights", n=4)
    out = tmp_path / "r.json"
    # eps 1 (the whole image box): APGD breaks every attacked triplet, so Square has nothing to do
    result = CliRunner().invoke(app, [str(a) for a in (
        "eval-2afc", "--dataset", "nights", "--root", root, "--split", "test", "--attack", "linf",
        "--attack", "square", "--eps", "1", "--iters", "2", "--out", out, "--model", tiny_vit[0],
        "--device", "cpu")])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["attack"]["square_queries"] == 5000
