"""Every subcommand and public library path on a CUDA GPU, in fp32, bf16 and fp16, with tiny models.

Marked ``cuda``: deselected by default, selected by ``pytest -m cuda``, skipped (with the reason) where
no GPU is present. ``PERCEPT_TEST_DEVICE=cpu pytest -m cuda tests/test_cuda.py`` runs the same bodies
on the CPU (fp32 and bf16), a dry run for machines without a GPU. Numbers are compared with the same
tiny model on the CPU in fp32: equal within a precision's tolerance, decisions equal except near ties.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import synthetic_datasets as sd
import torch
from conftest import cuda_test_device, make_picture
from PIL import Image
from typer.testing import CliRunner

from percept_cli import load_metric
from percept_cli.attacks import (
    AttackSettings,
    apgd,
    attack_2afc,
    attack_embedding,
    distance_interval,
    lp_norm,
    pgd,
    square,
)
from percept_cli.attacks.core import evaluate
from percept_cli.attacks.objectives import UntargetedEmbeddingObjective
from percept_cli.cli.app import app

pytestmark = pytest.mark.cuda

DEVICE = cuda_test_device()
DTYPES = ["fp32", "bf16", "fp16"] if DEVICE.startswith("cuda") else ["fp32", "bf16"]  # CPU fp16: not everywhere
TOL = {"fp32": 2e-3, "bf16": 2e-2, "fp16": 1e-2}  # |distance - the CPU fp32 distance| (cuDNN may use TF32)
EPS = {"linf": 8 / 255, "l2": 0.5}
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def on_device(t: torch.Tensor) -> bool:
    return t.device.type == torch.device(DEVICE).type


def in_ball(x_adv, x, eps, norm) -> bool:
    """Every image inside the ball around its clean image and inside the box [0,1]."""
    x_adv, x = x_adv.float().cpu(), x.float().cpu()
    return bool((lp_norm(x_adv - x, norm) <= eps + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1)


def png_pixels(path) -> torch.Tensor:
    """(3,H,W) [0,1] pixels of a saved PNG, read straight from the file."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def comparable(doc: dict) -> dict:
    """A results document's per-model entries without what legitimately differs between equal runs."""
    return {name: {k: v for k, v in entry.items() if k not in ("wall_time_s", "world_size")}
            for name, entry in doc["models"].items()}


@pytest.fixture(scope="module")
def model(tiny_vit) -> str:
    return str(tiny_vit[0])


@pytest.fixture(scope="module")
def cpu_metric(model):
    """The reference: the same tiny model on the CPU in fp32."""
    return load_metric(model, device="cpu")


@pytest.fixture(scope="module")
def metric32(model):
    """fp32 weights on the test device: what attacks use (--dtype is their autocast precision)."""
    return load_metric(model, device=DEVICE)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("pictures")
    for i, name in enumerate("abcde"):
        make_picture(i).save(folder / f"{name}.png")
    return [str(folder / f"{name}.png") for name in "abcde"]


@pytest.fixture(scope="module")
def nights(tmp_path_factory, cpu_metric):
    """A 20-triplet NIGHTS test split labelled with the CPU model's own decisions, every 5th flipped."""
    from test_evaluation import relabel_like_model

    root = sd.make_nights(tmp_path_factory.mktemp("nights") / "nights", n=40)
    relabel_like_model(root, cpu_metric, flip_every=5)
    return root


def eval_2afc(nights, model, out, *args, device=DEVICE, dtype="fp32"):
    """One ``percept eval-2afc`` run on ``nights``; -> (the model's results entry, the whole document)."""
    result = run("eval-2afc", "--dataset", "nights", "--root", nights, "--model", model, "--device", device,
                 "--dtype", dtype, "--batch-size", "4", "--out", out, *args)
    assert result.exit_code == 0, result.output
    doc = json.loads(Path(out).read_text())
    assert doc["status"] == "complete"
    return doc["models"][model], doc


