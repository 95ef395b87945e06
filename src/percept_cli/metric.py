"""The public metric object: ``load_metric(name)`` then ``embed`` / ``distance`` / ``similarity``.

Distance is ``1 - cos(phi(x1), phi(x2))`` on the encoder's output embedding, in [0, 2].
Inputs may be file paths, PIL images, tensors ((3,H,W) or (B,3,H,W)) or NumPy arrays (also
channel-last (H,W,3) or (B,H,W,3)), one or a list. uint8 tensors/arrays hold 0..255; float ones
lie in the metric's ``input_range`` (``"0,1"`` by default, ``"-1,1"`` as LPIPS takes, ``"0,255"``).
``embed``/``distance``/``similarity`` run without gradients; ``embed_pixels`` and calling the
metric on tensors are differentiable (attacks, or a loss inside another model: the metric is an
``nn.Module``, as ``lpips.LPIPS`` is).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .devices import DTYPE_NAMES, resolve_device, resolve_dtype
from .errors import BadInputError, ImageReadError
from .io.data import Failure, iter_file_batches
from .io.images import read_image
from .io.preprocess import Preprocess, as_pixel_batch, parse_input_range
from .models.encoder import PixelEncoder, compile_available
from .models.loading import ModelSource, load_encoder_and_text
from .models.naming import parse_model_name
from .models.zoo import DEFAULT_MODEL

ImageLike = str | os.PathLike | Image.Image | torch.Tensor | np.ndarray
Images = ImageLike | Sequence[ImageLike]
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


def _is_array(item) -> bool:
    return isinstance(item, (torch.Tensor, np.ndarray))


def embedding_distance(ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` of L2-normalised embeddings (broadcast over leading dims), in [0, 2].

    Computed as ``||ea - eb||^2 / 2`` (equal for unit vectors): exactly 0 for identical embeddings
    and free of the cancellation ``1 - cos`` suffers near 0. Differentiable.
    """
    return (ea - eb).pow(2).sum(-1).mul(0.5).clamp(0.0, 2.0)


