"""Plain projected gradient ascent with a fixed step (Madry et al., ICLR 2018): the baseline
that APGD is tested against. Same projection, objectives and restarts as APGD."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .core import AttackResult, Tracker, loss_and_grad, with_restarts
from .threat import ascent_direction, project


def default_step(eps: float, n_iter: int) -> float:
    """Madry et al.'s rule of thumb: 2.5·eps / n_iter."""
    return 2.5 * eps / max(1, n_iter)


def pgd_run(objective, x, index, x_init, eps, norm, n_iter, step_size, *, autocast_dtype=None,
            progress: Optional[Callable[[int], None]] = None) -> AttackResult:
    """One PGD run; keeps per example the latest successful point, else the highest-loss point
    (under autocast, successes confirmed in fp32: see :class:`Tracker`)."""
    x_adv = x_init
    loss, claimed, grad = loss_and_grad(objective, x_adv, index, autocast_dtype)
    tracker = Tracker(objective, index, x_adv, loss, claimed, autocast_dtype)
    for _ in range(n_iter):
        with torch.no_grad():
            x_adv = project(x_adv + step_size * ascent_direction(grad, norm), x, eps, norm)
        loss, claimed, grad = loss_and_grad(objective, x_adv, index, autocast_dtype)
        with torch.no_grad():
            tracker.update(None, x_adv, loss, claimed)
        if progress is not None:
            progress(1)
    return tracker.result(x.shape[0] * (n_iter + 1))


def pgd(objective, x: torch.Tensor, eps: float, norm: str = "linf", n_iter: int = 100, *,
        step_size: float | None = None, restarts: int = 1, random_start: bool = True, seed: int = 0,
        autocast_dtype=None, progress: Optional[Callable[[int], None]] = None) -> AttackResult:
    """Fixed-step PGD with restarts (``step_size`` default: 2.5·eps/n_iter)."""
    step = default_step(eps, n_iter) if step_size is None else float(step_size)

    def run(obj, x_sub, index, start, generator):
        return pgd_run(obj, x_sub, index, start, eps, norm, n_iter, step, autocast_dtype=autocast_dtype,
                       progress=progress)

    return with_restarts(run, objective, x, eps, norm, restarts, random_start, seed)
