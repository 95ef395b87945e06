"""Retrieval benchmarks (issue 12): search at scale, indexing throughput, filtering end to end.

Targets:
* search: 1M stored 640-d float16 vectors, 1,000 queries: exact torch (CPU, and GPU if present) vs
  FAISS IVF, with recall@10; memory O(N*d), no per-item Python objects.
* index: indexing throughput within 1.10x of the bare encoder's forward time on the same images when
  decoding keeps up (images/s and the bottleneck).
* filter: many small images end to end (images/s); after kill -9 a resume loses at most one chunk.

    python benchmarks/bench_retrieve.py search --n 1000000 --dim 640 --faiss ivf-flat,ivf-pq
    python benchmarks/bench_retrieve.py index --arch ViT-B-32 --n 256 --batch-size 32
    python benchmarks/bench_retrieve.py filter --n 100000 --chunk 4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- search --------------------------------------------------------------------------------------------------
class VectorIndex:
    """The members of PoolIndex that search.py uses, over .npy parts on disk (memory-mapped)."""

    def __init__(self, path: Path, parts: list[Path]):
        self.path = path
        self._parts = [np.load(p, mmap_mode="r") for p in parts]
        self.manifest = {"generation": "bench", "faiss": None}
        self.n = sum(len(p) for p in self._parts)
        self.dim = int(self._parts[0].shape[1])

    def vectors(self):
        return list(self._parts)

    def set_faiss(self, info):
        self.manifest = {**self.manifest, "faiss": info}


def make_vectors(folder: Path, n: int, dim: int, centres: int, part_rows: int, seed: int = 0) -> list[Path]:
    """Clustered unit vectors (a Gaussian mixture, normalised) in float16 parts of ``part_rows``."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim)).astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    paths = []
    for k, start in enumerate(range(0, n, part_rows)):
        rows = min(part_rows, n - start)
        x = means[rng.integers(0, centres, rows)] + 0.6 * rng.standard_normal((rows, dim)).astype(np.float32) / dim ** 0.5
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        path = folder / f"part-{k:05d}.npy"
        np.save(path, x.astype(np.float16))
        paths.append(path)
    return paths


def recall_at(found: torch.Tensor, truth: torch.Tensor, k: int = 10) -> float:
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / (len(truth) * k)


