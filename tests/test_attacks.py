"""Attack properties that a broken or weak attack cannot fake.

The tiny model is built by the tests (tests/tiny_models.py); every check compares the
attack against something independent: the size of the ball, a larger ball, more
iterations, more restarts, fixed-step PGD, a random perturbation of the same size,
a gradient-free attack, and a model whose gradients are masked.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st
from torch import nn

from percept_cli import load_metric
from percept_cli.attacks import (AttackSettings, TwoAFCObjective, UntargetedEmbeddingObjective, apgd, attack_2afc,
                                 attack_embedding, lp_norm, pgd, square)
from percept_cli.attacks.core import evaluate
from percept_cli.attacks.tasks import attack_2afc_embedded, rounded_2afc, rounded_embedding
from percept_cli.attacks.threat import random_start
from percept_cli.models.encoder import PixelEncoder
from percept_cli.metric import PerceptualMetric

TOL = 1e-6  # float32 rounding of x + delta in [0,1]


@pytest.fixture(scope="module")
def metric(tiny_vit):
    return load_metric(str(tiny_vit[0]), device="cpu")


@pytest.fixture(scope="module")
def triplets():
    g = torch.Generator().manual_seed(0)
    left = torch.rand(24, 3, 224, 224, generator=g)
    right = torch.rand(24, 3, 224, 224, generator=g)
    ref = (0.6 * left + 0.4 * torch.rand(24, 3, 224, 224, generator=g)).clamp(0, 1)
    return ref, left, right


def robust(metric, triplets, **kw) -> torch.Tensor:
    ref, left, right = triplets
    return attack_2afc(metric, ref, left, right, None, AttackSettings(**kw)).robust_correct


@pytest.mark.parametrize("norm, eps", [("linf", 1.0), ("l2", 1000.0)])
def test_huge_eps_breaks_every_decision(metric, triplets, norm, eps):
    report = attack_2afc(metric, *triplets, None, AttackSettings(norm=norm, eps=eps, iters=10))
    assert bool(report.clean_correct.all())
    assert int(report.robust_correct.sum()) == 0
    assert bool(report.flipped.all())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_eps_changes_nothing(metric, triplets, norm):
    ref, left, right = triplets
    with torch.no_grad():
        e_left, e_right = metric.embed_pixels(left), metric.embed_pixels(right)
    label = torch.zeros(len(ref), dtype=torch.long)
    objective = TwoAFCObjective(metric.encoder, e_left, e_right, label)
    _, clean_broken = evaluate(objective, ref)
    result = apgd(objective, ref, 0.0, norm, 10, random_start=True)
    assert torch.equal(result.x_adv, ref)
    assert torch.equal(result.broken, clean_broken)


@pytest.mark.parametrize("norm, radii", [("l2", [0.02, 0.05, 0.1, 0.2, 0.5, 2.0]),
                                         ("linf", [0.01 / 255, 0.03 / 255, 0.1 / 255, 0.3 / 255, 1 / 255])])
def test_robust_accuracy_does_not_grow_with_eps(metric, triplets, norm, radii):
    accs = [float(robust(metric, triplets, norm=norm, eps=e, iters=20).float().mean()) for e in radii]
    assert accs == sorted(accs, reverse=True), accs
    assert accs[0] > accs[-1]  # the sweep crosses the model's robustness: the test can fail


def test_robust_accuracy_does_not_grow_with_iterations(metric, triplets):
    accs = [float(robust(metric, triplets, norm="l2", eps=0.2, iters=n).float().mean()) for n in (1, 5, 20, 60)]
    assert accs == sorted(accs, reverse=True), accs
    assert accs[0] > accs[-1]


def test_a_later_restart_breaks_a_point_the_first_missed(metric, triplets):
    # On the smooth tiny model every start leads APGD to the same margin (within ~0.5%), so restarts
    # hardly ever matter there; behind a rounding layer the gradient is zero and each run stays at its
    # random start, so each restart is a fresh random draw in the ball: more restarts, more breaks.
    masked = _masked(metric)
    ref, left, right = (t[:12] for t in triplets)
    s = dict(norm="linf", eps=16 / 255, iters=1, seed=1)
    one = attack_2afc(masked, ref, left, right, None, AttackSettings(restarts=1, **s)).robust_correct
    four = attack_2afc(masked, ref, left, right, None, AttackSettings(restarts=4, **s)).robust_correct
    assert bool((one & ~four).any())  # some point survives the first run and falls to a later one
    assert bool((four <= one).all())  # every point broken with one restart stays broken


@pytest.mark.parametrize("norm, eps", [("l2", 0.1), ("linf", 0.1 / 255)])
def test_apgd_at_least_as_strong_as_pgd(metric, triplets, norm, eps):
    # 12 triplets x 10 iterations (was 24 x 20, 3x the time): with this budget fixed-step PGD at eps/10
    # still leaves one l2 point unbroken that APGD breaks, so the comparison is not a tie everywhere
    ref, left, right = (t[:12] for t in triplets)
    with torch.no_grad():
        e_left, e_right = metric.embed_pixels(left), metric.embed_pixels(right)
        label = (metric.embed_pixels(ref) @ e_right.T).diag().gt((metric.embed_pixels(ref) @ e_left.T).diag()).long()
    objective = TwoAFCObjective(metric.encoder, e_left, e_right, label)
    n = 10
    a = apgd(objective, ref, eps, norm, n, seed=1)
    a_acc = float((~a.broken).float().mean())
    for step in (2.5 * eps / n, eps / 10, eps / 4, eps):
        p = pgd(objective, ref, eps, norm, n, step_size=step, seed=1)
        assert a_acc <= float((~p.broken).float().mean()), step
    # the same holds for the loss an embedding attack reaches
    with torch.no_grad():
        clean = metric.embed_pixels(ref[:8])
    emb_objective = UntargetedEmbeddingObjective(metric.encoder, clean)
    a_loss = float(apgd(emb_objective, ref[:8], eps, norm, n, seed=1).loss.mean())
    for step in (2.5 * eps / n, eps / 4, eps):
        assert a_loss >= float(pgd(emb_objective, ref[:8], eps, norm, n, step_size=step, seed=1).loss.mean())


def _random_perturbation_distance(metric, x, eps, norm, targets=None):
    noisy = random_start(x, eps, norm, torch.Generator().manual_seed(9))
    with torch.no_grad():
        e = metric.embed_pixels(noisy)
        ref = metric.embed_pixels(x if targets is None else targets)
    return (1 - e @ ref.T).diag() if targets is None else (1 - e @ ref.T).mean(-1)


@pytest.mark.parametrize("norm, eps", [("linf", 1 / 255), ("l2", 0.5)])
def test_untargeted_attack_pushes_embedding_away(metric, triplets, norm, eps):
    x = triplets[0][:6]
    report = attack_embedding(metric, x, None, AttackSettings(norm=norm, eps=eps, iters=20))
    assert float(report.clean_distance.abs().max()) < 1e-5
    baseline = _random_perturbation_distance(metric, x, eps, norm)
    assert bool((report.adv_distance > 5 * baseline).all()), (report.adv_distance, baseline)
    assert bool((report.perturbation_norm <= eps * (1 + 1e-5) + TOL).all())


@pytest.mark.parametrize("norm, eps", [("linf", 2 / 255), ("l2", 2.0)])
def test_targeted_attack_pulls_embedding_to_targets(metric, triplets, norm, eps):
    x, targets = triplets[0][:6], triplets[2][:2]
    report = attack_embedding(metric, x, targets, AttackSettings(norm=norm, eps=eps, iters=30))
    assert bool((report.adv_distance < 0.5 * report.clean_distance).all()), (report.adv_distance,
                                                                              report.clean_distance)
    baseline = _random_perturbation_distance(metric, x, eps, norm, targets)
    assert bool((report.adv_distance < baseline).all())
    assert report.distances_per_target.shape == (6, 2)


def test_same_seed_same_result_and_seeds_matter(metric, triplets):
    x = triplets[0][:4]
    s = dict(norm="l2", eps=0.3, iters=5)
    a = attack_embedding(metric, x, None, AttackSettings(seed=7, **s))
    b = attack_embedding(metric, x, None, AttackSettings(seed=7, **s))
    c = attack_embedding(metric, x, None, AttackSettings(seed=8, **s))
    assert torch.equal(a.x_adv, b.x_adv)
    assert not torch.equal(a.x_adv, c.x_adv)


def test_early_stopping_spends_less_and_agrees(metric, triplets):
    # APGD's state (step size, checkpoints, best point) is per example, so an example's trajectory does
    # not depend on which others are still in the batch: early stopping only stops the broken ones,
    # which stay broken (a success is final). Both runs must therefore break the same triplets, and
    # the triplets that held must end at the same points.
    ref, left, right = triplets
    settings = AttackSettings(norm="l2", eps=0.2, iters=20)
    fast = attack_2afc(metric, ref, left, right, None, settings, early_stop=True)
    full = attack_2afc(metric, ref, left, right, None, settings, early_stop=False)
    assert fast.evaluations < full.evaluations == len(ref) * (settings.iters + 1)
    assert 0 < int(fast.robust_correct.sum()) < len(ref)  # something was broken, so something left early
    assert torch.equal(fast.robust_correct, full.robust_correct)
    held = fast.robust_correct
    torch.testing.assert_close(fast.x_adv[held], full.x_adv[held])


def test_per_example_seeds_do_not_depend_on_the_batch(metric, triplets):
    ref, left, right = (t[:6] for t in triplets)
    with torch.no_grad():
        e_left, e_right = metric.embed_pixels(left), metric.embed_pixels(right)
    label = torch.tensor([0, 1, 0, 1, 1, 0])  # for the random starts only
    objective = TwoAFCObjective(metric.encoder, e_left, e_right, label)
    ids = torch.tensor([40, 41, 42, 43, 44, 45])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])

    def starts(order, example_ids, x=ref):  # 0 iterations: the result is the random start itself
        return apgd(_Permuted(objective, order), x[order], 0.5, "l2", 0, seed=5, example_ids=example_ids).x_adv

    everyone = torch.arange(6)
    torch.testing.assert_close(starts(perm, ids[perm]), starts(everyone, ids)[perm], atol=0, rtol=0)
    same_image = ref[:1].expand(2, -1, -1, -1)
    two = apgd(objective, same_image, 0.5, "l2", 0, seed=5, example_ids=torch.tensor([7, 8])).x_adv
    assert not torch.equal(two[0], two[1])  # different ids, different starts, for the same image
    settings = AttackSettings(norm="l2", eps=0.2, iters=5, seed=5)
    whole = attack_2afc_embedded(metric, ref, e_left, e_right, None, settings, example_ids=ids)
    shuffled = attack_2afc_embedded(metric, ref[perm], e_left[perm], e_right[perm], None, settings,
                                    example_ids=ids[perm])
    assert 0 < int(whole.robust_correct.sum()) < len(ref)  # outcomes differ between triplets
    assert torch.equal(shuffled.robust_correct, whole.robust_correct[perm])
    torch.testing.assert_close(shuffled.x_adv, whole.x_adv[perm])


class _Permuted:
    """``objective`` on a reordered batch: local example i is the objective's example ``order[i]``."""

    has_success = True

    def __init__(self, objective, order):
        self.objective, self.order = objective, order

    def __call__(self, x, index):
        return self.objective(x, self.order[index])


