"""The model zoo: one declarative table of named perceptual metrics.

Each entry is a :class:`ModelSpec`: where the weights live on the Hugging Face
Hub, which backbone and robust fine-tuning produced them, the input size the
paper evaluated them at, and the NIGHTS 2AFC accuracy the paper reports.
Nothing here imports torch; ``percept models list`` stays instant.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from ..errors import UnknownModelError

DEFAULT_MODEL = "rclip-f-convnext-b"

PAPER = "Croce, Schlarmann, Singh, Hein. Adversarially Robust CLIP Models Can Induce Better (Robust) Perceptual Metrics. SaTML 2025"
ROBUSTCLIP_PAPER = "Schlarmann, Singh, Croce, Hein. Robust CLIP: Unsupervised Adversarial Fine-Tuning of Vision Embeddings for Robust LVLMs. ICML 2024"


@dataclass(frozen=True)
class NightsScores:
    """NIGHTS 2AFC accuracy (%) as reported by the model's authors.

    ``None`` where no number was published.
    """

    clean: float | None
    linf: float | None  # l_inf, eps = 4/255, APGD
    l2: float | None  # l2, eps = 3, APGD


@dataclass(frozen=True)
class ModelSpec:
    """One named model of the zoo.

    Attributes:
        name: the short name users type (lower case).
        label: the name the paper uses (e.g. ``R-CLIP_F``).
        backbone: human-readable architecture (``ConvNeXt-B``).
        method: robust fine-tuning method: ``FARE``, ``TeCoA`` or ``none``.
        threat: the fine-tuning threat model (``l_inf 4/255``) or ``-``.
        source: where the weights live, ``hf-hub:org/repo``.
        family: ``open_clip`` (a Hub repo with ``open_clip_config.json``) or
            ``timm`` (a Hub repo with timm's ``config.json``).
        image_size: input resolution used by the paper; ``None`` = the model's own.
        nights: NIGHTS numbers reported for this model.
        aliases: other accepted names.
        arch: the OpenCLIP architecture (built-in config name). Used when the Hub repo
            carries only weights (as OpenAI's ViT-L/14 does) and for ``--checkpoint``.
    """

    name: str
    label: str
    backbone: str
    method: str
    threat: str
    source: str
    family: str = "open_clip"
    image_size: int | None = 224
    nights: NightsScores = field(default_factory=lambda: NightsScores(None, None, None))
    aliases: tuple[str, ...] = ()
    reference: str = PAPER
    arch: str | None = None

    @property
    def repo_id(self) -> str:
        """The Hub repository id (``org/repo``) of this model."""
        return self.source.split(":", 1)[1]


def _s(clean, linf, l2) -> NightsScores:
    return NightsScores(clean, linf, l2)


_CNX, _B16, _B32, _L14 = "convnext_base_w", "ViT-B-16", "ViT-B-32", "ViT-L-14-quickgelu"  # OpenAI L/14: QuickGELU
_L_INF_4 = "l_inf 4/255"
_L_INF_2 = "l_inf 2/255"

# NIGHTS numbers: clean / l_inf 4/255 / l2 3, from the paper and the authors'
# model cards on the Hub (see docs/models.md for where each number comes from).
_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("rclip-f-convnext-b", "R-CLIP_F", "ConvNeXt-B", "FARE", _L_INF_4,
              "hf-hub:chs20/FARE4-convnext_base_w-laion2B-s13B-b82K-augreg", arch=_CNX,
              nights=_s(90.6, 74.3, 66.1), aliases=("rclip-f", "r-clip-f")),
    ModelSpec("rclip-t-convnext-b", "R-CLIP_T", "ConvNeXt-B", "TeCoA", _L_INF_4,
              "hf-hub:chs20/TeCoA4-convnext_base_w-laion2B-s13B-b82K-augreg", arch=_CNX,
              nights=_s(92.3, 81.9, 78.5), aliases=("rclip-t", "r-clip-t")),
    ModelSpec("rclip-f-vit-b16", "R-CLIP_F", "ViT-B/16", "FARE", _L_INF_4,
              "hf-hub:chs20/FARE4-ViT-B-16-laion2B-s34B-b88K", arch=_B16,
              nights=_s(90.6, 71.5, None)),
    ModelSpec("rclip-t-vit-b16", "R-CLIP_T", "ViT-B/16", "TeCoA", _L_INF_4,
              "hf-hub:chs20/TeCoA4-ViT-B-16-laion2B-s34B-b88K", arch=_B16,
              nights=_s(91.9, 79.4, 77.1)),
    ModelSpec("rclip-f-vit-b32", "R-CLIP_F", "ViT-B/32", "FARE", _L_INF_4,
              "hf-hub:chs20/FARE4-ViT-B-32-laion2B-s34B-b79K", arch=_B32,
              nights=_s(None, None, None)),
    ModelSpec("rclip-t-vit-b32", "R-CLIP_T", "ViT-B/32", "TeCoA", _L_INF_4,
              "hf-hub:chs20/TeCoA4-ViT-B-32-laion2B-s34B-b79K", arch=_B32,
              nights=_s(91.0, 79.1, 79.7)),
    ModelSpec("rclip-f2-vit-l14", "R-CLIP_F (eps 2)", "ViT-L/14", "FARE", _L_INF_2,
              "hf-hub:chs20/fare2-clip", arch=_L14, reference=ROBUSTCLIP_PAPER, aliases=("fare2-clip",)),
    ModelSpec("rclip-f4-vit-l14", "R-CLIP_F", "ViT-L/14", "FARE", _L_INF_4,
              "hf-hub:chs20/fare4-clip", arch=_L14, reference=ROBUSTCLIP_PAPER, aliases=("fare4-clip",)),
    ModelSpec("rclip-t2-vit-l14", "R-CLIP_T (eps 2)", "ViT-L/14", "TeCoA", _L_INF_2,
              "hf-hub:chs20/tecoa2-clip", arch=_L14, reference=ROBUSTCLIP_PAPER, aliases=("tecoa2-clip",)),
    ModelSpec("rclip-t4-vit-l14", "R-CLIP_T", "ViT-L/14", "TeCoA", _L_INF_4,
              "hf-hub:chs20/tecoa4-clip", arch=_L14, reference=ROBUSTCLIP_PAPER, aliases=("tecoa4-clip",)),
    ModelSpec("clip-convnext-b", "CLIP", "ConvNeXt-B", "none", "-",
              "hf-hub:laion/CLIP-convnext_base_w-laion2B-s13B-b82K-augreg", arch=_CNX,
              nights=_s(87.2, 0.0, None)),
    ModelSpec("clip-vit-b16", "CLIP", "ViT-B/16", "none", "-",
              "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", arch=_B16,
              nights=_s(85.1, 0.0, None)),
    ModelSpec("clip-vit-b32", "CLIP", "ViT-B/32", "none", "-",
              "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", arch=_B32),
    ModelSpec("clip-vit-l14", "CLIP (OpenAI)", "ViT-L/14", "none", "-",
              "hf-hub:timm/vit_large_patch14_clip_224.openai", arch=_L14, aliases=("openai-vit-l14",)),
    ModelSpec("dino-vit-b16", "DINO", "ViT-B/16", "none", "-",
              "hf-hub:timm/vit_base_patch16_224.dino", family="timm",
              reference="Caron et al. Emerging Properties in Self-Supervised Vision Transformers. ICCV 2021"),
)

_BY_NAME: dict[str, ModelSpec] = {}
for _spec in _MODELS:
    for _key in (_spec.name, *_spec.aliases):
        _BY_NAME[_key.lower()] = _spec


def list_models() -> list[ModelSpec]:
    """All zoo entries, in table order."""
    return list(_MODELS)


def find_spec(name: str) -> ModelSpec | None:
    """The zoo entry called ``name`` (case-insensitive, aliases too), or None."""
    return _BY_NAME.get(name.strip().lower())


def get_spec(name: str) -> ModelSpec:
    """The zoo entry called ``name``.

    Raises:
        UnknownModelError: no entry has that name; the message suggests close names.
    """
    spec = find_spec(name)
    if spec is None:
        raise UnknownModelError(f"unknown model '{name}'.", suggest_models(name))
    return spec


def suggest_models(name: str) -> str:
    """A hint sentence naming zoo entries close to ``name``."""
    close = difflib.get_close_matches(name.lower(), list(_BY_NAME), n=3, cutoff=0.5)
    lead = f"Did you mean {', '.join(close)}? " if close else ""
    return (lead + "Run 'percept models list' for the zoo, or pass hf-hub:ORG/NAME, "
            "a local model directory, or an architecture with --checkpoint.")