@pytest.fixture(scope="module")
def cpu_clean(nights, model, tmp_path_factory):
    """Clean per-triplet records of the CPU fp32 run: the reference every device run is held to."""
    entry, _ = eval_2afc(nights, model, tmp_path_factory.mktemp("cpu") / "r.json", device="cpu")
    return {t["id"]: t for t in entry["triplets"]}


def assert_clean_matches_cpu(entry: dict, cpu_clean: dict, dtype: str) -> None:
    """Distances within the precision's tolerance of the CPU fp32 run; the same decisions except near ties."""
    assert [t["id"] for t in entry["triplets"]] == list(cpu_clean)
    for t in entry["triplets"]:
        ref = cpu_clean[t["id"]]
        assert abs(t["d_left"] - ref["d_left"]) <= TOL[dtype] and abs(t["d_right"] - ref["d_right"]) <= TOL[dtype]
        if abs(ref["clean_margin"]) > 2 * TOL[dtype]:
            assert t["clean_correct"] == ref["clean_correct"], t["id"]


# -- library: the metric -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_metric_embeds_and_measures_on_device(model, cpu_metric, pictures, dtype, tmp_path):
    metric = load_metric(model, device=DEVICE, dtype=dtype, batch_size=2, num_workers=2)  # workers; pinned on cuda
    assert on_device(metric.encoder.mean) and metric.dtype_name == dtype and metric.encoder.mean.dtype == torch.float32
    emb, ref = metric.embed(pictures), cpu_metric.embed(pictures)
    assert on_device(emb) and emb.dtype == torch.float32 and emb.shape == ref.shape
    assert torch.allclose(emb.norm(dim=-1).cpu(), torch.ones(5), atol=1e-3)
    assert torch.allclose(metric.embed(metric.pixels(pictures).to(DEVICE)).cpu(), emb.cpu(), atol=1e-5)  # tensors
    d = metric.distance(pictures[0], pictures[1:])
    assert on_device(d) and (d.cpu() - cpu_metric.distance(pictures[0], pictures[1:])).abs().max() <= TOL[dtype]
    matrix = metric.distance_matrix(pictures)
    assert on_device(matrix) and torch.equal(matrix.diagonal().cpu(), torch.zeros(5))
    assert (matrix.cpu() - cpu_metric.distance_matrix(pictures)).abs().max() <= TOL[dtype]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    result = metric.embed_files([pictures[0], str(broken), pictures[1]], skip_bad=True)
    assert result.indices == [0, 2] and [f.path for f in result.failures] == [str(broken)]
    assert on_device(result.embeddings) and torch.allclose(result.embeddings.cpu(), emb[:2].cpu(), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_metric_call_is_differentiable_on_device(model, pictures, dtype):
    metric = load_metric(model, device=DEVICE, dtype=dtype)
    x = metric.pixels(pictures[:2]).to(DEVICE).requires_grad_(True)
    y = metric.pixels(pictures[2:4]).to(DEVICE)
    d = metric(x, y)
    assert on_device(d) and d.shape == (2,)
    # the inference path's number (low precision: other kernels with gradients, so within the tolerance)
    assert (d.detach() - metric.distance(pictures[:2], pictures[2:4])).abs().max() <= TOL[dtype] / 2
    d.sum().backward()
    assert on_device(x.grad) and x.grad.dtype == torch.float32
    assert bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    x_cpu = x.detach().cpu().requires_grad_(True)  # CPU inputs to a GPU metric: gradients reach them
    metric(x_cpu, y.cpu()).sum().backward()
    assert x_cpu.grad.device.type == "cpu" and float(x_cpu.grad.abs().sum()) > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_convnext_channels_last_matches_cpu(pictures, dtype, tmp_path_factory):
    """A convolutional backbone (ConvNeXt, channels-last on CUDA): the CPU's numbers, and gradients."""
    import tiny_models

    folder = tmp_path_factory.mktemp("convnext")
    tiny_models.save_open_clip_dir(folder, tiny_models.CONVNEXT_CFG, seed=1)
    cpu = load_metric(str(folder), device="cpu")
    metric = load_metric(str(folder), device=DEVICE, dtype=dtype)
    assert metric.encoder.channels_last == DEVICE.startswith("cuda")  # the path under test
    d = metric.distance(pictures[0], pictures[1:])
    assert on_device(d) and (d.cpu() - cpu.distance(pictures[0], pictures[1:])).abs().max() <= TOL[dtype]
    x = metric.pixels(pictures[:2]).to(DEVICE).requires_grad_(True)
    metric(x, metric.pixels(pictures[2:4]).to(DEVICE)).sum().backward()
    assert on_device(x.grad) and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0


# -- library: attacks with autocast --------------------------------------------------------------------------
def triplets(metric, pictures):
    """Four (ref, left, right) pixel triplets from the five pictures."""
    pix = metric.pixels(pictures)
    return pix[[0, 1, 2, 3]], pix[[1, 2, 3, 4]], pix[[4, 0, 1, 2]]


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attack_2afc_verdict_is_fp32_and_inside_the_ball(metric32, pictures, dtype, norm):
    ref, left, right = triplets(metric32, pictures)
    settings = AttackSettings(norm=norm, eps=EPS[norm], iters=5, restarts=2, autocast_dtype=dtype, square_queries=10)
    report = attack_2afc(metric32, ref, left, right, settings=settings)
    assert all(on_device(t) for t in (report.x_adv, report.label, report.robust_correct, report.adv_similarity))
    assert in_ball(report.x_adv, ref, EPS[norm], norm)
    assert torch.allclose(report.perturbation_norm.cpu(), lp_norm(report.x_adv.cpu() - ref, norm), atol=1e-5)
    assert (report.fp32_checked is None) == (dtype == "fp32") and report.found_by_square is not None
    with torch.no_grad():  # the verdict, recomputed here: fp32 weights, no autocast
        e_adv, e_left, e_right = (metric32.embed_pixels(p.to(DEVICE)) for p in (report.x_adv, left, right))
    sim_left, sim_right = (e_adv * e_left).sum(-1), (e_adv * e_right).sum(-1)
    holds = (sim_right > sim_left) == (report.label == 1)
    clear = (sim_right - sim_left).abs() > 1e-5
    assert torch.equal(report.robust_correct[clear], (holds & report.clean_correct)[clear])


@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_pixel_range_breaks_every_decision(metric32, pictures, dtype):
    ref, left, right = triplets(metric32, pictures)
    settings = AttackSettings(norm="linf", eps=1.0, iters=10, autocast_dtype=dtype, force=True)
    report = attack_2afc(metric32, ref, left, right, settings=settings)
    assert not bool(report.robust_correct.any())


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apgd_pgd_square_on_device(metric32, pictures, dtype, norm):
    x = metric32.pixels(pictures[:3]).to(DEVICE)
    with torch.no_grad():
        objective = UntargetedEmbeddingObjective(metric32.encoder, metric32.embed_pixels(x))
    autocast = None if dtype == "fp32" else getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype])
    eps = EPS[norm]
    ids = torch.tensor([7, 3, 11])  # global ids seed the random starts: on the CPU (the shipped crash) or the GPU
    runs = {"apgd": apgd(objective, x, eps, norm, 5, restarts=2, autocast_dtype=autocast, example_ids=ids),
            "apgd ids on device": apgd(objective, x, eps, norm, 5, restarts=2, autocast_dtype=autocast,
                                       example_ids=ids.to(DEVICE)),
            "pgd": pgd(objective, x, eps, norm, 5, autocast_dtype=autocast),
            "square": square(objective, x, eps, norm, 10, autocast_dtype=autocast)}
    assert torch.equal(runs["apgd"].x_adv, runs["apgd ids on device"].x_adv)
    assert runs["square"].evaluations == 3 * (1 + 10)  # no success notion: every query on every image
    for name, result in runs.items():
        assert on_device(result.x_adv) and in_ball(result.x_adv, x, eps, norm), name
        moved, _ = evaluate(objective, result.x_adv)  # fp32: how far each embedding was pushed
        assert bool((moved > 0).all()), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_attacks_and_distance_interval_on_device(metric32, cpu_metric, pictures, dtype):
    x = metric32.pixels(pictures[:2])
    targets = metric32.pixels(pictures[3:])
    settings = AttackSettings(eps=8 / 255, iters=5, random_start=False, autocast_dtype=dtype)
    away = attack_embedding(metric32, x, None, settings)
    assert on_device(away.x_adv) and in_ball(away.x_adv, x, 8 / 255, "linf")
    assert torch.equal(away.clean_distance.cpu(), torch.zeros(2)) and bool((away.adv_distance > 0).all())
    towards = attack_embedding(metric32, x, targets, settings)  # from x itself: the best point is never worse
    assert in_ball(towards.x_adv, x, 8 / 255, "linf")
    assert bool((towards.adv_distance <= towards.clean_distance + TOL[dtype]).all())
    a, b = metric32.pixels(pictures[2:4]), metric32.pixels(pictures[:2])
    interval = distance_interval(metric32, a, b, AttackSettings(eps=4 / 255, iters=5, autocast_dtype=dtype))
    assert on_device(interval.low) and bool((interval.low <= interval.distance).all())
    assert bool((interval.distance <= interval.high).all())
    assert torch.allclose(interval.distance.cpu(), cpu_metric.distance(pictures[2:4], pictures[:2]), atol=TOL["fp32"])
    assert in_ball(interval.x_low, b, 4 / 255, "linf") and in_ball(interval.x_high, b, 4 / 255, "linf")


