"""Preprocessing matches OpenCLIP's own eval transform (minus mean/std) and keeps [0,1]."""

from __future__ import annotations

import pytest
import torch
from conftest import make_picture

from percept_cli.errors import BadInputError
from percept_cli.io.preprocess import Preprocess, as_pixel_batch


@pytest.mark.parametrize("size", [(96, 64), (64, 96), (300, 300), (50, 500), (17, 23)])
def test_matches_open_clip_transform(size):
    import open_clip

    img = make_picture(3, size)
    reference = open_clip.image_transform(224, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                          resize_mode="shortest", interpolation="bicubic")
    ours = Preprocess(224)(img)
    theirs = reference(img)
    assert ours.shape == theirs.shape == (3, 224, 224)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_output_range_and_dtype():
    x = Preprocess(32)(make_picture(0, (80, 40)))
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_tensor_path_resizes_and_keeps_range():
    x = torch.rand(2, 3, 50, 80)
    y = Preprocess(32).tensor(x)
    assert y.shape == (2, 3, 32, 32)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    same = torch.rand(3, 32, 32)
    assert torch.equal(Preprocess(32).tensor(same)[0], same)


def test_tensor_path_close_to_pil_path():
    img = make_picture(5, (120, 80))
    import numpy as np

    t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    a, b = Preprocess(48)(img), Preprocess(48).tensor(t)[0]
    assert (a - b).abs().mean() < 0.02  # two bicubic implementations: close, not bit-equal


@pytest.mark.parametrize("bad", [torch.rand(3, 3), torch.rand(1, 4, 8, 8), torch.rand(2, 3, 8, 8) * 255,
                                 torch.rand(2, 3, 8, 8) - 0.5, torch.zeros(1, 3, 8, 8, dtype=torch.int64)])
def test_bad_tensors_rejected(bad):
    with pytest.raises(BadInputError):
        as_pixel_batch(bad)


def test_uint8_tensors_scaled():
    x = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    assert float(as_pixel_batch(x).max()) == 1.0