def embedding_distance_matrix(ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
    """(N, M) ``1 - cos`` between L2-normalised rows of ``ea`` (N, D) and ``eb`` (M, D), in [0, 2]."""
    return (1.0 - ea @ eb.T).clamp_(0.0, 2.0)


class PerceptualMetric(nn.Module):
    """A robust perceptual metric: an encoder plus preprocessing, as a torch module.

    Build it with :func:`load_metric`. Example::

        metric = load_metric("rclip-f-convnext-b", device="cuda")
        d = metric.distance("a.png", ["b.png", "c.png"])   # tensor of 2 distances
        loss = metric(x, y).mean()                         # differentiable, (B,) -> scalar

    An ``nn.Module`` (as ``lpips.LPIPS`` is): ``.to(device)`` moves it (``device`` follows),
    ``.to(dtype)`` casts the encoder's weights as ``load_metric(dtype=...)`` does (normalisation and
    output stay float32), it can sit inside another model as a loss, and DDP can wrap that model.
    Submodules: ``encoder`` (a :class:`PixelEncoder`) and ``text_encoder`` (None without a text tower).

    ``input_range`` (``"0,1"``, ``"-1,1"`` or ``"0,255"``; settable) says where the values of float
    tensors/arrays passed to its methods lie; uint8 always holds 0..255. Attacks
    (:mod:`percept_cli.attacks`) take and return [0,1] pixels whatever it says (eps is measured there).
    """

    def __init__(self, encoder: PixelEncoder, source: ModelSource, *, batch_size: int = 32,
                 num_workers: int | None = None, text_encoder: nn.Module | None = None, input_range: str = "0,1"):
        super().__init__()
        self.encoder = encoder
        self.register_module("text_encoder", text_encoder)  # a submodule slot even when None
        self.training = encoder.training
        self.source = source
        self.batch_size = int(batch_size)
        self.num_workers = num_workers
        self.preprocess: Preprocess = encoder.preprocess
        self.input_range = input_range

    @property
    def input_range(self) -> str:
        """Where float tensor/array values lie: ``"0,1"`` (default), ``"-1,1"`` or ``"0,255"``."""
        return self._input_range

    @input_range.setter
    def input_range(self, value) -> None:
        self._input_range = parse_input_range(value)

    def __repr__(self) -> str:
        extra = f", input_range={self.input_range!r}" if self.input_range != "0,1" else ""
        return (f"PerceptualMetric(model={self.source.name!r}, device={str(self.device)!r}, "
                f"dtype={self.dtype_name!r}, image_size={self.image_size}{extra})")

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
    def embed_pixels(self, pixels: torch.Tensor | np.ndarray, normalize: bool = True, *, check: bool = True,
                     name: str = "pixels") -> torch.Tensor:
        """(B, D) embeddings of a (3,H,W)/(B,3,H,W) tensor, with gradients; resizes if H,W != image_size.

        Values as the metric's ``input_range`` says (uint8: 0..255; NumPy arrays accepted). With
        ``check=False`` (internal callers, attacks) ``pixels`` must already be a float [0,1] tensor:
        nothing is checked or converted, so no device sync.

        Raises:
            BadInputError: (``check``) wrong type, shape or dtype, or values out of range.
        """
        if check:
            x = as_pixel_batch(pixels, input_range=self.input_range, name=name)
        else:
            x = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = self.preprocess.tensor(x, check=False, name=name)
        emb = self.encoder(x.to(self.device))
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *,
                check: bool = True) -> torch.Tensor:
        """``metric(x, y)``: differentiable distance (B,) between two pixel batches (like ``lpips.LPIPS()(x, y)``),
        in [0, 2].

        ``x``, ``y``: tensors or arrays as :meth:`embed_pixels` takes, with equal batch sizes (or one
        of them a single image); the same number as :meth:`distance` gives for them.

        Raises:
            BadInputError: not a tensor/array (use :meth:`distance` for files), bad shape, dtype or
                range (``check``), or batch sizes that cannot be paired.
        """
        for name, value in (("x", x), ("y", y)):
            if not _is_array(value):
                raise BadInputError(f"{name}: metric(x, y) takes image tensors or NumPy arrays (it is "
                                    f"differentiable); got {type(value).__name__}. For files or PIL images "
                                    "use metric.distance(x, y).")
        ex, ey = self.embed_pixels(x, check=check, name="x"), self.embed_pixels(y, check=check, name="y")
        _check_pairable(len(ex), len(ey), "x", "y")
        return embedding_distance(ex, ey)

    # -- inference path ------------------------------------------------------------------
    def pixels(self, images: Images, *, preprocess: Preprocess | None = None) -> torch.Tensor:
        """Preprocess inputs (paths, PIL images, tensors, arrays) into a (N,3,S,S) [0,1] batch on the CPU.

        ``preprocess`` replaces the model's geometry (e.g. a dataset's own upsampling); its
        output size must be the model's input size.
        """
        return self._pixels(images, "images", preprocess)

    def _pixels(self, images: Images, name: str, preprocess: Preprocess | None = None) -> torch.Tensor:
        pre = self._geometry(preprocess)
        items = self._as_list(images, name)
        out = []
        for i, item in enumerate(items):
            label = name if len(items) == 1 else f"{name}[{i}]"
            if _is_array(item):
                out.append(pre.tensor(item, input_range=self.input_range, name=label).cpu())
            elif isinstance(item, Image.Image):
                out.append(pre(_rgb(item)).unsqueeze(0))
            else:
                out.append(pre(read_image(item)).unsqueeze(0))
        return torch.cat(out)

    @torch.no_grad()
    def embed(self, images: Images, *, batch_size: int | None = None, normalize: bool = True,
              progress: Progress | None = None) -> torch.Tensor:
        """(N, D) float32 embeddings (L2-normalised unless ``normalize=False``) on the metric's device.

        Raises:
            ImageReadError: a file that cannot be read (use :meth:`embed_files` to skip such files).
            BadInputError: something that is not an image (the message names ``images``).
        """
        return self._embed(images, "images", batch_size=batch_size, normalize=normalize, progress=progress)

    def _embed(self, images: Images, name: str, *, batch_size: int | None = None, normalize: bool = True,
               progress: Progress | None = None) -> torch.Tensor:
        items = self._as_list(images, name)
        if all(_is_path(i) for i in items):
            result = self.embed_files(items, batch_size=batch_size, normalize=normalize, progress=progress)
            return result.embeddings
        bs = batch_size or self.batch_size
        pixels = self._pixels(items, name)
        chunks = []
        for start in range(0, len(pixels), bs):
            chunk = pixels[start:start + bs].to(self.device, non_blocking=True)
            chunks.append(self.embed_pixels(chunk, normalize=normalize, check=False))
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
            BadInputError: ``paths`` is not a list of paths.
        """
        if not isinstance(paths, (list, tuple)) or not all(_is_path(p) for p in paths):
            raise BadInputError("paths: embed_files takes a list of file paths; use embed() for other inputs.")
        bs = batch_size or self.batch_size
        pin = self.device.type == "cuda"
        rows, indices, failures = [], [], []
        for idx, batch, failed in iter_file_batches(paths, self._geometry(preprocess), bs, self.num_workers, pin):
            if failed and not skip_bad:
                raise ImageReadError(failed[0].path, failed[0].reason)
            failures.extend(failed)
            if batch is not None:
                x = batch.to(self.device, non_blocking=True).to(torch.float32).div_(255.0)
                rows.append(self.embed_pixels(x, normalize=normalize, check=False))
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

    def _paired(self, a: Images, b: Images) -> tuple[torch.Tensor, torch.Tensor]:
        ea, eb = self._embed(a, "a"), self._embed(b, "b")
        _check_pairable(len(ea), len(eb), "a", "b")
        return ea, eb

    def similarity(self, a: Images, b: Images) -> torch.Tensor:
        """Cosine similarity of paired inputs, in [-1, 1]: (N,) for N pairs; one side may be a single image.

        Raises:
            BadInputError: an input that is not an image, or counts that cannot be paired.
        """
        ea, eb = self._paired(a, b)
        return (ea * eb).sum(-1).clamp_(-1.0, 1.0)

    def distance(self, a: Images, b: Images) -> torch.Tensor:
        """``1 - cos`` of paired inputs, in [0, 2]: (N,) for N pairs; one side may be a single image.

        Raises:
            BadInputError: an input that is not an image (the message names ``a`` or ``b``), or counts
                that cannot be paired.
        """
        return embedding_distance(*self._paired(a, b))

    def distance_matrix(self, a: Images, b: Images | None = None) -> torch.Tensor:
        """(N, M) distances in [0, 2] between every image of ``a`` and every image of ``b`` (default: ``a``,
        with an exact 0 diagonal)."""
        ea = self._embed(a, "a")
        if b is None:
            return embedding_distance_matrix(ea, ea).fill_diagonal_(0.0)
        return embedding_distance_matrix(ea, self._embed(b, "b"))

    def _geometry(self, preprocess: Preprocess | None) -> Preprocess:
        if preprocess is None:
            return self.preprocess
        if preprocess.image_size != self.image_size:
            raise BadInputError(f"preprocessing to {preprocess.image_size} px does not fit the model's "
                                f"{self.image_size} px input.")
        return preprocess

    @staticmethod
    def _as_list(images: Images, name: str = "images") -> list:
        """``images`` as a non-empty list of image-like items.

        Raises:
            BadInputError: nothing given, or an item that is not a path, PIL image, tensor or array.
        """
        if _is_array(images) or _is_path(images) or isinstance(images, Image.Image):
            return [images]
        if isinstance(images, (bytes, bytearray, memoryview)):
            raise BadInputError(f"{name}: raw bytes are not an image; pass a path, or decode them first "
                                "(PIL.Image.open(io.BytesIO(data))).")
        try:
            items = list(images)
        except TypeError:
            raise BadInputError(f"{name}: expected an image (path, PIL image, tensor or NumPy array) or a list "
                                f"of them; got {type(images).__name__}.") from None
        if not items:
            raise BadInputError(f"{name}: no images given.")
        for i, item in enumerate(items):
            if not (_is_array(item) or _is_path(item) or isinstance(item, Image.Image)):
                raise BadInputError(f"{name}[{i}]: cannot use {type(item).__name__} as an image; pass a path, "
                                    "PIL image, tensor or NumPy array.")
        return items


def _check_pairable(n_a: int, n_b: int, name_a: str, name_b: str) -> None:
    """Raise BadInputError unless the counts are equal or one side is a single image."""
    if n_a != n_b and 1 not in (n_a, n_b):
        raise BadInputError(f"cannot pair {n_a} images of {name_a} with {n_b} of {name_b}; give equal counts or "
                            "one image on one side.")


def _rgb(img: Image.Image) -> Image.Image:
    from .io.images import to_rgb

    return to_rgb(img)


def load_metric(model: str = DEFAULT_MODEL, *, device: str | torch.device = "auto",
                dtype: str | torch.dtype = "fp32", checkpoint: str | Path | None = None,
                batch_size: int = 32, num_workers: int | None = None, with_text: bool = False,
                resize: int | None = None, crop: int | None = None, pooling: str | None = None,
                input_range: str = "0,1", compile: bool = False, head: str | Path | None = None,
                adapter: str | Path | None = None) -> PerceptualMetric:
    """Load a perceptual metric by zoo name, ``hf-hub:`` id, local directory, or arch + checkpoint.

    The metric comes in eval mode with every parameter frozen (``requires_grad=False``): gradients
    still flow to its inputs. To fine-tune it, unfreeze it: ``metric.requires_grad_(True)`` (or
    ``metric.encoder.requires_grad_(True)``, leaving a text tower frozen), ``metric.train()`` if the
    backbone has dropout, and give ``metric.parameters()`` to the optimizer.

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
        input_range: where float tensor/array values lie: ``"0,1"`` (default), ``"-1,1"`` (as LPIPS
            takes) or ``"0,255"``; uint8 always holds 0..255 (see :class:`PerceptualMetric`).
        compile: run the encoder's backbone through ``torch.compile`` (compiled at the first forward, and
            again for new shapes/dtypes: pays off for long GPU runs such as attacks and large evaluations).
            Convolutional backbones on CUDA also run in channels-last memory format, compile or not
            (see :func:`percept_cli.models.encoder.prefers_channels_last`).
        head: an MLP head file to put on the embedding (``.safetensors``, or a weights-only ``.pt`` such as
            the paper authors' Lightning checkpoints ``mlp-convnext_base_w-fare-eps4.pt``).
        adapter: a LoRA adapter directory (peft's ``adapter_config.json`` + ``adapter_model.safetensors``),
            merged into the weights. With ``head`` or ``adapter`` the preprocessing is the authors' for
            these models (224x224, no crop) unless ``resize``/``crop`` say otherwise. A trained model
            directory (``percept_model.json``) brings its own head and preprocessing.

    Raises:
        UnknownModelError, BadInputError (also: ``compile`` where torch.compile is unavailable),
        ModelUnavailableError, ModelFormatError.

    >>> metric = load_metric("rclip-f-convnext-b", device="cpu")  # doctest: +SKIP
    """
    input_range = parse_input_range(input_range)
    if compile:
        compile_available()  # before any loading work
    ref = parse_model_name(model, checkpoint)
    torch_device = resolve_device(device)
    encoder, source, text = load_encoder_and_text(ref, torch_device, resolve_dtype(dtype), with_text=with_text,
                                                  resize=resize, crop=crop, pooling=pooling, head=head,
                                                  adapter=adapter)
    encoder.set_compile(compile)
    metric = PerceptualMetric(encoder, source, batch_size=batch_size, num_workers=num_workers, text_encoder=text,
                              input_range=input_range)
    return metric.eval().requires_grad_(False)
