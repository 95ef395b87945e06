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
from ..metric import embedding_distance, embedding_distance_matrix
from .apgd import apgd
from .core import evaluate
from .inputs import embedding_batch, label_batch, pixel_batch, same_batch
from .objectives import (TWOAFC_LOSSES, DistanceObjective, TargetedEmbeddingObjective, TwoAFCObjective,
                         UntargetedEmbeddingObjective, twoafc_logits, twoafc_margin)
from .square import square
from .threat import check_radius, lp_norm, parse_eps, parse_norm, quantize_into_ball

# The paper's gradient-masking check: Square Attack with margin loss, p_init 0.8, 5,000 queries
# (auto-attack's settings), on the points APGD left unbroken.
SQUARE_QUERIES = 5000
SQUARE_P_INIT = 0.8


@dataclass
class AttackSettings:
    """One threat model and attack budget.

    ``norm``: "linf" or "l2" (spellings such as "Linf", "l_inf", "inf", "L2" are normalised; anything
    else raises). ``eps``: a number or text such as "4/255". An l_inf ``eps`` above 1 (the whole pixel
    range, usually a forgotten /255) raises unless ``force=True``.
    ``autocast_dtype`` (e.g. torch.bfloat16 on a GPU) speeds up the attack's forward/backward;
    ``square_queries`` > 0 runs Square Attack (margin loss, window fraction ``square_p_init``) with
    that many queries on the points APGD left unbroken; the paper's check is
    ``square_queries=SQUARE_QUERIES`` (5000) with the default ``square_p_init`` 0.8.

    Raises:
        BadInputError: an unknown norm or loss, a malformed or non-positive eps, an l_inf eps > 1
            without ``force``, iters/restarts below 1, or bad Square settings; the message names the field.
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
    force: bool = False

    def __post_init__(self):
        self.norm = parse_norm(self.norm)
        self.eps = parse_eps(self.eps)
        check_radius(self.eps, self.norm, force=self.force)
        for name in ("iters", "restarts", "square_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "square_queries" else 1):
                raise BadInputError(f"{name} must be an integer of at least {0 if name == 'square_queries' else 1}; "
                                    f"got {value!r}.")
        if not isinstance(self.loss, str) or self.loss.strip().lower() not in TWOAFC_LOSSES:
            raise BadInputError(f"loss must be one of {', '.join(TWOAFC_LOSSES)}; got {self.loss!r}.")
        self.loss = self.loss.strip().lower()
        if not isinstance(self.square_p_init, (int, float)) or not 0 < self.square_p_init <= 1:
            raise BadInputError(f"square_p_init must be in (0, 1]; got {self.square_p_init!r}.")


def _embed_fixed(metric, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised embeddings of perturbation-independent images: once, without gradient, fp32."""
    with torch.no_grad():
        return metric.embed_pixels(pixels.to(metric.device), check=False)


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
    """Untargeted (``targets`` None: Eq. 6) or targeted (Eq. 5, towards all ``targets``) APGD.

    ``images``: (B,3,S,S) [0,1] pixels at the model's input size; ``targets``: (T,3,H,W) [0,1] pixels.

    Raises:
        BadInputError: an argument of the wrong type, shape, size or range (the message names it).
    """
    images = pixel_batch(metric, images, "images", attacked=True).to(metric.device)
    clean = _embed_fixed(metric, images)
    if targets is None:
        objective = UntargetedEmbeddingObjective(metric.encoder, clean)
    else:
        targets = pixel_batch(metric, targets, "targets")
        if len(targets) < 1:
            raise BadInputError("targets: a targeted attack needs at least one target image.")
        target_emb = _embed_fixed(metric, targets)
        objective = TargetedEmbeddingObjective(metric.encoder, target_emb)
    result = apgd(objective, images, settings.eps, settings.norm, settings.iters, restarts=settings.restarts,
                  random_start=settings.random_start, seed=settings.seed,
                  autocast_dtype=settings.autocast_dtype, progress=progress)
    with torch.no_grad():
        adv = metric.embed_pixels(result.x_adv, check=False)
    if targets is None:
        clean_d = embedding_distance(clean, clean)
        adv_d = embedding_distance(adv, clean)
        per_target = None
    else:
        clean_per = embedding_distance_matrix(clean, target_emb)
        per_target = embedding_distance_matrix(adv, target_emb)
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
    x_low = torch.where(keep_low.view(-1, 1, 1, 1), x_low, b)
    x_high = torch.where(keep_high.view(-1, 1, 1, 1), x_high, b)
    low, high = torch.minimum(d_low, clean).clamp(0.0, 2.0), torch.maximum(d_high, clean).clamp(0.0, 2.0)
    return DistanceInterval(clean, low, high, x_low, x_high)


def save_ready(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit version of ``x_adv`` projected back into the ball, and whether it is inside."""
    return quantize_into_ball(x_adv, x.to(x_adv.device), eps, norm)
