"""The training objectives: FARE, TeCoA and 2AFC (MLP head or LoRA), each as one ``Method``.

A method owns the module being trained (what DistributedDataParallel wraps), turns a micro-batch of
dataset positions into tensors, and computes the micro-batch's loss summed over its rows (the loop
divides by the rows a process takes per step, so the gradient is that of the global batch mean).

* FARE (Schlarmann et al., ICML 2024): ``‖φ_orig(x) − φ_θ(x + δ)‖²₂`` on unnormalised embeddings,
  summed over dimensions; δ maximises the same loss (:mod:`.pgd`); φ_orig is a frozen copy of the
  starting encoder in eval mode.
* TeCoA (Mao et al., ICLR 2023): cross-entropy of ``100 · cos(φ(x + δ), ψ(t_k))`` over class prompts;
  δ by PGD on the same loss; text embeddings ψ computed once and frozen.
* 2AFC (DreamSim; the paper's NIGHTS fine-tuning), clean: hinge ``max(0, m − y·(d(r,l) − d(r,r')))``
  with y = ±1 the human label and d = 1 − cos.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .pgd import pgd_perturb, uniform_start

LOGIT_SCALE = 100.0


def fare_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per row ``‖student − teacher‖²₂`` (B,), summed over dimensions (not averaged)."""
    return (student.float() - teacher.float()).pow(2).sum(dim=1)


