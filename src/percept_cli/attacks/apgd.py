"""Auto-PGD (APGD), written from Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML 2020 (Algorithm 1, Sec. 3), with the
checkpoint schedule and halving rule exactly as the authors' auto-attack package applies them.

* step size starts at 2·eps (l_inf and l2), one per example;
* momentum alpha = 0.75: x(k+1) = P(x(k) + alpha (z(k+1) - x(k)) + (1 - alpha)(x(k) - x(k-1))),
  with z(k+1) = P(x(k) + eta(k) * ascent direction); the first step has no momentum;
* checkpoints: the first after int(0.22 N) iterations, then intervals shrinking by int(0.03 N)
  down to int(0.06 N) (each at least 1), see :func:`checkpoints`;
* at a checkpoint the step size of an example is halved, and it restarts from its best point, if
  (1) at most rho = 0.75 of the k iterations since the last checkpoint increased its loss
      (each loss compared with the previous iterate's, the first with the start's, where
      auto-attack compares with 0, an artefact of its loss buffer; after a restart, with the loss
      of the iterate before the restart), or
  (2) its step size was not reduced at the last checkpoint and its best loss has not improved
      since (the start counts as "reduced", so (2) cannot fire at the first checkpoint).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .core import AttackResult, Tracker, bcast, loss_and_grad, with_restarts
from .threat import ascent_direction, project

MOMENTUM = 0.75
RHO = 0.75
FIRST, DECREMENT, SHORTEST = 0.22, 0.03, 0.06  # fractions of N, truncated as auto-attack does
DROP_EVERY = 4  # early stopping drops broken examples from the batch every 4 iterations,
DROP_SHARE = 0.25  # or at once when a quarter of the batch may have broken (see drop_due)


def checkpoints(n_iter: int) -> list[int]:
    """The iteration counts (1-based) after which step sizes are reconsidered, for ``n_iter`` iterations.

    The first interval is ``max(int(0.22 N), 1)`` iterations; each next one is ``max(int(0.03 N), 1)``
    shorter, but never shorter than ``max(int(0.06 N), 1)`` (auto-attack's ``n_iter_2``,
    ``size_decr``, ``n_iter_min``).

    >>> checkpoints(100)
    [22, 41, 57, 70, 80, 87, 93, 99]
    """
    length = max(int(FIRST * n_iter), 1)
    shortest, decrement = max(int(SHORTEST * n_iter), 1), max(int(DECREMENT * n_iter), 1)
    points, at = [], length
    while at <= n_iter:
        points.append(at)
        length = max(length - decrement, shortest)
        at += length
    return points


def halve_step(increases: torch.Tensor, length: int, reduced_last: torch.Tensor, loss_best: torch.Tensor,
               loss_best_last: torch.Tensor) -> torch.Tensor:
    """Per example, whether a checkpoint halves the step (and restarts from the best point).

    Args:
        increases: how many of the ``length`` iterations since the last checkpoint increased the loss.
        reduced_last: whether the step was halved at the last checkpoint (True before the first).
        loss_best, loss_best_last: the best loss now and at the last checkpoint.
    Returns:
        bool tensor: condition (1) ``increases <= 0.75·length`` or condition (2)
        ``not reduced_last and loss_best <= loss_best_last``.
    """
    oscillating = increases <= RHO * length
    stalled = ~reduced_last & (loss_best <= loss_best_last)
    return oscillating | stalled


class _State:
    """APGD's optimiser state for the examples still attacked (rows aligned); ``index`` holds their
    rows in the run, and the best points and successes live in the run's :class:`Tracker`."""

    def __init__(self, x, x_adv, loss, grad, tracker: Tracker, eps, step=None):
        self.x, self.tracker = x, tracker
        self.index = torch.arange(x.shape[0], device=x.device)
        self.everyone = True  # index is every run row, in order (until the first drop)
        self.x_adv, self.x_prev, self.grad, self.loss = x_adv, x_adv, grad, loss
        self.grad_best = grad.clone()
        self.step = torch.full_like(loss, 2.0 * eps if step is None else step)
        self.count = torch.zeros_like(loss)
        self.loss_best_ckpt = tracker.loss_best[self.index]
        self.reduced_ckpt = torch.ones_like(loss, dtype=torch.bool)

    @property
    def x_best(self) -> torch.Tensor:
        return self.tracker.x_best[self.index]

    @property
    def loss_best(self) -> torch.Tensor:
        return self.tracker.loss_best[self.index]

    def keep(self, positions: torch.Tensor) -> None:
        """Keep only the examples at ``positions`` (an integer index into the rows attacked now)."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[positions])
        self.everyone = False

    def drop_broken(self) -> None:
        """Early stopping: the examples whose success is confirmed leave the batch (two synchronisations)."""
        self.tracker.settle()
        self.tracker.new_successes = 0
        positions = (~self.tracker.ever[self.index]).nonzero().flatten()
        if positions.numel() < self.index.numel():
            self.keep(positions)


def drop_due(new_successes: int, done: int, n_iter: int, batch: int) -> bool:
    """Whether early stopping drops the broken examples after iteration ``done`` (1-based) of ``n_iter``.

    Only when some example may have broken since the last drop (``new_successes``, as far as the
    host knows), and then every :data:`DROP_EVERY` iterations, or at once when that may be
    :data:`DROP_SHARE` of the ``batch``; never after the last iteration.
    """
    if new_successes <= 0 or done >= n_iter:
        return False
    return done % DROP_EVERY == 0 or new_successes >= DROP_SHARE * batch


def _step(s: _State, k: int, eps: float, norm: str) -> None:
    """Iteration k's move: a step of size ``s.step`` along the ascent direction, with momentum from k=1."""
    z = project(s.x_adv + bcast(s.step, s.x_adv) * ascent_direction(s.grad, norm), s.x, eps, norm)
    if k == 0:
        x_new = z
    else:
        x_new = project(s.x_adv + MOMENTUM * (z - s.x_adv) + (1 - MOMENTUM) * (s.x_adv - s.x_prev), s.x, eps, norm)
    s.x_prev, s.x_adv = s.x_adv, x_new


