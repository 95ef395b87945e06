"""How a timm ViT's tokens become the embedding (``--pooling``).

DreamSim, which the paper follows for DINO, takes the class token of the last block before the
final LayerNorm (``cls_prenorm``); timm's own output is the class token after it (``token``).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..errors import BadInputError

# How a timm ViT's tokens become the embedding.
POOLINGS = {
    "cls_prenorm": "the class token after the last block, before the final LayerNorm (DreamSim's DINO features)",
    "token": "timm's own output: the class token after the final LayerNorm",
}


def set_vit_pooling(model: nn.Module, pooling: Optional[str], arch: str) -> Optional[str]:
    """Make a timm ViT return the embedding ``pooling`` names; returns the pooling in force.

    ``None`` keeps timm's own pooling (reported as its ``global_pool``; None for non-ViTs).
    ``cls_prenorm`` replaces the final ``norm`` by an identity, so ``forward`` returns the
    last block's class token (only for ViTs that pool the class token without an ``fc_norm``).

    Raises:
        BadInputError: an unknown pooling, or one the model cannot provide.
    """
    from timm.models.vision_transformer import VisionTransformer

    is_vit = isinstance(model, VisionTransformer)
    if pooling is None:
        return (getattr(model, "global_pool", None) or None) if is_vit else None
    check_pooling(pooling)
    pools_token = (is_vit and model.global_pool == "token" and model.has_class_token
                   and getattr(model, "attn_pool", None) is None and isinstance(model.fc_norm, nn.Identity)
                   and isinstance(model.head, nn.Identity))
    if not pools_token:
        what = f"pools '{model.global_pool}'" if is_vit else f"is a {type(model).__name__}, not a timm ViT"
        raise BadInputError(f"pooling '{pooling}' needs a timm ViT that pools its class token; '{arch}' {what}.",
                            "Leave the pooling at the model's default.")
    if pooling == "cls_prenorm":
        model.norm = nn.Identity()
    return pooling


def check_pooling(pooling: Optional[str]) -> None:
    """Raise BadInputError unless ``pooling`` is None or one of :data:`POOLINGS`."""
    if pooling is not None and pooling not in POOLINGS:
        raise BadInputError(f"unknown pooling '{pooling}'; use one of: {', '.join(POOLINGS)}.")


def refuse_pooling(pooling: Optional[str], name: str) -> None:
    """Raise BadInputError if a pooling was asked for a model (OpenCLIP) that has none to choose."""
    if pooling is not None:
        raise BadInputError(f"pooling '{pooling}' applies to timm ViTs; '{name}' is an OpenCLIP model, "
                            "whose visual tower pools its own way.")
