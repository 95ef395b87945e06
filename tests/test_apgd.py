"""APGD against auto-attack's schedule and halving rule, and against Algorithm 1 of Croce & Hein
(ICML 2020) re-derived here on objectives whose every step can be followed by hand."""

from __future__ import annotations

import pytest
import torch

from percept_cli.attacks import apgd, checkpoints
from percept_cli.attacks.apgd import _checkpoint, _State, halve_step
from percept_cli.attacks.core import Tracker

EPS = 0.1


# -- the checkpoint schedule ------------------------------------------------------------------------
# auto-attack: first interval n_iter_2 = max(int(0.22 N), 1); each next interval is size_decr =
# max(int(0.03 N), 1) shorter, but at least n_iter_min = max(int(0.06 N), 1). Checks happen after
# the cumulative interval lengths, while they do not exceed N.
@pytest.mark.parametrize("n_iter, expected", [
    # N=10: first int(2.2)=2; decrement int(0.3)=0 -> 1; minimum int(0.6)=0 -> 1.
    # intervals 2,1,1,...: 2, 3, 4, ..., 10
    (10, [2, 3, 4, 5, 6, 7, 8, 9, 10]),
    # N=50: first int(11.0)=11; decrement int(1.5)=1; minimum int(3.0)=3.
    # intervals 11,10,9,8,7: 11, 21, 30, 38, 45 (next 45+6=51 > 50)
    (50, [11, 21, 30, 38, 45]),
    # N=100: first 22; decrement 3; minimum 6. intervals 22,19,16,13,10,7,6,6: 22, 41, 57, 70, 80, 87, 93, 99
    (100, [22, 41, 57, 70, 80, 87, 93, 99]),
    # N=500: first 110; decrement 15; minimum 30. intervals 110,95,80,65,50,35,30,30:
    # 110, 205, 285, 350, 400, 435, 465, 495 (next 525 > 500)
    (500, [110, 205, 285, 350, 400, 435, 465, 495]),
    # N=1: first max(int(0.22), 1) = 1
    (1, [1]),
])
def test_checkpoint_schedule_is_auto_attacks(n_iter, expected):
    assert checkpoints(n_iter) == expected


# -- the halving rule on hand-made states ---------------------------------------------------------------
def _halves(increases, length, reduced_last=True, best=1.0, best_last=0.0) -> bool:
    return bool(halve_step(torch.tensor([float(increases)]), length, torch.tensor([reduced_last]),
                           torch.tensor([best]), torch.tensor([best_last]))[0])


@pytest.mark.parametrize("length, at_most", [(4, 3), (8, 6), (22, 16)])  # 0.75·4 = 3, 0.75·8 = 6, 0.75·22 = 16.5
def test_condition_1_halves_at_or_below_three_quarters_of_the_interval(length, at_most):
    assert _halves(at_most, length)  # exactly 0.75·k (or the largest count below 0.75·k): halve
    assert _halves(0, length)
    assert not _halves(at_most + 1, length)  # one more increase: the step is working, keep it


def test_condition_2_halves_when_not_reduced_last_time_and_no_progress():
    many = 4  # of 4 iterations: condition 1 does not hold
    assert _halves(many, 4, reduced_last=False, best=1.0, best_last=1.0)  # best loss not improved
    assert _halves(many, 4, reduced_last=False, best=0.5, best_last=1.0)
    assert not _halves(many, 4, reduced_last=False, best=1.5, best_last=1.0)  # improved
    assert not _halves(many, 4, reduced_last=True, best=1.0, best_last=1.0)  # halved last time


def test_condition_2_cannot_fire_at_the_first_checkpoint():
    # a fresh state, as APGD starts: best loss 1.0 at the start, then 20 of 22 iterations increased
    # the loss without beating the start; auto-attack starts with reduced_last_check = True.
    loss = torch.tensor([1.0])
    x = torch.full((1, 1, 1, 2), 0.5)
    state = _State(x, x.clone(), loss, torch.ones_like(x), Tracker(None, torch.arange(1), x, loss, None), EPS)
    state.count = torch.tensor([20.0])
    _checkpoint(state, 22)
    assert float(state.step) == pytest.approx(2 * EPS)  # not halved
    state.count = torch.tensor([20.0])
    _checkpoint(state, 22)  # second checkpoint: not reduced last time, no progress -> halve
    assert float(state.step) == pytest.approx(EPS)


