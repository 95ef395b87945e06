"""The inner maximisation of adversarial training: PGD with momentum on the normalised gradient.

As the FARE/TeCoA training code (chs20/RobustVLM, ``train/pgd_train.py``) runs it: a uniform random
start in the l_inf ball (a point of the l2 ball for l2), ``steps`` steps of ``step_size`` along a
momentum (0.9) average of the steepest-ascent direction, projected onto ball ∩ [0,1] after each step.
Gradients are taken with respect to the perturbation only (``torch.autograd.grad``), on the bare
module: no parameter gradient is accumulated, so DistributedDataParallel's reducer never sees it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..attacks.threat import ascent_direction, bcast, project


def uniform_start(shape: tuple, eps: float, norm: str, generator: torch.Generator, device) -> torch.Tensor:
    """A random perturbation of the ball: uniform per pixel for l_inf, a uniform direction and radius for l2."""
    if norm == "linf":
        return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * eps
    direction = torch.randn(shape, generator=generator, device=device)
    radius = torch.rand((shape[0],), generator=generator, device=device) * eps
    flat = direction.flatten(1).norm(dim=1).clamp_min(1e-12)
    return direction * bcast(radius / flat, direction)


def pgd_perturb(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, delta0: torch.Tensor,
                eps: float, norm: str, steps: int, step_size: float, momentum: float = 0.9,
                autocast: Callable | None = None) -> torch.Tensor:
    """``x + δ`` after ``steps`` steps of momentum PGD maximising ``loss_fn`` (a scalar), detached.

    Args:
        loss_fn: images -> scalar loss to maximise (e.g. summed over the batch).
        delta0: the random start (inside the ball).
        autocast: a context-manager factory for the forward/backward (None: full precision).
    """
    x = x.detach()
    x_adv = project(x + delta0, x, eps, norm)
    velocity = torch.zeros_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        if autocast is not None:
            with autocast():
                loss = loss_fn(x_adv)
        else:
            loss = loss_fn(x_adv)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            direction = ascent_direction(torch.nan_to_num(grad.float()), norm)
            velocity = ascent_direction(momentum * velocity + direction, norm) if momentum else direction
            x_adv = project(x_adv.detach() + step_size * velocity, x, eps, norm)
    return x_adv.detach()
