"""Options shared by every subcommand, defined once so help texts agree everywhere."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..models.zoo import DEFAULT_MODEL

MODEL_HELP = ("Zoo name (see `percept models list`), hf-hub:ORG/NAME\\[@REV], a local model directory, "
              "or an OpenCLIP architecture with --checkpoint.")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP, envvar="PERCEPT_MODEL",
                                       rich_help_panel="Model")]
CheckpointOpt = Annotated[Optional[Path], typer.Option(
    "--checkpoint", help="Visual-encoder weights (.safetensors, or weights-only .pt/.bin) for --model ARCH.",
    rich_help_panel="Model")]
HeadOpt = Annotated[Optional[Path], typer.Option(
    "--head", help="An MLP head file to put on the embedding (.safetensors, or a weights-only .pt such as the "
    "paper authors' mlp-*.pt Lightning checkpoints).", rich_help_panel="Model", show_default=False)]
LoraOpt = Annotated[Optional[Path], typer.Option(
    "--lora", help="A LoRA adapter folder (peft's adapter_config.json + adapter_model.safetensors, such as the "
    "authors' lora-* folders), merged into the weights. With --head or --lora images are resized to 224x224 "
    "without a crop (the authors' setting) unless --resize/--crop say otherwise.", rich_help_panel="Model",
    show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N] | mps (auto: best present).",
                                        envvar="PERCEPT_DEVICE", rich_help_panel="Model")]
DTYPE_HELP = ("fp32 | bf16 | fp16. Embedding: the encoder's weights and compute. Attacks and inversion: the "
              "autocast precision of forward/backward (weights stay fp32; every verdict is re-checked in fp32).")
DtypeOpt = Annotated[str, typer.Option("--dtype", help=DTYPE_HELP, rich_help_panel="Model")]
ModelsOpt = Annotated[Optional[List[str]], typer.Option(
    "--model", "-m", help=MODEL_HELP + " Repeatable: several models are compared.", envvar="PERCEPT_MODEL",
    rich_help_panel="Model", show_default=False)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.",
                                           rich_help_panel="Model")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=0, help="DataLoader workers decoding images (default: automatic).",
    rich_help_panel="Model")]
ResizeOpt = Annotated[Optional[int], typer.Option(
    "--resize", min=1, help="Override the model's preprocessing: resize the short side to N before the crop "
    "(default: the zoo entry's, e.g. 256 for ConvNeXt, 224 for ViTs).", rich_help_panel="Model")]
CropOpt = Annotated[Optional[str], typer.Option(
    "--crop", help="Override the center-crop size (the model's input size), or 'none' to resize both sides "
    "to --resize without a crop.", rich_help_panel="Model", show_default=False)]
PoolingOpt = Annotated[Optional[str], typer.Option(
    "--pooling", help="timm ViTs: cls_prenorm (class token before the final LayerNorm, as DreamSim; the DINO "
    "entry's default) or token (timm's output, after the norm).", rich_help_panel="Model", show_default=False)]
CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the encoder (compiled at the first batch, and for new batch shapes: pays off "
    "on long GPU runs such as attacks and large evaluations).", rich_help_panel="Model")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for anything random (attack random starts).",
                                      rich_help_panel="Output")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else.",
                                       rich_help_panel="Output")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status messages.",
                                        rich_help_panel="Output")]


@dataclass(frozen=True)
class Common:
    """The common options of one invocation, and how to act on them.

    Build it from keyword arguments (``Common(model=model, device=device, ...)``); fields not given
    keep the CLI defaults.
    """

    model: str = DEFAULT_MODEL
    checkpoint: Optional[Path] = None
    device: str = "auto"
    dtype: str = "fp32"
    batch_size: int = 32
    workers: Optional[int] = None
    seed: int = 0
    json: bool = False
    quiet: bool = False
    resize: Optional[int] = None
    crop: Optional[str] = None
    pooling: Optional[str] = None
    compile: bool = False
    head: Optional[Path] = None
    lora: Optional[Path] = None

    def load_metric(self, out, model: Optional[str] = None, *, with_text: bool = False, dtype: Optional[str] = None,
                    geometry: bool = True):
        """Seed, then load ``model`` (default: ``--model``) with a spinner on stderr: the one way every
        command loads a metric.

        ``dtype`` overrides ``--dtype`` for the weights (attacks keep fp32 weights and autocast);
        ``geometry=False`` ignores ``--resize``/``--crop``/``--pooling`` (a second model, such as
        ``invert --judge``, keeps its own preprocessing), ``--checkpoint``/``--head``/``--lora`` (they belong
        to ``--model``) and ``--compile`` (it runs a few forwards only).
        """
        import torch

        from ..metric import load_metric

        name = model or self.model
        torch.manual_seed(self.seed)
        extra = geometry_options(self.resize, self.crop, self.pooling) if geometry else {}
        if geometry:
            extra.update(head=self.head, adapter=self.lora)
        with out.status(f"Loading {name} ..."):
            return load_metric(name, device=self.device, dtype=dtype or self.dtype,
                               checkpoint=self.checkpoint if geometry else None, batch_size=self.batch_size,
                               num_workers=self.workers, with_text=with_text, compile=self.compile and geometry,
                               **extra)

    def describe(self, metric) -> dict:
        """The run's settings for JSON output."""
        return {"model": metric.source.as_dict(), "device": str(metric.device), "dtype": metric.dtype_name,
                "image_size": metric.image_size, "preprocess": metric.preprocess.as_dict(),
                "batch_size": self.batch_size, "seed": self.seed}