def zero_shot_logits(emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``100 · cos(φ(x), ψ_k)`` (B, K) for normalised text embeddings ``text`` (K, D)."""
    return LOGIT_SCALE * F.normalize(emb.float(), dim=-1) @ text.t()


def hinge_2afc(d_left: torch.Tensor, d_right: torch.Tensor, label: torch.Tensor, margin: float) -> torch.Tensor:
    """Per row ``max(0, margin − y·(d_left − d_right))``, y = +1 when people chose the right candidate."""
    y = label.float() * 2 - 1
    return (margin - y * (d_left - d_right)).clamp_min(0)


def twoafc_correct(d_left: torch.Tensor, d_right: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The metric agrees with people: :func:`percept_cli.decision.is_correct` on the similarities 1 − d."""
    from ..decision import is_correct

    return is_correct(1 - d_left, 1 - d_right, label)


@dataclass
class StepContext:
    """What a micro-batch's loss needs besides its data."""

    step: int
    slots: list[int]              # the rows' positions within the global batch of this step
    batch_size: int               # global batch size
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    log: bool                     # a logging step: compute the extra statistics


class Method:
    """Base class: see the module docstring."""

    kind = ""
    module: nn.Module
    decodes_images = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def loss(self, model: nn.Module, data, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


class AdversarialMethod(Method):
    """FARE and TeCoA share the start of the inner maximisation: one uniform draw per step for the whole
    global batch (seeded by run seed and step), of which each process takes its rows, so the random
    starts do not depend on the number of processes."""

    def __init__(self, encoder: nn.Module, config: TrainConfig):
        self.module = encoder
        self.config = config
        self._starts: tuple[int, torch.Tensor] | None = None  # (step, its global batch's starts)

    def random_start(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The starts of this micro-batch's rows: drawn once per step for the whole global batch."""
        if self._starts is None or self._starts[0] != ctx.step:
            g = torch.Generator(device=ctx.device).manual_seed(self.config.seed * 1_000_003 + ctx.step)
            shape = (ctx.batch_size, *x.shape[1:])
            self._starts = (ctx.step, uniform_start(shape, self.config.eps, self.config.norm, g, ctx.device))
        return self._starts[1][torch.as_tensor(ctx.slots, device=ctx.device)]

    def attack(self, loss_fn, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        c = self.config
        was_training = self.module.training
        self.module.eval()  # as the reference training code: the attack runs the model in eval mode
        try:
            return pgd_perturb(loss_fn, x, self.random_start(x, ctx), c.eps, c.norm, c.pgd_steps, c.pgd_step_size,
                               c.pgd_momentum, ctx.autocast)
        finally:
            self.module.train(was_training)


class FARE(AdversarialMethod):
    kind = "fare"

    def __init__(self, encoder: nn.Module, config: TrainConfig):
        super().__init__(encoder, config)
        self.teacher = copy.deepcopy(encoder).eval().requires_grad_(False)

    def loss(self, model, x, ctx):
        with torch.no_grad(), ctx.autocast():
            target = self.teacher(x).float()
        x_adv = self.attack(lambda z: fare_loss(self.module(z), target).sum(), x, ctx)
        with ctx.autocast():
            per_row = fare_loss(model(x_adv), target)
        stats = {"adv_distortion": per_row.detach().sum()}
        if ctx.log:
            with torch.no_grad(), ctx.autocast():
                stats["clean_distortion"] = fare_loss(self.module(x), target).sum()
        return per_row.sum(), stats


class TeCoA(AdversarialMethod):
    kind = "tecoa"

    def __init__(self, encoder: nn.Module, config: TrainConfig, text_embeddings: torch.Tensor):
        super().__init__(encoder, config)
        self.text = F.normalize(text_embeddings.float(), dim=-1).detach()

    def loss(self, model, data, ctx):
        x, y = data
        x_adv = self.attack(lambda z: F.cross_entropy(zero_shot_logits(self.module(z), self.text), y,
                                                      reduction="sum"), x, ctx)
        with ctx.autocast():
            logits = zero_shot_logits(model(x_adv), self.text)
        per_row = F.cross_entropy(logits, y, reduction="none")
        stats = {"adv_correct": (logits.argmax(1) == y).sum().detach()}
        return per_row.sum(), stats


class TwoAFCLoRA(Method):
    """2AFC fine-tuning of LoRA adapters inside the encoder (the backbone's other weights frozen)."""

    kind = "2afc-lora"

    def __init__(self, encoder: nn.Module, config: TrainConfig):
        self.module = encoder
        self.config = config

    def loss(self, model, data, ctx):
        ref, left, right, label = data
        n = ref.shape[0]
        with ctx.autocast():
            emb = F.normalize(model(torch.cat([ref, left, right])).float(), dim=-1)
        e_ref, e_left, e_right = emb[:n], emb[n:2 * n], emb[2 * n:]
        d_left = 1 - (e_ref * e_left).sum(-1)
        d_right = 1 - (e_ref * e_right).sum(-1)
        per_row = hinge_2afc(d_left, d_right, label, self.config.margin)
        return per_row.sum(), {"correct": twoafc_correct(d_left, d_right, label).sum().detach()}


class TwoAFCHead(Method):
    """2AFC fine-tuning of an MLP head on a frozen encoder: the backbone's features of every training
    image are computed once (the backbone is frozen and the images are not augmented), then the head is
    trained on them; the same numbers as running the backbone at every step, at a fraction of the cost."""

    kind = "2afc-mlp"
    decodes_images = False

    def __init__(self, head: nn.Module, features: torch.Tensor, triplets: torch.Tensor, labels: torch.Tensor,
                 config: TrainConfig):
        self.module = head
        self.features = features           # (N_images, D) float32 backbone features
        self.triplets = triplets           # (N_triplets, 3) image positions (ref, left, right)
        self.labels = labels               # (N_triplets,)
        self.config = config

    def loss(self, model, rows: torch.Tensor, ctx):
        idx = self.triplets[rows]
        feats = self.features[idx.reshape(-1)]
        emb = F.normalize(model(feats).float(), dim=-1).view(len(rows), 3, -1)
        d_left = 1 - (emb[:, 0] * emb[:, 1]).sum(-1)
        d_right = 1 - (emb[:, 0] * emb[:, 2]).sum(-1)
        label = self.labels[rows]
        per_row = hinge_2afc(d_left, d_right, label, self.config.margin)
        return per_row.sum(), {"correct": twoafc_correct(d_left, d_right, label).sum().detach()}


def text_embeddings(text_encoder, classnames: list[str], template: str, batch: int = 256) -> torch.Tensor:
    """(K, D) normalised embeddings of ``template.format(name)`` for each class, without gradient."""
    prompts = [template.format(name) for name in classnames]
    with torch.no_grad():
        return torch.cat([text_encoder(prompts[i:i + batch]) for i in range(0, len(prompts), batch)])


def lora_target_modules(backbone: nn.Module, requested: list[str] | None) -> list[str]:
    """The module-name suffixes LoRA adapts: the MLP linear layers of every block.

    ConvNeXt (timm trunk): ``mlp.fc1``, ``mlp.fc2``. OpenCLIP ViT: ``mlp.c_fc``, ``mlp.c_proj``. The ViT's
    ``attn.out_proj`` is not adapted: nn.MultiheadAttention reads ``out_proj.weight`` directly instead of
    calling the module, so an adapter there would change nothing until merged (merged and unmerged
    models would differ).
    """
    if requested:
        return list(requested)
    names = [name for name, module in backbone.named_modules() if isinstance(module, nn.Linear)]
    for suffixes in (("mlp.fc1", "mlp.fc2"), ("mlp.c_fc", "mlp.c_proj")):
        if any(n.endswith(s) for n in names for s in suffixes):
            return list(suffixes)
    from ..errors import BadInputError

    raise BadInputError("cannot find MLP layers to put LoRA adapters on in this backbone; pass --lora-targets.")
