"""The model zoo: one declarative table of named perceptual metrics.

Each entry is a :class:`ModelSpec`: where the weights live on the Hugging Face
Hub, which backbone and robust fine-tuning produced them, the input size the
paper evaluated them at, and the numbers published for it (:class:`PublishedResult`,
each with where it was read). Nothing here imports torch; ``percept models list`` stays instant.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import UnknownModelError

DEFAULT_MODEL = "rclip-f-convnext-b"

PAPER = "Croce, Schlarmann, Singh, Hein. Adversarially Robust CLIP Models Can Induce Better (Robust) Perceptual Metrics. SaTML 2025"
ROBUSTCLIP_PAPER = "Schlarmann, Singh, Croce, Hein. Robust CLIP: Unsupervised Adversarial Fine-Tuning of Vision Embeddings for Robust LVLMs. ICML 2024"


# What a published number measures. Benchmarks: 2AFC accuracy (NIGHTS, BAPPS), odd-one-out
# accuracy (THINGS), retrieval mAP (revisited Oxford/Paris), detection accuracy (NSFW), all in %.
BENCHMARKS: dict[str, str] = {
    "nights": "NIGHTS test split, 2AFC accuracy",
    "nights_imagenet": "NIGHTS test split, ImageNet part",
    "nights_no_imagenet": "NIGHTS test split, non-ImageNet part",
    "bapps": "BAPPS val, 2AFC accuracy, mean over the six subsets",
    **{f"bapps_{s}": f"BAPPS val, subset {s}" for s in
       ("traditional", "cnn", "superres", "deblur", "color", "frameinterp")},
    "things": "THINGS odd-one-out accuracy",
    "roxford_medium": "revisited Oxford, medium, mAP", "roxford_hard": "revisited Oxford, hard, mAP",
    "rparis_medium": "revisited Paris, medium, mAP", "rparis_hard": "revisited Paris, hard, mAP",
    "nsfw": "NSFW detection accuracy",
}
# Threat models: clean, or APGD on the input within the named ball.
THREATS: dict[str, tuple[str, float] | None] = {"clean": None, "linf 4/255": ("linf", 4 / 255), "l2 3": ("l2", 3.0)}
# Where a number was read: a table of the paper, or one of these.
SOURCES: dict[str, str] = {
    "README": "the NIGHTS tables of the authors' code README, github.com/fra31/perceptual-metrics",
    "model card": "the model card of the weights' Hub repository (read when the zoo was built)",
}


def is_known_source(source: str) -> bool:
    """True for ``Table <roman numeral>`` (a table of :data:`PAPER`) or a key of :data:`SOURCES`."""
    head, _, numeral = source.partition(" ")
    return source in SOURCES or (head == "Table" and bool(numeral) and set(numeral) <= set("IVX"))


@dataclass(frozen=True)
class PublishedResult:
    """One number published for a zoo model.

    Attributes:
        benchmark: a key of :data:`BENCHMARKS`.
        threat: a key of :data:`THREATS`.
        value: the score in percent.
        source: ``Table I`` … (tables of the paper) or a key of :data:`SOURCES`.

    Raises:
        ValueError: a key outside the vocabularies or a value outside [0, 100].
    """

    benchmark: str
    threat: str
    value: float
    source: str

    def __post_init__(self):
        if self.benchmark not in BENCHMARKS or self.threat not in THREATS or not is_known_source(self.source):
            raise ValueError(f"unknown benchmark/threat/source in {self}")
        if not 0.0 <= self.value <= 100.0:
            raise ValueError(f"{self}: value outside [0, 100]")


@dataclass(frozen=True)
class NightsScores:
    """NIGHTS 2AFC accuracy (%) published for a model; ``None`` where none was published."""

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
        resize: the side the image is resized to before the crop (the short side when
            ``crop`` is set; both sides, aspect not kept, when ``crop`` is None), bicubic.
            ``None`` = the model config's own preprocessing.
        crop: the center-crop size, i.e. the model's input size; ``None`` = no crop
            (``Resize((resize, resize))``, as the authors' NIGHTS-fine-tuned MLP/LoRA models use).
        published: the numbers published for this model, each with its source (see
            :class:`PublishedResult`; ``nights`` gives the NIGHTS clean / l_inf / l2 view).
        aliases: other accepted names.
        arch: the OpenCLIP architecture (built-in config name). Used when the Hub repo
            carries only weights (as OpenAI's ViT-L/14 does) and for ``--checkpoint``.
            A ``-quickgelu`` arch also means the Hub config must build QuickGELU.
        pooling: how a timm ViT's tokens become the embedding (``cls_prenorm``: the class
            token before the final LayerNorm, as DreamSim uses DINO; ``token``: timm's output);
            None = the model's own.
    """

    name: str
    label: str
    backbone: str
    method: str
    threat: str
    source: str
    family: str = "open_clip"
    resize: int | None = 224
    crop: int | None = 224
    published: tuple[PublishedResult, ...] = ()
    aliases: tuple[str, ...] = ()
    reference: str = PAPER
    arch: str | None = None
    pooling: str | None = None

    @property
    def image_size(self) -> int | None:
        """The model's input size: the crop, or the resize when there is no crop."""
        return self.crop if self.crop is not None else self.resize

    def published_value(self, benchmark: str, threat: str = "clean") -> PublishedResult | None:
        """The published result for ``benchmark`` under ``threat``, or None."""
        return next((r for r in self.published if (r.benchmark, r.threat) == (benchmark, threat)), None)

    @property
    def nights(self) -> NightsScores:
        """NIGHTS (whole test split): clean, l_inf 4/255 and l2 3 accuracy; None where unpublished."""
        values = [self.published_value("nights", t) for t in ("clean", "linf 4/255", "l2 3")]
        return NightsScores(*(None if r is None else r.value for r in values))

    @property
    def repo_id(self) -> str:
        """The Hub repository id (``org/repo``) of this model."""
        return self.source.split(":", 1)[1]