def test_autocast_attack_verdict_is_checked_in_fp32(metric, triplets):
    ref, left, right = triplets
    report = attack_2afc(metric, ref[:8], left[:8], right[:8], None,
                         AttackSettings(norm="l2", eps=0.2, iters=10, autocast_dtype=torch.bfloat16))
    with torch.no_grad():
        e = metric.embed_pixels(report.x_adv)
        e_left, e_right = metric.embed_pixels(left[:8]), metric.embed_pixels(right[:8])
        sims = torch.stack(((e * e_left).sum(-1), (e * e_right).sum(-1)), 1)
    torch.testing.assert_close(report.adv_similarity, sims)
    correct = torch.where(report.label == 0, sims[:, 0] >= sims[:, 1], sims[:, 1] > sims[:, 0])  # a tie picks left
    assert torch.equal(report.robust_correct, correct & report.clean_correct)


@pytest.mark.parametrize("norm, eps", [("linf", 64 / 255), ("l2", 50.0)])
def test_square_attack_breaks_at_large_eps(metric, triplets, norm, eps):
    ref, left, right = triplets
    with torch.no_grad():
        e_left, e_right = metric.embed_pixels(left[:8]), metric.embed_pixels(right[:8])
    objective = TwoAFCObjective(metric.encoder, e_left, e_right, torch.zeros(8, dtype=torch.long), "margin")
    _, clean_broken = evaluate(objective, ref[:8])
    result = square(objective, ref[:8], eps, norm, n_queries=1000, seed=0)
    assert bool(result.broken.all()) and not bool(clean_broken.all())
    assert bool((lp_norm(result.x_adv - ref[:8], norm) <= eps * (1 + 1e-5) + TOL).all())
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1


