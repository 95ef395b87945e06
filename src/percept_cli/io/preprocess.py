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
        # channels first with NumPy: a torch permute+contiguous copy of a uint8 image goes through
        # torch's thread pool and took ~12 ms instead of ~0.1 ms in a busy main process
        return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C"))  # a writable copy

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """(3,S,S) float32 tensor in [0,1]."""
        return self.uint8(img).to(torch.float32).div_(255.0)

    def tensor(self, pixels, *, input_range: str = "0,1", check: bool = True, name: str = "pixels") -> torch.Tensor:
        """Bring a (3,H,W) or (B,3,H,W) tensor (or NumPy array) to (B,3,S,S) float in [0,1].

        Values as :func:`as_pixel_batch` reads them (uint8 divided by 255; float in ``input_range``).
        Other sizes go through the same geometry as files (antialiased interpolation).

        Raises:
            BadInputError: wrong type, shape or dtype, or values outside the input range.
        """
        x = as_pixel_batch(pixels, input_range=input_range, check=check, name=name)
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


INPUT_RANGES = {"0,1": (0.0, 1.0), "-1,1": (-1.0, 1.0), "0,255": (0.0, 255.0)}


def parse_input_range(value) -> str:
    """The canonical name (``"0,1"``, ``"-1,1"`` or ``"0,255"``) of an input range.

    Accepts those strings (spaces ignored) or the pairs ``(0, 1)``, ``(-1, 1)``, ``(0, 255)``.

    Raises:
        BadInputError: any other value.
    """
    if isinstance(value, (tuple, list)) and len(value) == 2:
        value = ",".join(f"{float(v):g}" for v in value)
    key = value.replace(" ", "") if isinstance(value, str) else None
    if key not in INPUT_RANGES:
        raise BadInputError(f"input_range must be one of {', '.join(map(repr, INPUT_RANGES))}; got {value!r}.")
    return key


def _as_tensor(pixels, name: str) -> torch.Tensor:
    """A tensor view of a tensor or NumPy array; NumPy (H,W,3)/(B,H,W,3) become channel-first."""
    if isinstance(pixels, torch.Tensor):
        return pixels
    if not isinstance(pixels, np.ndarray):
        raise BadInputError(f"{name}: expected an image tensor or NumPy array, got {type(pixels).__name__}.")
    if pixels.dtype != np.uint8 and pixels.dtype.kind != "f":
        raise BadInputError(f"{name}: image arrays must be uint8 or float; got {pixels.dtype}.")
    if not (pixels.flags.writeable and pixels.flags.c_contiguous):
        pixels = np.array(pixels, order="C")  # a writable contiguous copy (PIL gives read-only arrays)
    x = torch.from_numpy(pixels)
    if x.dim() in (3, 4) and x.shape[-1] == 3 and x.shape[-3] != 3:
        x = x.movedim(-1, -3)  # channel-last, as PIL/imageio/OpenCV give arrays
    return x


def as_pixel_batch(pixels, *, input_range: str = "0,1", check: bool = True, name: str = "pixels") -> torch.Tensor:
    """Validate an image tensor or NumPy array and return it as a (B,3,H,W) float32 batch in [0,1].

    Tensors are (3,H,W) or (B,3,H,W). NumPy arrays may also be channel-last, (H,W,3) or (B,H,W,3),
    as image libraries give them: an array whose last axis has 3 entries (and whose channel-first
    axis has not) is read as channel-last. uint8 values are always 0..255 and divided by 255;
    float values lie in ``input_range`` (``"0,1"``, ``"-1,1"`` as LPIPS takes, or ``"0,255"``)
    and are mapped linearly to [0,1]. ``check=False`` skips the value-range check (the one
    step that reads the values, i.e. a device sync on a GPU); dtype and shape are always checked.

    Raises:
        BadInputError: not a tensor/array, not 3 channels, not 3-D/4-D, an unsupported dtype, or
            (``check``) float values outside ``input_range``; the message starts with ``name``.
    """
    low, high = INPUT_RANGES[parse_input_range(input_range)]
    source = pixels
    x = _as_tensor(pixels, name)
    x = x.unsqueeze(0) if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[1] != 3:
        raise BadInputError(f"{name}: image tensors must be (3,H,W) or (B,3,H,W) (arrays also (H,W,3) or "
                            f"(B,H,W,3)); got shape {tuple(source.shape)}.")
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if not x.is_floating_point():
        raise BadInputError(f"{name}: image tensors must be uint8 or float in [{low:g},{high:g}]; got {x.dtype}.")
    if check and x.numel():
        lo, hi = torch.stack(torch.aminmax(x.detach())).float().tolist()  # one reduction, one sync
        tolerance = _RANGE_TOLERANCE * (high - low)
        if not (lo >= low - tolerance and hi <= high + tolerance):  # also catches NaN
            raise BadInputError(
                f"{name}: image values must lie in [{low:g},{high:g}]; got min {lo:.3g}, max {hi:.3g}.",
                "Pass raw pixels divided by 255 (or set input_range to \"0,255\" or \"-1,1\"), "
                "not mean/std-normalised inputs.")
    x = x.to(torch.float32)
    if (low, high) != (0.0, 1.0):
        x = (x - low) / (high - low)
    return x
