"""Feature and text inversion: monotone best-so-far, box and ball, seeds, text tower, grid."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tiny_models
from percept_cli import load_metric
from percept_cli.errors import BadInputError
from percept_cli.inversion import (InversionSettings, InversionTarget, contact_sheet, initial_images, invert,
                                   run_inversion, slug)


@pytest.fixture(scope="module")
def metric(tiny_vit):
    return load_metric(str(tiny_vit[0]), device="cpu", with_text=True)


@pytest.fixture(scope="module")
def target(metric):
    # a random direction: in this tiny random model all images embed close together, so an image
    # target would start at cos ~0.99 and leave nothing to measure
    g = torch.Generator().manual_seed(0)
    dim = metric.embed(torch.rand(1, 3, 224, 224, generator=g)).shape[-1]
    return F.normalize(torch.randn(dim, generator=g), dim=0)


def test_best_similarity_increases_monotonically(metric, target):
    result = invert(metric, target, [0, 1], InversionSettings(iters=15))
    trace = torch.tensor(result.trace)  # iterations x seeds
    assert trace.shape == (15, 2)
    assert bool((trace[1:] >= trace[:-1] - 1e-7).all())
    start_sim = metric.embed(result.start) @ target
    assert bool((result.similarity > start_sim + 0.05).all())
    torch.testing.assert_close(result.similarity, trace[-1], atol=1e-4, rtol=0)


def test_outputs_in_box_and_ball(metric, target):
    settings = InversionSettings(iters=10, radius=5.0, step_size=10.0)
    result = invert(metric, target, [0, 1, 2], settings)
    assert float(result.images.min()) >= 0 and float(result.images.max()) <= 1
    norms = (result.images - result.start).flatten(1).norm(dim=1)
    assert bool((norms <= 5.0 * (1 + 1e-5)).all()) and bool((norms > 1.0).all())


def test_start_is_grey_plus_small_noise():
    x = initial_images([0, 1], 32, 8 / 255, "cpu")
    assert float((x - 0.5).abs().max()) <= 8 / 255 + 1e-6
    assert not torch.equal(x[0], x[1])


def test_seeds_differ_and_repeat(metric, target):
    a = invert(metric, target, [3, 4], InversionSettings(iters=5))
    b = invert(metric, target, [3, 4], InversionSettings(iters=5))
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images[0], a.images[1])


def test_text_target_uses_tokenizer_and_text_tower(metric, tiny_vit):
    import open_clip

    _, model = tiny_vit
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_vit[0]}")
    with torch.no_grad():
        direct = F.normalize(model.encode_text(tokenizer(["a painting of a sunflower"])), dim=-1)[0]
    ours = metric.embed_text(["a painting of a sunflower"])[0]
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=1e-5)
    other = metric.embed_text(["a red sports car"])[0]
    assert float(ours @ other) < 0.999  # the prompt matters
    result = invert(metric, ours, [0], InversionSettings(iters=15))
    start_sim = float(metric.embed(result.start)[0] @ ours)
    assert float(result.similarity[0]) > start_sim + 0.05


def test_vision_only_and_empty_text_refused(tiny_vit, offline_hub):
    dino = load_metric("dino-vit-b16", device="cpu", with_text=True)
    with pytest.raises(BadInputError, match="no text tower"):
        dino.embed_text(["a cat"])
    metric = load_metric(str(tiny_vit[0]), device="cpu", with_text=True)
    with pytest.raises(BadInputError, match="empty"):
        metric.embed_text(["  "])


def test_augmented_method(metric, target):
    # lr 0.1 (the paper's, for real models) is too coarse for this random toy model, whose embedding has
    # none of the invariances the augmentations assume; the optimiser's mechanics are what is tested
    result = invert(metric, target, [0], InversionSettings(method="augmented", iters=30, lr=0.01, views=2))
    trace = torch.tensor(result.trace)
    assert bool((trace[1:] >= trace[:-1] - 1e-7).all())
    start_sim = float(metric.embed_pixels(result.start)[0] @ target)
    assert float(result.similarity[0]) > start_sim
    assert float(result.images.min()) >= 0 and float(result.images.max()) <= 1


def test_larger_output_size_optimised_through_resize(metric, target):
    result = invert(metric, target, [0], InversionSettings(iters=10, size=256))
    assert result.images.shape == (1, 3, 256, 256)
    start_sim = float(metric.embed_pixels(result.start)[0] @ target)
    assert float(result.similarity[0]) > start_sim + 0.05


@pytest.mark.parametrize("kwargs", [dict(radius=0.0), dict(iters=0), dict(method="dream"), dict(step_size=-1.0)])
def test_bad_settings(kwargs):
    with pytest.raises(BadInputError):
        InversionSettings(**kwargs)


def test_contact_sheet_size():
    images = torch.rand(3, 3, 40, 40)
    sheet = contact_sheet(images, ["a", "b", "c"], target=torch.rand(3, 40, 40), tile=40, pad=6, band=22)
    assert sheet.size == (4 * (40 + 6) + 6, 40 + 22 + 2 * 6)
    assert contact_sheet(images, ["a", "b", "c"], tile=40).size == (3 * 46 + 6, 40 + 22 + 12)


def test_slug():
    assert slug("A painting of a sunflower!") == "a-painting-of-a-sunflower" and slug("???") == "target"


# -- run_inversion: the whole job behind `percept invert` -----------------------------------------
def test_run_inversion_writes_the_documented_files(metric, tmp_path):
    out = tmp_path / "inv"  # not there yet: created
    run = run_inversion(metric, InversionTarget.text("A Sunflower!"), [3, 7], InversionSettings(iters=4), out,
                        save_every=2, grid=True)
    stem = "a-sunflower"  # the prompt, lower-cased, non-alphanumerics to '-'
    expected = {f"{stem}_seed3.png", f"{stem}_seed7.png", f"{stem}_grid.png",
                *(f"steps/{stem}_seed{s}_iter{k:04d}.png" for s in (3, 7) for k in (2, 4))}
    assert {str(p.relative_to(out)) for p in out.rglob("*.png")} == expected
    assert run.paths == [out / f"{stem}_seed3.png", out / f"{stem}_seed7.png"] and run.grid == out / f"{stem}_grid.png"
    assert sorted(map(str, run.intermediate)) == sorted(str(out / p) for p in expected if p.startswith("steps/"))
    assert run.failures == [] and run.judge_similarity is None
    for path, img in zip(run.paths, run.images):  # each file holds its seed's image, 8-bit
        expected_pixels = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(np.asarray(Image.open(path)), expected_pixels)
    assert Image.open(run.grid).size == (2 * (224 + 6) + 6, 224 + 22 + 12)  # no target tile for a prompt


def test_run_inversion_judge_similarity_is_the_judges_cosine(metric, tmp_path):
    import open_clip

    judge_model = tiny_models.save_open_clip_dir(tmp_path / "judge", tiny_models.VIT_CFG, seed=1)
    judge = load_metric(str(tmp_path / "judge"), device="cpu", with_text=True)
    prompt = "a red sports car"
    run = run_inversion(metric, InversionTarget.text(prompt), [0, 1], InversionSettings(iters=3), tmp_path / "out",
                        judge=judge)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'judge'}")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (tiny_models.CLIP_MEAN, tiny_models.CLIP_STD))
    with torch.no_grad():  # the judge's own text and image towers, straight from open_clip
        text = F.normalize(judge_model.encode_text(tokenizer([prompt])), dim=-1)[0]
        images = F.normalize(judge_model.encode_image((run.images - mean) / std), dim=-1)
    torch.testing.assert_close(run.judge_similarity, images @ text, atol=1e-5, rtol=0)
    assert not torch.allclose(run.judge_similarity, run.similarity, atol=1e-3)  # a different model's view


def test_run_inversion_returns_the_similarities_when_writes_fail(metric, tmp_path, monkeypatch):
    import percept_cli.io.outputs as outputs

    def disk_full(path, pixels):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "save_png", disk_full)
    run = run_inversion(metric, InversionTarget.text("a cat"), [0, 1], InversionSettings(iters=2), tmp_path,
                        grid=True, save_every=1)
    assert run.paths == [None, None] and run.grid is None and run.intermediate == []
    assert run.similarity.shape == (2,) and bool((run.similarity.abs() <= 1).all())
    # the first failed intermediate save stops the others; every final file is still tried
    assert [(f["option"], f["path"]) for f in run.failures] == [
        ("save_every", str(tmp_path / "steps" / "a-cat_seed0_iter0001.png")),
        ("save_every", str(tmp_path / "steps" / "a-cat_seed1_iter0001.png")),
        ("out_dir", str(tmp_path / "a-cat_seed0.png")), ("out_dir", str(tmp_path / "a-cat_seed1.png")),
        ("grid", str(tmp_path / "a-cat_grid.png"))]
    assert {f["reason"] for f in run.failures} == {"No space left on device"}


def test_inversion_target_names_and_checks():
    assert InversionTarget.image("photos/My Cat.JPG").name == "my-cat"
    assert InversionTarget.text("a painting of a sunflower").name == "a-painting-of-a-sunflower"
    with pytest.raises(BadInputError, match="empty"):
        InversionTarget.text("   ")
    with pytest.raises(BadInputError, match="kind"):
        InversionTarget("video", "x.mp4")


@pytest.mark.parametrize("method", ["apgd", "augmented"])
def test_both_methods_run_their_gradient_steps_under_the_requested_autocast(metric, target, method):
    """--dtype bf16 must reach the optimisation's forward passes for both methods (the final
    similarity stays fp32): the encoder sees autocast on during some calls and off during others."""
    seen = []
    handle = metric.encoder.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        settings = InversionSettings(method=method, iters=2, autocast_dtype="bf16")
        result = invert(metric, target, [0], settings)
    finally:
        handle.remove()
    assert True in seen and False in seen
    assert result.similarity.dtype == torch.float32
