"""Adversarial attacks on perceptual metrics: APGD (the reference), PGD (baseline), Square Attack
(gradient-free check), their objectives, and the tasks built on them."""

from .apgd import apgd, checkpoints
from .core import AttackResult
from .objectives import (DistanceObjective, TargetedEmbeddingObjective, TwoAFCObjective,
                         UntargetedEmbeddingObjective)
from .pgd import pgd
from .settings import AttackSettings
from .square import square
from .tasks import attack_2afc, attack_embedding, distance_interval
from .threat import format_eps, lp_norm, parse_eps, parse_norm, project

__all__ = ["apgd", "pgd", "square", "checkpoints", "AttackResult", "AttackSettings", "attack_2afc",
           "attack_embedding", "distance_interval", "TwoAFCObjective", "UntargetedEmbeddingObjective",
           "TargetedEmbeddingObjective", "DistanceObjective", "parse_eps", "parse_norm", "format_eps",
           "lp_norm", "project"]