class _Quantize(nn.Module):
    """A gradient-masking 'defence': rounding has zero gradient almost everywhere."""

    def forward(self, x):
        return torch.round(x * 4) / 4


def _masked(metric) -> PerceptualMetric:
    """The tiny model behind a rounding layer: zero gradients almost everywhere (gradient masking)."""
    enc = metric.encoder
    masked = PixelEncoder(nn.Sequential(_Quantize(), enc.backbone), enc.mean.flatten().tolist(),
                          enc.std.flatten().tolist(), enc.image_size).eval()
    return PerceptualMetric(masked, metric.source)


def test_square_attack_exposes_gradient_masking(metric, triplets):
    masked_metric = _masked(metric)
    ref, left, right = triplets
    settings = AttackSettings(norm="linf", eps=16 / 255, iters=20, square_queries=300)
    report = attack_2afc(masked_metric, ref, left, right, None, settings)
    apgd_only = attack_2afc(masked_metric, ref, left, right, None, AttackSettings(norm="linf", eps=16 / 255, iters=20))
    assert float(apgd_only.robust_correct.float().mean()) >= 0.5  # zero gradients: APGD looks "robust"
    assert int(report.found_by_square.sum()) > 0  # the gradient-free check finds what APGD missed
    assert int(report.robust_correct.sum()) < int(apgd_only.robust_correct.sum())


