"""The public metric object: ``load_metric(name)`` then ``embed`` / ``distance`` / ``similarity``.

Distance is ``1 - cos(phi(x1), phi(x2))`` on the encoder's output embedding.
Inputs may be file paths, PIL images or [0,1] tensors ((3,H,W) or (B,3,H,W)),
one or a list. ``embed``/``distance``/``similarity`` run without gradients;
``embed_pixels`` and calling the metric on tensors are differentiable (attacks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image

from .io.data import Failure, iter_file_batches
from .devices import DTYPE_NAMES, resolve_device, resolve_dtype
from .models.encoder import PixelEncoder
from .errors import BadInputError, ImageReadError
from .io.images import read_image
from .models.loading import ModelSource, load_encoder_and_text
from .models.naming import parse_model_name
from .io.preprocess import Preprocess
from .models.zoo import DEFAULT_MODEL

ImageLike = Union[str, os.PathLike, Image.Image, torch.Tensor]
Images = Union[ImageLike, Sequence[ImageLike]]
Progress = Callable[[int], None]


@dataclass
class EmbedResult:
    """Embeddings of the files that could be read, and the ones that could not.

    Attributes:
        embeddings: (N_ok, D) float32, L2-normalised, on the metric's device.
        indices: positions (in the input list) of the rows of ``embeddings``.
        failures: files skipped, with the reason.
    """

    embeddings: torch.Tensor
    indices: list[int]
    failures: list[Failure] = field(default_factory=list)


def _is_path(item) -> bool:
    return isinstance(item, (str, os.PathLike))


class PerceptualMetric:
    """A robust perceptual metric: an encoder plus preprocessing, on one device.

    Build it with :func:`load_metric`. Example::

        metric = load_metric("rclip-f-convnext-b", device="cuda")
        d = metric.distance("a.png", ["b.png", "c.png"])   # tensor of 2 distances
    """

    def __init__(self, encoder: PixelEncoder, source: ModelSource, *, batch_size: int = 32,
                 num_workers: int | None = None, text_encoder=None):
        self.encoder = encoder
        self.source = source
        self.text_encoder = text_encoder
        self.batch_size = int(batch_size)
        self.num_workers = num_workers
        self.preprocess: Preprocess = encoder.preprocess

    def __repr__(self) -> str:
        return (f"PerceptualMetric(model={self.source.name!r}, device={str(self.device)!r}, "
                f"dtype={self.dtype_name!r}, image_size={self.image_size})")

    @property
    def device(self) -> torch.device:
        return self.encoder.mean.device

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.encoder.compute_dtype, str(self.encoder.compute_dtype))

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    # -- differentiable path -------------------------------------------------------------
    def embed_pixels(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embeddings of a (B,3,H,W) [0,1] tensor, with gradients. Resizes if H,W != image_size."""
        x = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = self.preprocess.tensor(x)
        emb = self.encoder(x.to(self.device))
        return F.normalize(emb, dim=-1) if normalize else emb

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Differentiable distance between two pixel batches (like ``lpips.LPIPS()(x, y)``)."""
        return 1.0 - (self.embed_pixels(x) * self.embed_pixels(y)).sum(-1)

    # -- inference path ------------------------------------------------------------------
    def pixels(self, images: Images, *, preprocess: Preprocess | None = None) -> torch.Tensor:
        """Preprocess in-memory inputs (paths, PIL images, tensors) into a (N,3,S,S) [0,1] batch.

        ``preprocess`` replaces the model's geometry (e.g. a dataset's own upsampling); its
        output size must be the model's input size.
        """
        pre = self._geometry(preprocess)
        items = self._as_list(images)
        out = []
        for item in items:
            if isinstance(item, torch.Tensor):
                out.append(pre.tensor(item).cpu())
            elif isinstance(item, Image.Image):
                out.append(pre(_rgb(item)).unsqueeze(0))
            elif _is_path(item):
                out.append(pre(read_image(item)).unsqueeze(0))
            else:
                raise BadInputError(f"cannot use {type(item).__name__} as an image; pass a path, PIL image or tensor.")
        return torch.cat(out)

    @torch.no_grad()
    def embed(self, images: Images, *, batch_size: int | None = None, normalize: bool = True,
              progress: Progress | None = None) -> torch.Tensor:
        """(N, D) float32 embeddings (L2-normalised unless ``normalize=False``) on the metric's device.

        Raises:
            ImageReadError: a file that cannot be read (use :meth:`embed_files` to skip such files).
        """
        items = self._as_list(images)
        if items and all(_is_path(i) for i in items):
            result = self.embed_files(items, batch_size=batch_size, normalize=normalize, progress=progress)
            return result.embeddings
        bs = batch_size or self.batch_size
        pixels = self.pixels(items)
        chunks = []
        for start in range(0, len(pixels), bs):
            chunk = pixels[start:start + bs].to(self.device, non_blocking=True)
            chunks.append(self.embed_pixels(chunk, normalize=normalize))
            if progress:
                progress(len(chunk))
        return torch.cat(chunks)

    @torch.no_grad()
    def embed_files(self, paths: Sequence[str | os.PathLike], *, skip_bad: bool = False,
                    batch_size: int | None = None, normalize: bool = True,
                    progress: Progress | None = None, preprocess: Preprocess | None = None) -> EmbedResult:
        """Embed image files, decoded in parallel by DataLoader workers.

        Args:
            skip_bad: skip unreadable files (reported in ``failures``) instead of raising.
            preprocess: replaces the model's geometry (see :meth:`pixels`).

        Raises:
            ImageReadError: an unreadable file when ``skip_bad`` is False.
        """
        bs = batch_size or self.batch_size
        pin = self.device.type == "cuda"
        rows, indices, failures = [], [], []
        for idx, batch, failed in iter_file_batches(paths, self._geometry(preprocess), bs, self.num_workers, pin):
            if failed and not skip_bad:
                raise ImageReadError(failed[0].path, failed[0].reason)
            failures.extend(failed)
            if batch is not None:
                x = batch.to(self.device, non_blocking=True).to(torch.float32).div_(255.0)
                rows.append(self.embed_pixels(x, normalize=normalize))
                indices.extend(idx)
            if progress:
                progress(len(idx) + len(failed))
        emb = torch.cat(rows) if rows else torch.empty(0, 0, device=self.device)
        return EmbedResult(emb, indices, failures)

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) normalised CLIP text embeddings (load with ``with_text=True``).

        Raises:
            BadInputError: the model has no text tower, or a prompt is empty.
        """
        if self.text_encoder is None:
            raise BadInputError(f"model '{self.source.name}' has no text tower (vision-only model, a visual-encoder "
                                "checkpoint, or loaded without with_text=True); text needs a CLIP model.")
        if isinstance(texts, str):
            texts = [texts]
        if not texts or any(not t.strip() for t in texts):
            raise BadInputError("empty text prompt.")
        return self.text_encoder(list(texts))

    def similarity(self, a: Images, b: Images) -> torch.Tensor:
        """Cosine similarity of paired inputs: (N,) for N pairs; one side may be a single image."""
        ea, eb = self.embed(a), self.embed(b)
        if len(ea) != len(eb) and 1 not in (len(ea), len(eb)):
            raise BadInputError(f"cannot pair {len(ea)} images with {len(eb)}; give equal counts or one image.")
        return (ea * eb).sum(-1)

    def distance(self, a: Images, b: Images) -> torch.Tensor:
        """``1 - cos`` of paired inputs: (N,) for N pairs; one side may be a single image."""
        return 1.0 - self.similarity(a, b)

    def distance_matrix(self, a: Images, b: Images | None = None) -> torch.Tensor:
        """(N, M) distances between every image of ``a`` and every image of ``b`` (default: ``a``)."""
        ea = self.embed(a)
        eb = ea if b is None else self.embed(b)
        return 1.0 - ea @ eb.T

    def _geometry(self, preprocess: Preprocess | None) -> Preprocess:
        if preprocess is None:
            return self.preprocess
        if preprocess.image_size != self.image_size:
            raise BadInputError(f"preprocessing to {preprocess.image_size} px does not fit the model's "
                                f"{self.image_size} px input.")
        return preprocess

    @staticmethod
    def _as_list(images: Images) -> list:
        if isinstance(images, torch.Tensor) or _is_path(images) or isinstance(images, Image.Image):
            return [images]
        items = list(images)
        if not items:
            raise BadInputError("no images given.")
        return items


