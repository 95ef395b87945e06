"""`--head FILE` through the CLI: `percept distance` with an MLP head file on the tiny ViT."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from percept_cli.cli.app import app
from percept_cli.metric import load_metric
from percept_cli.models.encoder import MLPHead

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def head_file(tmp_path):
    torch.manual_seed(7)
    head = MLPHead(dim=16, hidden=8)
    path = tmp_path / "head.safetensors"
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
    return path, head.eval()


def _distance(*args) -> float:
    result = run("distance", *args, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert len(doc["results"]) == 1
    return doc["results"][0]["distance"]


def test_head_changes_distance_to_head_of_encoder(tiny_vit, image_dir, head_file):
    directory, _ = tiny_vit
    path, head = head_file
    a, b = image_dir / "a.png", image_dir / "b.png"
    plain = _distance(a, b, "--model", directory)
    with_head = _distance(a, b, "--model", directory, "--head", path)
    assert with_head != pytest.approx(plain, abs=1e-6)

    # by hand: the head metric's own preprocessing (the authors' 224x224, no crop), then the headless
    # encoder and the head applied here, on the same tensors
    headed = load_metric(str(directory), device="cpu", head=str(path))
    base = load_metric(str(directory), device="cpu")
    pixels = headed.pixels([a, b])
    with torch.no_grad():
        manual = head(base.encoder(pixels))
        assert torch.allclose(headed.encoder(pixels), manual, atol=1e-5)
        expected = 1 - torch.nn.functional.cosine_similarity(manual[0:1], manual[1:2]).item()
    assert with_head == pytest.approx(expected, abs=1e-4)