def test_square_finds_nothing_apgd_missed_on_an_honest_model(metric, triplets):
    report = attack_2afc(metric, *triplets, None, AttackSettings(norm="l2", eps=0.1, iters=50, square_queries=300))
    assert 0 < int(report.robust_correct.sum()) < len(triplets[0])  # an informative radius
    assert int(report.found_by_square.sum()) == 0


def _linear_objective(shape, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(int(torch.tensor(shape[1:]).prod()), 6, generator=g)
    encoder = lambda x: x.flatten(1) @ weight  # noqa: E731
    left, right = torch.randn(shape[0], 6, generator=g), torch.randn(shape[0], 6, generator=g)
    label = torch.randint(0, 2, (shape[0],), generator=g)
    return TwoAFCObjective(encoder, nn.functional.normalize(left, dim=-1), nn.functional.normalize(right, dim=-1),
                           label)


@hsettings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), side=st.integers(4, 12), norm=st.sampled_from(["linf", "l2"]),
       eps=st.floats(1e-4, 20.0), attack=st.sampled_from(["apgd", "pgd", "square"]), seed=st.integers(0, 99))
def test_results_stay_in_ball_and_box(batch, side, norm, eps, attack, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, side, side, generator=g)
    x[:, :, 0, 0] = 0.0  # pixels on the box boundary
    x[:, :, -1, -1] = 1.0
    objective = _linear_objective(x.shape, seed)
    if attack == "apgd":
        result = apgd(objective, x, eps, norm, 6, restarts=2, seed=seed)
    elif attack == "pgd":
        result = pgd(objective, x, eps, norm, 6, step_size=eps / 2, seed=seed)
    else:
        result = square(objective, x, eps, norm, n_queries=15, seed=seed)
    assert result.x_adv.shape == x.shape
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    assert bool((lp_norm(result.x_adv - x, norm) <= eps * (1 + 1e-5) + TOL).all())
    assert not result.x_adv.requires_grad and result.x_adv.grad_fn is None


# -- low-precision attacks: the fp32 verdict, and how often it overruled the attack ---------------------
_EPS_DIR = 3 * 2 ** -10  # rounds away in bf16 (8 significant bits: 1 + 3/1024 -> 1), not in fp32


