"""Device and dtype names as users type them: ``auto|cpu|cuda[:N]|mps`` and ``fp32|bf16|fp16``."""

from __future__ import annotations

import re

import torch

from .errors import BadInputError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn a device name into a torch.device that exists on this machine.

    ``auto`` picks CUDA, then MPS, then CPU.

    Raises:
        BadInputError: malformed name, or a device that is not present.
    """
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    if not _DEVICE.match(text):
        raise BadInputError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps.")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInputError(f"device '{name}' requested but CUDA is not available on this machine.",
                                "Use --device cpu (or auto).")
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise BadInputError(f"device '{name}' does not exist; this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s).")
    if text == "mps" and not _mps_available():
        raise BadInputError("device 'mps' requested but MPS is not available on this machine.")
    return torch.device(text)


def resolve_dtype(name: str | torch.dtype = "fp32") -> torch.dtype:
    """Turn ``fp32|bf16|fp16`` (or a torch.dtype) into a torch.dtype.

    Raises:
        BadInputError: an unknown name.
    """
    if isinstance(name, torch.dtype):
        if name not in DTYPE_NAMES:
            raise BadInputError(f"unsupported dtype {name}; use fp32, bf16 or fp16.")
        return name
    key = (name or "fp32").strip().lower()
    if key not in DTYPES:
        raise BadInputError(f"unknown dtype '{name}'; use fp32, bf16 or fp16.")
    return DTYPES[key]


def autocast_name(dtype: torch.dtype | None) -> str | None:
    """The name of an autocast precision: None for no autocast (None or fp32), else ``bf16``/``fp16``."""
    return None if dtype in (None, torch.float32) else DTYPE_NAMES.get(dtype, str(dtype))
