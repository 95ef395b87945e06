"""The public metric object: distance properties, agreement with OpenCLIP, input forms, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import tiny_models
from conftest import make_picture

from percept_cli import load_metric
from percept_cli.errors import BadInputError, ImageReadError
from percept_cli.io.preprocess import Preprocess


@pytest.fixture(scope="module")
def metric_and_model(tiny_vit):
    directory, model = tiny_vit
    return load_metric(str(directory), device="cpu", batch_size=2), model


def _direct_distance(model, a, b):
    mean = torch.tensor(tiny_models.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(tiny_models.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ea = F.normalize(model.encode_image((a - mean) / std), dim=-1)
        eb = F.normalize(model.encode_image((b - mean) / std), dim=-1)
    return 1 - F.cosine_similarity(ea, eb, dim=-1)


def test_identity_and_symmetry(metric_and_model, image_dir):
    metric, _ = metric_and_model
    a, b = str(image_dir / "a.png"), str(image_dir / "b.png")
    assert abs(float(metric.distance(a, a))) < 1e-6
    assert float(metric.distance(a, b)) > 1e-4
    assert float(metric.distance(a, b)) == pytest.approx(float(metric.distance(b, a)), abs=1e-6)


def test_agrees_with_direct_encode_image(metric_and_model, image_dir):
    metric, model = metric_and_model
    paths = [image_dir / f"{n}.png" for n in "abc"]
    pre = Preprocess(224)
    from percept_cli.io.images import read_image

    pixels = torch.stack([pre(read_image(p)) for p in paths])
    expected = _direct_distance(model, pixels[:1].expand(3, -1, -1, -1), pixels)
    ours = metric.distance(str(paths[0]), [str(p) for p in paths])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_paths_pil_and_tensors_agree(metric_and_model, image_dir):
    metric, _ = metric_and_model
    from percept_cli.io.images import read_image

    path = image_dir / "c.png"
    from_path = metric.embed(str(path))
    from_pil = metric.embed(read_image(path))
    from_tensor = metric.embed(Preprocess(224)(read_image(path)))
    torch.testing.assert_close(from_path, from_pil)
    torch.testing.assert_close(from_path, from_tensor)
    assert from_path.shape[0] == 1 and float(from_path.norm()) == pytest.approx(1.0, abs=1e-5)


def test_batch_of_pairs_and_matrix(metric_and_model, image_dir):
    metric, _ = metric_and_model
    files = [str(image_dir / f"{n}.png") for n in "abcde"]
    matrix = metric.distance_matrix(files)
    assert matrix.shape == (5, 5)
    torch.testing.assert_close(matrix, matrix.T, atol=1e-6, rtol=0)
    assert matrix.diagonal().abs().max() < 1e-5
    paired = metric.distance(files[:4], files[1:])
    torch.testing.assert_close(paired, torch.stack([matrix[i, i + 1] for i in range(4)]), atol=1e-6, rtol=0)
    with pytest.raises(BadInputError, match="cannot pair"):
        metric.distance(files[:2], files[:3])


def test_batch_size_does_not_change_results(metric_and_model, image_dir):
    metric, _ = metric_and_model
    files = [str(image_dir / f"{n}.png") for n in "abcde"]
    a = metric.embed(files, batch_size=1)
    b = metric.embed(files, batch_size=5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_embed_files_skips_or_raises(metric_and_model, image_dir, tmp_path):
    metric, _ = metric_and_model
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    files = [str(image_dir / "a.png"), str(bad), str(image_dir / "b.png")]
    with pytest.raises(ImageReadError, match="bad.png"):
        metric.embed_files(files)
    result = metric.embed_files(files, skip_bad=True)
    assert result.indices == [0, 2] and result.embeddings.shape[0] == 2
    assert [f.path for f in result.failures] == [str(bad)]


def test_dataloader_workers_give_same_embeddings(metric_and_model, image_dir):
    metric, _ = metric_and_model
    files = [str(image_dir / f"{n}.png") for n in "abcde"]
    serial = metric.embed_files(files, batch_size=2).embeddings
    metric.num_workers = 2
    try:
        parallel = metric.embed_files(files, batch_size=2).embeddings
    finally:
        metric.num_workers = None
    torch.testing.assert_close(serial, parallel)


def test_differentiable_path(metric_and_model):
    metric, _ = metric_and_model
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    y = torch.rand(2, 3, 224, 224)
    d = metric(x, y)
    assert d.shape == (2,) and d.requires_grad
    d.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with torch.no_grad():
        torch.testing.assert_close(d.detach(), metric.distance(x.detach(), y), atol=1e-5, rtol=1e-5)


def test_inference_outputs_carry_no_grad(metric_and_model):
    metric, _ = metric_and_model
    emb = metric.embed(torch.rand(1, 3, 224, 224))
    assert not emb.requires_grad


def test_zoo_name_through_offline_cache(offline_hub):
    metric = load_metric("rclip-f-convnext-b", device="cpu")
    assert metric.source.zoo == "rclip-f-convnext-b" and metric.image_size == 224
    d = metric.distance(make_picture_tensor(0), make_picture_tensor(1))
    assert d.shape == (1,) and 0.0 <= float(d) <= 2.0


def make_picture_tensor(seed):
    return Preprocess(224)(make_picture(seed))