def apgd_run(objective, x: torch.Tensor, index: torch.Tensor, x_init: torch.Tensor, eps: float, norm: str,
             n_iter: int, *, early_stop: bool = False, autocast_dtype=None,
             progress: Optional[Callable[[int], None]] = None, step_size: Optional[float] = None,
             monitor: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> AttackResult:
    """One APGD run from ``x_init`` on the examples ``index`` (rows of ``x``).

    Returns per example the latest successful point if the objective has a success notion and
    one was found, else the point of highest loss (see :class:`Tracker`; under autocast, successes
    are confirmed in fp32). ``step_size`` overrides the initial 2·eps;
    ``monitor(k, x_best, loss_best)`` is called after iteration k (rows = examples in the batch).

    With ``early_stop`` a confirmed success is final and the example leaves the batch at the next
    drop (:func:`drop_due`); until then it is carried along without effect on any result. Each
    example's state is its own, so the others follow the same trajectories as without early
    stopping. In fp32 an iteration makes no host-device synchronisation (one under autocast, see
    :class:`Tracker`); a drop makes two.
    """
    loss, claimed, grad = loss_and_grad(objective, x_init, index, autocast_dtype)
    tracker = Tracker(objective, index, x_init, loss, claimed, autocast_dtype, freeze_broken=early_stop)
    s = _State(x, x_init, loss, grad, tracker, eps, step_size)
    evaluations = x.shape[0]
    marks, last_mark = set(checkpoints(n_iter)), 0
    if early_stop:
        tracker.settle()
        if tracker.new_successes:
            s.drop_broken()
    for k in range(n_iter):
        if s.x.shape[0] == 0:
            break
        with torch.no_grad():
            _step(s, k, eps, norm)
        loss, claimed, s.grad = loss_and_grad(objective, s.x_adv, index[s.index], autocast_dtype)
        evaluations += s.x.shape[0]
        with torch.no_grad():
            s.count += (loss > s.loss).float()
            s.loss = loss
            improved = tracker.update(None if s.everyone else s.index, s.x_adv, loss, claimed)
            s.grad_best = torch.where(bcast(improved, s.grad), s.grad, s.grad_best)
            if (k + 1) in marks:
                _checkpoint(s, k + 1 - last_mark)
                last_mark = k + 1
        if progress is not None:
            progress(1)
        if monitor is not None:
            monitor(k + 1, s.x_best, s.loss_best)
        if early_stop and drop_due(tracker.new_successes, k + 1, n_iter, s.x.shape[0]):
            s.drop_broken()
    return tracker.result(evaluations)


def _checkpoint(s: _State, length: int) -> None:
    """Halve the step and restart from the best point where :func:`halve_step` says so.

    ``s.loss`` (what the next iteration's loss is compared with) stays the loss of the iterate
    before the restart, as in auto-attack; the momentum term then points from the iterate before
    that one to the best point.
    """
    loss_best = s.loss_best
    reduce = halve_step(s.count, length, s.reduced_ckpt, loss_best, s.loss_best_ckpt)
    s.step = torch.where(reduce, s.step / 2, s.step)
    mask = bcast(reduce, s.x_adv)
    s.x_adv = torch.where(mask, s.x_best, s.x_adv)
    s.grad = torch.where(mask, s.grad_best, s.grad)
    s.reduced_ckpt = reduce
    s.loss_best_ckpt = loss_best
    s.count.zero_()


def apgd(objective, x: torch.Tensor, eps: float, norm: str = "linf", n_iter: int = 100, *, restarts: int = 1,
         random_start: bool = True, seed: int = 0, early_stop: bool = False, autocast_dtype=None,
         progress: Optional[Callable[[int], None]] = None,
         example_ids: Optional[torch.Tensor] = None, step_size: Optional[float] = None,
         monitor: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> AttackResult:
    """APGD with restarts on a batch ``x`` (B,...) in [0,1].

    Args:
        objective: see :mod:`percept_cli.attacks.objectives`.
        eps, norm: the threat model (``linf`` or ``l2``).
        n_iter: iterations per restart (the paper used 100).
        restarts: runs; each later run attacks only the points still unbroken, from a random start.
        random_start: start the first run at a random point of the ball (else at ``x``).
        seed: makes random starts repeatable.
        early_stop: examples leave the batch once broken (evaluation, where only the decision counts),
            at most :data:`DROP_EVERY` iterations later; their results are as if they left at once.
        autocast_dtype: e.g. torch.bfloat16 to run forward/backward under autocast.
        progress: called with 1 after each iteration.
        example_ids: per-example ids seeding each random start (batch-independent results).
        step_size: initial step size instead of 2·eps (feature inversion uses its own).
        monitor: ``monitor(k, x_best, loss_best)`` after each iteration (for watching an optimisation).
    """
    def run(obj, x_sub, index, start, generator):
        return apgd_run(obj, x_sub, index, start, eps, norm, n_iter, early_stop=early_stop,
                        autocast_dtype=autocast_dtype, progress=progress, step_size=step_size, monitor=monitor)

    return with_restarts(run, objective, x, eps, norm, restarts, random_start, seed, example_ids)
