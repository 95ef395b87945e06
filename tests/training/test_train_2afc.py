"""2AFC fine-tuning on a synthetic NIGHTS: an MLP head and LoRA adapters learn, and their run directories
reload into the same metric (LoRA merged equals LoRA unmerged)."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from conftest import train_settings
from safetensors.torch import load_file

from percept_cli.metric import load_metric
from percept_cli.models.encoder import MLPHead
from percept_cli.training.config import resolve_config
from percept_cli.training.methods import hinge_2afc
from percept_cli.training.runner import run_training


def _train_logs(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_hinge_loss_by_hand():
    d_left, d_right = torch.tensor([0.3, 0.3, 0.1]), torch.tensor([0.1, 0.29, 0.3])
    label = torch.tensor([1, 1, 1])  # people chose the right candidate: it should be the closer one
    assert torch.allclose(hinge_2afc(d_left, d_right, label, 0.05), torch.tensor([0.0, 0.04, 0.25]))
    assert torch.allclose(hinge_2afc(d_left, d_right, 1 - label, 0.05), torch.tensor([0.25, 0.06, 0.0]))


def test_mlp_head_learns_and_its_run_reloads_into_the_same_metric(tiny64, small_nights, tmp_path):
    out = tmp_path / "mlp"
    config = resolve_config("2afc", {}, train_settings(tiny64, out, root=str(small_nights), head="mlp", epochs=40,
                                                       batch_size=16, lr=3e-3, log_every=3))
    result = run_training(config)
    assert result.steps == 40 * 3
    logs = _train_logs(out)
    assert logs[-1]["accuracy"] >= logs[0]["accuracy"] + 0.2
    assert "val_accuracy" in result.last_eval and result.last_eval["val_triplets"] == 12

    trained = load_metric(str(out), device="cpu")
    assert trained.preprocess.crop is False and trained.preprocess.image_size == 64
    base = load_metric(str(tiny64), device="cpu").encoder
    head = MLPHead(16, 512)
    head.load_state_dict(load_file(str(out / "head.safetensors")))
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(trained.encoder(x), head(base(x)), atol=1e-6)
    assert not torch.allclose(trained.encoder(x), base(x), atol=1e-3)  # the head changes the embedding
    meta = json.loads((out / "percept_model.json").read_text())
    assert meta["method"] == "2afc-mlp" and meta["head"]["hidden"] == 512 and meta["preprocess"]["crop"] == 0


def test_lora_learns_merged_equals_unmerged_and_reloads(tiny64, small_nights, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    config = resolve_config("2afc", {}, train_settings(tiny64, out, root=str(small_nights), head="lora", epochs=6,
                                                       batch_size=16, lr=1e-2, lora_dropout=0.0, log_every=3))
    run_training(config)
    logs = _train_logs(out)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert (out / "lora_adapter" / "adapter_config.json").is_file()
    adapter_cfg = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == ["mlp.c_fc", "mlp.c_proj"] and adapter_cfg["r"] == 16

    base = load_metric(str(tiny64), device="cpu").encoder
    merged = load_metric(str(out), device="cpu").encoder
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        plain = base(x)
    # unmerged: peft's own adapter injected into the base tower, run through peft's forward
    unmerged_tower = PeftModel.from_pretrained(base.backbone, str(out / "lora_adapter")).eval()
    with torch.no_grad():
        unmerged = unmerged_tower(base.normalize(x))
        assert torch.allclose(merged(x), unmerged, atol=1e-5)
        assert not torch.allclose(merged(x), plain, atol=1e-3)  # the adapters changed something
    emb = F.normalize(merged(x), dim=-1)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4))
