"""``percept train`` under torchrun: 2 CPU processes (gloo) follow the 1-process run's loss curve, only
rank 0 writes, and the model matches within float tolerance (the global batch and its random starts
do not depend on the number of processes; only summation order differs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _args(tiny64, images, out):
    return ["train", "fare", "--data", str(images), "--model", str(tiny64), "--out", str(out), "--steps", "4",
            "--batch-size", "8", "--lr", "1e-3", "--pgd-steps", "2", "--log-every", "1", "--eval-every", "0",
            "--save-every", "2", "--eval-iters", "2", "--workers", "0", "--warmup", "0", "--json"]


def test_two_processes_match_one(tiny64, train_images, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    single, double = tmp_path / "single", tmp_path / "double"
    one = subprocess.run([sys.executable, "-m", "percept_cli", *_args(tiny64, train_images, single)], env=env, check=False,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "percept_cli",
                          *_args(tiny64, train_images, double)], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    documents = [json.loads(line) for line in two.stdout.split("\n}\n") if line.strip() for line in [line + "}"]]
    assert len(documents) == 2 and all(d["steps"] == 4 for d in documents)  # every rank reports

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    a, b = losses(single), losses(double)
    assert len(a) == len(b) == 4  # one log line per step: rank 0 alone writes
    assert all(abs(x - y) <= 1e-3 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)
    wa, wb = load_file(str(single / "open_clip_model.safetensors")), load_file(str(double / "open_clip_model.safetensors"))
    assert wa.keys() == wb.keys()
    base = load_file(str(tiny64 / "open_clip_model.safetensors"))
    # Adam turns float-level gradient differences on near-zero gradients into lr-sized steps, so compare
    # the two runs' difference with how far training moved the weights
    moved = sum((wa[k] - base[k]).pow(2).sum() for k in wa if k.startswith("visual.")).sqrt()
    apart = sum((wa[k] - wb[k]).pow(2).sum() for k in wa if k.startswith("visual.")).sqrt()
    assert moved > 0 and apart < 0.05 * moved, (float(apart), float(moved))
    assert all(torch.equal(wa[k], wb[k]) for k in wa if not k.startswith("visual."))  # text tower untouched
    assert sorted(p.name for p in (double / "checkpoints").iterdir()) == ["latest", "step_00000002.safetensors",
                                                                          "step_00000004.safetensors"]
