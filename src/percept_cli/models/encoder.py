"""The encoder module: [0,1] pixels in, embedding out.

:class:`PixelEncoder` wraps a vision backbone (an OpenCLIP visual tower or a timm
model) together with its mean/std normalisation and an optional head, so every
caller (distance, attacks, inversion, training) works directly in pixel space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInputError
from ..io.preprocess import Preprocess


def prefers_channels_last(backbone: nn.Module, device: torch.device | str) -> bool:
    """Whether a backbone runs in channels-last memory format: only on CUDA, and only convolutional ones.

    A backbone counts as convolutional when it has more than one 2-D convolution (ConvNeXt, ResNet; a
    ViT's single patch-embedding convolution does not count). On CUDA, cuDNN's convolutions (ConvNeXt's
    7x7 depthwise ones above all, under bf16/fp16) are faster in NHWC and ConvNeXt's LayerNorm/MLP work on
    channels-last activations anyway; a ViT gains nothing. On the CPU it is left off: it gave no speed-up
    there in our measurements, and the default layout is what the reference implementations run.
    """
    if torch.device(device).type != "cuda":
        return False
    return sum(isinstance(module, nn.Conv2d) for module in backbone.modules()) > 1


def compile_available() -> None:
    """Raise BadInputError unless ``torch.compile`` can run here (it needs TorchDynamo support)."""
    if not callable(getattr(torch, "compile", None)):
        raise BadInputError(f"compile: torch {torch.__version__} has no torch.compile; load without it.")
    try:
        from torch import _dynamo

        supported = _dynamo.is_dynamo_supported()
    except Exception as exc:  # an unsupported Python/platform raises from inside torch
        raise BadInputError(f"compile: torch.compile does not work here ({exc}); load without it.") from exc
    if not supported:
        raise BadInputError("compile: torch.compile is not supported on this Python/platform; load without it.")


def _channel_constant(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32).view(1, 3, 1, 1)


class MLPHead(nn.Module):
    """One hidden layer with a residual connection: ``x + fc2(relu(fc1(x)))``.

    The head shape the paper's authors (after DreamSim) fine-tune on NIGHTS.

    Args:
        dim: embedding width (in and out).
        hidden: hidden width.
    """

    def __init__(self, dim: int, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class PixelEncoder(nn.Module):
    """A vision encoder that takes [0,1] RGB pixels and returns raw embeddings.

    Normalisation constants stay float32 whatever the backbone's dtype; the input
    is normalised in float32 and then cast to the backbone's dtype. The output is
    always float32.

    Args:
        backbone: module mapping normalised images (B,3,S,S) to (B,D) features.
        mean, std: per-channel normalisation from the model's config.
        image_size: the square input size S the backbone expects.
        head: optional module on top of the features (MLP head, ...); identity if None.
        preprocess: how files are brought to S x S for this model (resize, crop,
            interpolation); default: short side to S, center-crop S, bicubic.

    Speed switches, neither of which changes what is computed: :meth:`set_channels_last` (the backbone's
    weights and inputs in channels-last memory format; ``load_metric`` turns it on for convolutional
    backbones on CUDA, see :func:`prefers_channels_last`) and :meth:`set_compile` (``torch.compile`` of the
    backbone, compiled at the first forward).
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float],
                 image_size: int, head: nn.Module | None = None, preprocess: Preprocess | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()
        self.image_size = int(image_size)
        self.preprocess = preprocess if preprocess is not None else Preprocess(self.image_size)
        if self.preprocess.image_size != self.image_size:
            raise ValueError(f"preprocess makes {self.preprocess.image_size} px inputs, the encoder takes "
                             f"{self.image_size} px.")
        self._constants = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
        self.register_buffer("mean", _channel_constant(self._constants[0]), persistent=False)
        self.register_buffer("std", _channel_constant(self._constants[1]), persistent=False)
        self.channels_last = False
        self.compiled = False
        self._compiled_backbone: tuple | None = None  # (backbone, its torch.compile wrapper), made on first use

    def _apply(self, fn, recurse: bool = True):
        """What ``.to()``/``.half()``/``.double()`` run: the backbone and head take the new dtype, as
        :meth:`set_compute_dtype` does; ``mean``/``std`` follow the device but stay float32 (at full
        precision, rebuilt from the config's numbers rather than cast back)."""
        super()._apply(fn, recurse)
        if self.mean.dtype != torch.float32:
            device = self.mean.device
            self.mean = _channel_constant(self._constants[0]).to(device)
            self.std = _channel_constant(self._constants[1]).to(device)
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the backbone's parameters (the dtype the forward runs in)."""
        for param in self.backbone.parameters():
            return param.dtype
        return torch.float32

    def set_compute_dtype(self, dtype: torch.dtype) -> PixelEncoder:
        """Cast backbone and head to ``dtype``, keeping the normalisation in float32."""
        self.backbone.to(dtype)
        self.head.to(dtype)
        return self

    def set_head(self, head: nn.Module | None) -> PixelEncoder:
        """Attach (or with None, remove) a head; it takes the backbone's device and dtype."""
        head = head if head is not None else nn.Identity()
        self.head = head.to(device=self.mean.device, dtype=self.compute_dtype)
        return self

    def set_channels_last(self, enabled: bool = True) -> PixelEncoder:
        """Keep the backbone's 4-D weights, and feed it inputs, in channels-last memory format (or back to
        the default layout). The values computed are the same up to floating-point summation order."""
        self.backbone.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.channels_last = bool(enabled)
        return self

    def set_compile(self, enabled: bool = True) -> PixelEncoder:
        """Run the backbone through ``torch.compile`` (compiled lazily, at the first forward; later shapes,
        dtypes or devices recompile as torch.compile decides).

        Raises:
            BadInputError: ``torch.compile`` is not available in this torch/Python/platform.
        """
        if enabled:
            compile_available()
        self.compiled = bool(enabled)
        self._compiled_backbone = None
        return self

    def _run_backbone(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return self.backbone(x)
        if self._compiled_backbone is None or self._compiled_backbone[0] is not self.backbone:
            # kept in a tuple, not as a submodule: the state dict and .to() see only the backbone itself
            self._compiled_backbone = (self.backbone, torch.compile(self.backbone))
        return self._compiled_backbone[1](x)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map [0,1] pixels to the backbone's normalised input (float32)."""
        return (pixels.to(torch.float32) - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) pixels in [0,1] -> (B,D) float32 embeddings (not L2-normalised)."""
        x = self.normalize(pixels).to(self.compute_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self._run_backbone(x)).to(torch.float32)


class TextEncoder(nn.Module):
    """A CLIP text tower with its tokenizer: prompts in, L2-normalised float32 embeddings out.

    Args:
        clip_model: the OpenCLIP model (its ``encode_text`` is used).
        tokenizer: the model's tokenizer (``open_clip.get_tokenizer``).
    """

    def __init__(self, clip_model: nn.Module, tokenizer):
        super().__init__()
        self.model = clip_model
        self.tokenizer = tokenizer

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(texts)).to(device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)