class _RoundedDirection(nn.Module):
    """Embedding (m, m·(1 + 3/1024)) of the mean pixel m: 45° + ~1.5e-3 rad in fp32, but exactly 45°
    under bf16 autocast, where the weight 1 + 3/1024 rounds to 1. No perturbation changes the direction."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0], [1.0 + _EPS_DIR]]))

    def forward(self, x):
        return self.linear(x.mean(dim=(1, 2, 3))[:, None])


def _stub_metric(backbone: nn.Module, size: int) -> PerceptualMetric:
    from percept_cli.models.loading import ModelSource

    return PerceptualMetric(PixelEncoder(backbone, [0.0] * 3, [1.0] * 3, size).eval(),
                            ModelSource("stub", "test", "-", "stub"))


def test_points_broken_only_in_bf16_count_as_robust_and_are_reported():
    metric = _stub_metric(_RoundedDirection(), 4)
    unit = lambda a, b: nn.functional.normalize(torch.tensor([a, b]), dim=0)  # noqa: E731
    # triplet 0: left at 45° + 2.9e-3 rad, right at 45° - 0.7e-3: fp32 (45° + 1.5e-3) picks left,
    #            bf16 (45°) picks right -> the bf16 attack claims it broken, fp32 rejects every claim
    # triplet 1: left at the fp32 direction, right at 90°: both pick left (robust either way, never claimed)
    # triplet 2: as triplet 1 with label right: wrong before any attack (claimed at once, and confirmed)
    e_left = torch.stack([unit(1.0, 1 + 2 * _EPS_DIR), unit(1.0, 1 + _EPS_DIR), unit(1.0, 1 + _EPS_DIR)])
    e_right = torch.stack([unit(1.0, 1 - _EPS_DIR / 2), unit(0.0, 1.0), unit(0.0, 1.0)])
    label = torch.tensor([0, 0, 1])
    ref = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    objective = TwoAFCObjective(metric.encoder, e_left, e_right, label)
    assert evaluate(objective, ref, autocast_dtype=torch.bfloat16)[1].tolist() == [True, False, True]
    assert evaluate(objective, ref)[1].tolist() == [False, False, True]  # the scenario is real
    settings = AttackSettings(norm="linf", eps=1 / 255, iters=3, autocast_dtype="bf16", square_queries=20)
    report = attack_2afc_embedded(metric, ref, e_left, e_right, label, settings)
    assert report.robust_correct.tolist() == [True, True, False]  # the fp32 verdict
    assert report.fp32_checked.tolist() == [True, False, True]
    assert report.fp32_rejected.tolist() == [True, False, False]
    fp32 = attack_2afc_embedded(metric, ref, e_left, e_right, label, replace(settings, autocast_dtype=None))
    assert fp32.robust_correct.tolist() == [True, True, False]
    assert fp32.fp32_checked is None and fp32.fp32_rejected is None


class _NegatedUnderAutocast(nn.Module):
    """Channel means, negated under autocast: every low-precision decision is the opposite one."""

    def forward(self, x):
        feats = x.mean(dim=(2, 3))
        return -feats if torch.is_autocast_enabled(x.device.type) else feats


def test_rejected_low_precision_claims_keep_the_attack_going():
    metric = _stub_metric(_NegatedUnderAutocast(), 8)
    x = torch.rand(3, 3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    settings = AttackSettings(norm="linf", eps=1e-4, iters=4, autocast_dtype="bf16")
    report = attack_2afc(metric, *x, None, settings, early_stop=True)
    assert report.robust_correct.tolist() == [True] * 3  # fp32: the tiny ball changes no decision
    assert report.fp32_checked.tolist() == [True] * 3 and report.fp32_rejected.tolist() == [True] * 3
    # early stopping dropped nobody: 3 x (1 + 4) attack passes, plus one fp32 confirmation per claim
    assert report.evaluations == 2 * 3 * (settings.iters + 1)


class _ClaimsUnderAutocast:
    """Loss = mean pixel. The success flag is ``fp32_says`` in fp32 and True under autocast (for the
    first ``claims_for`` autocast calls, or always), so with ``fp32_says=False`` every low-precision
    claim is one that fp32 rejects. Records every call as (under autocast, batch size)."""

    has_success = True

    def __init__(self, fp32_says: bool, claims_for: int | None = None):
        self.fp32_says, self.claims_for, self.calls = fp32_says, claims_for, []

    def __call__(self, x, index):
        low = torch.is_autocast_enabled(x.device.type)
        self.calls.append((low, len(index)))
        claims = low and (self.claims_for is None or sum(c[0] for c in self.calls) <= self.claims_for)
        return x.flatten(1).mean(1).float(), torch.full((len(x),), claims or self.fp32_says)


def _run(attack, objective, x, n, dtype):
    if attack == "apgd":
        return apgd(objective, x, 0.1, "linf", n, early_stop=True, autocast_dtype=dtype)
    if attack == "pgd":
        return pgd(objective, x, 0.1, "linf", n, autocast_dtype=dtype)
    return square(objective, x, 0.1, "linf", n, early_stop=True, autocast_dtype=dtype)


@pytest.mark.parametrize("attack", ["apgd", "pgd", "square"])
def test_a_success_claimed_under_autocast_counts_only_if_fp32_confirms_it(attack):
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    n = 5
    rejected = _ClaimsUnderAutocast(fp32_says=False)
    result = _run(attack, rejected, x, n, torch.bfloat16)
    assert result.broken.tolist() == [False] * 4
    assert result.fp32_checked.tolist() == [True] * 4 and result.fp32_rejected.tolist() == [True] * 4
    # the attack went on with every example (no early stop), each claim checked by one fp32 forward
    assert rejected.calls == [(True, 4), (False, 4)] * (n + 1)
    confirmed = _ClaimsUnderAutocast(fp32_says=True)
    result = _run(attack, confirmed, x, n, torch.bfloat16)
    assert result.broken.tolist() == [True] * 4
    assert result.fp32_checked.tolist() == [True] * 4 and result.fp32_rejected.tolist() == [False] * 4
    if attack != "pgd":  # confirmed at the start: early stopping ends the attack there
        assert confirmed.calls == [(True, 4), (False, 4)]
    in_fp32 = _run(attack, _ClaimsUnderAutocast(fp32_says=False), x, n, None)
    assert in_fp32.broken.tolist() == [False] * 4
    assert in_fp32.fp32_checked is None and in_fp32.fp32_rejected is None


def test_restarts_combine_the_fp32_flags():
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    objective = _ClaimsUnderAutocast(fp32_says=False, claims_for=3)  # claims in the first run only
    result = apgd(objective, x, 0.1, "linf", 2, restarts=3, autocast_dtype=torch.bfloat16)
    assert sum(1 for low, _ in objective.calls if low) == 3 * 3  # 3 runs x (start + 2 iterations), all 4 unbroken
    assert sum(1 for low, _ in objective.calls if not low) == 3  # fp32 confirmations: the first run's claims
    assert result.broken.tolist() == [False] * 4
    assert result.fp32_checked.tolist() == [True] * 4 and result.fp32_rejected.tolist() == [True] * 4


def test_bf16_attack_is_not_weaker_than_fp32(metric, triplets):
    # bf16 gradients differ from fp32 ones, so the two attacks follow different paths and may end
    # one example apart either way. Before the fp32 confirmation, early stopping on bf16 claims left
    # examples unbroken that the fp32 attack breaks: 20 vs 16 robust at eps 0.2, 12 vs 8 at 0.3.
    ref, left, right = triplets
    for eps in (0.2, 0.3):
        low = attack_2afc(metric, ref, left, right, None, AttackSettings(norm="l2", eps=eps, iters=10,
                                                                         autocast_dtype="bf16"))
        full = attack_2afc(metric, ref, left, right, None, AttackSettings(norm="l2", eps=eps, iters=10))
        assert int(low.robust_correct.sum()) <= int(full.robust_correct.sum()) + 1, eps
        assert low.fp32_checked is not None and low.fp32_rejected is not None
        assert bool(low.fp32_checked.any())  # the claims were checked
        assert full.fp32_checked is None and full.fp32_rejected is None


def _linear_metric(size=8):
    torch.manual_seed(0)
    return _stub_metric(nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 6)), size)


@pytest.mark.parametrize("call, argument", [
    (lambda m, x: attack_2afc(m, x, x[:3], x), "left"),
    (lambda m, x: attack_2afc(m, x, x, x[:2]), "right"),
    (lambda m, x: attack_2afc(m, x[:, :, :6, :6], x, x), "ref"),  # not at the model's input size
    (lambda m, x: attack_2afc(m, x * 255, x, x), "ref"),
    (lambda m, x: attack_2afc(m, "r.png", x, x), "ref"),
    (lambda m, x: attack_2afc(m, x, None, x), "left"),
    (lambda m, x: attack_2afc(m, x, x, x, torch.tensor([0, 1])), "label"),
    (lambda m, x: attack_2afc(m, x, x, x, torch.tensor([0, 1, 2, 0])), "label"),
    (lambda m, x: attack_2afc_embedded(m, x, torch.zeros(4, 6), torch.zeros(3, 6)), "e_right"),
    (lambda m, x: attack_2afc_embedded(m, x, torch.zeros(4, 6), torch.zeros(4, 5)), "e_right"),
    (lambda m, x: attack_2afc_embedded(m, x, x, x), "e_left"),
    (lambda m, x: attack_embedding(m, x, targets=torch.rand(2, 4, 8, 8)), "targets"),
    (lambda m, x: attack_embedding(m, x.numpy() * 2), "images"),
])
def test_attack_arguments_are_checked_naming_the_argument(call, argument):
    from percept_cli.errors import BadInputError

    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(BadInputError, match=rf"^{argument}:|\b{argument} \d") as info:
        call(_linear_metric(), x)
    assert "--" not in str(info.value)


def test_attack_2afc_takes_uint8_and_numpy_like_float_pixels():
    metric = _linear_metric()
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    settings = AttackSettings(norm="linf", eps=2 / 255, iters=2, random_start=False)
    as_float = attack_2afc(metric, x.float() / 255, x.flip(0).float() / 255, x.roll(1, 0).float() / 255, None, settings)
    as_uint8 = attack_2afc(metric, x, x.flip(0), x.roll(1, 0).numpy(), None, settings)
    torch.testing.assert_close(as_uint8.x_adv, as_float.x_adv, atol=0, rtol=0)
    torch.testing.assert_close(as_uint8.clean_similarity, as_float.clean_similarity, atol=0, rtol=0)


# -- the saved (8-bit) adversarial images and the fp32 verdict on them ----------------------------------
def _on_grid_in_ball(rounded, x, eps, norm):
    q = rounded.pixels
    assert torch.equal(q * 255, torch.round(q * 255))  # multiples of 1/255
    assert float(q.min()) >= 0 and float(q.max()) <= 1
    assert bool(rounded.in_ball.all()) and bool((lp_norm(q - x, norm) <= eps + 1e-6).all())


@pytest.mark.parametrize("norm, eps", [("linf", 1 / 255), ("l2", 0.3)])
def test_rounded_2afc_is_judged_in_fp32_on_the_rounded_pixels(metric, triplets, norm, eps):
    ref, left, right = (t[:8] for t in triplets)
    ref = torch.round(ref * 255) / 255  # on the 8-bit grid, as a loaded PNG: the ball holds grid points
    with torch.no_grad():
        e_left, e_right = metric.embed_pixels(left), metric.embed_pixels(right)
    settings = AttackSettings(norm=norm, eps=eps, iters=10)
    report = attack_2afc_embedded(metric, ref, e_left, e_right, None, settings, early_stop=False)
    rounded = rounded_2afc(metric, report, ref, e_left, e_right, settings)
    _on_grid_in_ball(rounded, ref, eps, norm)
    with torch.no_grad():  # independent fp32 recomputation on the rounded pixels
        e = metric.embed_pixels(rounded.pixels)
    sims = torch.stack(((e * e_left).sum(-1), (e * e_right).sum(-1)), 1)
    torch.testing.assert_close(rounded.similarity, sims)
    wrong = torch.where(report.label == 0, sims[:, 1] > sims[:, 0], sims[:, 0] >= sims[:, 1])  # a tie picks left
    assert torch.equal(rounded.broken, wrong)
    assert bool(rounded.broken.any())
    if norm == "l2":  # rounding shrinks l2 perturbations into the ball: some decisions come back
        assert not bool(rounded.broken.all()) and bool((~report.robust_correct & ~rounded.broken).any())


@pytest.mark.parametrize("targeted", [False, True])
def test_rounded_embedding_distance_is_recomputed_on_the_rounded_pixels(metric, triplets, targeted):
    x, targets = triplets[0][:4], (triplets[2][:2] if targeted else None)
    settings = AttackSettings(norm="linf", eps=2 / 255, iters=5)
    report = attack_embedding(metric, x, targets, settings)
    rounded = rounded_embedding(metric, report, x, settings)
    _on_grid_in_ball(rounded, x, settings.eps, settings.norm)
    with torch.no_grad():
        e = metric.embed_pixels(rounded.pixels)
        reference = metric.embed_pixels(targets if targeted else x)
    expected = (1 - e @ reference.T).mean(-1) if targeted else 1 - (e * reference).sum(-1)
    torch.testing.assert_close(rounded.distance, expected, atol=1e-5, rtol=1e-4)
    assert not torch.equal(rounded.pixels, report.x_adv)  # rounding did move the images


# -- early stopping: a broken example's result is final, the others' trajectories unchanged -------------
class _Bowl:
    """Loss = -sum w (x - c_i)^2 (each example on its own: no batch effects), its maximum near the
    ball's border, so APGD's points keep moving after they break; broken once the loss passes the
    example's threshold, so examples break at different iterations, some never."""

    has_success = True

    def __init__(self, centre, weight, threshold):
        self.centre, self.weight, self.threshold = centre, weight, threshold

    def __call__(self, x, index):
        loss = -(self.weight[index] * (x - self.centre[index]) ** 2).flatten(1).sum(1)
        return loss, loss > self.threshold[index]


