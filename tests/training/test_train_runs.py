"""Whole training runs on a tiny 64 px encoder: FARE and TeCoA measurably work, resume equals an
uninterrupted run, and the run directory is a model every command loads."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import train_settings
from safetensors.torch import load_file

from percept_cli.errors import BadInputError
from percept_cli.metric import load_metric
from percept_cli.training import data as tdata
from percept_cli.training.config import resolve_config
from percept_cli.training.evaluate import fare_eval, tecoa_eval
from percept_cli.training.export import files_to_push
from percept_cli.training.runner import run_training
from percept_cli.training.setup import held_out_pixels

CPU = torch.device("cpu")


def _held_out(images_dir, fraction, preprocess):
    images = tdata.image_data(str(images_dir), labelled=True)
    _, held = tdata.split_held_out(len(images.items), fraction, 0)
    pixels, positions = held_out_pixels(images.items, held, preprocess, 64)
    return pixels, torch.tensor(images.labels)[positions]


def test_fare_lowers_the_adversarial_distortion_and_keeps_the_clean_one_small(tiny64, train_images, tmp_path):
    out = tmp_path / "fare"
    config = resolve_config("fare", {}, train_settings(tiny64, out, data=str(train_images), steps=12, lr=1e-3,
                                                       val_fraction=0.25, log_every=4))
    result = run_training(config)
    assert result.steps == 12 and (out / "percept_model.json").is_file()
    base = load_metric(str(tiny64), device="cpu").encoder
    trained = load_metric(str(out), device="cpu").encoder
    val, _ = _held_out(train_images, 0.25, base.preprocess)
    assert len(val) == 10
    # a fresh APGD (not the training PGD), more iterations than training used
    before = fare_eval(copy.deepcopy(base), base, val, 4 / 255, "linf", 20, seed=1, device=CPU)
    after = fare_eval(trained, base, val, 4 / 255, "linf", 20, seed=1, device=CPU)
    assert before["clean_distortion"] == 0.0
    assert after["adv_distortion"] < 0.5 * before["adv_distortion"]
    assert after["clean_distortion"] < 0.1 * before["adv_distortion"]
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_logs = [r for r in logs if r["kind"] == "train"]
    assert [r["step"] for r in train_logs] == [4, 8, 12]
    assert train_logs[-1]["adv_distortion"] < train_logs[0]["adv_distortion"]
    assert logs[-1]["kind"] == "eval" and {"clean_distortion", "adv_distortion"} <= set(logs[-1])


def test_tecoa_raises_the_robust_zero_shot_accuracy(tiny64, train_images, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("dark noise\nbright noise\n")
    out = tmp_path / "tecoa"
    eps = 32 / 255  # large enough that APGD breaks the untrained model (the classes differ by ~100/255 in brightness)
    config = resolve_config("tecoa", {}, train_settings(tiny64, out, data=str(train_images), classnames=str(names),
                                                        steps=15, lr=3e-3, val_fraction=0.25, eps=eps,
                                                        pgd_step_size=eps / 4))
    run_training(config)
    base = load_metric(str(tiny64), device="cpu", with_text=True)
    trained = load_metric(str(out), device="cpu", with_text=True)
    text = base.embed_text(["This is a photo of a dark noise.", "This is a photo of a bright noise."])
    assert torch.allclose(text, trained.embed_text(["This is a photo of a dark noise.",
                                                    "This is a photo of a bright noise."]))  # text tower untouched
    val, labels = _held_out(train_images, 0.25, base.preprocess)
    before = tecoa_eval(base.encoder, text, val, labels, eps, "linf", 20, 1, CPU)
    after = tecoa_eval(trained.encoder, text, val, labels, eps, "linf", 20, 1, CPU)
    assert before["robust_accuracy"] <= 0.2 < before["clean_accuracy"]  # the attack works on the base model
    assert after["robust_accuracy"] >= before["robust_accuracy"] + 0.5
    assert after["robust_accuracy"] <= after["clean_accuracy"]


def _fare_config(tiny64, train_images, out, **extra):
    settings = {"data": str(train_images), "steps": 6, "lr": 1e-3, "micro_batch": 4, "pgd_steps": 2, "save_every": 2,
                "log_every": 2, **extra}
    return resolve_config("fare", {}, train_settings(tiny64, out, **settings))


def test_resume_reaches_the_same_weights_bit_for_bit(tiny64, train_images, tmp_path):
    whole = tmp_path / "whole"
    run_training(_fare_config(tiny64, train_images, whole))

    class Killed(Exception):
        pass

    def kill_after_step_4(kind, payload):
        if kind == "checkpoint" and payload["step"] == 4:
            raise Killed

    parted = tmp_path / "parted"
    with pytest.raises(Killed):
        run_training(_fare_config(tiny64, train_images, parted), on_event=kill_after_step_4)
    assert not (parted / "percept_model.json").exists()
    # a log line written after the last checkpoint by the killed run, and a torn one
    with open(parted / "log.jsonl", "a") as log:
        log.write(json.dumps({"kind": "train", "step": 5, "loss": 9.9}) + "\n{\"kind\": \"tr")
    result = run_training(_fare_config(tiny64, train_images, parted), resume=True)
    assert result.resumed_from == 4 and result.steps == 6
    a, b = load_file(str(whole / "open_clip_model.safetensors")), load_file(str(parted / "open_clip_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs_a = (whole / "log.jsonl").read_text().splitlines()
    logs_b = (parted / "log.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in logs_a]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in logs_b]
    assert sorted(p.name for p in (parted / "checkpoints").iterdir()) == ["latest", "step_00000004.safetensors",
                                                                          "step_00000006.safetensors"]


def test_resume_refuses_other_settings_and_missing_runs(tiny64, train_images, tmp_path):
    out = tmp_path / "run"
    run_training(_fare_config(tiny64, train_images, out, steps=2))
    with pytest.raises(BadInputError, match=r"other settings \(lr\)"):
        run_training(_fare_config(tiny64, train_images, out, steps=2, lr=2e-3), resume=True)
    with pytest.raises(BadInputError, match="not empty"):
        run_training(_fare_config(tiny64, train_images, out, steps=2))
    with pytest.raises(BadInputError, match="holds no training run"):
        run_training(_fare_config(tiny64, train_images, tmp_path / "nothing"), resume=True)


def test_the_run_directory_is_a_model_locally_and_through_a_hub_cache(tiny64, train_images, tmp_path,
                                                                      monkeypatch):
    import tiny_models

    out = tmp_path / "run"
    run_training(_fare_config(tiny64, train_images, out, steps=2))
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard is in the test extra
    assert len(events) == 1 and events[0].stat().st_size > 0
    trained = load_metric(str(out), device="cpu")
    # independent check: open_clip's own CLIP class built from the saved config takes the saved weights
    state = load_file(str(out / "open_clip_model.safetensors"))
    config = json.loads((out / "open_clip_config.json").read_text())
    reference = tiny_models.build_open_clip(config["model_cfg"])
    reference.load_state_dict(state)
    x = torch.rand(3, 3, 64, 64)
    mean = torch.tensor(tiny_models.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(tiny_models.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference.encode_image((x - mean) / std)
    assert torch.allclose(trained.encoder(x), expected, atol=1e-5)
    assert not torch.allclose(load_metric(str(tiny64), device="cpu").encoder(x), expected, atol=1e-3)

    pushed = tmp_path / "pushed"  # what `percept train push` would upload
    pushed.mkdir()
    for path in files_to_push(out):
        shutil.copy(path, pushed / path.name)
    assert sorted(p.name for p in pushed.iterdir()) == sorted(
        ["README.md", "log.jsonl", "open_clip_config.json", "open_clip_model.safetensors", "percept_model.json",
         "train_config.json"])
    cache = tmp_path / "hub"
    tiny_models.add_to_hub_cache(cache, "someone/fare-tiny", pushed)
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    from_hub = load_metric("hf-hub:someone/fare-tiny", device="cpu")
    assert torch.allclose(from_hub.encoder(x), expected, atol=1e-5)
    shutil.rmtree(out / "checkpoints")  # the model needs no training state
    assert torch.allclose(load_metric(str(out), device="cpu").encoder(x), expected, atol=1e-5)


def test_a_full_disk_leaves_the_last_checkpoint_intact(tiny64, train_images, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from percept_cli.training.checkpoint import (
        CheckpointWriteError,
        latest_checkpoint,
        read_checkpoint,
    )

    real_save = safetensors.torch.save_file
    calls = []

    def fills_up(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second checkpoint: half a file, then the disk is full
            with open(filename, "wb") as handle:
                handle.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)
    out = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match="No space left on device.*step_00000002.safetensors\\) is intact"):
        run_training(_fare_config(tiny64, train_images, out, steps=4, save_every=2))
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000002.safetensors"]  # no .tmp left
    assert read_checkpoint(latest_checkpoint(folder))[1]["step"] == 2  # and it is whole


def test_too_little_free_space_is_refused_before_training(tiny64):
    from percept_cli.training.runner import check_free_space

    module = torch.nn.Linear(1000, 1000)  # 4 MB of trainable float32
    check_free_space(tiny64, module, None, keep=2, free=10**9)
    with pytest.raises(BadInputError, match="GiB free"):
        check_free_space(tiny64, module, None, keep=2, free=10**6)


def test_a_base_model_with_a_head_is_refused_for_fare(tiny64, train_images, tmp_path):
    from safetensors.torch import save_file

    from percept_cli.models.encoder import MLPHead

    headed = tmp_path / "headed"
    shutil.copytree(tiny64, headed)
    save_file(MLPHead(16, 8).state_dict(), str(headed / "head.safetensors"))
    (headed / "percept_model.json").write_text(json.dumps({
        "schema": "percept.model/1", "method": "2afc-mlp", "preprocess": {"resize": 64, "crop": 0},
        "head": {"type": "mlp", "file": "head.safetensors", "dim": 16, "hidden": 8}, "lora": None}))
    assert load_metric(str(headed), device="cpu").source.head  # it loads, with its head
    config = resolve_config("fare", {}, train_settings(headed, tmp_path / "run", data=str(train_images), steps=1))
    with pytest.raises(BadInputError, match="carries an MLP head"):
        run_training(config)


def test_tecoa_reads_labelled_webdataset_shards(tiny64, train_images, tmp_path):
    """Class labels from the shards' ``cls`` members, class names in sorted label order."""
    import io
    import tarfile

    shard = tmp_path / "train-000.tar"
    with tarfile.open(shard, "w") as tar:
        for k, folder in enumerate(sorted(p for p in train_images.iterdir() if p.is_dir())):
            for image in sorted(folder.glob("*.png"))[:8]:
                for name, data in ((f"{folder.name}{image.stem}.png", image.read_bytes()),
                                   (f"{folder.name}{image.stem}.cls", folder.name.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    images = tdata.image_data(str(shard), labelled=True)
    assert images.classes == ["cat", "dog"] and sorted(images.labels) == [0] * 8 + [1] * 8
    assert all(it.member is not None for it in images.items)
    names = tmp_path / "names.txt"
    names.write_text("cat,a cat\ndog,a dog\n")
    out = tmp_path / "run"
    config = resolve_config("tecoa", {}, train_settings(tiny64, out, data=str(shard), classnames=str(names), steps=1,
                                                        pgd_steps=1, eval_iters=2))
    assert run_training(config).steps == 1 and (out / "percept_model.json").is_file()


def test_fare_on_a_timm_vit_keeps_its_layout_and_pooling(train_images, tmp_path):
    """A timm ViT (the DINO kind) trains too: the run directory is a timm model (config.json +
    model.safetensors) that loads with the pooling it was trained with."""
    import tiny_models

    base_dir = tmp_path / "vit"
    tiny_models.save_timm_dir(base_dir)
    out = tmp_path / "run"
    config = resolve_config("fare", {}, train_settings(base_dir, out, data=str(train_images), steps=2, pgd_steps=1,
                                                       eval_iters=2, lr=1e-3, pooling="cls_prenorm"))
    run_training(config)
    assert (out / "config.json").is_file() and not (out / "open_clip_config.json").exists()
    trained = load_metric(str(out), device="cpu")
    assert trained.source.family == "timm" and trained.source.pooling == "cls_prenorm"
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        as_trained = trained.encoder(x)
        assert torch.allclose(as_trained, load_metric(str(out), device="cpu", pooling="cls_prenorm").encoder(x))
        assert not torch.allclose(as_trained, load_metric(str(out), device="cpu", pooling="token").encoder(x))
    saved, base = load_file(str(out / "model.safetensors")), load_file(str(base_dir / "model.safetensors"))
    assert saved.keys() == base.keys()
    assert torch.equal(saved["norm.weight"], base["norm.weight"])  # bypassed by cls_prenorm: untouched
    assert not torch.equal(saved["blocks.0.mlp.fc1.weight"], base["blocks.0.mlp.fc1.weight"])  # trained