def bench_search(args) -> dict:
    from percept_cli.retrieval import search

    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        t0 = time.perf_counter()
        paths = make_vectors(work, args.n, args.dim, args.centres, args.part_rows)
        generated = time.perf_counter() - t0
        index = VectorIndex(work, paths)
        rng = np.random.default_rng(1)
        picks = rng.choice(args.n, args.queries, replace=False)
        flat = [p for p in index.vectors()]
        base = np.stack([np.asarray(flat[i // args.part_rows][i % args.part_rows], np.float32) for i in picks])
        noisy = base + 0.3 * rng.standard_normal(base.shape).astype(np.float32) / args.dim ** 0.5
        queries = torch.from_numpy(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
        rss_before = rss_peak_mib()
        out = {"n": args.n, "dim": args.dim, "queries": args.queries, "storage": "float16 .npy parts, memory-mapped",
               "vector_bytes": args.n * args.dim * 2, "generate_s": generated, "torch_threads": torch.get_num_threads()}
        t0 = time.perf_counter()
        exact = search.exact_topk(queries, index.vectors(), 10, device="cpu")
        out["exact_cpu"] = {"seconds": time.perf_counter() - t0}
        out["exact_cpu"]["queries_per_s"] = args.queries / out["exact_cpu"]["seconds"]
        out["exact_cpu"]["rss_peak_increase_mib"] = rss_peak_mib() - rss_before
        if torch.cuda.is_available():
            search.exact_topk(queries[:8], index.vectors(), 10, device="cuda")  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            gpu = search.exact_topk(queries, index.vectors(), 10, device="cuda")
            torch.cuda.synchronize()
            out["exact_cuda"] = {"seconds": time.perf_counter() - t0, "same_ids": bool(torch.equal(gpu.ids, exact.ids))}
        for kind in [k for k in args.faiss.split(",") if k]:
            if args.train_cap:
                search.TRAIN_CAP = args.train_cap
            t0 = time.perf_counter()
            info = search.build_faiss(index, kind, seed=0)
            built = time.perf_counter() - t0
            searcher = search.Searcher(index, "faiss")
            searcher.topk(queries[:8], 10)  # load
            t0 = time.perf_counter()
            hits = searcher.topk(queries, 10)
            took = time.perf_counter() - t0
            out[f"faiss_{kind}"] = {"factory": info["factory"], "nlist": info["nlist"], "nprobe": info["nprobe"],
                                    "trained_on": info["trained_on"], "build_s": built, "search_s": took,
                                    "queries_per_s": args.queries / took,
                                    "recall_at_10_vs_exact": recall_at(hits.ids, exact.ids),
                                    "recall_at_10_stored": info["recall_at_10"]}
            print(json.dumps({kind: out[f"faiss_{kind}"]}), file=sys.stderr, flush=True)
        out["rss_peak_mib"] = rss_peak_mib()
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- index ---------------------------------------------------------------------------------------------------
def make_pngs(folder: Path, n: int, size: int, labels=("a", "b")) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / labels[i % len(labels)]
        sub.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BICUBIC).save(sub / f"{i:06d}.png")


def bench_index(args) -> dict:
    """Decode only, bare encoder on pre-decoded batches, and build_index into a fresh folder; rotating
    order over ``args.repeats`` rounds, medians reported."""
    import statistics

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import random_metric

    from percept_cli.retrieval.index import build_index
    from percept_cli.retrieval.sources import collect_items, iter_item_batches

    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        make_pngs(work / "pool", args.n, args.size)
        _, _, metric = random_metric(args.arch, device, batch_size=args.batch_size, num_workers=args.workers)
        listing = collect_items([work / "pool"], label_from_folder=True)
        batches = [b for _, b, _ in iter_item_batches(listing.items, metric.preprocess, args.batch_size,
                                                         args.workers)]
        parts = []

        def decode():  # the pipeline's supply
            for _ in iter_item_batches(listing.items, metric.preprocess, args.batch_size, args.workers):
                pass

        @torch.no_grad()
        def bare():  # the demand: the encoder on the same images, pre-decoded
            for b in batches:
                metric.embed_pixels(b.to(device).float().div(255), check=False)
            if device.type == "cuda":
                torch.cuda.synchronize()

        def index():
            out = Path(tempfile.mkdtemp(dir=work, prefix="run-")) / "pool.idx"
            parts.append(build_index(metric, listing, out, part_size=args.part_size, batch_size=args.batch_size,
                                     num_workers=args.workers).parts_total)
            shutil.rmtree(out.parent)

        with torch.no_grad():
            metric.embed_pixels(batches[0].to(device).float().div(255), check=False)  # warm-up
        runners = [("decode_only", decode), ("bare_encoder", bare), ("build_index", index)]
        times = {name: [] for name, _ in runners}
        for rep in range(args.repeats):
            for name, fn in runners[rep % 3:] + runners[:rep % 3]:  # rotate: no variant always first
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        return {"arch": args.arch, "device": str(device), "n": args.n, "image_size": args.size,
                "batch_size": args.batch_size, "part_size": args.part_size, "torch_threads": torch.get_num_threads(),
                "repeats": args.repeats, "all_s": times,
                "decode_only_s": med["decode_only"], "decode_images_per_s": args.n / med["decode_only"],
                "bare_encoder_s": med["bare_encoder"], "bare_images_per_s": args.n / med["bare_encoder"],
                "build_index_s": med["build_index"], "index_images_per_s": args.n / med["build_index"],
                "ratio_index_vs_bare": med["build_index"] / med["bare_encoder"], "target_ratio": 1.10,
                "bottleneck": "decode" if med["decode_only"] > med["bare_encoder"] else "encoder",
                "parts": parts[0]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- filter --------------------------------------------------------------------------------------------------
def bench_filter(args) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models
    from PIL import Image

    from percept_cli.retrieval.filtering import read_report

    cache = Path(args.cache) / f"filter-{args.n}-{args.size}"
    data = cache / "data"
    if not (cache / "ready").exists():
        shutil.rmtree(cache, ignore_errors=True)
        rng = np.random.default_rng(0)
        for i in range(args.n):
            sub = data / f"{i // 1000:04d}"
            if i % 1000 == 0:
                sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)).save(sub / f"{i:07d}.png")
        make_pngs(cache / "pool", 64, 32, labels=("safe", "unsafe"))
        tiny_models.save_open_clip_dir(cache / "model", tiny_models.VIT_CFG, seed=0)
        (cache / "ready").write_text("ok")
    work = Path(tempfile.mkdtemp(prefix="bench-filter-"))
    base = [sys.executable, "-m", "percept_cli", "retrieve"]
    common = ["--device", "cpu", "--batch-size", str(args.batch_size), "--quiet"]
    try:
        subprocess.run([*base, "index", str(cache / "pool"), "--out", str(work / "pool.idx"), "--model",
                        str(cache / "model"), "--faiss", "none", *common], check=True)
        filt = [*base, "filter", str(data), "--index", str(work / "pool.idx"), "--flag", "unsafe",
                "--chunk", str(args.chunk), *common]
        t0 = time.perf_counter()
        subprocess.run([*filt, "--report", str(work / "full.parquet")], check=True)
        full_s = time.perf_counter() - t0
        # kill -9 part way, then --resume
        report = work / "killed.parquet"
        partial = work / "killed.parquet.partial"
        proc = subprocess.Popen([*filt, "--report", str(report)], start_new_session=True)
        while len(list(partial.glob("chunk-*.parquet"))) < args.kill_after and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(args.chunk / max(args.n / full_s, 1) / 2)  # half-way through the next chunk
        chunks_before_kill = len(list(partial.glob("chunk-*.parquet")))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        chunks_at_kill = len(list(partial.glob("chunk-*.parquet")))
        rows_done = min(chunks_at_kill * args.chunk, args.n)
        t0 = time.perf_counter()
        done = subprocess.run([*filt, "--report", str(report), "--resume", "--json"], check=True,
                              capture_output=True, text=True)
        resume_s = time.perf_counter() - t0
        doc = json.loads(done.stdout)
        full, resumed = read_report(work / "full.parquet"), read_report(report)
        return {"n": args.n, "image_size": args.size, "chunk": args.chunk, "batch_size": args.batch_size,
                "model": "tiny ViT (1 layer, width 32, 224 px)", "full_s": full_s, "images_per_s": args.n / full_s,
                "chunks_total": doc["chunks"], "chunks_seen_before_kill": chunks_before_kill,
                "chunks_done_at_kill": chunks_at_kill, "chunks_resumed": doc["chunks_resumed"],
                "rows_kept_from_killed_run": rows_done, "rows_recomputed_on_resume": args.n - rows_done,
                "resume_s": resume_s, "resumed_equals_uninterrupted": resumed.equals(full),
                "lost_at_most_one_chunk": doc["chunks_resumed"] == chunks_at_kill}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("search")
    s.add_argument("--n", type=int, default=1_000_000)
    s.add_argument("--dim", type=int, default=640)
    s.add_argument("--queries", type=int, default=1000)
    s.add_argument("--centres", type=int, default=4096)
    s.add_argument("--part-rows", type=int, default=65536)
    s.add_argument("--faiss", default="ivf-flat,ivf-pq", help="comma-separated kinds ('' for none)")
    s.add_argument("--train-cap", type=int, default=None, help="cap the IVF training sample (default: percept's)")
    i = sub.add_parser("index")
    i.add_argument("--arch", default="ViT-B-32")
    i.add_argument("--n", type=int, default=256)
    i.add_argument("--size", type=int, default=256)
    i.add_argument("--batch-size", type=int, default=32)
    i.add_argument("--part-size", type=int, default=4096)
    i.add_argument("--workers", type=int, default=None)
    i.add_argument("--device", default="cpu")
    i.add_argument("--repeats", type=int, default=3)
    f = sub.add_parser("filter")
    f.add_argument("--n", type=int, default=100_000)
    f.add_argument("--size", type=int, default=32)
    f.add_argument("--chunk", type=int, default=4096)
    f.add_argument("--batch-size", type=int, default=256)
    f.add_argument("--kill-after", type=int, default=3, help="kill -9 once this many chunks are written")
    f.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "percept-bench"))
    for p in (s, i, f):
        p.add_argument("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/...)")
    args = parser.parse_args()
    result = {"search": bench_search, "index": bench_index, "filter": bench_filter}[args.mode](args)
    result["machine"] = {"cpus": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                         else None}
    name = {"search": lambda: f"retrieve_search_{args.n}_{args.dim}",
            "index": lambda: f"retrieve_index_{args.arch}_{torch.device(args.device).type}"
                             + (f"_{result['parts']}parts" if result["parts"] > 1 else ""),
            "filter": lambda: f"retrieve_filter_{args.n}"}[args.mode]()
    out = args.out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