@pytest.mark.parametrize("dtype", DTYPES)
def test_evaluation_runner_on_device(nights, model, cpu_clean, dtype):
    from percept_cli.evaluation import runner

    request = runner.EvalRequest("nights", nights, split="test", models=[model], batch_size=4, radii=[8 / 255],
                                 attack=AttackSettings(eps=8 / 255, iters=3, autocast_dtype=dtype))
    record = runner.run(runner.prepare(request), lambda name: load_metric(name, device=DEVICE))
    entry = record["models"][model]
    assert entry["device"].startswith(torch.device(DEVICE).type) and record["attack"]["autocast"] == (
        None if dtype == "fp32" else dtype)
    assert_clean_matches_cpu(entry, cpu_clean, "fp32")  # attacks keep fp32 weights
    assert entry["summary"]["overall"]["n_attacked"] == 20
    for t in entry["triplets"]:  # one radius; a decision wrong when clean is broken there
        assert len(t["robust_correct"]) == 1 and (t["clean_correct"] or t["robust_correct"] == [False])


# -- the commands ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_distance_command(model, cpu_metric, pictures, dtype, tmp_path):
    args = ["--model", model, "--device", DEVICE, "--dtype", dtype]
    a, b, c, d = pictures[:4]
    pair = json.loads(run("distance", a, b, *args, "--json").stdout)
    assert pair["device"].startswith(torch.device(DEVICE).type) and pair["dtype"] == dtype
    assert abs(pair["results"][0]["distance"] - float(cpu_metric.distance(a, b)[0])) <= TOL[dtype]
    ranked = json.loads(run("distance", a, b, c, d, *args, "--json").stdout)["results"]
    values = [r["distance"] for r in ranked]
    assert values == sorted(values) and len(values) == 3
    for r in ranked:
        assert abs(r["distance"] - float(cpu_metric.distance(a, r["b"])[0])) <= TOL[dtype]
    table = tmp_path / "pairs.csv"
    table.write_text(f"a,b\n{a},{b}\n{c},{d}\n")
    assert run("distance", "--pairs", table, "--out", tmp_path / "d.csv", *args).exit_code == 0
    assert len((tmp_path / "d.csv").read_text().splitlines()) == 3
    folder = Path(a).parent
    result = run("distance", folder, "--out", tmp_path / "m.npy", *args)
    assert result.exit_code == 0, result.output
    matrix = np.load(tmp_path / "m.npy")
    assert np.all(np.diag(matrix) == 0)
    assert np.abs(matrix - cpu_metric.distance_matrix(pictures).numpy()).max() <= TOL[dtype]
    robust = run("distance", a, b, "--robust", "4/255", "--iters", "3", *args, "--json")
    assert robust.exit_code == 0, robust.output
    rec = json.loads(robust.stdout)["results"][0]
    assert rec["low"] <= rec["distance"] <= rec["high"]
    assert abs(rec["distance"] - float(cpu_metric.distance(a, b)[0])) <= TOL["fp32"]  # --robust: fp32 weights


