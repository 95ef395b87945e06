"""Pieces shared by the optimisers: the result type, one loss+gradient evaluation, the tracker of
best points and successes (with the fp32 confirmation of low-precision successes), restarts."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .threat import bcast
from .threat import random_start as _random_start

__all__ = ["ASYNC_HOST_COPY", "AttackResult", "HostCount", "Tracker", "autocast", "bcast", "evaluate",
           "loss_and_grad", "low_precision", "with_restarts"]


@dataclass
class AttackResult:
    """The outcome of an attack on a batch.

    Attributes:
        x_adv: (B,3,S,S) adversarial images (the latest successful point where one was found, else
            the point of highest loss), always inside the ball and the box.
        loss: (B,) the loss at ``x_adv`` as the attack measured it.
        broken: (B,) bool success (None for objectives without one). Under autocast a success
            counts only once an fp32 forward confirmed it.
        evaluations: forward(+backward) passes spent, counted per example (fp32 confirmations included,
            and, under early stopping, the passes of broken examples not yet dropped from the batch).
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


ASYNC_HOST_COPY = ("cuda",)  # device types whose counts reach the host by an asynchronous copy


class HostCount:
    """A device integer for the host to read later without stalling the device.

    On CUDA (:data:`ASYNC_HOST_COPY`) the value is copied, behind the work queued so far, into
    pinned host memory, and :meth:`get` waits only for that copy (an event), not for the work
    queued since; elsewhere :meth:`get` reads the value when asked.
    """

    def __init__(self, value: torch.Tensor):
        self._value, self._event = value, None
        if value.device.type in ASYNC_HOST_COPY:
            cuda = value.device.type == "cuda"
            # copy and event on the value's own device and stream (cuda:1 as well as cuda:0)
            with torch.cuda.device(value.device) if cuda else contextlib.nullcontext():
                self._value = torch.empty((), dtype=value.dtype, pin_memory=cuda)
                self._value.copy_(value, non_blocking=True)
                if cuda:
                    self._event = torch.cuda.Event()
                    self._event.record()

    def get(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return int(self._value)


class Tracker:
    """What one run found per example: the best loss and its point and, for objectives with a success
    notion, whether it was broken and its latest successful point (with the loss there).

    Under autocast (``autocast_dtype`` bf16/fp16) a success the low-precision forward claims is
    only a candidate: one batched fp32 forward (no autocast, no gradient) of the claimed points
    decides, and only confirmed successes count; the others stay unbroken and are attacked on.

    With ``freeze_broken`` (early stopping) a confirmed success is final: later points of that
    example change nothing it recorded, so the caller may keep attacking it for a few iterations
    and drop it from the batch when convenient. ``new_successes`` counts, on the host, the
    successes (fp32) or claims (autocast) recorded since the caller last reset it; in fp32 it lags
    one :meth:`update` behind (:meth:`settle` brings it up to date).

    An update makes no host-device synchronisation in fp32 (on CUDA; with ``freeze_broken`` the
    count of new successes reaches the host through :class:`HostCount`) and one under autocast
    (the number of claims, to size the fp32 confirmation). Rows are the run's examples 0..n-1;
    ``index`` maps them to the objective's examples. Updates write the tracker's tensors in place.
    """

    def __init__(self, objective, index: torch.Tensor, x: torch.Tensor, loss: torch.Tensor,
                 claimed: Optional[torch.Tensor], autocast_dtype=None, *, freeze_broken: bool = False):
        self.objective, self.index = objective, index
        self.x_best, self.loss_best = x.clone(), loss.clone()
        self.ever = None if claimed is None else torch.zeros_like(loss, dtype=torch.bool)
        self.x_succ, self.loss_succ = x.clone(), loss.clone()
        checking = claimed is not None and low_precision(autocast_dtype)
        self.fp32_checked = torch.zeros_like(self.ever) if checking else None
        self.fp32_rejected = torch.zeros_like(self.ever) if checking else None
        self.freeze = freeze_broken and claimed is not None
        self.confirmations = 0
        self.new_successes = 0
        self._unread: Optional[HostCount] = None
        if claimed is not None:
            self._record_successes(None, x, loss, claimed)

    def update(self, rows: Optional[torch.Tensor], x: torch.Tensor, loss: torch.Tensor,
               claimed: Optional[torch.Tensor]) -> torch.Tensor:
        """Record new points ``x`` of the distinct run rows ``rows`` (None: every row, in order) with
        their loss and claimed success.

        Returns:
            improved: (b,) bool, the loss beat the row's best (never for a frozen row).
        """
        self._read_count()
        improved = loss > _rows(self.loss_best, rows)
        live = ~_rows(self.ever, rows) if self.freeze else None
        if live is not None:
            improved &= live
        _assign(self.loss_best, rows, improved, loss)
        _assign(self.x_best, rows, improved, x)
        if claimed is not None and self.ever is not None:
            self._record_successes(rows, x, loss, claimed if live is None else claimed & live)
        return improved

    def settle(self) -> None:
        """Bring ``new_successes`` up to date (one host-device synchronisation at most)."""
        self._read_count()

    def _read_count(self) -> None:
        if self._unread is not None:
            self.new_successes += self._unread.get()
            self._unread = None

    def _record_successes(self, rows, x, loss, claimed) -> None:
        if self.fp32_checked is None:  # fp32: a claim is a success
            self._record(rows, x, loss, claimed)
            if self.freeze:
                self._unread = HostCount(claimed.sum())
            return
        claims = int(claimed.sum())  # the one synchronisation: the size of the fp32 confirmation
        self.new_successes += claims
        if claims:
            self._record(rows, x, loss, self._confirm(rows, x, claimed, claims))

    def _confirm(self, rows, x, claimed, claims: int) -> torch.Tensor:
        """The claimed successes that hold in fp32 ((b,) bool), from one fp32 forward of the claimed rows."""
        local = torch.argsort((~claimed).to(torch.uint8), stable=True)[:claims]  # the claimed rows, in order
        claimed_rows = local if rows is None else rows[local]
        _, verdict = evaluate(self.objective, x[local], self.index[claimed_rows])
        self.confirmations += claims
        self.fp32_checked[claimed_rows] = True
        self.fp32_rejected[claimed_rows] = self.fp32_rejected[claimed_rows] | ~verdict
        return torch.zeros_like(claimed).index_put((local,), verdict)

    def _record(self, rows, x, loss, hit) -> None:
        _assign(self.x_succ, rows, hit, x)
        _assign(self.loss_succ, rows, hit, loss)
        _assign(self.ever, rows, hit, hit)

    def result(self, evaluations: int) -> AttackResult:
        """The run's :class:`AttackResult`: successful points where found, else the best points."""
        if self.ever is None:
            return AttackResult(self.x_best, self.loss_best, None, evaluations)
        x_adv = torch.where(bcast(self.ever, self.x_best), self.x_succ, self.x_best)
        loss = torch.where(self.ever, self.loss_succ, self.loss_best)
        return AttackResult(x_adv, loss, self.ever.clone(), evaluations + self.confirmations,
                            self.fp32_checked, self.fp32_rejected)


def _rows(t: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """``t[rows]``, or ``t`` itself for rows None (every row, in order)."""
    return t if rows is None else t[rows]


def _assign(target: torch.Tensor, rows: Optional[torch.Tensor], mask: torch.Tensor, value: torch.Tensor) -> None:
    """``target[rows] = where(mask, value, target[rows])`` with integer rows (no host sync); in place,
    without gather and scatter, for rows None."""
    value = value.to(target.dtype)
    if rows is None:
        torch.where(bcast(mask, value), value, target, out=target)
    else:
        target[rows] = torch.where(bcast(mask, value), value, target[rows])


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
