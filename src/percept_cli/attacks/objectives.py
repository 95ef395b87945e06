"""What an attack maximises: small named loss functions, and objectives that apply them.

An objective is called on the perturbed images of the examples still attacked
(``index`` = their positions in the full batch) and returns, from one forward pass,
the per-example loss to *maximise* and, where the threat model has one, the
per-example success flag ("broken"). Everything that does not depend on the
perturbation (the 2AFC candidates, the targets, the clean embedding) is embedded once,
without gradient, when the objective is built.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..decision import is_correct

Encoder = Callable[[torch.Tensor], torch.Tensor]


# -- loss functions (per example; larger = better for the attacker) ------------------------
def twoafc_logits(emb: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The 2AFC classifier: ``[cos(ref, x0), cos(ref, x1)]`` for normalised embeddings, (B, 2)."""
    return torch.stack(((emb * left).sum(-1), (emb * right).sum(-1)), dim=-1)


def twoafc_margin(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Similarity of the wrong candidate minus that of the right one (the margin loss, and how far a
    decision is from flipping). > 0: the decision is lost; at 0 (a tie) it is lost only for label 1,
    as a tie picks the left candidate (:mod:`percept_cli.decision`)."""
    correct = logits.gather(1, label[:, None]).squeeze(1)
    wrong = logits.gather(1, (1 - label)[:, None]).squeeze(1)
    return wrong - correct


def twoafc_ce_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 2AFC classifier against the label (maximised by the attack)."""
    return F.cross_entropy(logits, label, reduction="none")


def twoafc_margin_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Binary margin loss: ``sim(ref, wrong) - sim(ref, right)``."""
    return twoafc_margin(logits, label)


def untargeted_embedding_loss(emb: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 6: ``|| phi(x+d)/||phi(x+d)|| - phi(x)/||phi(x)|| ||_2^2`` (inputs normalised)."""
    return (emb - clean).pow(2).sum(-1)


def targeted_embedding_loss(emb: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 5, negated for maximisation: ``-mean_t ||phi^(x+d) - phi^(t)||_2^2``.

    ``targets``: (T, D) shared by the batch, or (B, T, D) per example (all normalised).
    """
    if targets.dim() == 2:
        return -(emb[:, None, :] - targets[None]).pow(2).sum(-1).mean(-1)
    return -(emb[:, None, :] - targets).pow(2).sum(-1).mean(-1)


def cosine_distance(emb: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` of normalised embeddings."""
    return 1.0 - (emb * other).sum(-1)


TWOAFC_LOSSES = {"ce": twoafc_ce_loss, "margin": twoafc_margin_loss}


# -- objectives ------------------------------------------------------------------------------
class Objective:
    """Base: normalised embeddings of the perturbed images, and a loss on them.

    Subclasses set ``has_success`` and implement :meth:`score`.
    """

    has_success = False

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(x).float(), dim=-1)

    def score(self, emb: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(loss to maximise (b,), broken (b,) bool or None) for the images ``x`` of examples ``index``."""
        return self.score(self.embed(x), index)


class TwoAFCObjective(Objective):
    """Attack the reference of a 2AFC triplet; success = the decision no longer matches ``label``
    (:func:`percept_cli.decision.is_correct`: a tie picks the left candidate).

    Args:
        left, right: normalised candidate embeddings (B, D), computed once without gradient.
        label: (B,) 0 if the left candidate is the right answer, 1 for the right candidate.
        loss: ``ce`` or ``margin``.
    """

    has_success = True

    def __init__(self, encoder: Encoder, left: torch.Tensor, right: torch.Tensor, label: torch.Tensor,
                 loss: str = "ce"):
        super().__init__(encoder)
        self.left, self.right, self.label = left.detach(), right.detach(), label.long()
        self.loss_fn = TWOAFC_LOSSES[loss]

    def score(self, emb, index):
        logits = twoafc_logits(emb, self.left[index], self.right[index])
        label = self.label[index]
        return self.loss_fn(logits, label), ~is_correct(logits[:, 0], logits[:, 1], label)


class UntargetedEmbeddingObjective(Objective):
    """Push each image's embedding away from its clean embedding (Eq. 6)."""

    def __init__(self, encoder: Encoder, clean: torch.Tensor):
        super().__init__(encoder)
        self.clean = clean.detach()

    def score(self, emb, index):
        return untargeted_embedding_loss(emb, self.clean[index]), None


class TargetedEmbeddingObjective(Objective):
    """Pull each image's embedding towards a set of target embeddings (Eq. 5)."""

    def __init__(self, encoder: Encoder, targets: torch.Tensor):
        super().__init__(encoder)
        self.targets = targets.detach()

    def score(self, emb, index):
        targets = self.targets if self.targets.dim() == 2 else self.targets[index]
        return targeted_embedding_loss(emb, targets), None


class DistanceObjective(Objective):
    """Move the cosine distance to fixed embeddings up (``sign=+1``) or down (``sign=-1``)."""

    def __init__(self, encoder: Encoder, other: torch.Tensor, sign: float = 1.0):
        super().__init__(encoder)
        self.other, self.sign = other.detach(), float(sign)

    def score(self, emb, index):
        return self.sign * cosine_distance(emb, self.other[index]), None
