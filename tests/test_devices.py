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
