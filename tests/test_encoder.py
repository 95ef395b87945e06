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


# --- speed switches: channels-last and torch.compile change nothing that is computed ----------------

def _convnext_encoder():
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model("convnext_atto", pretrained=False, num_classes=0, dims=(8, 16, 16, 16),
                                 depths=(1, 1, 1, 1)).eval()
    return PixelEncoder(backbone, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), image_size=64).eval()


def test_channels_last_is_chosen_for_conv_backbones_on_cuda_only():
    import timm

    from percept_cli.models.encoder import prefers_channels_last

    convnext = _convnext_encoder().backbone
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, embed_dim=32, depth=1,
                            num_heads=2)
    assert prefers_channels_last(convnext, torch.device("cuda"))
    assert prefers_channels_last(convnext, "cuda:1")
    assert not prefers_channels_last(convnext, "cpu")
    assert not prefers_channels_last(vit, "cuda")  # one patch-embedding convolution: not a conv backbone


def test_channels_last_forced_on_cpu_gives_the_same_embeddings():
    enc = _convnext_encoder()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        default = enc(x)
        enc.set_channels_last(True)
        fast = enc(x)
    convs = [m for m in enc.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not all(c.weight.is_contiguous() for c in convs)  # the layout really changed
    torch.testing.assert_close(fast, default, atol=1e-5, rtol=1e-5)
    assert fast.dtype == torch.float32 and fast.is_contiguous()


def _recording_compile(calls):
    """A stand-in for torch.compile: records what it compiles and every call of the result, runs it eagerly."""
    def compile_(module, **kwargs):
        calls.append(("compile", module))

        def run(*args, **kw):
            calls.append(("call", args[0].shape))
            return module(*args, **kw)
        return run
    return compile_


def test_compile_wraps_the_backbone_lazily_and_changes_nothing(monkeypatch):
    enc = _convnext_encoder()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        eager, eager_one = enc(x), enc(x[:1])
    calls = []
    monkeypatch.setattr(torch, "compile", _recording_compile(calls))
    enc.set_compile(True)
    assert calls == []  # nothing compiled before the first forward
    with torch.no_grad():
        first, second = enc(x), enc(x[:1])
    assert calls == [("compile", enc.backbone), ("call", (2, 3, 64, 64)), ("call", (1, 3, 64, 64))]
    assert torch.equal(first, eager) and torch.equal(second, eager_one)
    assert "_compiled_backbone" not in " ".join(enc.state_dict())  # the wrapper is no submodule
    enc.set_compile(False)
    with torch.no_grad():
        enc(x)
    assert len(calls) == 3


def test_compile_where_torch_has_none_is_a_clear_error(monkeypatch):
    import pytest

    from percept_cli.errors import BadInputError

    monkeypatch.delattr(torch, "compile")
    with pytest.raises(BadInputError, match="torch.compile"):
        _encoder().set_compile(True)