@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_command(model, cpu_metric, pictures, dtype, tmp_path):
    from percept_cli.embeddings import read_embeddings

    out = tmp_path / "e.safetensors"
    result = run("embed", Path(pictures[0]).parent, "--out", out, "--model", model, "--device", DEVICE,
                 "--dtype", dtype, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    emb, paths, _ = read_embeddings(out)
    assert paths == pictures
    assert (emb - cpu_metric.embed(pictures)).abs().max() <= 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_attack_2afc_command_with_square(model, cpu_metric, pictures, dtype, tmp_path):
    out = tmp_path / "adv.png"
    result = run("attack", "2afc", "--ref", pictures[0], "--left", pictures[1], "--right", pictures[2], "--square",
                 "--square-queries", "10", "--iters", "5", "--eps", "8/255", "--out", out, "--json",
                 "--model", model, "--device", DEVICE, "--dtype", dtype)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["device"].startswith(torch.device(DEVICE).type) and doc["threat"]["autocast"] == (
        None if dtype == "fp32" else dtype)
    assert doc["perturbation_norm"] <= 8 / 255 + 1e-6 and doc["saved"]["in_ball"] is True
    assert (doc["fp32_checked"] is None) == (dtype == "fp32")
    assert doc["found_by_square"] is not None or not doc["robust_correct"]  # Square ran where APGD failed
    with torch.no_grad():  # the saved file, judged on the CPU: the similarities the command reported
        e_adv = cpu_metric.embed_pixels(png_pixels(out)[None])[0]
    e_left, e_right = cpu_metric.embed(pictures[1:3])
    assert abs(float(e_adv @ e_left) - doc["saved"]["sim_left"]) <= TOL["fp32"]
    assert abs(float(e_adv @ e_right) - doc["saved"]["sim_right"]) <= TOL["fp32"]


@pytest.mark.parametrize("mode", ["--untargeted", "--target"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attack_embed_command(model, cpu_metric, pictures, dtype, mode, tmp_path):
    out = tmp_path / "adv.png"
    target = [pictures[3]] if mode == "--target" else []
    result = run("attack", "embed", pictures[0], mode, *target, "--iters", "5", "--eps", "8/255", "--out", out,
                 "--json", "--model", model, "--device", DEVICE, "--dtype", dtype)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["saved"]["in_ball"] is True and doc["perturbation_norm"] <= 8 / 255 + 1e-6
    with torch.no_grad():
        e_adv = cpu_metric.embed_pixels(png_pixels(out)[None])[0]
    reference = cpu_metric.embed([pictures[3] if target else pictures[0]])[0]
    assert abs((1 - float(e_adv @ reference)) - doc["saved"]["distance"]) <= TOL["fp32"]
    if not target:
        assert doc["clean_distance"] == 0 and doc["adv_distance"] > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_invert_commands(model, pictures, dtype, tmp_path):
    args = ["--iters", "4", "--json", "--model", model, "--device", DEVICE, "--dtype", dtype]
    image = run("invert", "--image", pictures[0], "--seeds", "0,1", "--judge", model, "--out", tmp_path / "i", *args)
    assert image.exit_code == 0, image.output
    doc = json.loads(image.stdout)
    assert doc["device"].startswith(torch.device(DEVICE).type)
    for o in doc["outputs"]:
        assert Image.open(o["path"]).size == (224, 224)
        assert abs(o["judge_similarity"] - o["similarity"]) <= 1e-3  # the same fp32 model, judged again
    text = run("invert", "--text", "a red circle", "--size", "64", "--out", tmp_path / "t", *args)
    assert text.exit_code == 0, text.output
    (o,) = json.loads(text.stdout)["outputs"]
    assert Image.open(o["path"]).size == (64, 64) and -1 <= o["similarity"] <= 1


def test_models_command():
    from percept_cli.models import zoo

    result = run("models", "list", "--json")
    assert result.exit_code == 0
    assert [m["name"] for m in json.loads(result.stdout)["models"]] == [s.name for s in zoo.list_models()]


# -- eval-2afc ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_clean_matches_cpu(nights, model, cpu_clean, dtype, tmp_path):
    entry, _ = eval_2afc(nights, model, tmp_path / "r.json", dtype=dtype)
    assert entry["device"].startswith(torch.device(DEVICE).type) and entry["dtype"] == dtype
    assert_clean_matches_cpu(entry, cpu_clean, dtype)


ATTACKS = {
    "linf-restarts": ["--attack", "linf", "--iters", "5", "--restarts", "2"],
    "l2": ["--attack", "l2", "--eps", "0.5", "--iters", "5"],
    "linf-square": ["--attack", "linf", "--attack", "square", "--iters", "3", "--square-queries", "10"],
    "sweep": ["--attack", "linf", "--sweep-eps", "0,1/255,8/255", "--iters", "5"],
}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_attacks(nights, model, cpu_clean, dtype, attack, tmp_path):
    entry, doc = eval_2afc(nights, model, tmp_path / "r.json", *ATTACKS[attack], dtype=dtype)
    assert doc["attack"]["autocast"] == (None if dtype == "fp32" else dtype) and entry["dtype"] == "fp32"
    assert_clean_matches_cpu(entry, cpu_clean, "fp32")  # an attack keeps fp32 weights
    overall, n = entry["summary"]["overall"], len(doc["radii"])
    assert all(r <= overall["clean"] for r in overall["robust"]) and overall["robust"] == sorted(overall["robust"],
                                                                                               reverse=True)
    for t in entry["triplets"]:
        assert len(t["robust_correct"]) == n and (t["clean_correct"] or not any(t["robust_correct"]))
        assert (t["fp32_checked"] is None) == (dtype == "fp32") or not t["clean_correct"]
        assert (t.get("square_found") is not None) == (attack == "linf-square") or not t["clean_correct"]
    if attack == "sweep":  # radius 0 is the clean accuracy: dropped; the others ascending
        assert doc["radii"] == pytest.approx([1 / 255, 8 / 255])
    if attack == "linf-restarts":
        assert doc["attack"]["restarts"] == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_resume_equals_uninterrupted_run(nights, model, dtype, tmp_path, monkeypatch):
    from percept_cli.evaluation import twoafc

    attack = ["--attack", "linf", "--iters", "5", "--flush-every", "0", "--attack-batch-size", "4"]  # 4 batches
    _, full = eval_2afc(nights, model, tmp_path / "full.json", *attack, dtype=dtype)
    real, calls = twoafc._attack_batch, {"n": 0}

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(twoafc, "_attack_batch", crash_on_second)
    part = tmp_path / "part.json"
    common = ["eval-2afc", "--dataset", "nights", "--root", nights, "--model", model, "--device", DEVICE, "--dtype",
              dtype, "--batch-size", "4", *attack]
    assert run(*common, "--out", part).exit_code == 130
    assert list(tmp_path.glob("part.json.rank0.partial.json"))  # the first batch was flushed
    resumed = run(*common, "--resume", part)
    assert resumed.exit_code == 0, resumed.output
    assert comparable(json.loads(part.read_text())) == comparable(full)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_save_adv_inside_the_ball(nights, model, cpu_metric, dtype, tmp_path):
    adv = tmp_path / "adv"
    entry, _ = eval_2afc(nights, model, tmp_path / "r.json", "--attack", "linf", "--eps", "8/255", "--iters", "3",
                         "--save-adv", adv, dtype=dtype)
    (folder,) = adv.iterdir()
    saved = {p.stem: p for p in (folder / "8_255").glob("*.png")}
    assert set(saved) == {t["id"] for t in entry["triplets"] if t["clean_correct"]} and saved
    with open(nights / "data.csv") as fh:
        refs = {row["id"]: nights / row["ref_path"] for row in csv.DictReader(fh)}
    for name, path in saved.items():
        clean = cpu_metric.pixels([str(refs[name])])[0]
        assert in_ball(png_pixels(path)[None], clean[None], 8 / 255, "linf"), name


def test_torchrun_one_process_equals_plain_run(nights, model, tmp_path):
    """A 1-process torchrun job (NCCL on a GPU) writes the document a plain run writes, world_size 1."""
    attack = ["--attack", "linf", "--iters", "3", "--quiet"]
    _, plain = eval_2afc(nights, model, tmp_path / "plain.json", *attack)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "torchrun.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={port}",
           "-m", "percept_cli", "eval-2afc", "--dataset", "nights", "--root", str(nights), "--model", model,
           "--device", DEVICE, "--batch-size", "4", "--out", str(out), *attack]
    proc = subprocess.run(cmd, check=False, env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["models"][model]["world_size"] == 1
    assert comparable(doc) == comparable(plain)


# -- retrieval ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled_pool(tmp_path_factory) -> Path:
    """pool/safe (pictures 0-3) and pool/unsafe (10-13)."""
    root = tmp_path_factory.mktemp("retrieval") / "pool"
    for label, seeds in {"safe": range(4), "unsafe": range(10, 14)}.items():
        (root / label).mkdir(parents=True)
        for s in seeds:
            make_picture(s).save(root / label / f"p{s:02d}.png")
    return root


def retrieve(*args):
    result = run("retrieve", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_retrieve_index_search_filter_on_device(model, labelled_pool, dtype, tmp_path):
    from percept_cli.retrieval.index import open_index

    cpu = tmp_path / "cpu.idx"
    retrieve("index", labelled_pool, "--out", cpu, "--model", model, "--device", "cpu", "--part-size", "3")
    on_gpu = tmp_path / "gpu.idx"
    doc = retrieve("index", labelled_pool, "--out", on_gpu, "--model", model, "--device", DEVICE, "--dtype", dtype,
                   "--part-size", "3", "--batch-size", "2")
    assert doc["ok"] == 8 and doc["labels"] == {"safe": 4, "unsafe": 4}
    a, b = (np.concatenate([np.asarray(v, np.float32) for v in open_index(p).vectors()]) for p in (cpu, on_gpu))
    assert np.abs(a - b).max() <= 2 * TOL[dtype] + 1e-3  # float16 storage adds ~5e-4
    picture = labelled_pool / "unsafe" / "p11.png"
    hits = retrieve("search", picture, "--index", on_gpu, "-k", "2", "--device", DEVICE, "--dtype", dtype)
    assert hits["results"][0]["neighbours"][0]["key"] == str(picture)
    report = tmp_path / "r.parquet"
    filtered = retrieve("filter", labelled_pool, "--index", on_gpu, "--flag", "unsafe", "--report", report,
                        "--chunk", "3", "--device", DEVICE, "--dtype", dtype)
    assert filtered["decisions"] == {"flagged": 4, "kept": 4}


@pytest.mark.parametrize("dtype", DTYPES)
def test_retrieve_classify_attack_on_device(model, labelled_pool, dtype, tmp_path):
    index = tmp_path / "pool.idx"
    retrieve("index", labelled_pool, "--out", index, "--model", model, "--device", DEVICE)
    adv = tmp_path / "adv"
    doc = retrieve("classify", labelled_pool / "unsafe", "--index", index, "--truth", "none", "--attack", "linf",
                   "--eps", "8/255", "--iters", "3", "--attack-targets", labelled_pool / "safe", "--target-class",
                   "safe", "--save-adv", adv, "--device", DEVICE, "--dtype", dtype)
    assert sum(doc["attacked_counts"].values()) == 4 and 0.0 <= doc["attack"]["success_rate"] <= 1.0
    assert len(list(adv.glob("*.png"))) == 4


def test_exact_search_on_device_equals_cpu():
    from percept_cli.retrieval.search import exact_range, exact_topk

    g = torch.Generator().manual_seed(0)
    parts = [torch.nn.functional.normalize(torch.randn(n, 32, generator=g), dim=1).half().numpy() for n in (50, 7)]
    queries = torch.nn.functional.normalize(torch.randn(5, 32, generator=g), dim=1)
    cpu, dev = (exact_topk(queries, parts, 4, device=d, chunk_rows=16) for d in ("cpu", DEVICE))
    assert torch.equal(cpu.ids, dev.ids) and torch.allclose(cpu.sims, dev.sims, atol=1e-5)
    for (ci, cs), (di, ds) in zip(exact_range(queries, parts, 0.2, device="cpu"),
                                  exact_range(queries, parts, 0.2, device=DEVICE)):
        assert np.array_equal(ci, di) and np.allclose(cs, ds, atol=1e-5)


# -- training ---------------------------------------------------------------------------------------------------
def train(*args):
    result = run("train", *args, "--device", DEVICE, "--workers", "0", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # training refuses fp16 (no loss scaling)
def test_train_fare_resume_and_reload_on_device(tiny64, train_images, dtype, tmp_path):
    """FARE on the device (autocast ``dtype``), stopped at a checkpoint and resumed; the model reloads there."""
    from percept_cli.training.config import resolve_config
    from percept_cli.training.runner import run_training

    settings = {"data": str(train_images), "model": str(tiny64), "out": str(tmp_path / "run"), "steps": 4,
                "batch_size": 8, "micro_batch": 4, "pgd_steps": 2, "save_every": 2, "eval_every": 2,
                "eval_iters": 3, "eval_size": 4, "workers": 0, "device": DEVICE, "dtype": dtype, "lr": 1e-3}

    def stop_at_2(kind, payload):
        if kind == "checkpoint" and payload["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(resolve_config("fare", {}, settings), on_event=stop_at_2)
    result = run_training(resolve_config("fare", {}, settings), resume=True)
    assert result.resumed_from == 2 and result.steps == 4
    assert np.isfinite(result.last_log["loss"]) and np.isfinite(result.last_eval["adv_distortion"])
    metric = load_metric(str(tmp_path / "run"), device=DEVICE)
    x = torch.rand(2, 3, 64, 64, device=DEVICE)
    assert on_device(metric.encoder(x)) and torch.isfinite(metric.encoder(x)).all()


@pytest.mark.parametrize("head", ["mlp", "lora"])
def test_train_2afc_on_device(tiny64, small_nights, head, tmp_path):
    doc = train("2afc", "--root", small_nights, "--head", head, "--model", tiny64, "--out", tmp_path / head,
                "--epochs", "2", "--batch-size", "16", "--log-every", "1")
    assert doc["steps"] == 6 and 0.0 <= doc["last_eval"]["val_accuracy"] <= 1.0
    metric = load_metric(str(tmp_path / head), device=DEVICE)
    assert on_device(metric.embed_pixels(torch.rand(1, 3, 64, 64, device=DEVICE)))


def test_train_tecoa_on_device(tiny64, train_images, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("dark\nbright\n")
    doc = train("tecoa", "--data", train_images, "--classnames", names, "--model", tiny64, "--out", tmp_path / "t",
                "--steps", "2", "--batch-size", "8", "--pgd-steps", "2", "--eval-iters", "2")
    assert 0.0 <= doc["last_eval"]["robust_accuracy"] <= doc["last_eval"]["clean_accuracy"] <= 1.0


def test_train_torchrun_one_process(tiny64, train_images, tmp_path):
    """``percept train fare`` under a 1-process torchrun (NCCL on a GPU) equals the plain run's loss curve."""
    common = ["train", "fare", "--data", str(train_images), "--model", str(tiny64), "--steps", "2",
              "--batch-size", "8", "--pgd-steps", "2", "--eval-every", "0", "--eval-iters", "2", "--log-every", "1",
              "--device", DEVICE, "--dtype", "fp32", "--workers", "0", "--quiet"]
    plain = run(*common, "--out", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                           f"--master_port={port}", "-m", "percept_cli", *common, "--out", str(tmp_path / "tr")],
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    def losses(run_dir):
        return [r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    assert np.allclose(losses(tmp_path / "plain"), losses(tmp_path / "tr"), rtol=1e-4)
