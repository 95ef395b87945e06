"""Threat models: l_inf and l2 balls intersected with the image box [0,1].

Standalone functions for everything the optimisers share: parsing ``--eps``, the
projection, the steepest-ascent direction, random starts, and putting an
adversarial image on the 8-bit grid without leaving the ball.
"""

from __future__ import annotations

import math
import numbers
import re

import torch

from ..errors import BadInputError

_EPS_TEXT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*([0-9]*\.?[0-9]+))?\s*$")
_TINY = 1e-12


def parse_norm(text) -> str:
    """The one place a norm is read: ``linf`` or ``l2``, case-insensitively, from common spellings.

    ``linf``: "linf", "Linf", "l_inf", "l-inf", "inf", "infinity", "l∞", float('inf');
    ``l2``: "l2", "L2", "l_2", "2", 2.

    Raises:
        BadInputError: anything else ("l1", a typo, None), naming the value.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise BadInputError(f"norm must be 'linf' or 'l2'; got {text!r}.")
    key = str(text).strip().lower().replace("_", "").replace("-", "").replace(" ", "").replace("∞", "inf")
    if key in {"linf", "inf", "infinity", "linfinity"}:
        return "linf"
    if key in {"l2", "2", "2.0"}:
        return "l2"
    raise BadInputError(f"unknown norm '{text}'; use linf or l2.")


def parse_eps(text: str | float) -> float:
    """An attack radius from ``4/255``, ``0.0157`` or ``3`` (text or a number): a positive finite float.

    Raises:
        BadInputError: malformed text, a bool or other non-number, or a value that is not > 0.

    >>> round(parse_eps("4/255"), 6)
    0.015686
    """
    if isinstance(text, bool) or not isinstance(text, (str, numbers.Real)):
        raise BadInputError(f"eps must be a number or text such as '4/255'; got {text!r}.")
    if isinstance(text, numbers.Real):
        value = float(text)
    else:
        match = _EPS_TEXT.match(str(text))
        if not match:
            raise BadInputError(f"malformed eps '{text}'; write e.g. 4/255, 0.0157 or 3.")
        value = float(match.group(1))
        if match.group(2) is not None:
            denominator = float(match.group(2))
            if denominator == 0:
                raise BadInputError(f"malformed eps '{text}': division by zero.")
            value /= denominator
    if not math.isfinite(value) or value <= 0:
        raise BadInputError(f"eps must be a positive number; got '{text}'.")
    return value


LINF_WARN_ABOVE = 32 / 255  # l_inf radii above this are far outside what robust models are tested at


def check_radius(eps: float, norm: str, *, force: bool = False, escape: str = "pass force=True") -> None:
    """Refuse an l_inf radius above 1 (the whole pixel range: almost always a forgotten ``/255``).

    ``escape`` tells the caller how to insist (the CLI says ``add --force``).

    Raises:
        BadInputError: ``norm`` is linf, ``eps`` > 1 and not ``force``; the message suggests eps/255.
    """
    if norm == "linf" and eps > 1 and not force:
        hint = f"; did you mean {eps:g}/255?" if eps <= 255 else "."
        raise BadInputError(f"l_inf eps {eps:g} is larger than the whole pixel range [0, 1]{hint} "
                            f"{escape[:1].upper()}{escape[1:]} to attack with it anyway.")


def radius_warning(eps: float, norm: str) -> str | None:
    """A warning for an l_inf radius above 32/255 (a visible change, not a small perturbation), else None."""
    if norm == "linf" and eps > LINF_WARN_ABOVE:
        return (f"l_inf eps {format_eps(eps, norm)} is above 32/255: such a perturbation changes the image "
                "visibly (the paper attacks at 4/255 and 8/255).")
    return None


def format_eps(eps: float, norm: str) -> str:
    """``4/255`` for l_inf radii on the 8-bit grid, else a plain number."""
    scaled = eps * 255
    if norm == "linf" and abs(scaled - round(scaled, 3)) < 1e-6:
        return f"{round(scaled, 3):g}/255"
    return f"{eps:g}"


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example norm of a (B, ...) perturbation."""
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(p=2, dim=1)


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example (B,) tensor viewed as (B,1,...,1) to broadcast against the (B,...) tensor ``like``.

    >>> bcast(torch.ones(2), torch.zeros(2, 3, 4, 4)).shape
    torch.Size([2, 1, 1, 1])
    """
    return v.view(-1, *([1] * (like.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A point of the ball of radius ``eps`` around ``x`` intersected with [0,1].

    l_inf: the exact Euclidean projection (clip the perturbation, then the box).
    l2: scale the perturbation into the ball, then clip to the box; clipping only moves
    coordinates towards ``x`` (which lies in the box), so the result stays in the ball.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        factor = (eps / (lp_norm(delta, "l2") + _TINY)).clamp(max=1.0)
        delta = delta * bcast(factor, delta)
    return (x + delta).clamp(0.0, 1.0)


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest ascent for the norm: sign(g) for l_inf, g/||g||_2 for l2."""
    if norm == "linf":
        return grad.sign()
    return grad / bcast(lp_norm(grad, "l2") + _TINY, grad)


