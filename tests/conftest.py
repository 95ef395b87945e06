"""Shared fixtures: tiny models in the Hub layouts, an offline Hub cache, synthetic images; the
``device`` parametrisation and the ``cuda`` marker (see :func:`cuda_test_device`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

# -- devices --------------------------------------------------------------------------------------
# Tests marked ``cuda`` (tests/test_cuda.py) are deselected by default (pyproject: -m 'not cuda');
# ``pytest -m cuda`` selects them. They run on the device cuda_test_device() names: ``cuda``, or what
# PERCEPT_TEST_DEVICE says (``cpu``: a dry run of the same bodies on a machine without a GPU).


def cuda_test_device() -> str:
    """The device the ``cuda``-marked tests run on: $PERCEPT_TEST_DEVICE, default ``cuda``."""
    return os.environ.get("PERCEPT_TEST_DEVICE", "cuda").strip().lower() or "cuda"


def available_devices() -> list[str]:
    """The devices device-parametrised tests run on: always ``cpu``; ``cuda`` where a GPU is present."""
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def pytest_collection_modifyitems(config, items):
    """A selected ``cuda`` test skips, with the reason, when its device is CUDA and no GPU is present."""
    import torch

    device = cuda_test_device()
    if not device.startswith("cuda") or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False (set "
                                   "PERCEPT_TEST_DEVICE=cpu to run these test bodies on the CPU)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=available_devices())
def device(request) -> str:
    """``cpu``, and ``cuda`` where a GPU is present: the same test body runs on each."""
    return request.param


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    """(directory, model): a 1-layer OpenCLIP ViT saved as open_clip_config.json + .safetensors."""
    directory = tmp_path_factory.mktemp("tiny-vit")
    model = tiny_models.save_open_clip_dir(directory, tiny_models.VIT_CFG, seed=0)
    return directory, model


@pytest.fixture(scope="session")
def other_vit(tmp_path_factory):
    """Another tiny ViT directory: the tiny_vit architecture with other weights (seed 1)."""
    directory = tmp_path_factory.mktemp("other-vit")
    tiny_models.save_open_clip_dir(directory, tiny_models.VIT_CFG, seed=1)
    return directory


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory):
    """A huggingface_hub cache holding a tiny stand-in under every zoo repo id."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    tiny_models.build_zoo_cache(cache, root / "work")
    return cache


@pytest.fixture
def offline_hub(zoo_cache, monkeypatch):
    """Point huggingface_hub at the stand-in cache with HF_HUB_OFFLINE=1 (env and live constants)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(zoo_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(zoo_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return zoo_cache


@pytest.fixture
def empty_offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache, offline: nothing can be loaded from the Hub."""
    from huggingface_hub import constants

    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def make_picture(seed: int, size=(96, 64)) -> Image.Image:
    """A deterministic RGB picture: a noisy background and a few coloured shapes."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 80 + rng.integers(0, 170, 3)).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        x1, y1 = x0 + rng.integers(2, max(3, size[0] // 2)), y0 + rng.integers(2, max(3, size[1] // 2))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


@pytest.fixture
def image_dir(tmp_path):
    """A directory of five distinct PNG pictures (a.png ... e.png)."""
    directory = tmp_path / "images"
    directory.mkdir()
    for i, name in enumerate("abcde"):
        make_picture(i).save(directory / f"{name}.png")
    return directory


# -- training (tests/training) ---------------------------------------------------------------------
TINY64_CFG = {"embed_dim": 16,
              "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
              "text_cfg": tiny_models.TEXT_CFG}


@pytest.fixture(scope="session")
def tiny64(tmp_path_factory):
    """A 1-layer OpenCLIP ViT at 64 px (with its text tower) in the Hub layout."""
    directory = tmp_path_factory.mktemp("tiny64")
    tiny_models.save_open_clip_dir(directory, TINY64_CFG, seed=0)
    return directory


def make_images(root, classes=("cat", "dog"), per_class=20, size=24, seed=0):
    """Random-noise PNGs in ``root/CLASS/``; class ``k`` is brighter by ``k`` steps (learnable)."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 120, (size, size, 3)) + 100 * k
            Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def train_images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("train-images"))


@pytest.fixture(scope="session")
def small_nights(tmp_path_factory):
    """48 training and 12 val triplets with fixed (arbitrary) human labels."""
    rows = [{"id": i, "right_vote": (i * 7 % 5) % 2, "votes": 6, "split": "train" if i < 48 else "val"}
            for i in range(60)]
    from synthetic_datasets import make_nights

    return make_nights(tmp_path_factory.mktemp("nights"), rows, size=(32, 32))


def train_settings(model, out, **extra) -> dict:
    """Small, fast run settings (every field can be overridden)."""
    base = {"model": str(model), "out": str(out), "batch_size": 8, "eval_every": 0, "save_every": 0,
            "log_every": 1, "workers": 0, "warmup": 0}
    base.update(extra)
    return base
