"""Attacks on retrieval queries: the targeted attack (Eq. 5) pulls queries towards the target class, the
untargeted one (Eq. 6) pushes them away from their clean embedding; images stay 8-bit inside the ball,
and the result does not depend on how the queries are batched."""

from __future__ import annotations

import pytest
import torch
from conftest import make_picture

from percept_cli.attacks.settings import AttackSettings
from percept_cli.errors import BadInputError
from percept_cli.metric import load_metric
from percept_cli.retrieval.attack import attack_queries, select_targets


@pytest.fixture(scope="module")
def metric(tiny_vit):
    return load_metric(str(tiny_vit[0]), device="cpu")


def pictures(metric, seeds):
    return metric.pixels([make_picture(s) for s in seeds])


def test_targeted_attack_pulls_queries_towards_the_targets(metric):
    queries, targets = pictures(metric, [0, 1, 2, 3]), pictures(metric, [50, 51, 52])
    settings = AttackSettings(norm="linf", eps=8 / 255, iters=10)
    result = attack_queries(metric, queries, settings, targets=targets)
    centre = torch.nn.functional.normalize(metric.embed_pixels(targets).mean(0), dim=0)
    assert ((result.adversarial @ centre) > (result.clean @ centre)).all()
    # the pixels are what a saved PNG holds: multiples of 1/255, inside the ball, and give those embeddings
    assert torch.equal(result.pixels, (result.pixels * 255).round() / 255)
    assert (result.pixels - queries).abs().max() <= 8 / 255 + 1e-6 and result.in_ball.all()
    assert torch.allclose(metric.embed_pixels(result.pixels), result.adversarial, atol=1e-5)


def test_untargeted_attack_moves_queries_away_inside_the_ball(metric):
    queries = pictures(metric, [5, 6, 7, 8])
    result = attack_queries(metric, queries, AttackSettings(norm="l2", eps=1.0, iters=5))
    cos = (result.adversarial * result.clean).sum(-1)
    assert (cos < 1 - 1e-4).all()
    assert torch.linalg.vector_norm((result.pixels - queries).flatten(1), dim=1).max() <= 1.0 + 1e-5


def test_each_query_is_seeded_by_its_position_whatever_the_batch(metric, monkeypatch):
    # batched matmuls round differently, so trajectories may differ in the last bits; the random starts
    # must not: each query's start is seeded by its position in the whole query set
    import percept_cli.retrieval.attack as module

    seen, real = [], module.attack_embedding
    monkeypatch.setattr(module, "attack_embedding",
                        lambda *a, example_ids=None, **k: seen.append(example_ids.tolist()) or real(
                            *a, example_ids=example_ids, **k))
    queries = pictures(metric, [5, 6, 7, 8, 9])
    attack_queries(metric, queries, AttackSettings(norm="linf", iters=1), batch_size=2)
    assert seen == [[0, 1], [2, 3], [4]]


def test_target_selection_is_the_first_sixteen_in_path_order():
    paths = [f"/t/{i:02d}.png" for i in range(20)][::-1]
    assert select_targets(paths) == [f"/t/{i:02d}.png" for i in range(16)]
    with pytest.raises(BadInputError, match="target images"):
        select_targets([])