def _rgb(img: Image.Image) -> Image.Image:
    from .io.images import to_rgb

    return to_rgb(img)


def load_metric(model: str = DEFAULT_MODEL, *, device: str | torch.device = "auto",
                dtype: str | torch.dtype = "fp32", checkpoint: str | Path | None = None,
                batch_size: int = 32, num_workers: int | None = None, with_text: bool = False,
                resize: int | None = None, crop: int | None = None, pooling: str | None = None) -> PerceptualMetric:
    """Load a perceptual metric by zoo name, ``hf-hub:`` id, local directory, or arch + checkpoint.

    Args:
        model: see :func:`percept_cli.naming.parse_model_name` for accepted forms.
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
        dtype: ``fp32``, ``bf16`` or ``fp16`` for the encoder's weights and compute.
        checkpoint: visual-encoder weights for an architecture name.
        batch_size: default batch size for embedding.
        num_workers: DataLoader workers for files (None: automatic).
        with_text: also keep the CLIP text tower (``embed_text``; text inversion).
        resize, crop: override the zoo's/config's preprocessing: the short side before the crop, and
            the crop (the model's input size); ``crop=0`` resizes both sides to ``resize``, no crop.
        pooling: how a timm ViT's tokens become the embedding (see ``percept models info``).

    Raises:
        UnknownModelError, BadInputError, ModelUnavailableError, ModelFormatError.

    >>> metric = load_metric("rclip-f-convnext-b", device="cpu")  # doctest: +SKIP
    """
    ref = parse_model_name(model, checkpoint)
    torch_device = resolve_device(device)
    encoder, source, text = load_encoder_and_text(ref, torch_device, resolve_dtype(dtype), with_text=with_text,
                                                  resize=resize, crop=crop, pooling=pooling)
    return PerceptualMetric(encoder, source, batch_size=batch_size, num_workers=num_workers, text_encoder=text)
