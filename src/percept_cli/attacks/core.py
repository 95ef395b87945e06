"""Pieces shared by the optimisers: the result type, one loss+gradient evaluation, the tracker of
best points and successes (with the fp32 confirmation of low-precision successes), restarts."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .threat import bcast
from .threat import random_start as _random_start

__all__ = ["AttackResult", "Tracker", "autocast", "bcast", "evaluate", "loss_and_grad", "low_precision",
           "with_restarts"]


@dataclass
class AttackResult:
    """The outcome of an attack on a batch.

    Attributes:
        x_adv: (B,3,S,S) adversarial images (the latest successful point where one was found, else
            the point of highest loss), always inside the ball and the box.
        loss: (B,) the loss at ``x_adv`` as the attack measured it.
        broken: (B,) bool success (None for objectives without one). Under autocast a success
            counts only once an fp32 forward confirmed it.
        evaluations: forward(+backward) passes spent, counted per example (fp32 confirmations included).
        fp32_checked: (B,) bool, the autocast forward claimed a success at least once, so an fp32
            confirmation was needed; None for fp32 attacks and objectives without success.
        fp32_rejected: (B,) bool, fp32 rejected at least one claimed success; None as ``fp32_checked``.
    """

    x_adv: torch.Tensor
    loss: torch.Tensor
    broken: Optional[torch.Tensor]
    evaluations: int = 0
    fp32_checked: Optional[torch.Tensor] = None
    fp32_rejected: Optional[torch.Tensor] = None


def low_precision(dtype: torch.dtype | None) -> bool:
    """Whether ``dtype`` means running under autocast (anything but None/fp32)."""
    return dtype is not None and dtype != torch.float32


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for None/fp32."""
    if not low_precision(dtype):
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


class Tracker:
    """What one run found per example: the best loss and its point and, for objectives with a success
    notion, whether it was broken and its latest successful point (with the loss there).

    Under autocast (``autocast_dtype`` bf16/fp16) a success the low-precision forward claims is
    only a candidate: one batched fp32 forward (no autocast, no gradient) of the claimed points
    decides, and only confirmed successes count; the others stay unbroken and are attacked on.

    Rows are the run's examples 0..n-1; ``index`` maps them to the objective's examples.
    """

    def __init__(self, objective, index: torch.Tensor, x: torch.Tensor, loss: torch.Tensor,
                 claimed: Optional[torch.Tensor], autocast_dtype=None):
        self.objective, self.index = objective, index
        self.x_best, self.loss_best = x.clone(), loss.clone()
        self.ever = None if claimed is None else torch.zeros_like(loss, dtype=torch.bool)
        self.x_succ, self.loss_succ = x.clone(), loss.clone()
        checking = claimed is not None and low_precision(autocast_dtype)
        self.fp32_checked = torch.zeros_like(self.ever) if checking else None
        self.fp32_rejected = torch.zeros_like(self.ever) if checking else None
        self.confirmations = 0
        if claimed is not None:
            self._record_successes(torch.arange(len(x), device=x.device), x, loss, claimed)

    def update(self, rows: torch.Tensor, x: torch.Tensor, loss: torch.Tensor, claimed: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Record new points ``x`` of the run rows ``rows`` with their loss and claimed success.

        Returns:
            (improved: (b,) bool, the loss beat the row's best; broken: (b,) bool confirmed successes,
            or None for objectives without success).
        """
        improved = loss > self.loss_best[rows]
        better = rows[improved]
        self.loss_best[better], self.x_best[better] = loss[improved], x[improved]
        if claimed is None or self.ever is None:
            return improved, None
        return improved, self._record_successes(rows, x, loss, claimed)

    def _record_successes(self, rows, x, loss, claimed) -> torch.Tensor:
        broken = self.confirm(rows, x, claimed)
        hit = rows[broken]
        self.x_succ[hit], self.loss_succ[hit] = x[broken], loss[broken]
        self.ever[hit] = True
        return broken

    def confirm(self, rows: torch.Tensor, x: torch.Tensor, claimed: torch.Tensor) -> torch.Tensor:
        """The claimed successes that hold in fp32 ((b,) bool); ``claimed`` itself for fp32 attacks."""
        if self.fp32_checked is None or not bool(claimed.any()):
            return claimed
        local = claimed.nonzero().flatten()
        _, verdict = evaluate(self.objective, x[local], self.index[rows[local]])
        self.confirmations += local.numel()
        self.fp32_checked[rows[local]] = True
        self.fp32_rejected[rows[local[~verdict]]] = True
        confirmed = torch.zeros_like(claimed)
        confirmed[local] = verdict
        return confirmed

    def result(self, evaluations: int) -> AttackResult:
        """The run's :class:`AttackResult`: successful points where found, else the best points."""
        if self.ever is None:
            return AttackResult(self.x_best, self.loss_best, None, evaluations)
        x_adv = torch.where(bcast(self.ever, self.x_best), self.x_succ, self.x_best)
        loss = torch.where(self.ever, self.loss_succ, self.loss_best)
        return AttackResult(x_adv, loss, self.ever.clone(), evaluations + self.confirmations,
                            self.fp32_checked, self.fp32_rejected)


def with_restarts(run: Callable[..., AttackResult], objective, x: torch.Tensor, eps: float, norm: str,
                  restarts: int, random_start: bool, seed: int,
                  example_ids: Optional[torch.Tensor] = None) -> AttackResult:
    """Run ``run`` ``restarts`` times; later runs attack only points not yet broken.

    The first run starts at ``x`` (or a random point if ``random_start``); later runs always
    start at a random point. Per example, a success beats no success and a higher loss beats a
    lower one, so a restart can never make the result worse for the attacker.
    ``example_ids`` (global ids, one per example, on any device) seed each example's random start
    on its own, so results do not depend on how examples are batched (resume, several processes).
    """
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    everyone = torch.arange(x.shape[0], device=x.device)
    best: AttackResult | None = None
    evaluations = 0
    for r in range(max(1, int(restarts))):
        index = everyone if best is None or best.broken is None else (~best.broken).nonzero().flatten()
        if index.numel() == 0:
            break
        x_sub = x[index]
        seeds = None
        if example_ids is not None:
            ids = example_ids[index.to(example_ids.device)].cpu().long()
            seeds = (int(seed) * 1_000_003 + ids * 7919 + r) % (2**62)
        start = _random_start(x_sub, eps, norm, generator, seeds) if (random_start or r > 0) else x_sub.clone()
        result = run(objective, x_sub, index, start, generator)
        evaluations += result.evaluations
        best = result if best is None else _merge(best, result, index)
    best.evaluations = evaluations
    return best


def _merge(best: AttackResult, new: AttackResult, index: torch.Tensor) -> AttackResult:
    """Fold a later run on the examples ``index`` into ``best`` (a success wins, then the higher loss)."""
    old_loss = best.loss[index]
    take = new.loss > old_loss
    if best.broken is not None:
        old_broken = best.broken[index]
        take = (new.broken & ~old_broken) | (take & (new.broken == old_broken))
        best.broken[index] = torch.where(take, new.broken, old_broken)
    best.x_adv[index] = torch.where(bcast(take, new.x_adv), new.x_adv, best.x_adv[index])
    best.loss[index] = torch.where(take, new.loss, old_loss)
    for name in ("fp32_checked", "fp32_rejected"):
        old, later = getattr(best, name), getattr(new, name)
        if old is not None and later is not None:
            old[index] |= later
    return best