def _bowl(batch, seed=0, device_put=lambda t: t, eps=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 4, 4, generator=g) * 0.5 + 0.25
    centre = x + (torch.rand(batch, 3, 4, 4, generator=g) * 4 - 2) * eps
    weight = torch.rand(batch, 3, 4, 4, generator=g) + 0.5

    def loss(point):
        return -(weight * (point - centre) ** 2).flatten(1).sum(1)

    at_start, best = loss(x), loss(centre.clamp(x - eps, x + eps))  # the best point of the ball
    threshold = at_start + (best - at_start) * torch.linspace(0.3, 1.2, batch)
    return device_put(x), _Bowl(*(device_put(t) for t in (centre, weight, threshold)))


def test_early_stopping_records_the_first_success_and_leaves_the_rest_alone():
    x, objective = _bowl(32)
    n = 20
    seen = []
    full = apgd(objective, x, 0.1, "linf", n, seed=3, monitor=lambda k, xb, lb: seen.append((xb.clone(), lb.clone())))
    early = apgd(objective, x, 0.1, "linf", n, seed=3, early_stop=True)
    # independent expectation from the full run: the first successful point of an example is a new
    # best point (every earlier point had a loss below the threshold), so it is the best point after
    # the first iteration whose best loss passes the threshold (or the start, if that passes already)
    start_loss, _ = objective(apgd(objective, x, 0.1, "linf", 0, seed=3).x_adv, torch.arange(32))
    start = apgd(objective, x, 0.1, "linf", 0, seed=3).x_adv
    broken_at = [None] * 32
    for i in range(32):
        if start_loss[i] > objective.threshold[i]:
            broken_at[i] = (start[i], start_loss[i])
            continue
        for xb, lb in seen:
            if lb[i] > objective.threshold[i]:
                broken_at[i] = (xb[i], lb[i])
                break
    assert torch.equal(early.broken, torch.tensor([b is not None for b in broken_at]))
    assert 4 < int(early.broken.sum()) < 28  # examples break at many different iterations, and some never
    for i, first in enumerate(broken_at):
        if first is None:  # never broken: the same trajectory, to the last bit
            assert torch.equal(early.x_adv[i], full.x_adv[i]) and torch.equal(early.loss[i], full.loss[i])
        else:
            assert torch.equal(early.x_adv[i], first[0]) and torch.equal(early.loss[i], first[1])
    assert early.evaluations < full.evaluations