def _nights(source: str, clean: float | None = None, linf: float | None = None,
            l2: float | None = None) -> tuple[PublishedResult, ...]:
    """NIGHTS (whole test split) numbers read in ``source``: clean, l_inf 4/255, l2 3."""
    pairs = (("clean", clean), ("linf 4/255", linf), ("l2 3", l2))
    return tuple(PublishedResult("nights", t, v, source) for t, v in pairs if v is not None)


_CNX, _B16, _B32, _L14 = "convnext_base_w", "ViT-B-16", "ViT-B-32", "ViT-L-14-quickgelu"  # OpenAI L/14: QuickGELU
_L_INF_4 = "l_inf 4/255"
_L_INF_2 = "l_inf 2/255"

# Published numbers, each with where it was read (docs/models.md lists them). The paper's tables
# were not readable when this was written; the README and model-card numbers are the NIGHTS
# test split under APGD (l_inf 4/255, l2 3), the protocol of the paper's Table I.
_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("rclip-f-convnext-b", "R-CLIP_F", "ConvNeXt-B", "FARE", _L_INF_4,
              "hf-hub:chs20/FARE4-convnext_base_w-laion2B-s13B-b82K-augreg", arch=_CNX, resize=256,
              published=_nights("README", 90.6, 74.3) + _nights("model card", l2=66.1),
              aliases=("rclip-f", "r-clip-f")),
    ModelSpec("rclip-t-convnext-b", "R-CLIP_T", "ConvNeXt-B", "TeCoA", _L_INF_4,
              "hf-hub:chs20/TeCoA4-convnext_base_w-laion2B-s13B-b82K-augreg", arch=_CNX, resize=256,
              published=_nights("README", 92.3, 81.9, 78.5),
              aliases=("rclip-t", "r-clip-t")),
    ModelSpec("rclip-f-vit-b16", "R-CLIP_F", "ViT-B/16", "FARE", _L_INF_4,
              "hf-hub:chs20/FARE4-ViT-B-16-laion2B-s34B-b88K", arch=_B16,
              published=_nights("README", 90.6, 71.5)),
    ModelSpec("rclip-t-vit-b16", "R-CLIP_T", "ViT-B/16", "TeCoA", _L_INF_4,
              "hf-hub:chs20/TeCoA4-ViT-B-16-laion2B-s34B-b88K", arch=_B16,
              published=_nights("README", 91.9, 79.4) + _nights("model card", l2=77.1)),
    ModelSpec("rclip-f-vit-b32", "R-CLIP_F", "ViT-B/32", "FARE", _L_INF_4,
              "hf-hub:chs20/FARE4-ViT-B-32-laion2B-s34B-b79K", arch=_B32),
    ModelSpec("rclip-t-vit-b32", "R-CLIP_T", "ViT-B/32", "TeCoA", _L_INF_4,
              "hf-hub:chs20/TeCoA4-ViT-B-32-laion2B-s34B-b79K", arch=_B32,
              published=_nights("model card", 91.0, 79.1, 79.7)),
    ModelSpec("rclip-f2-vit-l14", "R-CLIP_F (eps 2)", "ViT-L/14", "FARE", _L_INF_2,
              "hf-hub:chs20/fare2-clip", arch=_L14, reference=ROBUSTCLIP_PAPER, aliases=("fare2-clip",)),
    ModelSpec("rclip-f4-vit-l14", "R-CLIP_F", "ViT-L/14", "FARE", _L_INF_4,
              "hf-hub:chs20/fare4-clip", arch=_L14, reference=ROBUSTCLIP_PAPER, aliases=("fare4-clip",)),
    ModelSpec("rclip-t2-vit-l14", "R-CLIP_T (eps 2)", "ViT-L/14", "TeCoA", _L_INF_2,
              "hf-hub:chs20/tecoa2-clip", arch=_L14, reference=ROBUSTCLIP_PAPER, aliases=("tecoa2-clip",)),
    ModelSpec("rclip-t4-vit-l14", "R-CLIP_T", "ViT-L/14", "TeCoA", _L_INF_4,
              "hf-hub:chs20/tecoa4-clip", arch=_L14, reference=ROBUSTCLIP_PAPER, aliases=("tecoa4-clip",)),
    ModelSpec("clip-convnext-b", "CLIP", "ConvNeXt-B", "none", "-",
              "hf-hub:laion/CLIP-convnext_base_w-laion2B-s13B-b82K-augreg", arch=_CNX, resize=256,
              published=_nights("README", 87.2, 0.0, 0.0)),
    ModelSpec("clip-vit-b16", "CLIP", "ViT-B/16", "none", "-",
              "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", arch=_B16,
              published=_nights("README", 85.1, 0.0)),
    ModelSpec("clip-vit-b32", "CLIP", "ViT-B/32", "none", "-",
              "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", arch=_B32),
    ModelSpec("clip-vit-l14", "CLIP (OpenAI)", "ViT-L/14", "none", "-",
              "hf-hub:timm/vit_large_patch14_clip_224.openai", arch=_L14, aliases=("openai-vit-l14",)),
    ModelSpec("dino-vit-b16", "DINO", "ViT-B/16", "none", "-",
              "hf-hub:timm/vit_base_patch16_224.dino", family="timm",
              resize=224, crop=None, pooling="cls_prenorm",  # as DreamSim: Resize((224,224)), pre-norm CLS
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
