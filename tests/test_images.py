"""Reading images: every bad file is one clear ImageReadError; every valid mode converts correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from percept_cli.errors import BadInputError, ImageReadError
from percept_cli.io.images import MIN_SIDE, check_image, list_images, path_problem, read_image


def _pixel(img, xy):
    return img.getpixel(xy)


def test_rgb_roundtrip_exact(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png")
    assert out.mode == "RGB" and out.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(out), arr)


@pytest.mark.parametrize("make, reason", [
    (lambda p: None, "file not found"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_text("hello, I am not a picture"), "not an image"),
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.symlink_to(p), "symlink loop"),
    (lambda p: p.symlink_to(p.with_name("elsewhere.png")), "broken symlink"),
])
def test_unreadable_files(tmp_path, make, reason):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert reason in str(info.value)
    assert str(path) in str(info.value)


def test_truncated_png_found_by_check_and_read(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        check_image(bad)
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(bad)
    assert check_image(good) == (64, 64)


def test_truncated_jpeg(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(good.read_bytes()[:600])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(bad)


def test_one_pixel_image_rejected(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "dot.png")
    with pytest.raises(ImageReadError, match="1x1 pixels"):
        read_image(tmp_path / "dot.png")
    Image.new("RGB", (MIN_SIDE, MIN_SIDE)).save(tmp_path / "ok.png")
    assert read_image(tmp_path / "ok.png").size == (MIN_SIDE, MIN_SIDE)


def test_decompression_bomb_rejected_before_decoding(tmp_path):
    side = int((Image.MAX_IMAGE_PIXELS * 1.2) ** 0.5) + 1  # over Pillow's limit, under its hard error
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)  # compresses to a few kB
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageReadError, match="too large"):
        check_image(path)
    with pytest.raises(ImageReadError, match="too large"):
        read_image(path)


def test_cmyk_white_is_white(tmp_path):
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    out = read_image(tmp_path / "c.jpg")
    assert out.mode == "RGB"
    assert all(v >= 250 for v in _pixel(out, (8, 8)))


def test_palette_image_keeps_colours(tmp_path):
    rgb = Image.new("RGB", (16, 16), (200, 30, 40))
    rgb.paste((10, 220, 90), (0, 0, 8, 16))
    rgb.convert("P", palette=Image.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert _pixel(out, (2, 2)) == (10, 220, 90) and _pixel(out, (12, 2)) == (200, 30, 40)


def test_alpha_is_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((255, 0, 0, 255), (0, 0, 8, 16))  # opaque red on the left
    rgba.paste((255, 0, 0, 128), (8, 0, 12, 16))  # half-transparent strip
    rgba.save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert _pixel(out, (2, 2)) == (255, 0, 0)
    assert _pixel(out, (14, 2)) == (255, 255, 255)
    r, g, b = _pixel(out, (10, 2))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_grayscale_alpha_and_palette_transparency(tmp_path):
    la = Image.new("LA", (16, 16), (0, 0))
    la.save(tmp_path / "la.png")
    assert _pixel(read_image(tmp_path / "la.png"), (3, 3)) == (255, 255, 255)
    p = Image.new("P", (16, 16), 0)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 8, 16))
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    out = read_image(tmp_path / "pt.png")
    assert _pixel(out, (2, 2)) == (0, 0, 255) and _pixel(out, (12, 2)) == (255, 255, 255)


def test_16bit_grayscale_is_rescaled(tmp_path):
    arr = np.zeros((16, 16), dtype=np.uint16)
    arr[:, :8] = 65535
    arr[:, 8:] = 128 * 257
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    assert _pixel(out, (2, 2)) == (255, 255, 255) and _pixel(out, (12, 2)) == (128, 128, 128)


def test_grayscale_and_bilevel(tmp_path):
    Image.new("L", (16, 16), 77).save(tmp_path / "l.png")
    assert _pixel(read_image(tmp_path / "l.png"), (0, 0)) == (77, 77, 77)
    Image.new("1", (16, 16), 1).save(tmp_path / "b.png")
    assert _pixel(read_image(tmp_path / "b.png"), (0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    out = read_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    top, bottom = _pixel(out, (10, 5)), _pixel(out, (10, 35))
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue at the bottom


def test_list_images_sorted_filtered_and_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.jpg", "notes.txt", "sub/c.png"):
        path = tmp_path / name
        if name.endswith(".txt"):
            path.write_text("x")
        else:
            Image.new("RGB", (16, 16)).save(path)
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.jpg", "b.png", "c.png"]


def test_list_images_empty_directory(tmp_path):
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(BadInputError, match="no image files"):
        list_images(tmp_path)


def test_path_problem_names_what_the_path_is(tmp_path):
    import os

    regular = tmp_path / "x.csv"
    regular.write_text("a,b\n")
    assert path_problem(regular) is None
    assert path_problem(tmp_path / "missing.csv") == "file not found"
    assert "directory" in path_problem(tmp_path)
    assert "not a regular file" in path_problem(os.devnull)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert "symlink loop" in path_problem(loop)


def test_empty_directory_hint_is_an_option_hint(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(BadInputError) as info:
        list_images(tmp_path)
    assert "--recursive" not in str(info.value)  # the library names no CLI flag
    assert "--recursive" in info.value.option_hints
    with pytest.raises(BadInputError) as info:
        list_images(tmp_path, recursive=True)
    assert not info.value.option_hints


# --- how many processes decode files (io.data.default_workers) ------------------------------------

@pytest.mark.parametrize("cores, local, n, batch, workers", [
    (16, None, 6360, 32, 15),   # NIGHTS' test split on a 16-core GPU machine: every core but the main one
    (2, None, 6360, 32, 1),     # this 2-core machine: one decoder beside the main process
    (1, None, 6360, 32, 1),     # a single core still gets one decoder (the floor)
    (16, None, 32, 32, 0),      # one batch: no process start-up at all
    (16, None, 100, 32, 4),     # 4 batches: no more decoders than batches
    (128, None, 100000, 32, 32),  # the cap
    (16, "4", 6360, 32, 3),     # torchrun, 4 processes on this machine: 16 // 4 cores each, less one
])
def test_decoders_use_every_available_core_but_one(monkeypatch, cores, local, n, batch, workers):
    import os

    from percept_cli.io import data

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 999)  # the affinity mask wins over the machine's count
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert data.default_workers(n, batch) == workers


def test_file_batches_come_back_in_order_with_failures_as_records(tmp_path):
    from percept_cli.io.data import iter_file_batches
    from percept_cli.io.preprocess import Preprocess

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 12), (40 * i, 0, 0)).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.insert(2, tmp_path / "bad.png")
    got = list(iter_file_batches(paths, Preprocess(8, crop=False), 3, num_workers=2))
    assert [indices for indices, _, _ in got] == [[0, 1], [3, 4, 5]]
    assert [(f.path, "not an image" in f.reason) for _, _, failed in got for f in failed] == [(str(paths[2]), True)]
    reds = torch.cat([batch[:, 0, 0, 0] for _, batch, _ in got]).tolist()
    assert reds == [0, 40, 80, 120, 160]  # decoded by two worker processes, in input order
