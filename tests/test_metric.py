"""The public metric object: distance properties, agreement with OpenCLIP, input forms, gradients."""

from __future__ import annotations

import pytest
import tiny_models
import torch
import torch.nn.functional as F
from conftest import make_picture
from torch import nn

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


# -- input checks, ranges and exact zeros (issue 9) -------------------------------------------
def _uint8_images(seed, n=2):
    return torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_uint8_tensor_in_metric_call_is_scaled_like_distance(metric_and_model):
    metric, model = metric_and_model
    x, y = _uint8_images(0), _uint8_images(1)
    expected = _direct_distance(model, x.float() / 255, y.float() / 255)  # OpenCLIP on raw pixels / 255
    with torch.no_grad():
        called = metric(x, y)
    torch.testing.assert_close(called, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(called, metric.distance(x, y), atol=1e-6, rtol=0)


@pytest.mark.parametrize("which, scale, shift", [("x", 255.0, 0.0), ("y", 1.0, -0.5), ("x", 1.0, 0.01)])
def test_float_input_outside_0_1_is_refused_naming_the_argument(metric_and_model, which, scale, shift):
    metric, _ = metric_and_model
    x, y = torch.rand(2, 3, 224, 224), torch.rand(2, 3, 224, 224)
    x[0, 0, 0, 0] = y[0, 0, 0, 0] = 1.0
    bad = {"x": x, "y": y}
    bad[which] = bad[which] * scale + shift
    with pytest.raises(BadInputError, match=rf"^{which}: image values must lie in \[0,1\]"):
        metric(bad["x"], bad["y"])
    with torch.no_grad():  # the documented escape: no check at all
        assert metric(bad["x"], bad["y"], check=False).shape == (2,)


def test_identical_images_are_exactly_zero_through_every_api(metric_and_model, image_dir):
    metric, _ = metric_and_model
    # 1 - cos of these four self-pairs was [0, 1.2e-07, 0, -1.2e-07] before distances were clamped/exact
    x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros(4)
    with torch.no_grad():
        called = metric(x, x)
    for d in (called, metric.distance(x, x), metric.distance_matrix(x).diagonal()):
        assert torch.equal(d, zeros) and not bool(torch.signbit(d).any())  # no -0.0, no -1.19e-07
    files = [str(image_dir / f"{n}.png") for n in "ab"]
    assert torch.equal(metric.distance(files, files), torch.zeros(2))
    assert float(metric.similarity(x, x).max()) <= 1.0


def test_distance_of_opposite_embeddings_is_two_at_most(metric_and_model):
    from percept_cli.metric import embedding_distance, embedding_distance_matrix

    e = F.normalize(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    d = embedding_distance(e, -e)  # 1 - cos(e, -e) = 2 by definition
    assert float(d.max()) <= 2.0 and float(d.min()) == pytest.approx(2.0, abs=1e-5)
    m = embedding_distance_matrix(e, -e)
    assert float(m.max()) <= 2.0 and float(m.min()) >= 0.0


@pytest.mark.parametrize("call, argument", [
    (lambda m, p: m.distance(3, 4), "a"),
    (lambda m, p: m.distance(None, p), "a"),
    (lambda m, p: m.distance(p, None), "b"),
    (lambda m, p: m.distance(b"\x89PNG", p), "a"),
    (lambda m, p: m.distance([p, 7], p), r"a\[1\]"),
    (lambda m, p: m.distance(p, []), "b"),
    (lambda m, p: m.embed(3.5), "images"),
    (lambda m, p: m.similarity(object(), p), "a"),
    (lambda m, p: m(p, p), "x"),
    (lambda m, p: m(torch.rand(1, 3, 224, 224), p), "y"),
    (lambda m, p: m(torch.rand(2, 3, 224, 224), torch.rand(3, 3, 224, 224)), "x"),
    (lambda m, p: m(torch.rand(2, 4, 224, 224), torch.rand(2, 3, 224, 224)), "x"),
    (lambda m, p: m(torch.rand(2, 3, 224, 224), torch.zeros(2, 3, 224, 224, dtype=torch.int64)), "y"),
    (lambda m, p: m.embed_files(p), "paths"),
])
def test_bad_library_calls_raise_bad_input_naming_the_argument(metric_and_model, image_dir, call, argument):
    metric, _ = metric_and_model
    with pytest.raises(BadInputError, match=rf"^{argument}:|of {argument} ") as info:
        call(metric, str(image_dir / "a.png"))
    assert "--" not in str(info.value)  # library messages name arguments, not CLI flags


def test_batch_mismatch_names_both_sides(metric_and_model, image_dir):
    metric, _ = metric_and_model
    files = [str(image_dir / f"{n}.png") for n in "abcde"]
    with pytest.raises(BadInputError, match="2 images of a with 3 of b"):
        metric.distance(files[:2], files[:3])


def test_numpy_arrays_give_the_tensor_result(metric_and_model):
    np = pytest.importorskip("numpy")
    metric, _ = metric_and_model
    img_a, img_b = make_picture(0, (120, 90)), make_picture(1, (120, 90))
    hwc_a, hwc_b = np.asarray(img_a), np.asarray(img_b)  # (H, W, 3) uint8, as PIL gives it
    t_a, t_b = (torch.from_numpy(h.copy()).permute(2, 0, 1) for h in (hwc_a, hwc_b))  # (3, H, W) uint8
    expected = metric.distance(t_a, t_b)
    torch.testing.assert_close(metric.distance(hwc_a, hwc_b), expected, atol=0, rtol=0)
    torch.testing.assert_close(metric.distance(hwc_a / 255.0, hwc_b.astype(np.float32) / 255), expected,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(metric.distance(t_a.numpy(), t_b.numpy()), expected, atol=0, rtol=0)  # (3,H,W)
    batch = np.stack([hwc_a, hwc_b])  # (B, H, W, 3)
    torch.testing.assert_close(metric.embed(batch), metric.embed(torch.stack([t_a, t_b])), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(metric(hwc_a, hwc_b), expected, atol=1e-6, rtol=0)
    with pytest.raises(BadInputError, match="uint8 or float"):
        metric.distance(hwc_a.astype(np.int32), hwc_b)


def test_input_range_minus_one_to_one_and_0_255(metric_and_model, tiny_vit):
    from percept_cli.metric import PerceptualMetric

    metric, _ = metric_and_model
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(1, 3, 224, 224, generator=g), torch.rand(1, 3, 100, 140, generator=g)
    lpips_style = PerceptualMetric(metric.encoder, metric.source, input_range="-1,1")
    with torch.no_grad():
        torch.testing.assert_close(lpips_style(x * 2 - 1, y * 2 - 1), metric(x, y), atol=1e-5, rtol=0)
    torch.testing.assert_close(lpips_style.distance(x * 2 - 1, y * 2 - 1), metric.distance(x, y), atol=1e-5, rtol=0)
    with pytest.raises(BadInputError, match=r"\[-1,1\]"):
        lpips_style.distance(x * 2, y)
    with pytest.raises(BadInputError, match=r"\[0,1\]"):
        metric.distance(x * 2 - 1, y)  # the same values are refused in the default range
    raw = load_metric(str(tiny_vit[0]), device="cpu", input_range="0,255")
    assert raw.input_range == "0,255"
    torch.testing.assert_close(raw.distance(x * 255, y * 255), metric.distance(x, y), atol=1e-5, rtol=0)
    uint8 = (x * 255).round().to(torch.uint8)  # uint8 always holds 0..255, whatever the range
    torch.testing.assert_close(lpips_style.distance(uint8, y * 2 - 1), metric.distance(uint8, y), atol=1e-5, rtol=0)
    with pytest.raises(BadInputError, match="input_range"):
        load_metric(str(tiny_vit[0]), device="cpu", input_range="0-1")


# -- the metric is a torch module (issue 10) ---------------------------------------------------
@pytest.fixture
def fresh_metric(tiny_vit):
    """A metric of its own (these tests move, cast, unfreeze or train it)."""
    return load_metric(str(tiny_vit[0]), device="cpu")


def _open_clip_distance(model, a, b):
    """1 - cos of OpenCLIP's own image embeddings, with gradients (the independent reference)."""
    mean = torch.tensor(tiny_models.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(tiny_models.CLIP_STD).view(1, 3, 1, 1)
    ea, eb = (model.encode_image((v - mean) / std) for v in (a, b))
    return 1 - F.cosine_similarity(ea, eb, dim=-1)


class _Restorer(nn.Module):
    """A small image-to-image model trained with the metric as its loss."""

    def __init__(self, metric):
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.metric = metric

    def forward(self, noisy, clean):
        return self.metric(torch.sigmoid(self.conv(noisy)), clean).mean()


def test_load_metric_returns_an_eval_mode_frozen_module(fresh_metric):
    metric = fresh_metric
    assert isinstance(metric, nn.Module) and not metric.training and not metric.encoder.training
    params = list(metric.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert {id(p) for p in params} == {id(p) for p in metric.encoder.parameters()}
    state = metric.state_dict()
    assert state and all(k.startswith("encoder.") for k in state)
    assert metric.train() is metric and metric.encoder.backbone.training  # the usual module switches
    assert metric.eval() is metric and not metric.encoder.backbone.training


def test_to_moves_the_device_and_casts_like_the_dtype_option(fresh_metric, tiny_vit):
    metric = fresh_metric
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    fp32 = metric.embed(x)
    assert metric.to("cpu") is metric and metric.device == torch.device("cpu")
    metric.to(torch.float64)  # fp32 weights are exact in fp64: the same embeddings up to rounding
    assert metric.encoder.compute_dtype == torch.float64 and metric.embed(x).dtype == torch.float32
    torch.testing.assert_close(metric.embed(x), fp32, atol=1e-5, rtol=0)
    as_bf16 = load_metric(str(tiny_vit[0]), device="cpu", dtype="bf16")
    metric.to(torch.bfloat16)
    assert metric.dtype_name == "bf16" and metric.encoder.mean.dtype == torch.float32
    # normalisation kept at full float32 precision (a bf16 round trip would move 0.48145466 to 0.482421875)
    assert metric.encoder.mean.flatten().tolist() == torch.tensor(tiny_models.CLIP_MEAN).tolist()
    torch.testing.assert_close(metric.embed(x), as_bf16.embed(x), atol=0, rtol=0)
    metric.to("meta")  # a device move without a second device: `device` follows the weights
    assert metric.device.type == "meta" and next(metric.parameters()).device.type == "meta"
    assert "device='meta'" in repr(metric)


def test_as_a_loss_inside_a_model_gradients_match_open_clip(fresh_metric, tiny_vit):
    _, model = tiny_vit
    g = torch.Generator().manual_seed(2)
    noisy, clean = torch.rand(2, 3, 224, 224, generator=g), torch.rand(2, 3, 224, 224, generator=g)
    restorer = _Restorer(fresh_metric)
    restorer(noisy.requires_grad_(), clean).backward()
    reference = _Restorer(None)  # the same conv (same seed), the loss computed by OpenCLIP itself
    noisy_ref = noisy.detach().clone().requires_grad_()
    _open_clip_distance(model, torch.sigmoid(reference.conv(noisy_ref)), clean).mean().backward()
    torch.testing.assert_close(noisy.grad, noisy_ref.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(restorer.conv.weight.grad, reference.conv.weight.grad, atol=1e-6, rtol=1e-4)
    assert float(noisy.grad.abs().sum()) > 0
    assert all(p.grad is None for p in fresh_metric.parameters())  # frozen: nothing accumulates
    model.zero_grad(set_to_none=True)


def test_unfrozen_metric_fine_tunes_with_open_clips_gradients(fresh_metric, tiny_vit):
    import copy

    metric = fresh_metric.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 3, 224, 224, generator=g), torch.rand(2, 3, 224, 224, generator=g)
    metric(x, y).mean().backward()
    reference = copy.deepcopy(tiny_vit[1]).requires_grad_(True)
    _open_clip_distance(reference, x, y).mean().backward()
    expected = dict(reference.visual.named_parameters())
    for name, param in metric.encoder.backbone.named_parameters():
        torch.testing.assert_close(param.grad, expected[name].grad, atol=1e-6, rtol=1e-4, msg=name)
    before = {name: p.detach().clone() for name, p in metric.named_parameters()}
    with torch.no_grad():
        d0 = metric(x, y)
    torch.optim.SGD(metric.parameters(), lr=0.05).step()
    assert any(not torch.equal(before[name], p) for name, p in metric.named_parameters())
    with torch.no_grad():
        d1 = metric(x, y)
    assert float(d1.mean()) < float(d0.mean())  # a gradient step on the distance lowers it


def test_ddp_wraps_a_model_holding_a_trainable_metric(fresh_metric, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    g = torch.Generator().manual_seed(4)
    noisy, clean = torch.rand(1, 3, 224, 224, generator=g), torch.rand(1, 3, 224, 224, generator=g)
    restorer = _Restorer(fresh_metric.requires_grad_(True))
    restorer(noisy, clean).backward()  # the single-process gradients, for comparison
    expected = {name: p.grad.clone() for name, p in restorer.named_parameters()}
    restorer.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(restorer)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
        for step in range(2):  # a second step fails if some trainable parameter got no gradient
            optimizer.zero_grad(set_to_none=True)
            ddp(noisy, clean).backward()
            if step == 0:
                for name, param in restorer.named_parameters():
                    torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)
            optimizer.step()
    finally:
        dist.destroy_process_group()


def test_compile_option_runs_the_backbone_through_torch_compile(tiny_vit, monkeypatch):
    """``load_metric(compile=True)`` and the CLI's ``--compile`` (through ``Common``): same embeddings, and the
    backbone's forward went through torch.compile (a recording stand-in here; the real one needs minutes)."""
    from percept_cli.cli.options import Common
    from percept_cli.cli.output import Output

    directory, _ = tiny_vit
    x = torch.rand(2, 3, 224, 224)
    plain = load_metric(str(directory), device="cpu").embed(x)
    compiled = []

    def recording_compile(module, **kwargs):
        compiled.append(module)
        return lambda *args, **kw: (compiled.append(args[0].shape), module(*args, **kw))[1]

    monkeypatch.setattr(torch, "compile", recording_compile)
    metric = load_metric(str(directory), device="cpu", compile=True)
    assert compiled == []  # compiled at the first forward, not at load time
    assert torch.equal(metric.embed(x), plain)
    assert compiled == [metric.encoder.backbone, (2, 3, 224, 224)]
    output = Output(False, True)
    assert Common(model=str(directory), device="cpu", compile=True).load_metric(output).encoder.compiled
    assert not Common(model=str(directory), device="cpu").load_metric(output).encoder.compiled
    assert not Common(model=str(directory), device="cpu", compile=True).load_metric(
        output, str(directory), geometry=False).encoder.compiled  # a judge model runs a few forwards only
