"""Preprocessing as in the paper: resize, center-crop, pixels in [0,1].

Two geometries, both as torchvision/OpenCLIP compute them, without the mean/std step
(it lives inside the encoder):

* resize the short side to ``resize`` and center-crop ``image_size`` (``Resize(int)`` +
  ``CenterCrop``; OpenCLIP's eval transform; the authors' ConvNeXt protocol is 256 -> 224);
* ``crop=False``: resize both sides to ``image_size`` without a crop (``Resize((S, S))``, aspect
  not kept), as the authors' NIGHTS-fine-tuned MLP/LoRA models and their BAPPS upsampling use.

PIL images go through Pillow (as torchvision does for PIL input); tensors through
``torch.nn.functional.interpolate`` with antialiasing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import BadInputError

_RANGE_TOLERANCE = 1e-4
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after scaling the short side to ``size`` (torchvision's rounding)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _crop_box(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of a centered ``size`` crop (torchvision's rounding)."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


@dataclass(frozen=True)
class Preprocess:
    """The geometry from an image to the model's (3, S, S) input.

    Args:
        image_size: S, the model's input size (the crop size).
        resize: the short side before the crop (``None``: S). Ignored when ``crop`` is False.
        crop: center-crop S after resizing the short side (True), or resize both sides to S (False).
        interpolation: ``bicubic`` (the paper's models) or ``bilinear`` (the authors' BAPPS upsampling).

    >>> Preprocess(224).uint8(Image.new("RGB", (640, 480))).shape
    torch.Size([3, 224, 224])
    >>> Preprocess(224, resize=256).describe()
    'resize short side 256 (bicubic), center-crop 224'
    """

    image_size: int
    resize: Optional[int] = None
    crop: bool = True
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise BadInputError(f"unknown interpolation '{self.interpolation}'; use bicubic or bilinear.")
        if self.image_size < 1 or (self.resize is not None and self.resize < 1):
            raise BadInputError(f"image sizes must be positive; got resize {self.resize}, crop {self.image_size}.")
        if self.crop and self.resize is not None and self.resize < self.image_size:
            raise BadInputError(f"the crop ({self.image_size}) cannot be larger than the resized short side "
                                f"({self.resize}).")

    @property
    def short_side(self) -> int:
        """The short side after resizing (S when there is no separate resize)."""
        return self.image_size if self.resize is None or not self.crop else self.resize

    def describe(self) -> str:
        """One line for humans and results files."""
        if not self.crop:
            return f"resize to {self.image_size}x{self.image_size} ({self.interpolation}), no crop"
        return f"resize short side {self.short_side} ({self.interpolation}), center-crop {self.image_size}"

    def as_dict(self) -> dict:
        """The settings as a JSON-ready dict (results documents)."""
        return {"resize": self.short_side, "crop": self.image_size if self.crop else None,
                "interpolation": self.interpolation}

    def pil(self, img: Image.Image) -> Image.Image:
        """Resize and crop an RGB PIL image to image_size x image_size."""
        size, resample = self.image_size, INTERPOLATIONS[self.interpolation]
        if not self.crop:
            return img if img.size == (size, size) else img.resize((size, size), resample)
        new_w, new_h = _resized_size(*img.size, self.short_side)
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), resample)
        if (new_w, new_h) != (size, size):
            left, top = _crop_box(new_w, new_h, size)
            img = img.crop((left, top, left + size, top + size))
        return img

    def uint8(self, img: Image.Image) -> torch.Tensor:
        """(3,S,S) uint8 tensor of a preprocessed RGB PIL image (cheap to send between processes)."""
        arr = np.asarray(self.pil(img), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """(3,S,S) float32 tensor in [0,1]."""
        return self.uint8(img).to(torch.float32).div_(255.0)

    def tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """Bring a (3,H,W) or (B,3,H,W) tensor to (B,3,S,S) float in [0,1].

        uint8 tensors are divided by 255; float tensors must already be in [0,1].
        Other sizes go through the same geometry as files (antialiased interpolation).

        Raises:
            BadInputError: wrong shape or values outside [0,1].
        """
        x = as_pixel_batch(pixels)
        size = self.image_size
        height, width = x.shape[-2:]
        if (height, width) == (size, size):
            return x
        if not self.crop:
            new_w, new_h = size, size
        else:
            new_w, new_h = _resized_size(width, height, self.short_side)
        x = F.interpolate(x, size=(new_h, new_w), mode=self.interpolation, align_corners=False, antialias=True)
        left, top = _crop_box(new_w, new_h, size)
        return x[..., top:top + size, left:left + size].clamp_(0.0, 1.0)


def as_pixel_batch(pixels: torch.Tensor) -> torch.Tensor:
    """Validate an image tensor and return it as (B,3,H,W) float32 in [0,1].

    Raises:
        BadInputError: not 3 channels, not 3-D/4-D, or float values outside [0,1].
    """
    if not isinstance(pixels, torch.Tensor):
        raise BadInputError(f"expected an image tensor, got {type(pixels).__name__}.")
    x = pixels.unsqueeze(0) if pixels.dim() == 3 else pixels
    if x.dim() != 4 or x.shape[1] != 3:
        raise BadInputError(f"image tensors must be (3,H,W) or (B,3,H,W); got shape {tuple(pixels.shape)}.")
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if not x.is_floating_point():
        raise BadInputError(f"image tensors must be uint8 or float in [0,1]; got {x.dtype}.")
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise BadInputError(
                f"image tensor values must lie in [0,1]; got min {lo:.3g}, max {hi:.3g}.",
                "Pass raw pixels divided by 255, not 0-255 values or mean/std-normalised inputs.")
    return x.to(torch.float32)