def geometry_options(resize: Optional[int], crop: Optional[str], pooling: Optional[str] = None) -> dict:
    """``load_metric`` keyword arguments from ``--resize``/``--crop``/``--pooling`` (``--crop none`` = no crop).

    Raises:
        BadInputError: a crop that is neither a positive integer nor 'none'.
    """
    from ..errors import BadInputError
    from ..models.loading import NO_CROP

    if crop is None:
        return {"resize": resize, "crop": None, "pooling": pooling}
    text = crop.strip().lower()
    if text in {"none", "no", "0"}:
        return {"resize": resize, "crop": NO_CROP, "pooling": pooling}
    if not text.isdigit():
        raise BadInputError(f"--crop takes a positive size or 'none'; got '{crop}'.")
    return {"resize": resize, "crop": int(text), "pooling": pooling}


# -- attack options (percept attack ..., percept distance --robust) -------------------------------
NormOpt = Annotated[str, typer.Option("--norm", help="Threat model: linf or l2.", rich_help_panel="Attack")]
EpsOpt = Annotated[Optional[str], typer.Option(
    "--eps", help="Radius: 4/255, 0.0157 or 3 (default: 4/255 for linf, 3 for l2).", show_default=False,
    rich_help_panel="Attack")]
ItersOpt = Annotated[int, typer.Option("--iters", min=1, help="APGD iterations per restart.",
                                       rich_help_panel="Attack")]
RestartsOpt = Annotated[int, typer.Option("--restarts", min=1, help="APGD runs; later ones attack only "
                                          "unbroken points from a random start.", rich_help_panel="Attack")]
RandomStartOpt = Annotated[bool, typer.Option("--random-start/--no-random-start",
                                              help="Start the first run at a random point of the ball.",
                                              rich_help_panel="Attack")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Allow an l_inf eps above 1 (more than the whole pixel "
                                        "range; usually a forgotten /255).", rich_help_panel="Attack")]
DEFAULT_EPS = {"linf": "4/255", "l2": "3"}


def check_radii(radii, norm: str, force: bool = False) -> None:
    """Refuse l_inf radii above 1 unless ``force`` (BadInputError with an eps/255 hint); warn on stderr
    for l_inf radii above 32/255."""
    from rich.console import Console

    from ..attacks.threat import check_radius, radius_warning

    for eps in radii:
        check_radius(eps, norm, force=force, escape="add --force")
    for message in filter(None, (radius_warning(eps, norm) for eps in radii)):
        Console(stderr=True, highlight=False).print(f"[yellow]warning:[/yellow] {message}")


def attack_settings(norm: str, eps: Optional[str], iters: int, restarts: int, random_start: bool, seed: int,
                    dtype: str, loss: str = "ce", square_queries: int = 0, force: bool = False):
    """AttackSettings from CLI values (validating norm, eps and dtype; BadInputError on bad ones).

    An l_inf eps above 1 is refused unless ``force``; one above 32/255 gets a warning on stderr.
    ``dtype`` is the autocast precision (fp32: none).
    """
    from ..attacks import AttackSettings, parse_eps, parse_norm

    norm = parse_norm(norm)
    value = parse_eps(eps if eps is not None else DEFAULT_EPS[norm])
    check_radii([value], norm, force)
    return AttackSettings(norm=norm, eps=value, iters=iters, restarts=restarts, random_start=random_start,
                          seed=seed, loss=loss, autocast_dtype=dtype, square_queries=square_queries, force=force)


def threat_dict(settings, *, decision: bool = True) -> dict:
    """``settings.to_dict()`` for JSON output; without ``decision`` (embedding attacks, ``distance
    --robust``) the keys only a 2AFC decision uses (``loss``, ``square_*``) are left out."""
    data = settings.to_dict()
    return data if decision else {k: v for k, v in data.items() if k != "loss" and not k.startswith("square_")}