# -- device handling and host-device syncs, on a simulated second device (tests/simulated_device.py) ----
def test_example_ids_on_the_cpu_while_the_attack_runs_on_another_device():
    # issue 11: eval-2afc builds the ids on the CPU; with_restarts indexed them with an index on the
    # attack's device ("indices should be either on cpu or on the same device as the indexed tensor")
    from simulated_device import SimulatedDevice

    x, objective = _bowl(8, seed=1)
    ids = torch.arange(40, 48)
    kw = dict(eps=0.1, norm="linf", n_iter=3, restarts=3, seed=2, early_stop=True, example_ids=ids)
    on_cpu = apgd(objective, x, **kw)
    assert 0 < int(on_cpu.broken.sum()) < 8  # later restarts run on a subset: a device index from nonzero
    with SimulatedDevice() as dev:
        xd, objective_d = _bowl(8, seed=1, device_put=dev.put)
        on_device = apgd(objective_d, xd, **kw)
        assert on_device.x_adv.device == dev.device and on_device.broken.device == dev.device
        assert ids.device == torch.device("cpu")
    # the same numbers (the simulated device computes on the CPU)
    assert torch.equal(on_device.x_adv, on_cpu.x_adv) and torch.equal(on_device.broken, on_cpu.broken)


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_attack_tasks_on_another_device_give_the_cpus_results(dtype):
    from simulated_device import SimulatedDevice

    metric = _linear_metric()
    g = torch.Generator().manual_seed(0)
    ref, left, right = (torch.rand(6, 3, 8, 8, generator=g) for _ in range(3))
    settings = AttackSettings(norm="linf", eps=0.1, iters=4, restarts=2, autocast_dtype=dtype, square_queries=10)
    with torch.no_grad():
        e_left, e_right = metric.embed_pixels(left), metric.embed_pixels(right)
    ids = torch.arange(6)  # on the CPU, as eval-2afc builds them
    on_cpu = attack_2afc_embedded(metric, ref, e_left, e_right, None, settings, example_ids=ids)
    assert 0 < int(on_cpu.robust_correct.sum()) < 6
    with SimulatedDevice() as dev:
        dev.put_module(metric)
        report = attack_2afc_embedded(metric, ref, dev.put(e_left), dev.put(e_right), None, settings, example_ids=ids)
        rounded = rounded_2afc(metric, report, ref, e_left, e_right, settings)
        embedding = attack_embedding(metric, ref[:2], left[:2], replace(settings, norm="l2", eps=0.5))
        outputs = (report.x_adv, report.robust_correct, rounded.pixels, embedding.x_adv)
        assert {t.device for t in outputs} == {dev.device}
        x_adv, robust = report.x_adv.cpu(), report.robust_correct.cpu()
    assert torch.equal(x_adv, on_cpu.x_adv) and torch.equal(robust, on_cpu.robust_correct)


