"""Embedding a directory with percept vs. bare OpenCLIP `encode_image` on pre-decoded batches.

Target (issue #2): percept's end-to-end directory embedding (files decoded by DataLoader
workers, normalisation inside the encoder, L2-normalised output) costs at most 1.10x the
time of calling `model.encode_image` on the same images already decoded and batched
(same architecture, batch size and device). Weights are random: the compute is the same
as for the pretrained model.

    python benchmarks/bench_embed.py --arch convnext_base_w --n 96 --batch-size 16 --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import random_metric
from PIL import Image


def make_images(directory: Path, n: int, size=(500, 375)) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize(size, Image.BICUBIC)  # smooth, photo-like content
        path = directory / f"{i:04d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    import open_clip

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="convnext_base_w")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    model, pp, metric = random_metric(args.arch, device, dtype=dtype, image_size=args.image_size,
                                      batch_size=args.batch_size, num_workers=args.workers)
    transform = open_clip.image_transform(args.image_size, is_train=False, mean=pp["mean"], std=pp["std"])

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.n)
        batches = [torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + args.batch_size]])
                   for i in range(0, len(paths), args.batch_size)]

        def bare():
            with torch.no_grad():
                for batch in batches:
                    model.encode_image(batch.to(device, dtype))
            sync(device)

        def percept_files():
            metric.embed_files(paths)
            sync(device)

        def percept_tensors():
            with torch.no_grad():
                for batch in batches:
                    metric.embed_pixels(batch.to(device))
            sync(device)

        timings = {"bare_encode_image": [], "percept_files": [], "percept_predecoded": []}
        bare(), percept_files()  # warm-up (allocator, worker start-up code paths, caches)
        runners = [("bare_encode_image", bare), ("percept_files", percept_files),
                   ("percept_predecoded", percept_tensors)]
        for rep in range(args.repeats):
            # rotate the order each repeat so no variant always runs first (CPU clocks, caches)
            for name, fn in runners[rep % 3:] + runners[:rep % 3]:
                start = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in timings.items()}
    result = {
        "arch": args.arch, "device": str(device), "dtype": args.dtype, "n_images": args.n,
        "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
        "median_s": med,
        "images_per_s": {k: args.n / v for k, v in med.items()},
        "ratio_files_vs_bare": med["percept_files"] / med["bare_encode_image"],
        "ratio_predecoded_vs_bare": med["percept_predecoded"] / med["bare_encode_image"],
        "target_ratio": 1.10,
    }
    out = args.out or Path(__file__).parent / "results" / f"embed_{args.arch}_{device.type}_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
