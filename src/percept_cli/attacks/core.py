"""Pieces shared by the optimisers: the result type, one loss+gradient evaluation, restarts."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .threat import random_start as _random_start


@dataclass
class AttackResult:
    """The outcome of an attack on a batch.

    Attributes:
        x_adv: (B,3,S,S) adversarial images (a successful point where one was found, else the
            point of highest loss), always inside the ball and the box.
        loss: (B,) the loss at ``x_adv`` as the attack measured it.
        broken: (B,) bool success as the attack measured it (None for objectives without one).
        evaluations: forward(+backward) passes spent, counted per example.
    """

    x_adv: torch.Tensor
    loss: torch.Tensor
    broken: Optional[torch.Tensor]
    evaluations: int = 0


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for None/fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_and_grad(objective, x: torch.Tensor, index: torch.Tensor, autocast_dtype=None):
    """One forward+backward: (loss (b,), broken or None, d loss / d x), all detached.

    The graph is freed before returning: nothing outlives the iteration.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), autocast(x.device, autocast_dtype):
        loss, broken = objective(x, index)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach().float(), (broken.detach() if broken is not None else None), grad.detach()


@torch.no_grad()
def evaluate(objective, x: torch.Tensor, index: torch.Tensor | None = None, autocast_dtype=None):
    """Loss and success without gradient (the final fp32 check uses autocast_dtype=None)."""
    if index is None:
        index = torch.arange(x.shape[0], device=x.device)
    with autocast(x.device, autocast_dtype):
        loss, broken = objective(x, index)
    return loss.float(), broken


def with_restarts(run: Callable[..., AttackResult], objective, x: torch.Tensor, eps: float, norm: str,
                  restarts: int, random_start: bool, seed: int,
                  example_ids: Optional[torch.Tensor] = None) -> AttackResult:
    """Run ``run`` ``restarts`` times; later runs attack only points not yet broken.

    The first run starts at ``x`` (or a random point if ``random_start``); later runs always
    start at a random point. Per example, a success beats no success and a higher loss beats a
    lower one, so a restart can never make the result worse for the attacker.
    ``example_ids`` (global ids, one per example) seed each example's random start on its own,
    so results do not depend on how examples are batched (resume, several processes).
    """
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    best: AttackResult | None = None
    evaluations = 0
    for r in range(max(1, int(restarts))):
        if best is None:
            index = torch.arange(x.shape[0], device=x.device)
        elif best.broken is not None:
            index = (~best.broken).nonzero().flatten()
        else:
            index = torch.arange(x.shape[0], device=x.device)
        if index.numel() == 0:
            break
        x_sub = x[index]
        seeds = None
        if example_ids is not None:
            seeds = (int(seed) * 1_000_003 + example_ids[index].cpu().long() * 7919 + r) % (2**62)
        start = _random_start(x_sub, eps, norm, generator, seeds) if (random_start or r > 0) else x_sub.clone()
        result = run(objective, x_sub, index, start, generator)
        evaluations += result.evaluations
        best = result if best is None else _merge(best, result, index)
    best.evaluations = evaluations
    return best


def _merge(best: AttackResult, new: AttackResult, index: torch.Tensor) -> AttackResult:
    old_loss = best.loss[index]
    take = new.loss > old_loss
    if best.broken is not None:
        old_broken = best.broken[index]
        take = (new.broken & ~old_broken) | (take & (new.broken == old_broken))
        best.broken[index] = torch.where(take, new.broken, old_broken)
    mask = take.view(-1, *([1] * (new.x_adv.dim() - 1)))
    best.x_adv[index] = torch.where(mask, new.x_adv, best.x_adv[index])
    best.loss[index] = torch.where(take, new.loss, old_loss)
    return best
