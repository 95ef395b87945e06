"""Held-out evaluation during and after training, with a fresh attack (APGD, never the training PGD).

* FARE: mean clean distortion ``‖φ_orig(x) − φ(x)‖²`` and adversarial distortion ``‖φ_orig(x) − φ(x + δ*)‖²``
  with δ* from APGD maximising it (``eval_iters`` iterations, the run's eps and norm).
* TeCoA: clean and APGD-robust zero-shot accuracy (cross-entropy objective, success = misclassified).
* 2AFC: NIGHTS val accuracy through the evaluation code of ``percept eval-2afc`` (clean; with
  ``eval_attack`` also APGD l_inf at the run's eps).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..attacks.apgd import apgd
from ..attacks.objectives import Objective
from .methods import fare_loss, zero_shot_logits

EVAL_BATCH = 32


class FAREObjective(Objective):
    """Maximise ``‖φ(x) − φ_orig(x_clean)‖²`` on unnormalised embeddings (no success notion)."""

    def __init__(self, encoder, target: torch.Tensor):
        super().__init__(encoder)
        self.target = target.detach()

    def embed(self, x):
        return self.encoder(x).float()

    def score(self, emb, index):
        return fare_loss(emb, self.target[index]), None


class ZeroShotObjective(Objective):
    """Maximise the zero-shot cross-entropy; success = the prediction is wrong."""

    has_success = True

    def __init__(self, encoder, text: torch.Tensor, labels: torch.Tensor):
        super().__init__(encoder)
        self.text, self.labels = text.detach(), labels.detach()

    def embed(self, x):
        return self.encoder(x).float()

    def score(self, emb, index):
        logits = zero_shot_logits(emb, self.text)
        y = self.labels[index]
        return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) != y


@contextlib.contextmanager
def _eval_mode(module):
    """``module`` in eval mode for the block, back in its former mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _batches(n: int):
    for start in range(0, n, EVAL_BATCH):
        yield slice(start, min(n, start + EVAL_BATCH))


def fare_eval(student, teacher, images: torch.Tensor, eps: float, norm: str, iters: int, seed: int,
              device: torch.device, amp: torch.dtype | None = None) -> dict:
    """Mean clean and adversarial distortion of ``student`` against ``teacher`` on uint8 ``images``."""
    clean, adv = [], []
    with _eval_mode(student):
        for rows in _batches(images.shape[0]):
            x = images[rows].to(device).float() / 255
            with torch.no_grad():
                target = teacher(x).float()
                clean.append(fare_loss(student(x), target))
            result = apgd(FAREObjective(student, target), x, eps, norm, iters, seed=seed, autocast_dtype=amp,
                          example_ids=torch.arange(rows.start, rows.stop))
            with torch.no_grad():
                adv.append(fare_loss(student(result.x_adv), target))
    return {"clean_distortion": torch.cat(clean).mean().item(), "adv_distortion": torch.cat(adv).mean().item(),
            "eval_images": int(images.shape[0]), "eval_iters": iters}


def tecoa_eval(student, text: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, eps: float, norm: str,
               iters: int, seed: int, device: torch.device, amp: torch.dtype | None = None) -> dict:
    """Clean and APGD-robust zero-shot accuracy of ``student`` on uint8 ``images`` with class ``labels``."""
    clean, robust = [], []
    with _eval_mode(student):
        for rows in _batches(images.shape[0]):
            x = images[rows].to(device).float() / 255
            y = labels[rows].to(device)
            with torch.no_grad():
                clean.append(zero_shot_logits(student(x), text).argmax(1) == y)
            result = apgd(ZeroShotObjective(student, text, y), x, eps, norm, iters, seed=seed, autocast_dtype=amp,
                          example_ids=torch.arange(rows.start, rows.stop), early_stop=True)
            with torch.no_grad():  # the verdict in fp32 on the returned points
                robust.append(zero_shot_logits(student(result.x_adv), text).argmax(1) == y)
    return {"clean_accuracy": torch.cat(clean).float().mean().item(),
            "robust_accuracy": torch.cat(robust).float().mean().item(),
            "eval_images": int(images.shape[0]), "eval_iters": iters}


def twoafc_eval(metric, index, eps: float, attack: bool, iters: int, batch_size: int) -> dict:
    """NIGHTS accuracy of ``metric`` on ``index`` (clean; with ``attack`` also APGD l_inf at ``eps``)."""
    from ..attacks.settings import AttackSettings
    from ..distributed import Dist
    from ..evaluation.twoafc import EvalPlan, evaluate_model, summarize

    with _eval_mode(metric.encoder):
        radii = [eps] if attack else []
        settings = AttackSettings(norm="linf", eps=eps, iters=iters) if attack else None
        plan = EvalPlan(radii=radii, attack=settings, batch_size=batch_size, flush_every=1e9)
        records = evaluate_model(metric, index, plan, {}, Dist())
        overall = summarize(index, records, radii)["overall"]
    out = {"val_accuracy": overall["clean"], "val_triplets": overall["n"]}
    if attack:
        out["val_robust_accuracy"] = overall["robust"][0]
    return out
