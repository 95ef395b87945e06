"""Attacks as tasks: a 2AFC decision, an embedding, a distance interval.

Inputs are pixel batches at the model's input size (``metric.pixels(...)``); the ball is
around those preprocessed pixels, i.e. the image the model actually sees. Every verdict
("broken", the adversarial similarities) comes from a final evaluation in fp32 without
autocast, whatever precision the attack itself ran in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import BadInputError
from .apgd import apgd
from .core import evaluate
from .objectives import (DistanceObjective, TargetedEmbeddingObjective, TwoAFCObjective,
                         UntargetedEmbeddingObjective, cosine_distance, twoafc_logits, twoafc_margin)
from .square import square
from .threat import lp_norm, quantize_into_ball

# The paper's gradient-masking check: Square Attack with margin loss, p_init 0.8, 5,000 queries
# (auto-attack's settings), on the points APGD left unbroken.
SQUARE_QUERIES = 5000
SQUARE_P_INIT = 0.8


@dataclass
class AttackSettings:
    """One threat model and attack budget.

    ``autocast_dtype`` (e.g. torch.bfloat16 on a GPU) speeds up the attack's forward/backward;
    ``square_queries`` > 0 runs Square Attack (margin loss, window fraction ``square_p_init``) with
    that many queries on the points APGD left unbroken; the paper's check is
    ``square_queries=SQUARE_QUERIES`` (5000) with the default ``square_p_init`` 0.8.
    """

    norm: str = "linf"
    eps: float = 4 / 255
    iters: int = 100
    restarts: int = 1
    random_start: bool = True
    seed: int = 0
    loss: str = "ce"
    autocast_dtype: Optional[torch.dtype] = None
    square_queries: int = 0
    square_p_init: float = SQUARE_P_INIT

    def __post_init__(self):
        if self.iters < 1 or self.restarts < 1:
            raise BadInputError("--iters and --restarts must be at least 1.")
        if self.square_queries < 0 or not 0 < self.square_p_init <= 1:
            raise BadInputError("Square Attack needs queries >= 0 and 0 < p_init <= 1.")
        if self.eps <= 0:
            raise BadInputError(f"eps must be positive; got {self.eps}.")


def _embed_fixed(metric, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised embeddings of perturbation-independent images: once, without gradient, fp32."""
    with torch.no_grad():
        return metric.embed_pixels(pixels.to(metric.device))


@dataclass
class TwoAFCReport:
    """Per-triplet outcome of an attack on the reference image (all tensors have batch size B).

    ``robust_correct`` is the fp32 verdict. ``broken_low_precision_only`` marks triplets the attack
    broke by its own (autocast, e.g. bf16) measurement but the fp32 re-check did not: they count as
    robust, so a bf16 attack can understate the attack's strength (all False for fp32 attacks).
    """

    label: torch.Tensor
    clean_similarity: torch.Tensor
    adv_similarity: torch.Tensor
    clean_correct: torch.Tensor
    robust_correct: torch.Tensor
    x_adv: torch.Tensor
    perturbation_norm: torch.Tensor
    found_by_square: Optional[torch.Tensor] = None
    evaluations: int = 0
    broken_low_precision_only: Optional[torch.Tensor] = None

    @property
    def flipped(self) -> torch.Tensor:
        """The model's decision after the attack differs from its clean decision."""
        return _decision(self.adv_similarity) != _decision(self.clean_similarity)

    @property
    def margin(self) -> torch.Tensor:
        """sim(correct) - sim(wrong) after the attack; > 0 means still correct."""
        s = self.adv_similarity
        return torch.where(self.label == 0, s[:, 0] - s[:, 1], s[:, 1] - s[:, 0])


def _decision(similarity: torch.Tensor) -> torch.Tensor:
    """0 = left is more similar, 1 = right (ties go left)."""
    return (similarity[:, 1] > similarity[:, 0]).long()


def attack_2afc(metric, ref: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                label: Optional[torch.Tensor] = None, settings: AttackSettings = AttackSettings(), *,
                early_stop: bool = True, progress: Optional[Callable[[int], None]] = None) -> TwoAFCReport:
    """APGD on the reference of each triplet (candidates fixed), then optionally Square Attack.

    Args:
        ref, left, right: (B,3,S,S) pixels in [0,1].
        label: (B,) 0/1 = which candidate is correct; None attacks the model's own clean decision.
    """
    return attack_2afc_embedded(metric, ref, _embed_fixed(metric, left), _embed_fixed(metric, right), label,
                                settings, early_stop=early_stop, progress=progress)


