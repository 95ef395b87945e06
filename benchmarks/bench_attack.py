"""Cost of one APGD iteration vs. one forward+backward of the encoder, and memory over iterations.

Targets (issue #3): one APGD iteration <= 1.15x one forward+backward (w.r.t. the input) of the
encoder on the batch being attacked; with early stopping, broken points leave the batch so later
iterations cost less; no graph outlives its iteration (memory flat over iterations).
Random weights of the real architecture (same compute as the pretrained model).

    python benchmarks/bench_attack.py --arch convnext_base_w --batch 4 --iters 10 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from _common import random_metric


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_mib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mib()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    from percept_cli.attacks import TwoAFCObjective, apgd

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="convnext_base_w")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", default=None, choices=[None, "bf16"])
    parser.add_argument("--early-eps", type=float, default=0.05 / 255,
                        help="radius for the early-stopping run (points should break gradually)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.bfloat16 if args.autocast == "bf16" else None

    _, _, metric = random_metric(args.arch, device)
    encoder = metric.encoder
    g = torch.Generator().manual_seed(0)
    ref, left, right = (torch.rand(args.batch, 3, 224, 224, generator=g).to(device) for _ in range(3))
    with torch.no_grad():
        e_left, e_right = metric.embed_pixels(left), metric.embed_pixels(right)
    label = torch.zeros(args.batch, dtype=torch.long, device=device)
    objective = TwoAFCObjective(encoder, e_left, e_right, label)

    def fwd_bwd():
        x = ref.detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = encoder(x)
        torch.autograd.grad(out.float().sum(), x)
        sync(device)

    fwd_bwd()  # warm-up
    bare = []
    for _ in range(max(3, args.iters // 2)):
        start = time.perf_counter()
        fwd_bwd()
        bare.append(time.perf_counter() - start)

    stamps, mem = [], []

    def tick(_):
        sync(device)
        stamps.append(time.perf_counter())
        mem.append(memory_mib(device))

    eps_small = 1e-6  # nothing breaks: the full batch is attacked every iteration
    apgd(objective, ref, eps_small, "linf", 2, autocast_dtype=autocast)  # warm-up
    sync(device)
    start = time.perf_counter()
    apgd(objective, ref, eps_small, "linf", args.iters, autocast_dtype=autocast, progress=tick)
    per_iter = [b - a for a, b in zip([start] + stamps[:-1], stamps)][1:]  # drop the first (initial evaluation)
    mem_trace = list(mem)

    # early stopping at a radius where points break: later iterations cost less
    stamps.clear()
    start = time.perf_counter()
    result = apgd(objective, ref, args.early_eps, "linf", args.iters, early_stop=True, autocast_dtype=autocast,
                  progress=tick)
    early = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    result_json = {
        "arch": args.arch, "device": str(device), "batch": args.batch, "iters": args.iters,
        "autocast": args.autocast, "torch_threads": torch.get_num_threads(),
        "fwd_bwd_median_s": statistics.median(bare),
        "apgd_iteration_median_s": statistics.median(per_iter),
        "ratio_apgd_iteration_vs_fwd_bwd": statistics.median(per_iter) / statistics.median(bare),
        "target_ratio": 1.15,
        "memory_mib_per_iteration": [round(m, 1) for m in mem_trace],
        "memory_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
        "early_stop": {"eps": args.early_eps, "iteration_s": [round(t, 4) for t in early],
                       "broken": int(result.broken.sum()),
                       "evaluations": result.evaluations, "evaluations_without_early_stop":
                       args.batch * (args.iters + 1)},
    }
    out = args.out or Path(__file__).parent / "results" / f"attack_{args.arch}_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result_json, indent=2) + "\n")
    print(json.dumps(result_json, indent=2))


if __name__ == "__main__":
    main()
