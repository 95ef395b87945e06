"""Device and dtype names."""

from __future__ import annotations

import pytest
import torch

from percept_cli.devices import resolve_device, resolve_dtype
from percept_cli.errors import BadInputError


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", "cpu:0:1"])
def test_malformed_devices(name):
    with pytest.raises(BadInputError, match="unknown device"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_absent_cuda_is_clear():
    with pytest.raises(BadInputError, match="CUDA is not available"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                         ("FP16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_dtypes(name, dtype):
    assert resolve_dtype(name) is dtype


def test_bad_dtype():
    with pytest.raises(BadInputError, match="unknown dtype"):
        resolve_dtype("int8")


# -- the same bodies on every device present (cpu always; cuda where there is one) -------------------
class _Linear:
    """A 2AFC-like objective with a known optimum: loss = <w_i, x>, success when it exceeds goal_i."""

    has_success = True

    def __init__(self, w: torch.Tensor, goal: torch.Tensor):
        self.w, self.goal = w, goal

    def __call__(self, x, index):
        loss = (x.float() * self.w[index]).flatten(1).sum(1)
        return loss, loss > self.goal[index]


def test_metric_embeds_and_measures_on(device, tiny_vit, image_dir):
    from percept_cli import load_metric

    metric = load_metric(str(tiny_vit[0]), device=device)
    files = [str(image_dir / f"{c}.png") for c in "abc"]
    raw = metric.embed(files, normalize=False)
    assert raw.device.type == device and raw.dtype == torch.float32
    unit = raw / raw.norm(dim=-1, keepdim=True)  # 1 - cos, by hand
    expected = 1 - (unit[0] * unit[1:]).sum(-1)
    d = metric.distance(files[0], files[1:])
    assert d.device.type == device and torch.allclose(d, expected, atol=1e-5)
    x = metric.pixels(files[:1]).to(device).requires_grad_(True)
    metric(x, metric.pixels(files[1:2]).to(device)).sum().backward()
    assert x.grad.device.type == device and float(x.grad.abs().sum()) > 0


def test_apgd_restarts_with_example_ids_on(device):
    """Global ids on the CPU (as the evaluation keeps them) seed the random starts of a batch on ``device``;
    a restart attacks only the unbroken example, so its index is a strict subset (the shipped crash)."""
    from percept_cli.attacks import apgd

    x = torch.full((2, 3, 4, 4), 0.5, device=device)
    w = torch.linspace(-1, 1, 48, device=device).reshape(1, 3, 4, 4).repeat(2, 1, 1, 1)
    eps = 0.1
    best = float((w[0] * eps * w[0].sign()).sum() + (w[0] * 0.5).sum())  # the l_inf optimum: x + eps sign(w)
    objective = _Linear(w, torch.tensor([best - 1.0, best + 1.0], device=device))  # 0 breaks, 1 cannot
    ids = torch.tensor([5, 9])
    result = apgd(objective, x, eps, "linf", 3, restarts=3, example_ids=ids)
    same = apgd(objective, x, eps, "linf", 3, restarts=3, example_ids=ids.to(device))
    assert result.x_adv.device.type == device and torch.equal(result.x_adv, same.x_adv)
    assert result.broken.tolist() == [True, False]
    assert float((result.x_adv - x).abs().max()) <= eps + 1e-6
    assert float(result.loss[1]) == pytest.approx(best, abs=1e-4)  # one sign step from anywhere reaches it