def attack_2afc_embedded(metric, ref: torch.Tensor, e_left: torch.Tensor, e_right: torch.Tensor,
                         label: Optional[torch.Tensor] = None, settings: AttackSettings = AttackSettings(), *,
                         early_stop: bool = True, progress: Optional[Callable[[int], None]] = None,
                         example_ids: Optional[torch.Tensor] = None,
                         e_ref: Optional[torch.Tensor] = None) -> TwoAFCReport:
    """:func:`attack_2afc` with the candidates' normalised embeddings already computed (evaluation).

    ``example_ids`` seed each triplet's random start on its own, so a triplet's outcome does not
    depend on the batch it is attacked in. ``e_ref``: the clean reference embeddings, if known.
    """
    device = metric.device
    ref, e_left, e_right = ref.to(device), e_left.to(device), e_right.to(device)
    e_ref = _embed_fixed(metric, ref) if e_ref is None else e_ref.to(device)
    clean_sim = twoafc_logits(e_ref, e_left, e_right)
    label = _decision(clean_sim) if label is None else label.to(device).long()
    objective = TwoAFCObjective(metric.encoder, e_left, e_right, label, settings.loss)
    result = apgd(objective, ref, settings.eps, settings.norm, settings.iters, restarts=settings.restarts,
                  random_start=settings.random_start, seed=settings.seed, early_stop=early_stop,
                  autocast_dtype=settings.autocast_dtype, progress=progress, example_ids=example_ids)
    x_adv, evaluations = result.x_adv, result.evaluations
    attack_said = result.broken.clone()  # the attack's own (possibly autocast) success flags
    everyone = torch.arange(len(ref), device=device)
    with torch.no_grad():  # the fp32 verdict, and the similarities it rests on, from one forward pass
        e_adv = objective.embed(x_adv)
    _, broken = objective.score(e_adv, everyone)
    found_by_square = None
    if settings.square_queries > 0:
        found_by_square, evaluations = _square_check(metric, ref, e_left, e_right, label, settings, broken, x_adv,
                                                     e_adv, attack_said, evaluations)
        broken = broken | found_by_square
    adv_sim = twoafc_logits(e_adv, e_left, e_right)
    clean_correct = twoafc_margin(clean_sim, label) < 0
    low_only = attack_said & ~broken
    if settings.autocast_dtype in (None, torch.float32):
        low_only = torch.zeros_like(broken)
    return TwoAFCReport(label, clean_sim, adv_sim, clean_correct, ~broken & clean_correct, x_adv,
                        lp_norm(x_adv - ref, settings.norm), found_by_square, evaluations, low_only)


def _square_check(metric, ref, e_left, e_right, label, settings: AttackSettings, broken, x_adv, e_adv,
                  attack_said, evaluations: int):
    """Square Attack (margin loss) on the points not broken in fp32; fp32-confirmed hits go into
    ``x_adv``/``e_adv`` in place, Square's own flags into ``attack_said``.

    Returns:
        (found_by_square (B,) bool, evaluations including Square's).
    """
    margin_objective = TwoAFCObjective(metric.encoder, e_left, e_right, label, "margin")
    remaining = (~broken).nonzero().flatten()
    found_by_square = torch.zeros_like(broken)
    if remaining.numel() == 0:
        return found_by_square, evaluations
    subset = _Subset(margin_objective, remaining)
    sq = square(subset, ref[remaining], settings.eps, settings.norm, settings.square_queries,
                p_init=settings.square_p_init, seed=settings.seed, autocast_dtype=settings.autocast_dtype)
    attack_said[remaining] |= sq.broken
    _, sq_broken = evaluate(subset, sq.x_adv)
    hits = remaining[sq_broken]
    x_adv[hits] = sq.x_adv[sq_broken]
    found_by_square[hits] = True
    if hits.numel():
        with torch.no_grad():
            e_adv[hits] = margin_objective.embed(x_adv[hits])
    return found_by_square, evaluations + sq.evaluations