# -- trajectories that can be followed by hand -----------------------------------------------------------
class Quadratic:
    """loss(x) = -sum_i w_i (x_i - c_i)^2 per example: maximum at c (inside or outside the ball)."""

    has_success = False

    def __init__(self, centre: torch.Tensor, weight: torch.Tensor):
        self.centre, self.weight = centre, weight

    def __call__(self, x, index):
        d = x.flatten(1) - self.centre[index]
        return -(self.weight[index] * d.pow(2)).sum(1), None


def test_first_two_steps_follow_the_paper_with_momentum():
    # x0 = (0.5, 0.5), eps 0.1, start at x0. loss = -(u - 0.53)^2 + 0.1 v: c_u = 0.53 inside the ball,
    # v pushed up to the border. Step eta = 2 eps = 0.2. Two iterations: checkpoints at 1 and 2, but
    # at 1 the loss went up (1 > 0.75·1) and condition 2 cannot fire yet: no halving before step 2.
    # step 1 (no momentum): z = P(x0 + 0.2 sign(0.06, 0.1)) = (0.6, 0.6); x1 = z.
    # step 2: grad at x1 = (-2(0.6-0.53), 0.1) -> sign (-1, +1); z = P((0.4, 0.8)) = (0.4, 0.6);
    #   x2 = P(x1 + 0.75 (z - x1) + 0.25 (x1 - x0)) = (0.6 - 0.15 + 0.025, 0.6 + 0 + 0.025 -> 0.6)
    #      = (0.475, 0.6).
    # losses: x0: -0.0009 + 0.05 = 0.0491; x1: -0.0049 + 0.06 = 0.0551; x2: -0.003025 + 0.06 = 0.056975.
    # Without momentum x2 would be (0.4, 0.6), loss -0.0169 + 0.06 = 0.0431 < x1's.
    class Objective:
        has_success = False

        def __call__(self, x, index):
            u, v = x[:, 0, 0, 0], x[:, 0, 0, 1]
            return -(u - 0.53) ** 2 + 0.1 * v, None

    x = torch.full((1, 1, 1, 2), 0.5, dtype=torch.float64)
    seen = []
    result = apgd(Objective(), x, EPS, "linf", 2, random_start=False,
                  monitor=lambda k, xb, lb: seen.append(float(lb[0])))
    torch.testing.assert_close(result.x_adv.flatten(), torch.tensor([0.475, 0.6], dtype=torch.float64))
    assert seen == pytest.approx([0.0551, 0.056975], rel=1e-6)


def _reference_apgd(loss, grad, x0, eps, n_iter, marks):
    """Algorithm 1 (l_inf), one example, plain Python: the best loss after each iteration, and the best point.

    Step 2·eps, momentum 0.75 from the second step; at a checkpoint of interval length k, halve the step
    and go back to the best point (and its gradient) if at most 0.75·k of the last k iterations
    increased the loss over the previous iterate (the iterate before a restart still counts as
    previous), or if the step was not halved at the last checkpoint (true before the first) and
    the best loss has not improved since.
    """
    def project(v):
        return [min(max(vi, ci - eps, 0.0), ci + eps, 1.0) for vi, ci in zip(v, x0)]

    def sign(t):
        return (t > 0) - (t < 0)

    x, x_prev, eta = list(x0), list(x0), 2 * eps
    f, g = loss(x), grad(x)
    best, x_best, g_best = f, list(x), list(g)
    previous, increases, halved_last, best_last, last = f, 0, True, f, 0
    trajectory, gaps = [], []
    for k in range(1, n_iter + 1):
        z = project([xi + eta * sign(gi) for xi, gi in zip(x, g)])
        a = 1.0 if k == 1 else 0.75
        x_prev, x = x, project([xi + a * (zi - xi) + (1 - a) * (xi - pi) for xi, zi, pi in zip(x, z, x_prev)])
        f, g = loss(x), grad(x)
        gaps.append(abs(f - previous))
        increases += f > previous
        previous = f
        if f > best:
            best, x_best, g_best = f, list(x), list(g)
        if k in marks:
            halve = increases <= 0.75 * (k - last) or (not halved_last and best <= best_last)
            if halve:
                eta /= 2
                x, g = list(x_best), list(g_best)
            halved_last, best_last, increases, last = halve, best, 0, k
        trajectory.append(best)
    return trajectory, x_best, min(gaps)


