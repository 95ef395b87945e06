"""Cost of one inversion iteration vs. one forward+backward of the encoder at batch = number of seeds.

Target (issue #5): <= 1.15x (all seeds are optimised together in one batch). Random weights of the
real architecture (same compute as pretrained).

    python benchmarks/bench_invert.py --arch convnext_base_w --seeds 4 --iters 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _common import random_metric
import torch.nn.functional as F


def main() -> None:
    from percept_cli.inversion import InversionSettings, invert

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="convnext_base_w")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    _, _, metric = random_metric(args.arch, device)
    encoder = metric.encoder
    target = F.normalize(torch.randn(encoder(torch.rand(1, 3, 224, 224, device=device)).shape[-1]), dim=0)

    x = torch.rand(args.seeds, 3, 224, 224, device=device)
    fb = []
    for _ in range(4):
        start = time.perf_counter()
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(encoder(xr).sum(), xr)
        fb.append(time.perf_counter() - start)

    stamps = []
    invert(metric, target, list(range(args.seeds)), InversionSettings(iters=2))  # warm-up
    start = time.perf_counter()
    invert(metric, target, list(range(args.seeds)), InversionSettings(iters=args.iters),
           progress=lambda n: stamps.append(time.perf_counter()))
    per_iter = [b - a for a, b in zip([start] + stamps[:-1], stamps)][1:]
    result = {"arch": args.arch, "device": str(device), "seeds": args.seeds, "iters": args.iters,
              "torch_threads": torch.get_num_threads(), "fwd_bwd_median_s": statistics.median(fb[1:]),
              "iteration_median_s": statistics.median(per_iter),
              "ratio": statistics.median(per_iter) / statistics.median(fb[1:]), "target": 1.15}
    out = Path(__file__).parent / "results" / f"invert_{args.arch}_{device.type}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
