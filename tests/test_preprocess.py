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


# --- the other geometries: ConvNeXt's 256 -> 224, no-crop resizes, and the zoo's choices -----------

SIZES = [(96, 64), (64, 96), (300, 300), (50, 500), (333, 257)]


def _torchvision(*steps):
    from torchvision import transforms

    return transforms.Compose([*steps, transforms.ToTensor()])


def _resize_no_crop(size=224, interpolation="bicubic"):
    from torchvision import transforms

    mode = transforms.InterpolationMode.BICUBIC if interpolation == "bicubic" else transforms.InterpolationMode.BILINEAR
    return _torchvision(transforms.Resize((size, size), interpolation=mode))


def _resize_crop(resize, crop):
    from torchvision import transforms

    return _torchvision(transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
                        transforms.CenterCrop(crop))


@pytest.mark.parametrize("size", SIZES)
def test_resize_256_crop_224_matches_the_authors_convnext_transform(size):
    """The authors build OpenCLIP's 256 px eval transform and swap its CenterCrop for CenterCrop(224)."""
    import open_clip
    from torchvision import transforms

    reference = open_clip.image_transform(256, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert isinstance(reference.transforms[1], transforms.CenterCrop)
    reference.transforms[1] = transforms.CenterCrop(224)
    img = make_picture(4, size)
    ours, theirs = Preprocess(224, resize=256)(img), reference(img)
    assert ours.shape == theirs.shape == (3, 224, 224)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_no_crop_matches_torchvision_resize_to_square(size):
    img = make_picture(6, size)
    torch.testing.assert_close(Preprocess(224, crop=False)(img), _resize_no_crop()(img), atol=1e-6, rtol=0)


def test_bilinear_no_crop_matches_torchvision_default_upsampling():
    """The authors' BAPPS pipeline: 64x64 patches through torchvision's default Resize(224) (bilinear)."""
    from torchvision import transforms

    img = make_picture(7, (64, 64))
    ours = Preprocess(224, crop=False, interpolation="bilinear")(img)
    torch.testing.assert_close(ours, _torchvision(transforms.Resize(224))(img), atol=1e-6, rtol=0)
    assert not torch.allclose(ours, Preprocess(224, crop=False)(img), atol=1e-3)  # bicubic differs


@pytest.mark.parametrize("pre, other", [(Preprocess(48, resize=56), Preprocess(48, crop=False)),
                                        (Preprocess(48, crop=False), Preprocess(48, resize=56))],
                         ids=["resize-crop", "no-crop"])
@pytest.mark.parametrize("size", [(120, 80), (80, 120), (30, 200)])
def test_tensor_path_follows_the_same_geometry(pre, other, size):
    import numpy as np

    img = make_picture(8, size)
    pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    from_pil, from_tensor = pre(img), pre.tensor(pixels)[0]
    assert from_tensor.shape == from_pil.shape == (3, 48, 48)
    gap = (from_pil - from_tensor).abs().mean()
    assert gap < 0.03  # two resamplers: close, not bit-equal
    assert (other.tensor(pixels)[0] - from_pil).abs().mean() > 2 * gap  # ... and closer than the other geometry


# The preprocessing each kind of zoo model was evaluated with, written from the authors' code:
# ConvNeXt-B (trained at 256 px): OpenCLIP's resize to 256 then CenterCrop(224); CLIP ViTs: 224 then 224;
# DINO as DreamSim: Resize((224, 224)) without crop. All bicubic.
ZOO_GEOMETRY = {
    "rclip-f-convnext-b": lambda: _resize_crop(256, 224),
    "clip-convnext-b": lambda: _resize_crop(256, 224),
    "rclip-t-vit-b16": lambda: _resize_crop(224, 224),
    "rclip-t-vit-b32": lambda: _resize_crop(224, 224),
    "rclip-f4-vit-l14": lambda: _resize_crop(224, 224),
    "dino-vit-b16": lambda: _resize_no_crop(224),
}
OVERRIDES = [  # (zoo name, load_metric overrides, the transform they must give)
    ("rclip-f-convnext-b", {"resize": 224}, lambda: _resize_crop(224, 224)),
    ("rclip-f-convnext-b", {"resize": 224, "crop": 0}, lambda: _resize_no_crop(224)),
    ("rclip-t-vit-b16", {"crop": 0}, lambda: _resize_no_crop(224)),
    ("dino-vit-b16", {"crop": 224}, lambda: _resize_crop(224, 224)),
]


@pytest.mark.parametrize("name, overrides, reference",
                         [pytest.param(n, {}, g, id=n) for n, g in ZOO_GEOMETRY.items()]
                         + [pytest.param(*case, id=f"{case[0]}-" + ",".join(f"{k}={v}" for k, v in case[1].items()))
                            for case in OVERRIDES])
def test_zoo_models_preprocess_as_evaluated(offline_hub, name, overrides, reference):
    from percept_cli import load_metric

    metric = load_metric(name, device="cpu", **overrides)
    images = [make_picture(9, (150, 100)), make_picture(10, (100, 150))]
    expected = torch.stack([reference()(img) for img in images])
    torch.testing.assert_close(metric.pixels(images), expected, atol=1e-6, rtol=0)


def test_every_zoo_entry_has_a_stated_geometry():
    from percept_cli.models import zoo

    by_backbone = {"ConvNeXt-B": (256, 224), "ViT-B/16": (224, 224), "ViT-B/32": (224, 224), "ViT-L/14": (224, 224)}
    for spec in zoo.list_models():
        expected = (224, None) if spec.family == "timm" else by_backbone[spec.backbone]
        assert (spec.resize, spec.crop) == expected, spec.name


def test_numpy_layouts_match_the_tensor_layout():
    import numpy as np

    chw = torch.randint(0, 256, (2, 3, 9, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = chw.float() / 255
    hwc = chw.permute(0, 2, 3, 1).numpy()  # (B, H, W, 3), as image libraries give arrays
    torch.testing.assert_close(as_pixel_batch(hwc), expected, atol=0, rtol=0)
    torch.testing.assert_close(as_pixel_batch(hwc[0]), expected[:1], atol=0, rtol=0)  # (H, W, 3)
    torch.testing.assert_close(as_pixel_batch(chw.numpy()), expected, atol=0, rtol=0)  # (B, 3, H, W)
    torch.testing.assert_close(as_pixel_batch(hwc[0].astype(np.float64) / 255), expected[:1], atol=1e-7, rtol=0)
    for bad in (hwc.astype(np.int64), hwc.astype(bool), np.zeros((4, 9, 9))):
        with pytest.raises(BadInputError, match="^pixels: "):
            as_pixel_batch(bad)


@pytest.mark.parametrize("input_range, low, high", [("-1,1", -1.0, 1.0), ("0,255", 0.0, 255.0),
                                                     ((0, 255), 0.0, 255.0), (" -1, 1 ", -1.0, 1.0)])
def test_input_ranges_map_linearly_to_0_1(input_range, low, high):
    x = torch.tensor([0.0, 0.25, 0.5, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    given = low + x * (high - low)  # the same pixels written in the other range
    torch.testing.assert_close(as_pixel_batch(given, input_range=input_range), x, atol=1e-6, rtol=0)
    with pytest.raises(BadInputError, match=rf"^img: image values must lie in \[{low:g},{high:g}\]"):
        as_pixel_batch(given + (high - low) * 0.01, input_range=input_range, name="img")
    uint8 = (x * 255).to(torch.uint8)  # uint8 always holds 0..255
    torch.testing.assert_close(as_pixel_batch(uint8, input_range=input_range), uint8.float() / 255, atol=0, rtol=0)


def test_unknown_input_range_and_check_false():
    with pytest.raises(BadInputError, match="input_range"):
        as_pixel_batch(torch.rand(3, 4, 4), input_range="0,2")
    y = as_pixel_batch(torch.full((3, 4, 4), 7.0), check=False)  # the escape: values not read
    assert float(y.max()) == 7.0
    with pytest.raises(BadInputError, match="NaN|must lie"):
        as_pixel_batch(torch.full((3, 4, 4), float("nan")))


# --- files through the decoding workers: full-resolution decoding, no JPEG draft shortcut ------------

@pytest.mark.parametrize("size", [(1024, 768), (2000, 1500)])
def test_large_jpeg_files_decode_at_full_resolution_like_torchvision(tmp_path, size):
    """A JPEG much larger than the input goes through the file pipeline exactly as torchvision's
    Resize(256, bicubic) + CenterCrop(224) on the fully decoded file: uint8 for uint8, no difference.
    Pillow's ``draft`` (decoding at a reduced DCT scale, 2-5x faster) would not be: the test shows it
    changes pixels, which is why it is not used."""
    from PIL import Image
    from torchvision import transforms

    from percept_cli.io.data import iter_file_batches

    path = tmp_path / "big.jpg"
    make_picture(3, (size[0] // 16, size[1] // 16)).resize(size, Image.BICUBIC).save(path, quality=90)
    reference = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(224), transforms.PILToTensor()])
    expected = reference(Image.open(path).convert("RGB"))
    [(indices, batch, failures)] = list(iter_file_batches([path], Preprocess(224, resize=256), 4, num_workers=0))
    assert indices == [0] and failures == [] and batch.dtype == torch.uint8
    assert torch.equal(batch[0], expected)
    drafted = Image.open(path)
    drafted.draft("RGB", (256 * size[0] // size[1], 256))  # the shortcut: decode at 1/2, 1/4 or 1/8 scale
    assert drafted.size != size
    difference = (reference(drafted.convert("RGB")).int() - expected.int()).abs()
    assert difference.max() >= 2  # measured: up to 3 (1024x768) and 4 (2000x1500) levels of 255