def _noise(x: torch.Tensor, kind: str, generator, seeds) -> torch.Tensor:
    draw = torch.rand if kind == "uniform" else torch.randn
    if seeds is None:
        return draw(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    rows = [draw(x.shape[1:], generator=torch.Generator(device=x.device).manual_seed(int(s)), device=x.device,
                 dtype=x.dtype) for s in seeds.tolist()]
    return torch.stack(rows) if rows else torch.empty_like(x)


def random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None,
                 seeds: torch.Tensor | None = None) -> torch.Tensor:
    """A random point of the ball ∩ box: uniform in the l_inf cube, or on the l2 sphere.

    ``seeds`` (one per example) makes each example's start independent of the batch it is in.
    """
    if norm == "linf":
        noise = _noise(x, "uniform", generator, seeds) * 2 - 1
        return project(x + eps * noise, x, eps, norm)
    noise = _noise(x, "normal", generator, seeds)
    noise = noise / bcast(lp_norm(noise, "l2") + _TINY, noise)
    return project(x + eps * noise, x, eps, norm)


def quantize_into_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Put ``x_adv`` on the 8-bit grid (k/255) while staying in the ball around ``x``.

    l_inf: each pixel takes the grid value nearest ``x_adv`` among those within eps of ``x``.
    l2: the largest fraction c of the perturbation whose rounded image stays in the ball (bisection).

    Returns:
        (quantised images, per-example bool: inside the ball). An example can end up outside
        only when no grid point is inside (eps below the rounding error of ``x`` itself).
    """
    tol = 1e-6
    if norm == "linf":
        lo = torch.ceil((x - eps) * 255 - tol).clamp(0, 255)
        hi = torch.floor((x + eps) * 255 + tol).clamp(0, 255)
        k = torch.round(x_adv * 255)
        empty = lo > hi
        k = torch.where(empty, torch.round(x * 255), torch.minimum(torch.maximum(k, lo), hi))
        q = k / 255
    else:
        delta = x_adv - x

        def rounded(c):
            return torch.round((x + bcast(c, x) * delta).clamp(0, 1) * 255) / 255

        lo_c = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        hi_c = torch.ones_like(lo_c)
        fits_full = lp_norm(rounded(hi_c) - x, "l2") <= eps + tol
        for _ in range(20):
            mid = (lo_c + hi_c) / 2
            ok = lp_norm(rounded(mid) - x, "l2") <= eps + tol
            lo_c = torch.where(ok, mid, lo_c)
            hi_c = torch.where(ok, hi_c, mid)
        q = rounded(torch.where(fits_full, torch.ones_like(lo_c), lo_c))
    in_ball = lp_norm(q - x, norm) <= eps + tol
    return q, in_ball
