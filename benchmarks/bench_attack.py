"""Cost of one APGD iteration vs. one forward+backward of the encoder, host-device syncs per
iteration, and memory over iterations.

Targets (issue #3): one APGD iteration <= 1.15x one forward+backward (w.r.t. the input) of the
encoder on the batch being attacked; with early stopping, broken points leave the batch so later
iterations cost less; no graph outlives its iteration (memory flat over iterations). Issue 11:
at GPU speeds the bookkeeping must not stall the device: syncs per iteration are counted (on CUDA
with torch's sync debug mode; on the CPU on the simulated device of tests/simulated_device.py,
which copies counts to the host asynchronously as CUDA does).
Random weights of the real architecture (same compute as the pretrained model); ``--arch tiny-vit``
is the tests' 1-layer ViT (width 32, patch 32, 224 px), where the per-iteration overhead shows.

    python benchmarks/bench_attack.py --arch convnext_base_w --batch 4 --iters 10 --device cpu
    python benchmarks/bench_attack.py --arch tiny-vit --batch 64 --iters 20 --autocast bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from _common import random_metric

TINY_VIT = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32,
                                            "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def build_metric(arch: str, device: torch.device):
    """The benchmark's metric: an OpenCLIP architecture with random weights, or the tests' tiny ViT."""
    if arch != "tiny-vit":
        return random_metric(arch, device)[2]
    from open_clip.model import CLIP

    from percept_cli.metric import PerceptualMetric
    from percept_cli.models.encoder import PixelEncoder
    from percept_cli.models.loading import ModelSource

    torch.manual_seed(0)
    visual = CLIP(**TINY_VIT).visual.eval().to(device)
    encoder = PixelEncoder(visual, [0.5] * 3, [0.25] * 3, 224).eval().requires_grad_(False)
    return PerceptualMetric(encoder, ModelSource(arch, "benchmark", arch, "open_clip"))


def syncs_per_iteration(objective, ref, autocast, device) -> float | None:
    """Host-device syncs per APGD iteration with early stopping and nothing breaking (the labels are
    the model's own clean decisions, eps 1e-6), from runs of 2 and 5 iterations."""
    from percept_cli.attacks import TwoAFCObjective, apgd
    from percept_cli.decision import decision

    with torch.no_grad():
        e_ref = objective.embed(ref)
    own = decision((e_ref * objective.left).sum(-1), (e_ref * objective.right).sum(-1))
    objective = TwoAFCObjective(objective.encoder, objective.left, objective.right, own)

    if device.type == "cuda":
        def count(n):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    apgd(objective, ref, 1e-6, "linf", n, early_stop=True, autocast_dtype=autocast)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            return sum("synchroniz" in str(w.message) for w in seen)
        return (count(5) - count(2)) / 3
    if device.type != "cpu":
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from simulated_device import SimulatedDevice

    from percept_cli.attacks import core

    def count(n):
        saved = getattr(core, "ASYNC_HOST_COPY", None)  # None: code from before asynchronous counts
        core.ASYNC_HOST_COPY = ("cuda", "cpu")
        try:
            with SimulatedDevice() as dev:
                dev.put_module(objective.encoder)
                sim = TwoAFCObjective(objective.encoder, dev.put(objective.left[:2]), dev.put(objective.right[:2]),
                                      dev.put(objective.label[:2]))
                apgd(sim, dev.put(ref[:2]), 1e-6, "linf", n, early_stop=True, autocast_dtype=autocast)
                return sum(dev.syncs.values())
        finally:
            core.ASYNC_HOST_COPY = saved
    return (count(5) - count(2)) / 3


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_mib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mib()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Per-iteration times and memory, from APGD's progress callback."""

    def __init__(self, device):
        self.device, self.stamps, self.memory = device, [], []

    def start(self):
        sync(self.device)
        self.stamps, self.memory = [time.perf_counter()], []

    def tick(self, _):
        sync(self.device)
        self.stamps.append(time.perf_counter())
        self.memory.append(memory_mib(self.device))

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def time_iterations(objective, ref, encoder, autocast, device, iters: int, rounds: int):
    """(forward+backward times, APGD iteration times, memory trace), interleaved over ``rounds`` so
    that a machine shared with other work slows both alike. Nothing breaks (eps 1e-6, no early stop)."""
    from percept_cli.attacks import apgd

    def fwd_bwd():
        x = ref.detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = encoder(x)
        torch.autograd.grad(out.float().sum(), x)
        sync(device)

    fwd_bwd()  # warm-up
    apgd(objective, ref, 1e-6, "linf", 2, autocast_dtype=autocast)
    bare, per_iter, clock = [], [], Clock(device)
    for _ in range(rounds):
        for _ in range(2):
            start = time.perf_counter()
            fwd_bwd()
            bare.append(time.perf_counter() - start)
        clock.start()
        apgd(objective, ref, 1e-6, "linf", iters, autocast_dtype=autocast, progress=clock.tick)
        per_iter += clock.intervals()[1:]  # the first includes the initial evaluation
    return bare, per_iter, clock.memory


def main() -> None:
    from percept_cli.attacks import TwoAFCObjective, apgd

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="convnext_base_w", help="an OpenCLIP architecture, or tiny-vit")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of forward+backward and APGD")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", default=None, choices=[None, "bf16"])
    parser.add_argument("--early-eps", type=float, default=0.05 / 255,
                        help="radius for the early-stopping run (points should break gradually)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.bfloat16 if args.autocast == "bf16" else None

    metric = build_metric(args.arch, device)
    g = torch.Generator().manual_seed(0)
    ref, left, right = (torch.rand(args.batch, 3, 224, 224, generator=g).to(device) for _ in range(3))
    with torch.no_grad():
        e_left, e_right = metric.embed_pixels(left), metric.embed_pixels(right)
    label = torch.zeros(args.batch, dtype=torch.long, device=device)
    objective = TwoAFCObjective(metric.encoder, e_left, e_right, label)
    bare, per_iter, memory = time_iterations(objective, ref, metric.encoder, autocast, device, args.iters,
                                             args.rounds)

    # early stopping at a radius where points break: later iterations cost less
    clock = Clock(device)
    clock.start()
    result = apgd(objective, ref, args.early_eps, "linf", args.iters, early_stop=True, autocast_dtype=autocast,
                  progress=clock.tick)
    floor, iteration = statistics.median(bare), statistics.median(per_iter)
    result_json = {
        "arch": args.arch, "device": str(device), "batch": args.batch, "iters": args.iters, "rounds": args.rounds,
        "autocast": args.autocast, "torch_threads": torch.get_num_threads(),
        "fwd_bwd_median_s": floor,
        "apgd_iteration_median_s": iteration,
        "ratio_apgd_iteration_vs_fwd_bwd": iteration / floor,
        "target_ratio": 1.15,
        "overhead_per_iteration_s": iteration - floor,
        "syncs_per_iteration": syncs_per_iteration(objective, ref, autocast, device),
        "syncs_counted_on": {"cuda": "torch.cuda sync debug mode", "cpu": "simulated device"}.get(device.type),
        "memory_mib_per_iteration": [round(m, 1) for m in memory],
        "memory_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
        "early_stop": {"eps": args.early_eps, "iteration_s": [round(t, 4) for t in clock.intervals()],
                       "broken": int(result.broken.sum()),
                       "evaluations": result.evaluations, "evaluations_without_early_stop":
                       args.batch * (args.iters + 1)},
    }
    name = f"attack_{args.arch}_{device.type}_b{args.batch}_{args.autocast or 'fp32'}.json"
    out = args.out or Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result_json, indent=2) + "\n")
    print(json.dumps(result_json, indent=2))


if __name__ == "__main__":
    main()
