"""Checks of the arguments the attack tasks take: one BadInputError naming the argument, once per call.

Attacks work on [0,1] pixels (the space eps is measured in) whatever a metric's ``input_range``
says; uint8 tensors/arrays are divided by 255. None of these checks runs inside an attack's loop.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import BadInputError
from ..io.preprocess import as_pixel_batch


def pixel_batch(metric, value, name: str, *, attacked: bool = False, check: bool = True) -> torch.Tensor:
    """``value`` as a (B,3,H,W) float [0,1] batch; an ``attacked`` batch must be at the model's input size.

    Raises:
        BadInputError: not an image tensor/array, wrong shape or dtype, values outside [0,1]
            (``check``), or (``attacked``) a size other than the model's.
    """
    x = as_pixel_batch(value, name=name, check=check)
    size = getattr(metric, "image_size", None)
    if attacked and size is not None and tuple(x.shape[-2:]) != (size, size):
        raise BadInputError(f"{name}: the attacked images must be at the model's input size {size}x{size}; got "
                            f"{x.shape[-2]}x{x.shape[-1]}. Preprocess them with metric.pixels(...).")
    return x


def embedding_batch(value, name: str, dim: Optional[int] = None) -> torch.Tensor:
    """``value`` as a (B, D) float embedding batch (D = ``dim`` when given).

    Raises:
        BadInputError: not a 2-D floating-point tensor, or another width than ``dim``.
    """
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise BadInputError(f"{name}: expected (B, D) float embeddings (metric.embed_pixels(...)); got {shape}.")
    if dim is not None and value.shape[1] != dim:
        raise BadInputError(f"{name}: expected embeddings of width {dim} like the others; got {value.shape[1]}.")
    return value


def label_batch(label, size: int, *, check: bool = True) -> Optional[torch.Tensor]:
    """``label`` as a (B,) long tensor of 0 (left) / 1 (right), or None.

    Raises:
        BadInputError: not B entries, or (``check``) an entry other than 0 or 1.
    """
    if label is None:
        return None
    try:
        value = torch.as_tensor(label)
    except (TypeError, ValueError, RuntimeError):
        raise BadInputError(f"label: expected {size} labels of 0 (left) or 1 (right); got "
                            f"{type(label).__name__}.") from None
    if value.dim() != 1 or len(value) != size or value.is_complex():
        raise BadInputError(f"label: expected {size} labels of 0 (left) or 1 (right); got shape "
                            f"{tuple(value.shape)}.")
    if check and not bool(((value == 0) | (value == 1)).all()):
        raise BadInputError("label: each label must be 0 (left) or 1 (right).")
    return value.long()


def same_batch(**named: Optional[torch.Tensor]) -> None:
    """Raise BadInputError naming the arguments unless every given tensor has the same batch size."""
    sizes = {name: len(value) for name, value in named.items() if value is not None}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise BadInputError(f"batch sizes differ ({listed}); give one entry per example in each.")