class _Subset:
    """An objective restricted to some examples: local row i is global example ``rows[i]``."""

    def __init__(self, objective, rows: torch.Tensor):
        self.objective, self.rows = objective, rows
        self.has_success = objective.has_success

    def __call__(self, x, index):
        return self.objective(x, self.rows[index])


@dataclass
class EmbeddingReport:
    """Clean and adversarial distances for an embedding attack (tensors of batch size B).

    ``reference``: ``original`` (untargeted: distance to the image's own clean embedding) or
    ``targets`` (targeted: mean distance to the target embeddings).
    """

    reference: str
    clean_distance: torch.Tensor
    adv_distance: torch.Tensor
    x_adv: torch.Tensor
    perturbation_norm: torch.Tensor
    evaluations: int = 0
    distances_per_target: Optional[torch.Tensor] = field(default=None)


def attack_embedding(metric, images: torch.Tensor, targets: Optional[torch.Tensor] = None,
                     settings: AttackSettings = AttackSettings(), *,
                     progress: Optional[Callable[[int], None]] = None) -> EmbeddingReport:
    """Untargeted (``targets`` None: Eq. 6) or targeted (Eq. 5, towards all ``targets``) APGD."""
    images = images.to(metric.device)
    clean = _embed_fixed(metric, images)
    if targets is None:
        objective = UntargetedEmbeddingObjective(metric.encoder, clean)
    else:
        if len(targets) < 1:
            raise BadInputError("a targeted attack needs at least one target image.")
        target_emb = _embed_fixed(metric, targets)
        objective = TargetedEmbeddingObjective(metric.encoder, target_emb)
    result = apgd(objective, images, settings.eps, settings.norm, settings.iters, restarts=settings.restarts,
                  random_start=settings.random_start, seed=settings.seed,
                  autocast_dtype=settings.autocast_dtype, progress=progress)
    with torch.no_grad():
        adv = metric.embed_pixels(result.x_adv)
    if targets is None:
        clean_d = cosine_distance(clean, clean)
        adv_d = cosine_distance(adv, clean)
        per_target = None
    else:
        clean_per = 1.0 - clean @ target_emb.T
        per_target = 1.0 - adv @ target_emb.T
        clean_d, adv_d = clean_per.mean(-1), per_target.mean(-1)
    return EmbeddingReport("original" if targets is None else "targets", clean_d, adv_d, result.x_adv,
                           lp_norm(result.x_adv - images, settings.norm), result.evaluations, per_target)


@dataclass
class DistanceInterval:
    """``distance`` between a and b, and the range an attacker perturbing b reached (all (N,))."""

    distance: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    x_low: torch.Tensor
    x_high: torch.Tensor


def distance_interval(metric, a: torch.Tensor, b: torch.Tensor, settings: AttackSettings = AttackSettings(), *,
                      progress: Optional[Callable[[int], None]] = None) -> DistanceInterval:
    """Two APGD runs on ``b`` within the ball: one minimising, one maximising d(a, b + delta).

    An empirical (attack-found) interval, not a certificate: the true extremes may lie beyond it.
    The clean distance always lies inside (delta = 0 is allowed).
    """
    b = b.to(metric.device)
    ea = _embed_fixed(metric, a)
    clean = cosine_distance(_embed_fixed(metric, b), ea)
    ends = []
    for sign in (-1.0, 1.0):
        objective = DistanceObjective(metric.encoder, ea, sign)
        result = apgd(objective, b, settings.eps, settings.norm, settings.iters, restarts=settings.restarts,
                      random_start=settings.random_start, seed=settings.seed,
                      autocast_dtype=settings.autocast_dtype, progress=progress)
        loss, _ = evaluate(objective, result.x_adv)
        ends.append((sign * loss, result.x_adv))
    (d_low, x_low), (d_high, x_high) = ends
    keep_low, keep_high = d_low < clean, d_high > clean
    x_low = torch.where(keep_low.view(-1, 1, 1, 1), x_low, b)
    x_high = torch.where(keep_high.view(-1, 1, 1, 1), x_high, b)
    return DistanceInterval(clean, torch.minimum(d_low, clean), torch.maximum(d_high, clean), x_low, x_high)


def save_ready(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit version of ``x_adv`` projected back into the ball, and whether it is inside."""
    return quantize_into_ball(x_adv, x.to(x_adv.device), eps, norm)
