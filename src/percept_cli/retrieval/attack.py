"""Attacks on retrieval queries (Croce et al., SaTML 2025, Sec. V and App. B).

* Untargeted (the paper's Eq. 6): push each query's embedding away from its own clean embedding,
  so that its neighbours change (``search --attack``, ``map --attack``).
* Targeted (Eq. 5, the grey-box NSFW attack): the attacker knows the encoder but not the pool, and
  pushes each query towards the embeddings of a few images of the class it wants to be taken for
  (the paper uses 16 images of the target class that are not in the pool). Minimising the mean
  squared distance to the normalised target embeddings has the same gradient as minimising the
  distance to their mean, the paper's formulation (they differ by a constant).

Both run APGD through :func:`percept_cli.attacks.tasks.attack_embedding`; the adversarial queries are
then rounded to 8 bits inside the ball (what a saved image is), and the embeddings returned are
those of the rounded images in fp32, so a reported retrieval under attack is one an attacker could
reproduce with the saved files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..attacks.settings import AttackSettings
from ..attacks.tasks import attack_embedding, rounded_embedding
from ..errors import BadInputError

TARGET_IMAGES = 16  # the paper's number of target-class images for the targeted attack


@dataclass
class QueryAttack:
    """Queries before and after the attack.

    Attributes:
        clean: (Q, D) float32 L2-normalised clean embeddings.
        adversarial: (Q, D) float32 L2-normalised embeddings of the 8-bit adversarial images.
        pixels: (Q, 3, S, S) float [0, 1] adversarial images, multiples of 1/255, inside the ball (CPU).
        in_ball: (Q,) bool; False only where no 8-bit image lies inside the ball.
        evaluations: forward+backward passes the attack spent.
    """

    clean: torch.Tensor
    adversarial: torch.Tensor
    pixels: torch.Tensor
    in_ball: torch.Tensor
    evaluations: int = 0


def select_targets(paths: Sequence[str], n: int = TARGET_IMAGES) -> list[str]:
    """The first ``n`` target images in path order (the attack's target set; repeatable).

    Raises:
        BadInputError: no target image.
    """
    chosen = sorted(str(p) for p in paths)[:n]
    if not chosen:
        raise BadInputError("the targeted attack needs target images (--attack-targets): none found.")
    return chosen


def attack_queries(metric, pixels: torch.Tensor, settings: AttackSettings, *, targets: Optional[torch.Tensor] = None,
                   batch_size: Optional[int] = None, progress: Optional[Callable[[int], None]] = None) -> QueryAttack:
    """APGD on the query images ``pixels`` ((Q,3,S,S) at the model's input size, float in [0,1] or uint8;
    any device).

    ``targets`` ((T,3,S,S) [0,1]): the targeted attack towards them (Eq. 5); None: untargeted (Eq. 6).
    Queries are attacked in batches of ``batch_size`` (default: the metric's); each query's random
    start is seeded by its position, so the result does not depend on the batch size. ``progress`` is called with the number of queries done.
    """
    if pixels.ndim != 4 or len(pixels) == 0:
        raise BadInputError("pixels: expected a non-empty (Q, 3, S, S) batch of query images.")
    size = batch_size or metric.batch_size
    clean, adversarial, rounded, in_ball, evaluations = [], [], [], [], 0
    for start in range(0, len(pixels), size):
        x = pixels[start:start + size].to(metric.device)
        x = x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)
        ids = torch.arange(start, start + len(x))
        report = attack_embedding(metric, x, targets, settings, example_ids=ids)
        ready = rounded_embedding(metric, report, x, settings)
        clean.append(report.clean_embeddings.float())  # both computed once, by the attack and the rounding
        adversarial.append(ready.embeddings.float())
        rounded.append(ready.pixels.cpu())
        in_ball.append(ready.in_ball.cpu())
        evaluations += report.evaluations
        if progress is not None:
            progress(len(x))
    return QueryAttack(torch.cat(clean), torch.cat(adversarial), torch.cat(rounded), torch.cat(in_ball), evaluations)

