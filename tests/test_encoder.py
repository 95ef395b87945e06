"""PixelEncoder: normalisation inside the module, the head seam, dtype handling."""

from __future__ import annotations

import torch
from torch import nn

from percept_cli.models.encoder import MLPHead, PixelEncoder


class _Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 6)

    def forward(self, x):
        return self.proj(x.flatten(1))


def _encoder():
    torch.manual_seed(0)
    return PixelEncoder(_Flatten(), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), image_size=8).eval()


def test_normalisation_is_inside():
    enc = _encoder()
    x = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(enc(x), enc.backbone((x - mean) / std))


def test_mlp_head_is_residual_and_attaches():
    enc = _encoder()
    x = torch.rand(2, 3, 8, 8)
    base = enc(x)
    head = MLPHead(6, hidden=4)
    nn.init.zeros_(head.fc2.weight)
    nn.init.zeros_(head.fc2.bias)
    enc.set_head(head)
    torch.testing.assert_close(enc(x), base)  # zero residual branch: identity
    nn.init.normal_(head.fc2.weight)
    assert not torch.allclose(enc(x), base)
    enc.set_head(None)
    torch.testing.assert_close(enc(x), base)


def test_compute_dtype_keeps_float32_constants_and_output():
    enc = _encoder().set_compute_dtype(torch.bfloat16)
    enc.set_head(MLPHead(6, hidden=4))
    assert enc.compute_dtype == torch.bfloat16 and enc.head.fc1.weight.dtype == torch.bfloat16
    assert enc.mean.dtype == torch.float32
    out = enc(torch.rand(1, 3, 8, 8))
    assert out.dtype == torch.float32


def test_module_to_dtype_casts_like_set_compute_dtype_and_keeps_exact_constants():
    x = torch.rand(2, 3, 8, 8)
    cast = _encoder().to(torch.bfloat16)
    assert cast.compute_dtype == torch.bfloat16 and cast.mean.dtype == cast.std.dtype == torch.float32
    # the config's numbers, not a bf16 round trip of them (0.4 would become 0.400390625)
    assert cast.mean.flatten().tolist() == torch.tensor([0.5, 0.4, 0.3]).tolist()
    assert cast.std.flatten().tolist() == torch.tensor([0.2, 0.25, 0.3]).tolist()
    torch.testing.assert_close(cast(x), _encoder().set_compute_dtype(torch.bfloat16)(x), atol=0, rtol=0)
    double = _encoder().double()
    assert double.compute_dtype == torch.float64 and double.mean.dtype == torch.float32
    torch.testing.assert_close(double(x), _encoder()(x), atol=1e-6, rtol=0)
