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

from ..decision import decision, is_correct
from ..errors import BadInputError
from ..metric import embedding_distance, embedding_distance_matrix
from .apgd import apgd
from .core import AttackResult, bcast, evaluate
from .inputs import embedding_batch, label_batch, pixel_batch, same_batch
from .objectives import (DistanceObjective, TargetedEmbeddingObjective, TwoAFCObjective, UntargetedEmbeddingObjective,
                         twoafc_logits, twoafc_margin)
from .settings import SQUARE_P_INIT, SQUARE_QUERIES, AttackSettings
from .square import square
from .threat import lp_norm, quantize_into_ball

__all__ = ["SQUARE_P_INIT", "SQUARE_QUERIES", "AttackSettings", "TwoAFCReport", "EmbeddingReport", "DistanceInterval",
           "RoundedAdversarial", "attack_2afc", "attack_2afc_embedded", "attack_embedding", "distance_interval",
           "rounded_2afc", "rounded_embedding", "save_ready"]



def _embed_fixed(metric, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised embeddings of perturbation-independent images: once, without gradient, fp32."""
    with torch.no_grad():
        return metric.embed_pixels(pixels.to(metric.device), check=False)


@dataclass
class TwoAFCReport:
    """Per-triplet outcome of an attack on the reference image (all tensors have batch size B).

    ``robust_correct`` is the fp32 verdict. ``fp32_checked`` marks triplets for which a low-precision
    (autocast) attack claimed a success at least once, so an fp32 forward had to confirm it;
    ``fp32_rejected`` those where fp32 rejected at least one such claim (the attack then went on).
    Both come from APGD and, if it ran, Square Attack (OR-ed), and are None for fp32 attacks.
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
    fp32_checked: Optional[torch.Tensor] = None
    fp32_rejected: Optional[torch.Tensor] = None

    @property
    def flipped(self) -> torch.Tensor:
        """The model's decision after the attack differs from its clean decision."""
        clean, adv = self.clean_similarity, self.adv_similarity
        return decision(adv[:, 0], adv[:, 1]) != decision(clean[:, 0], clean[:, 1])

    @property
    def margin(self) -> torch.Tensor:
        """sim(correct) - sim(wrong) after the attack; > 0 means still correct (at 0, correct iff label 0)."""
        return -twoafc_margin(self.adv_similarity, self.label)


def attack_2afc(metric, ref: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                label: Optional[torch.Tensor] = None, settings: AttackSettings = AttackSettings(), *,
                early_stop: bool = True, progress: Optional[Callable[[int], None]] = None) -> TwoAFCReport:
    """APGD on the reference of each triplet (candidates fixed), then optionally Square Attack.

    Args:
        ref: (B,3,S,S) pixels in [0,1] at the model's input size S (uint8 0..255 and NumPy accepted).
        left, right: (B,3,H,W) pixels in [0,1] (resized to S for embedding).
        label: (B,) 0/1 = which candidate is correct; None attacks the model's own clean decision.

    Raises:
        BadInputError: an argument of the wrong type, shape, size or range, or differing batch sizes
            (the message names the argument).
    """
    ref = pixel_batch(metric, ref, "ref", attacked=True)
    left, right = pixel_batch(metric, left, "left"), pixel_batch(metric, right, "right")
    same_batch(ref=ref, left=left, right=right)
    label = label_batch(label, len(ref))
    return attack_2afc_embedded(metric, ref, _embed_fixed(metric, left), _embed_fixed(metric, right), label,
                                settings, early_stop=early_stop, progress=progress, check=False)


def attack_2afc_embedded(metric, ref: torch.Tensor, e_left: torch.Tensor, e_right: torch.Tensor,
                         label: Optional[torch.Tensor] = None, settings: AttackSettings = AttackSettings(), *,
                         early_stop: bool = True, progress: Optional[Callable[[int], None]] = None,
                         example_ids: Optional[torch.Tensor] = None,
                         e_ref: Optional[torch.Tensor] = None, check: bool = True) -> TwoAFCReport:
    """:func:`attack_2afc` with the candidates' normalised embeddings already computed (evaluation).

    ``example_ids`` seed each triplet's random start on its own, so a triplet's outcome does not
    depend on the batch it is attacked in. ``e_ref``: the clean reference embeddings, if known.
    ``check=False`` skips the value checks of ``ref`` and ``label`` (callers that made them already).
    Decisions follow :mod:`percept_cli.decision` (a tie picks the left candidate).

    Raises:
        BadInputError: as :func:`attack_2afc`, for ``ref``, ``e_left``, ``e_right``, ``label``,
            ``example_ids`` or ``e_ref``.
    """
    ref = pixel_batch(metric, ref, "ref", attacked=True, check=check)
    e_left = embedding_batch(e_left, "e_left")
    e_right = embedding_batch(e_right, "e_right", e_left.shape[1])
    if e_ref is not None:
        e_ref = embedding_batch(e_ref, "e_ref", e_left.shape[1])
    label = label_batch(label, len(ref), check=check)
    same_batch(ref=ref, e_left=e_left, e_right=e_right, e_ref=e_ref, example_ids=example_ids)
    device = metric.device
    ref, e_left, e_right = ref.to(device), e_left.to(device), e_right.to(device)
    e_ref = _embed_fixed(metric, ref) if e_ref is None else e_ref.to(device)
    clean_sim = twoafc_logits(e_ref, e_left, e_right)
    label = decision(clean_sim[:, 0], clean_sim[:, 1]) if label is None else label.to(device).long()
    objective = TwoAFCObjective(metric.encoder, e_left, e_right, label, settings.loss)
    result = apgd(objective, ref, settings.eps, settings.norm, settings.iters, restarts=settings.restarts,
                  random_start=settings.random_start, seed=settings.seed, early_stop=early_stop,
                  autocast_dtype=settings.autocast_dtype, progress=progress, example_ids=example_ids)
    x_adv = result.x_adv
    with torch.no_grad():  # the fp32 verdict, and the similarities it rests on, from one forward pass
        e_adv = objective.embed(x_adv)
    _, broken = objective.score(e_adv, torch.arange(len(ref), device=device))
    found_by_square = None
    if settings.square_queries > 0:
        found_by_square = _square_check(objective, ref, settings, broken, x_adv, e_adv, result)
        broken = broken | found_by_square
    clean_correct = is_correct(clean_sim[:, 0], clean_sim[:, 1], label)
    return TwoAFCReport(label, clean_sim, twoafc_logits(e_adv, e_left, e_right), clean_correct,
                        ~broken & clean_correct, x_adv, lp_norm(x_adv - ref, settings.norm), found_by_square,
                        result.evaluations, result.fp32_checked, result.fp32_rejected)


def _square_check(objective: TwoAFCObjective, ref, settings: AttackSettings, broken, x_adv, e_adv,
                  result: AttackResult) -> torch.Tensor:
    """Square Attack (margin loss) on the points not broken in fp32. Its fp32-verdict hits go into
    ``x_adv``/``e_adv`` in place; its evaluations and fp32 flags are added to APGD's ``result``.

    Returns:
        found_by_square (B,) bool.
    """
    margin_objective = TwoAFCObjective(objective.encoder, objective.left, objective.right, objective.label, "margin")
    remaining = (~broken).nonzero().flatten()
    found_by_square = torch.zeros_like(broken)
    if remaining.numel() == 0:
        return found_by_square
    subset = _Subset(margin_objective, remaining)
    sq = square(subset, ref[remaining], settings.eps, settings.norm, settings.square_queries,
                p_init=settings.square_p_init, seed=settings.seed, autocast_dtype=settings.autocast_dtype)
    result.evaluations += sq.evaluations
    for name in ("fp32_checked", "fp32_rejected"):
        if getattr(result, name) is not None and getattr(sq, name) is not None:
            getattr(result, name)[remaining] |= getattr(sq, name)
    _, sq_broken = evaluate(subset, sq.x_adv)  # the fp32 verdict on Square's points
    hits = remaining[sq_broken]
    x_adv[hits] = sq.x_adv[sq_broken]
    found_by_square[hits] = True
    if hits.numel():
        with torch.no_grad():
            e_adv[hits] = margin_objective.embed(x_adv[hits])
    return found_by_square


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
    ``targets`` (targeted: mean distance to the target embeddings). ``reference_embeddings``: what
    the distances are measured to, the clean embeddings (B, D) or the target embeddings (T, D).
    ``clean_embeddings``: the images' own normalised clean embeddings (B, D).
    """

    reference: str
    clean_distance: torch.Tensor
    adv_distance: torch.Tensor
    x_adv: torch.Tensor
    perturbation_norm: torch.Tensor
    evaluations: int = 0
    distances_per_target: Optional[torch.Tensor] = field(default=None)
    reference_embeddings: Optional[torch.Tensor] = None
    clean_embeddings: Optional[torch.Tensor] = None


def attack_embedding(metric, images: torch.Tensor, targets: Optional[torch.Tensor] = None,
                     settings: AttackSettings = AttackSettings(), *,
                     progress: Optional[Callable[[int], None]] = None,
                     example_ids: Optional[torch.Tensor] = None) -> EmbeddingReport:
    """Untargeted (``targets`` None: Eq. 6) or targeted (Eq. 5, towards all ``targets``) APGD.

    ``images``: (B,3,S,S) [0,1] pixels at the model's input size; ``targets``: (T,3,H,W) [0,1] pixels.
    ``example_ids``: (B,) global ids seeding each image's random start (results independent of how
    a larger set is cut into batches); None: one generator for the batch.

    Raises:
        BadInputError: an argument of the wrong type, shape, size or range (the message names it).
    """
    images = pixel_batch(metric, images, "images", attacked=True).to(metric.device)
    clean = _embed_fixed(metric, images)
    if targets is None:
        reference, objective = clean, UntargetedEmbeddingObjective(metric.encoder, clean)
    else:
        targets = pixel_batch(metric, targets, "targets")
        if len(targets) < 1:
            raise BadInputError("targets: a targeted attack needs at least one target image.")
        reference = _embed_fixed(metric, targets)
        objective = TargetedEmbeddingObjective(metric.encoder, reference)
    result = apgd(objective, images, settings.eps, settings.norm, settings.iters, restarts=settings.restarts,
                  random_start=settings.random_start, seed=settings.seed,
                  autocast_dtype=settings.autocast_dtype, progress=progress, example_ids=example_ids)
    with torch.no_grad():
        adv = metric.embed_pixels(result.x_adv, check=False)
    untargeted = targets is None
    clean_d, _ = _distances(clean, reference, untargeted)
    adv_d, per_target = _distances(adv, reference, untargeted)
    return EmbeddingReport("original" if untargeted else "targets", clean_d, adv_d, result.x_adv,
                           lp_norm(result.x_adv - images, settings.norm), result.evaluations, per_target, reference,
                           clean)


def _distances(emb: torch.Tensor, reference: torch.Tensor, untargeted: bool):
    """(distance to the image's own clean embedding, None) or (mean distance to the targets, (B, T) per target)."""
    if untargeted:
        return embedding_distance(emb, reference), None
    per_target = embedding_distance_matrix(emb, reference)
    return per_target.mean(-1), per_target


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
    The clean distance always lies inside (delta = 0 is allowed); all distances lie in [0, 2].
    ``a``: (N,3,H,W) [0,1] pixels; ``b``: (N,3,S,S) [0,1] pixels at the model's input size.

    Raises:
        BadInputError: an argument of the wrong type, shape, size or range, or differing batch sizes.
    """
    a, b = pixel_batch(metric, a, "a"), pixel_batch(metric, b, "b", attacked=True)
    same_batch(a=a, b=b)
    b = b.to(metric.device)
    ea = _embed_fixed(metric, a)
    clean = embedding_distance(_embed_fixed(metric, b), ea)
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
    x_low = torch.where(bcast(keep_low, b), x_low, b)
    x_high = torch.where(bcast(keep_high, b), x_high, b)
    low, high = torch.minimum(d_low, clean).clamp(0.0, 2.0), torch.maximum(d_high, clean).clamp(0.0, 2.0)
    return DistanceInterval(clean, low, high, x_low, x_high)


def save_ready(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit version of ``x_adv`` projected back into the ball, and whether it is inside."""
    return quantize_into_ball(x_adv, x.to(x_adv.device), eps, norm)


@dataclass
class RoundedAdversarial:
    """Adversarial images as they would be saved (8-bit, inside the ball), and the fp32 verdict on them.

    Attributes:
        pixels: (B,3,S,S) float [0,1], multiples of 1/255, inside the ball (ready for ``save_png``).
        in_ball: (B,) bool; False only where no grid point lies inside the ball.
        broken: 2AFC: (B,) bool, the fp32 decision on the rounded pixels is not the label.
        similarity: 2AFC: (B, 2) ``[sim_left, sim_right]`` on the rounded pixels.
        distance: embedding: (B,) the distance the attack measured (to the image's clean self, or
            the mean over the targets), on the rounded pixels.
        embeddings: (B, D) normalised fp32 embeddings of the rounded pixels.
    """

    pixels: torch.Tensor
    in_ball: torch.Tensor
    broken: Optional[torch.Tensor] = None
    similarity: Optional[torch.Tensor] = None
    distance: Optional[torch.Tensor] = None
    embeddings: Optional[torch.Tensor] = None


def rounded_2afc(metric, report: TwoAFCReport, ref: torch.Tensor, e_left: torch.Tensor, e_right: torch.Tensor,
                 settings: AttackSettings) -> RoundedAdversarial:
    """The report's adversarial references rounded to 8 bits inside the ball around ``ref`` (the clean
    pixels the attack started from), and the fp32 2AFC decision on them against ``report.label``.

    Raises:
        BadInputError: ``ref``, ``e_left`` or ``e_right`` malformed or of another batch size than the report's.
    """
    ref = pixel_batch(metric, ref, "ref", attacked=True)
    e_left = embedding_batch(e_left, "e_left")
    e_right = embedding_batch(e_right, "e_right", e_left.shape[1])
    same_batch(report=report.x_adv, ref=ref, e_left=e_left, e_right=e_right)
    pixels, in_ball = save_ready(report.x_adv, ref, settings.eps, settings.norm)
    emb = _embed_fixed(metric, pixels)
    similarity = twoafc_logits(emb, e_left.to(emb.device), e_right.to(emb.device))
    label = report.label.to(emb.device)
    broken = ~is_correct(similarity[:, 0], similarity[:, 1], label)
    return RoundedAdversarial(pixels, in_ball, broken=broken, similarity=similarity, embeddings=emb)


def rounded_embedding(metric, report: EmbeddingReport, images: torch.Tensor,
                      settings: AttackSettings) -> RoundedAdversarial:
    """The report's adversarial images rounded to 8 bits inside the ball around ``images`` (the clean
    pixels attacked), and the fp32 distance the attack measured, recomputed on them.

    Raises:
        BadInputError: ``images`` malformed or of another batch size than the report's, or a report
            without ``reference_embeddings``.
    """
    images = pixel_batch(metric, images, "images", attacked=True)
    same_batch(report=report.x_adv, images=images)
    if report.reference_embeddings is None:
        raise BadInputError("report: it has no reference_embeddings; use the report attack_embedding returns.")
    pixels, in_ball = save_ready(report.x_adv, images, settings.eps, settings.norm)
    emb = _embed_fixed(metric, pixels)
    distance, _ = _distances(emb, report.reference_embeddings.to(emb.device), report.reference == "original")
    return RoundedAdversarial(pixels, in_ball, distance=distance, embeddings=emb)