def _syncs(attack, batch, n, dtype=None, breaks=False):
    """Host-device synchronisations of one attack run on the simulated device, which (as CUDA) takes
    counts to the host by an asynchronous copy (percept_cli.attacks.core.ASYNC_HOST_COPY)."""
    from simulated_device import SimulatedDevice

    from percept_cli.attacks import core

    with pytest.MonkeyPatch.context() as patch, SimulatedDevice() as dev:
        patch.setattr(core, "ASYNC_HOST_COPY", ("cuda", "cpu"))
        x, objective = _bowl(batch, device_put=dev.put)
        if not breaks:
            objective.threshold = objective.threshold + 1e3
        if attack == "apgd":
            apgd(objective, x, 0.1, "linf", n, early_stop=True, autocast_dtype=dtype)
        elif attack == "pgd":
            pgd(objective, x, 0.1, "linf", n, autocast_dtype=dtype)
        else:
            square(objective, x, 0.1, "l2", n, autocast_dtype=dtype)
        return sum(dev.syncs.values())


@pytest.mark.parametrize("attack, fp32, bf16", [("apgd", 0, 1), ("pgd", 0, 1), ("square", 1, 1)])
def test_iterations_make_a_fixed_number_of_host_syncs_whatever_the_batch(attack, fp32, bf16):
    # per iteration with nothing breaking: APGD and PGD none in fp32, one under autocast (how many
    # claims the fp32 confirmation must check); Square one (whether a point broke before the next query)
    for dtype, per_iteration in ((None, fp32), (torch.bfloat16, bf16)):
        for batch in (2, 24):
            assert _syncs(attack, batch, 9, dtype) - _syncs(attack, batch, 3, dtype) == 6 * per_iteration


@pytest.mark.parametrize("batch", [8, 48])
def test_early_stopping_drops_broken_examples_with_few_syncs(batch):
    # examples breaking at many different iterations: broken ones leave the batch with one sync per
    # drop, and drops come every few iterations, not every iteration (was 7 or more per iteration)
    n = 24
    assert _syncs("apgd", batch, n, breaks=True) <= n // 2
