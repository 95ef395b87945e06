"""Square Attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020): score-based random search.

It never looks at a gradient, so it is the check against gradient masking: a defence that only
hides its gradients falls to Square Attack even where APGD fails. Each query changes the
perturbation inside one random square window and keeps the change if the loss goes up.

* l_inf: initialised with vertical stripes of +-eps; a window gets +-eps per channel.
* l2: initialised with a grid of +-"pseudo-Gaussian" tiles scaled to norm eps; a query moves the
  budget of two windows into one new "meta-square" pattern (the paper's Algorithm 3).
* The window covers a fraction p of the image, halved on the paper's query schedule.

``square()`` called directly defaults to the Square paper's ImageNet values p_init = 0.05 (l_inf)
and 0.1 (l2). The gradient-masking check of the 2AFC tasks (:mod:`.tasks`) instead uses the
robustness-evaluation setting of the perceptual-metrics paper and auto-attack: p_init = 0.8 for
both norms, margin loss, 5,000 queries.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .core import AttackResult, Tracker, bcast, evaluate
from .threat import lp_norm, project

P_INIT = {"linf": 0.05, "l2": 0.1}
_HALVING_AT = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # per 10,000 queries
_TINY = 1e-12


def window_fraction(p_init: float, query: int, n_queries: int) -> float:
    """The fraction of pixels a window covers at ``query`` (halved at the paper's milestones)."""
    scaled = int(query / max(1, n_queries) * 10000)
    return p_init / 2 ** sum(scaled > t for t in _HALVING_AT)


def _window(n, height, width, size, generator, device):
    """Random top-left corners and the (n,1,H,W) boolean mask of a size x size window."""
    r = torch.randint(0, height - size + 1, (n,), generator=generator, device=device)
    c = torch.randint(0, width - size + 1, (n,), generator=generator, device=device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    mr = (rows[None] >= r[:, None]) & (rows[None] < r[:, None] + size)
    mc = (cols[None] >= c[:, None]) & (cols[None] < c[:, None] + size)
    return r, c, (mr[:, :, None] & mc[:, None, :])[:, None]


def _pseudo_gaussian(h1: int, h2: int, device) -> torch.Tensor:
    """The paper's eta: sum_{k=0}^{M(i,j)} 1/(n+1-k)^2, M = n - Chebyshev distance to the centre."""
    n = h1 // 2
    i = torch.arange(h1, device=device)[:, None]
    j = torch.arange(h2, device=device)[None, :]
    m = (n - torch.maximum((i - h1 // 2).abs(), (j - h2 // 2).abs())).clamp(min=0)
    weights = torch.cumsum(1.0 / (n + 1 - torch.arange(n + 1, device=device, dtype=torch.float32)) ** 2, 0)
    return weights[m]


def _meta_square(size: int, generator, device) -> torch.Tensor:
    """Two pseudo-Gaussian halves of opposite sign, randomly oriented, unit l2 norm (size x size)."""
    left = _pseudo_gaussian(size, size // 2, device)
    right = -_pseudo_gaussian(size, size - size // 2, device)
    eta = torch.cat((left, right), dim=1)
    eta = torch.where(torch.rand((), generator=generator, device=device) < 0.5, eta.T, eta)  # no host sync
    return eta / (eta.norm() + _TINY)


def _place(pattern: torch.Tensor, r, c, height, width, mask) -> torch.Tensor:
    """Put a size x size ``pattern`` at per-example corners (r, c): (n,1,H,W), zero elsewhere."""
    size = pattern.shape[0]
    iy = (torch.arange(height, device=r.device)[None] - r[:, None]).clamp(0, size - 1)
    ix = (torch.arange(width, device=r.device)[None] - c[:, None]).clamp(0, size - 1)
    return pattern[iy[:, :, None], ix[:, None, :]][:, None] * mask


def _signs(shape, generator, device) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=device).float() * 2 - 1


def _init_linf(x, eps, generator):
    b, ch, _, width = x.shape
    return (x + eps * _signs((b, ch, 1, width), generator, x.device)).clamp(0, 1)


def _init_l2(x, eps, generator):
    b, ch, height, width = x.shape
    tile = max(2, min(height, width) // 5)
    eta = _pseudo_gaussian(tile, tile, x.device)
    delta = torch.zeros_like(x)
    for top in range(0, height - tile + 1, tile):
        for left in range(0, width - tile + 1, tile):
            delta[:, :, top:top + tile, left:left + tile] = eta * _signs((b, ch, 1, 1), generator, x.device)
    delta = delta * bcast(eps / (lp_norm(delta, "l2") + _TINY), delta)
    return project(x + delta, x, eps, "l2")


def _propose_linf(x, x_adv, eps, size, generator):
    n, ch, height, width = x.shape
    _, _, mask = _window(n, height, width, size, generator, x.device)
    values = eps * _signs((n, ch, 1, 1), generator, x.device)
    delta = torch.where(mask, values.expand_as(x), x_adv - x)
    return project(x + delta, x, eps, "linf")


def _propose_l2(x, x_adv, eps, size, generator):
    n, ch, height, width = x.shape
    nu = x_adv - x
    r1, c1, m1 = _window(n, height, width, size, generator, x.device)
    _, _, m2 = _window(n, height, width, size, generator, x.device)
    m1f, union = m1.float(), (m1 | m2).float()
    unused = (eps ** 2 - lp_norm(nu, "l2") ** 2).clamp(min=0)
    eta = _place(_meta_square(size, generator, x.device), r1, c1, height, width, m1f)
    in_w1 = nu * m1f
    w1_norm = in_w1.pow(2).sum((2, 3), keepdim=True).sqrt()
    temp = (_signs((n, ch, 1, 1), generator, x.device) * eta + in_w1 / (w1_norm + _TINY)) * m1f
    available = (nu * union).pow(2).sum((2, 3), keepdim=True) + bcast(unused, nu) / ch
    temp_norm = temp.pow(2).sum((2, 3), keepdim=True).sqrt()
    nu_new = nu * (1 - union) + temp / (temp_norm + _TINY) * available.sqrt()
    return project(x + nu_new, x, eps, "l2")


def _window_side(p_init: float, query: int, n_queries: int, height: int, width: int, norm: str) -> int:
    """The side of query ``query``'s square window: at least 1 (l_inf) or 3 (l2), below the image side."""
    size = int(round(math.sqrt(window_fraction(p_init, query, n_queries) * height * width)))
    return min(max(size, 1 if norm == "linf" else 3), min(height, width) - 1)


@torch.no_grad()
def square(objective, x: torch.Tensor, eps: float, norm: str = "linf", n_queries: int = 1000, *,
           p_init: float | None = None, seed: int = 0, early_stop: bool = True, autocast_dtype=None,
           progress: Optional[Callable[[int], None]] = None) -> AttackResult:
    """Square Attack on a batch ``x`` (B,C,H,W) in [0,1]; ``n_queries`` loss evaluations per example.

    ``p_init``: the window's initial fraction of the image (None: ``P_INIT[norm]``, the Square
    paper's ImageNet values). Each query changes the current point, the best one so far, and is
    kept if the loss goes up. Points already broken stop querying when ``early_stop`` (the
    default: it is a success attack); under autocast a success counts once fp32 confirms it (see
    :class:`Tracker`). The random draws depend on how many points query, so broken points leave
    before the very next query (one host-device synchronisation per query, two when one broke).
    Returns an :class:`AttackResult` (``evaluations`` counts the initial evaluation and every query).
    """
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    p_init = P_INIT[norm] if p_init is None else p_init
    height, width = x.shape[-2:]
    everyone = torch.arange(x.shape[0], device=x.device)
    x_adv = _init_linf(x, eps, generator) if norm == "linf" else _init_l2(x, eps, generator)
    loss, claimed = evaluate(objective, x_adv, everyone, autocast_dtype)
    tracker = Tracker(objective, everyone, x_adv, loss, claimed, autocast_dtype, freeze_broken=early_stop)
    evaluations = x.shape[0]
    propose = _propose_linf if norm == "linf" else _propose_l2
    active = everyone
    for query in range(n_queries):
        if tracker.freeze:  # early stopping: the broken points leave before the next query
            tracker.settle()
            if tracker.new_successes:
                tracker.new_successes = 0
                active = (~tracker.ever).nonzero().flatten()
        if active.numel() == 0:
            break
        size = _window_side(p_init, query, n_queries, height, width, norm)
        rows = None if active is everyone else active  # None: every point, without gathering copies
        candidate = propose(x if rows is None else x[rows], tracker.x_best if rows is None else tracker.x_best[rows],
                            eps, size, generator)
        new_loss, claimed = evaluate(objective, candidate, active, autocast_dtype)
        tracker.update(rows, candidate, new_loss, claimed)
        evaluations += active.numel()
        if progress is not None:
            progress(1)
    return tracker.result(evaluations)