# Chosen (by searching centres/weights with the reference above) so that over 20 iterations the
# trajectory changes if momentum is dropped, if the restart from the best point is dropped, if
# "at most 0.75·k" becomes "fewer than 0.75·k", or if a restart resets the loss the next one is
# compared with: the last two columns say which of these each example exercises.
CASES = [((0.025, 0.1224), (1.0, 1.61)),    # momentum, restart, "<=", count after restart
         ((-0.0723, 0.0034), (1.0, 1.33)),  # momentum, restart, count after restart
         ((-0.0099, 0.0927), (1.0, 2.65))]  # momentum, restart, "<="


def test_trajectory_matches_algorithm_1():
    n_iter = 20
    # N=20: first int(4.4)=4; decrement max(int(0.6),1)=1; minimum max(int(1.2),1)=1 -> 4, 7, 9, 10, ..., 20
    marks = {4, 7, 9, *range(10, 21)}
    x = torch.full((len(CASES), 1, 1, 2), 0.5, dtype=torch.float64)
    centre = 0.5 + torch.tensor([c for c, _ in CASES], dtype=torch.float64)
    weight = torch.tensor([w for _, w in CASES], dtype=torch.float64)
    seen = []
    result = apgd(Quadratic(centre, weight), x, EPS, "linf", n_iter, random_start=False,
                  monitor=lambda k, xb, lb: seen.append(lb.clone()))
    for i in range(len(CASES)):
        c, w = centre[i].tolist(), weight[i].tolist()
        loss = lambda v: -sum(wj * (vj - cj) ** 2 for vj, cj, wj in zip(v, c, w))  # noqa: E731
        grad = lambda v: [-2 * wj * (vj - cj) for vj, cj, wj in zip(v, c, w)]  # noqa: E731
        trajectory, x_best, gap = _reference_apgd(loss, grad, [0.5, 0.5], EPS, n_iter, marks)
        assert gap > 1e-6  # no near-ties: float32 losses take the same decisions as the reference
        assert [float(lb[i]) for lb in seen] == pytest.approx(trajectory, rel=1e-6, abs=1e-9), i
        torch.testing.assert_close(result.x_adv[i].flatten(), torch.tensor(x_best, dtype=torch.float64))
        assert float(result.loss[i]) == pytest.approx(trajectory[-1], rel=1e-6)


# -- restarts ------------------------------------------------------------------------------------------
class TwoPeaks:
    """loss = d^2 + b·d on the first coordinate's offset d from the clean point: two local maxima,
    d = +eps (the higher one when b > 0) and d = -eps; which one APGD climbs depends on the start.
    With ``success``, a point is broken when d > eps / 2."""

    def __init__(self, x0: torch.Tensor, b: float, success: bool):
        self.x0, self.b, self.has_success = x0, b, success

    def __call__(self, x, index):
        d = (x - self.x0[index]).flatten(1)[:, 0]
        return d * d + self.b * d, (d > EPS / 2) if self.has_success else None


def test_later_restarts_break_points_the_first_run_missed():
    x = torch.full((64, 1, 1, 2), 0.5)
    objective = TwoPeaks(x, 0.0, success=True)
    one = apgd(objective, x, EPS, "linf", 5, restarts=1, seed=0)
    three = apgd(objective, x, EPS, "linf", 5, restarts=3, seed=0)
    assert 10 < int(one.broken.sum()) < 54  # the first random start decides: about half are broken
    assert bool((three.broken | ~one.broken).all())  # nothing broken once is lost
    assert int(three.broken.sum()) > int(one.broken.sum()) + 10  # the other restarts break many more
    assert bool(((three.x_adv - x)[:, 0, 0, 0][three.broken] > EPS / 2).all())


def test_restarts_keep_the_higher_loss_per_example():
    x = torch.full((64, 1, 1, 2), 0.5)
    objective = TwoPeaks(x, 0.2 * EPS, success=False)  # peaks: 1.2·eps^2 at +eps, 0.8·eps^2 at -eps
    one = apgd(objective, x, EPS, "linf", 5, restarts=1, seed=0)
    two = apgd(objective, x, EPS, "linf", 5, restarts=2, seed=0)
    low, high = 0.8 * EPS ** 2, 1.2 * EPS ** 2
    assert int((one.loss < (low + high) / 2).sum()) > 5  # the first run ends on the lower peak for some
    assert bool((two.loss >= one.loss - 1e-9).all())  # a restart never makes an example worse
    assert int((two.loss > one.loss + 0.1 * EPS ** 2).sum()) > 5  # and the second run finds the higher peak
    torch.testing.assert_close(two.loss, objective(two.x_adv, torch.arange(64))[0])
