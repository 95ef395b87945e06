"""Feature and text inversion: images whose embedding matches a target, showing what the metric sees.

The paper's recipe (Croce et al., SaTML 2025, Appendix A-B), the default: start at grey (0.5) plus
uniform noise in [-8/255, 8/255], then APGD for 500 iterations in the l2 ball of radius 100 around
that start (the radius regularises), with initial step size 200, maximising cos(phi(x), target).
All seeds are optimised together in one batch.

:func:`run_inversion` is the whole job behind ``percept invert``: target embedding(s), the
inversion, the PNG files (named by :func:`seed_file`, :func:`grid_file`, :func:`step_file`), an
optional second "judge" metric and the contact sheet; it never prints and a failed write is
returned, not raised.

The alternative (their Appendix C, ``method="augmented"``): Adam (lr 0.1, 1000 steps) on the
pixels, the loss averaged over randomly augmented views (colour, translation, cutout, in the
spirit of DiffAugment, Zhao et al., NeurIPS 2020).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .attacks import DistanceObjective, apgd
from .attacks.core import autocast, bcast
from .errors import BadInputError

METHODS = ("apgd", "augmented")


@dataclass
class InversionSettings:
    """Recipe parameters (defaults: the paper's)."""

    method: str = "apgd"
    iters: Optional[int] = None  # 500 for apgd, 1000 for augmented
    radius: float = 100.0
    step_size: float = 200.0
    init_noise: float = 8 / 255
    lr: float = 0.1
    views: int = 8
    size: Optional[int] = None  # optimisation/output resolution; None = the model's input size
    autocast_dtype: Optional[torch.dtype] = None  # or a name (bf16, fp16); fp32 means no autocast

    def __post_init__(self):
        if self.autocast_dtype is not None:
            from .devices import resolve_dtype

            self.autocast_dtype = resolve_dtype(self.autocast_dtype)
            self.autocast_dtype = None if self.autocast_dtype == torch.float32 else self.autocast_dtype
        if self.method not in METHODS:
            raise BadInputError(f"unknown inversion method '{self.method}'; use apgd or augmented.")
        if self.iters is None:
            self.iters = 500 if self.method == "apgd" else 1000
        if self.iters < 1:
            raise BadInputError(f"iters must be at least 1; got {self.iters}.")
        if self.radius <= 0 or self.step_size <= 0 or self.lr <= 0:
            raise BadInputError("radius, step_size and lr must be positive.")
        if self.size is not None and self.size < 8:
            raise BadInputError(f"size must be at least 8 pixels; got {self.size}.")


@dataclass
class InversionResult:
    """One reconstruction per seed (rows aligned with ``seeds``).

    ``trace`` holds, per iteration, the best similarity so far of each seed (iterations x seeds).
    """

    images: torch.Tensor
    similarity: torch.Tensor
    seeds: list[int]
    start: torch.Tensor
    trace: list[list[float]] = field(default_factory=list)


def initial_images(seeds: Sequence[int], size: int, noise: float, device) -> torch.Tensor:
    """Grey (0.5) plus uniform noise in [-noise, noise], one image per seed (repeatable)."""
    rows = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        rows.append(0.5 + (torch.rand(3, size, size, generator=g) * 2 - 1) * noise)
    return torch.stack(rows).clamp(0, 1).to(device)


def _encoder_at(metric, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The metric's encoder fed from ``size`` x ``size`` pixels (differentiable resize if needed)."""
    if size == metric.image_size:
        return metric.encoder
    target = metric.image_size
    return lambda x: metric.encoder(F.interpolate(x, size=(target, target), mode="bicubic", align_corners=False,
                                                  antialias=True).clamp(0, 1))


def invert(metric, target: torch.Tensor, seeds: Sequence[int], settings: InversionSettings = InversionSettings(), *,
           progress: Optional[Callable[[int], None]] = None,
           on_iteration: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> InversionResult:
    """Images (one per seed, optimised together) maximising cos(phi(x), ``target``).

    Args:
        target: (D,) normalised target embedding (an image's or a text's).
        on_iteration: ``f(k, best_images, best_similarity)`` after iteration k.
    """
    if not seeds:
        raise BadInputError("no seeds given.")
    size = settings.size or metric.image_size
    encoder = _encoder_at(metric, size)
    target = F.normalize(target.float().to(metric.device).reshape(1, -1), dim=-1).expand(len(seeds), -1)
    start = initial_images(seeds, size, settings.init_noise, metric.device)
    trace: list[torch.Tensor] = []  # kept on the device: no host sync per iteration

    def monitor(k, x_best, loss_best):
        trace.append((loss_best + 1.0).detach())  # DistanceObjective(sign=-1) loss is cos - 1
        if on_iteration is not None:
            on_iteration(k, x_best, loss_best + 1.0)

    if settings.method == "apgd":
        objective = DistanceObjective(encoder, target, sign=-1.0)
        result = apgd(objective, start, settings.radius, "l2", settings.iters, random_start=False,
                      step_size=settings.step_size, autocast_dtype=settings.autocast_dtype, progress=progress,
                      monitor=monitor)
        images = result.x_adv
    else:
        images = _invert_augmented(encoder, target, start, settings, progress, monitor)
    with torch.no_grad():
        similarity = (F.normalize(encoder(images).float(), dim=-1) * target).sum(-1)
    history = torch.stack(trace).cpu().tolist() if trace else []
    return InversionResult(images.detach(), similarity, list(seeds), start, history)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random colour (brightness, saturation, contrast), translation (1/8) and cutout (1/2), per image."""
    b, _, h, w = x.shape
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(dev)

    x = x + (rand(b, 1, 1, 1) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand(b, 1, 1, 1) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (rand(b, 1, 1, 1) + 0.5) + mean
    shift = (torch.randint(-(h // 8), h // 8 + 1, (b, 2), generator=generator)).tolist()
    x = torch.stack([torch.roll(img, shifts=(dy, dx), dims=(1, 2)) for img, (dy, dx) in zip(x, shift)])
    cut_h, cut_w = h // 2, w // 2
    rows = torch.arange(h, device=dev)[None, :, None]
    cols = torch.arange(w, device=dev)[None, None, :]
    top = torch.randint(0, h - cut_h + 1, (b, 1, 1), generator=generator).to(dev)
    left = torch.randint(0, w - cut_w + 1, (b, 1, 1), generator=generator).to(dev)
    hole = (rows >= top) & (rows < top + cut_h) & (cols >= left) & (cols < left + cut_w)
    return x * (~hole)[:, None].float()


def _invert_augmented(encoder, target, start, settings, progress, monitor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=settings.lr)
    with torch.no_grad():  # the start counts: the result is never worse than where it began
        best_sim = (F.normalize(encoder(start).float(), dim=-1) * target).sum(-1)
    best_x = start.clone()
    for k in range(settings.iters):
        views = torch.cat([augment(x, generator) for _ in range(settings.views)])
        with autocast(x.device, settings.autocast_dtype):  # --dtype: the forward/backward's precision
            emb = F.normalize(encoder(views).float(), dim=-1)
        loss = -(emb * target.repeat(settings.views, 1)).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0, 1)
            sim = (F.normalize(encoder(x).float(), dim=-1) * target).sum(-1)
            better = sim > best_sim
            best_sim = torch.where(better, sim, best_sim)
            best_x = torch.where(bcast(better, x), x, best_x)
        if progress is not None:
            progress(1)
        monitor(k + 1, best_x, best_sim - 1.0)
    return best_x


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe version of a prompt or image name."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return cleaned or "target"


def contact_sheet(images: torch.Tensor, labels: Sequence[str], target: Optional[torch.Tensor] = None,
                  target_label: str = "target", tile: int = 224, pad: int = 6, band: int = 22) -> Image.Image:
    """The target (if an image) and every reconstruction side by side, each labelled underneath.

    Size: ``(n * (tile + pad) + pad, tile + band + 2 * pad)`` for n tiles.
    """
    tiles = ([(target, target_label)] if target is not None else []) + list(zip(images, labels))
    sheet = Image.new("RGB", (len(tiles) * (tile + pad) + pad, tile + band + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, label) in enumerate(tiles):
        arr = (img.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr).resize((tile, tile), Image.BICUBIC)
        x0 = pad + i * (tile + pad)
        sheet.paste(pil, (x0, pad))
        draw.text((x0 + 2, pad + tile + 4), label, fill=(0, 0, 0))
    return sheet


# -- the whole job: targets, files, judge, contact sheet ------------------------------------------
@dataclass(frozen=True)
class InversionTarget:
    """What to invert: a photo's embedding (``kind="image"``, ``value`` its path) or a prompt's CLIP
    text embedding (``kind="text"``, ``value`` the prompt). ``name`` is the stem of every file written.

    Raises:
        BadInputError: an unknown kind or an empty prompt.
    """

    kind: str
    value: str

    def __post_init__(self):
        if self.kind not in ("image", "text"):
            raise BadInputError(f"unknown inversion target kind '{self.kind}'; use image or text.")
        if self.kind == "text" and not self.value.strip():
            raise BadInputError("empty text prompt.")

    @classmethod
    def image(cls, path: str | Path) -> "InversionTarget":
        return cls("image", str(path))

    @classmethod
    def text(cls, prompt: str) -> "InversionTarget":
        return cls("text", prompt)

    @property
    def name(self) -> str:
        return slug(self.value if self.kind == "text" else Path(self.value).stem)


def seed_file(out_dir: str | Path, name: str, seed: int) -> Path:
    """``<out_dir>/<name>_seed<S>.png``: the reconstruction from ``seed``."""
    return Path(out_dir) / f"{name}_seed{seed}.png"


def grid_file(out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/<name>_grid.png``: the contact sheet."""
    return Path(out_dir) / f"{name}_grid.png"


def step_file(out_dir: str | Path, name: str, seed: int, k: int) -> Path:
    """``<out_dir>/steps/<name>_seed<S>_iter<k>.png`` (k zero-padded to 4 digits): an intermediate image."""
    return Path(out_dir) / "steps" / f"{name}_seed{seed}_iter{k:04d}.png"


@dataclass
class InversionRun:
    """What :func:`run_inversion` did. Rows of ``images``, ``similarity``, ``judge_similarity`` and
    ``paths`` follow ``seeds``; a path is None when its file could not be written, and ``failures``
    (``{"option", "path", "reason"}``, ``option`` naming the argument: out_dir, grid or save_every)
    lists every write that failed."""

    target: InversionTarget
    seeds: list[int]
    settings: InversionSettings
    images: torch.Tensor
    similarity: torch.Tensor
    judge_similarity: Optional[torch.Tensor]
    paths: list[Optional[Path]]
    grid: Optional[Path]
    intermediate: list[Path]
    failures: list[dict]


def _target_embedding(metric, target: InversionTarget, *, keep_pixels: bool = False):
    """(normalised (D,) target embedding under ``metric``, the target's pixels or None)."""
    if target.kind == "text":
        return metric.embed_text([target.value])[0], None
    if not keep_pixels:  # the metric's own preprocessing of the file
        return metric.embed([target.value])[0], None
    pixels = metric.pixels([target.value])
    with torch.no_grad():
        return metric.embed_pixels(pixels.to(metric.device)).detach()[0], pixels[0]


def run_inversion(metric, target: InversionTarget, seeds: Sequence[int],
                  settings: Optional[InversionSettings] = None, out_dir: str | Path = "inversions", *,
                  judge=None, save_every: int = 0, grid: bool = False,
                  progress: Optional[Callable[[int], None]] = None,
                  on_iteration: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> InversionRun:
    """Invert ``target`` under ``metric`` (one image per seed) and write the PNG files into ``out_dir``.

    ``settings`` default to the paper's recipe. Writes :func:`seed_file` per seed, with ``grid``
    :func:`grid_file` (the target image, if any, then each reconstruction labelled with its seed
    and cosine), and every ``save_every`` iterations (0: never) the best images so far as
    :func:`step_file` (stopped after a failed write). ``judge``, a second metric, scores the
    reconstructions against its own embedding of the target. A failed write (``OSError``) is
    recorded in ``failures``, never raised, so the similarities are always returned.

    Raises:
        BadInputError: no seeds, bad settings, a text target for a model without a text tower.
        ImageReadError: an unreadable target image.
    """
    from .io.outputs import OutputWrites

    if not seeds:
        raise BadInputError("no seeds given.")
    seeds, out_dir, name = [int(s) for s in seeds], Path(out_dir), target.name
    settings = settings or InversionSettings()
    target_emb, target_pixels = _target_embedding(metric, target, keep_pixels=True)
    judge_target = _target_embedding(judge, target)[0] if judge is not None else None
    writes = OutputWrites()
    writes.attempt("out_dir", out_dir, lambda: out_dir.mkdir(parents=True, exist_ok=True))
    intermediate: list[Path] = []

    def watch(k, best, best_sim):
        if save_every and k % save_every == 0 and not writes.failures:
            intermediate.extend(_save_all(writes, "save_every", [step_file(out_dir, name, s, k) for s in seeds], best))
        if on_iteration is not None:
            on_iteration(k, best, best_sim)

    result = invert(metric, target_emb, seeds, settings, progress=progress, on_iteration=watch)
    judge_sims = None
    if judge is not None:
        with torch.no_grad():
            judge_sims = (judge.embed_pixels(result.images.to(judge.device)) * judge_target).sum(-1).cpu()
    paths = [_save(writes, "out_dir", seed_file(out_dir, name, s), img) for s, img in zip(seeds, result.images)]
    grid_path = None
    if grid:
        labels = [f"seed {s}  cos {float(sim):.3f}" for s, sim in zip(seeds, result.similarity)]
        sheet = contact_sheet(result.images, labels, target_pixels, "target" if target_pixels is not None else "",
                              tile=result.images.shape[-1])
        grid_path = _save(writes, "grid", grid_file(out_dir, name), sheet)
    return InversionRun(target, seeds, settings, result.images, result.similarity, judge_sims, paths, grid_path,
                        intermediate, writes.failures)


def _save(writes, option: str, path: Path, pixels) -> Optional[Path]:
    """Write one PNG through ``writes`` (its parent folder created); the path, or None if it failed."""
    from .io import outputs

    def write():
        path.parent.mkdir(parents=True, exist_ok=True)
        return outputs.save_png(path, pixels)

    return writes.attempt(option, path, write)


def _save_all(writes, option: str, paths: Sequence[Path], images: torch.Tensor) -> list[Path]:
    return [p for p, img in zip(paths, images) if _save(writes, option, p, img) is not None]
