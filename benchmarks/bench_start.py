"""How long a command takes to start: `percept distance a.png b.png` from process start to exit.

Target (issue #11): at most 4 s for ConvNeXt-B (OpenCLIP `convnext_base_w`, the default model's
architecture) on the 2-core CPU machine, cached model, warm disk cache.

The model is a random-init `convnext_base_w` written ONCE in the Hub layout the real repos use
(`open_clip_config.json` + `open_clip_model.safetensors`, both towers) into a cache directory that
later runs reuse. Every timing runs in a fresh process after one untimed warm-up run (warm disk
cache); the median of ``--runs`` is reported, end to end and for its parts measured inside a child
process (imports of torch, percept and open_clip; `load_metric` after those; first distance: both
images embedded in one batch, as the CLI does).

``--baseline SRC`` times another source tree (e.g. `git archive HEAD src | tar -x -C /tmp/old`, then
`--baseline /tmp/old/src`) in the same runs, alternating with this one, so both see the same machine
load. ``--check`` also compares the embedding with open_clip's own create_model + load_checkpoint.

    python benchmarks/bench_start.py [--runs 5] [--device cpu] [--baseline OLD/src] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCH = "convnext_base_w"
SRC = Path(__file__).resolve().parent.parent / "src"

# Run in a child process: the parts of one start, each timed from the child's own start.
PARTS = """
import json, sys, time
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter()
from percept_cli.metric import load_metric
t_import = time.perf_counter()
import open_clip  # what loading an OpenCLIP model imports (timm, torchvision, and through it torch._dynamo)
t_libs = time.perf_counter()
metric = load_metric(sys.argv[1], device=sys.argv[2])
t_load = time.perf_counter()
emb = metric.embed_files([sys.argv[3], sys.argv[4]]).embeddings
d = float((emb[0] - emb[1]).pow(2).sum() / 2)
t_first = time.perf_counter()
print(json.dumps({"import_torch_s": t_torch - t0, "import_percept_s": t_import - t_torch,
                  "import_open_clip_s": t_libs - t_import, "load_metric_s": t_load - t_libs,
                  "first_distance_s": t_first - t_load,
                  "total_s": t_first - t0, "distance": d}))
"""

CHECK = """
import logging, sys, torch, open_clip
from percept_cli.metric import load_metric
metric = load_metric(sys.argv[1], device="cpu")
logging.disable(logging.WARNING)
model = open_clip.create_model("local-dir:" + sys.argv[1], load_weights=False, pretrained_text=False)
open_clip.load_checkpoint(model, sys.argv[1] + "/open_clip_model.safetensors", weights_only=True)
model.eval().requires_grad_(False)
x = torch.rand(1, 3, metric.image_size, metric.image_size, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    ours, theirs = metric.encoder(x), model.encode_image(metric.encoder.normalize(x))
print(float((ours - theirs).abs().max()))
"""


def build_model_dir(directory: Path) -> Path:
    """A random-init ``convnext_base_w`` in the Hub layout (both towers), built once and reused."""
    weights = directory / "open_clip_model.safetensors"
    config = directory / "open_clip_config.json"
    if weights.is_file() and config.is_file():
        return directory
    import logging

    import open_clip
    import torch
    from safetensors.torch import save_file

    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None, load_weights=False)
    logging.disable(logging.NOTSET)
    pp = open_clip.get_model_preprocess_cfg(model)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": open_clip.get_model_config(ARCH),
           "preprocess_cfg": {"mean": list(pp["mean"]), "std": list(pp["std"])}}
    config.write_text(json.dumps(cfg, indent=2))
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    return directory


def make_images(directory: Path) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for name in ("a.png", "b.png"):
        path = directory / name
        if not path.is_file():
            Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths[0], paths[1]


def run(cmd: list[str], src: Path) -> tuple[float, str]:
    """(seconds from start to exit, stdout) of ``cmd`` with ``src`` first on the Python path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, check=True, text=True, env=env)
    return time.perf_counter() - start, done.stdout


def measure(trees: dict[str, Path], model_dir: Path, device: str, a: Path, b: Path, runs: int) -> dict:
    """End-to-end and per-part medians for each source tree, the trees' runs interleaved."""
    cli = [sys.executable, "-m", "percept_cli", "distance", str(a), str(b), "-m", str(model_dir), "--device", device]
    parts = [sys.executable, "-c", PARTS, str(model_dir), device, str(a), str(b)]
    for src in trees.values():
        run(cli, src)  # warm the OS file cache (and any bytecode caches)
    times = {name: [] for name in trees}
    rows = {name: [] for name in trees}
    for _ in range(runs):
        for name, src in trees.items():
            times[name].append(run(cli, src)[0])
            rows[name].append(json.loads(run(parts, src)[1].strip().splitlines()[-1]))
    return {name: {"end_to_end_median_s": statistics.median(times[name]), "end_to_end_min_s": min(times[name]),
                   "end_to_end_max_s": max(times[name]),
                   "parts_median_s": {key: statistics.median(row[key] for row in rows[name])
                                      for key in rows[name][0] if key != "distance"}}
            for name in trees}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "percept-bench-start",
                        help="Where the model and images are built once and reused.")
    parser.add_argument("--baseline", type=Path, default=None, help="Another source tree to time alongside.")
    parser.add_argument("--check", action="store_true", help="Also compare with open_clip's own loading.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model_dir = build_model_dir(args.cache / ARCH)
    a, b = make_images(args.cache)
    trees = {"current": SRC, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    result = {"arch": ARCH, "device": args.device, "runs": args.runs, "target_s": 4.0,
              "command": f"python -m percept_cli distance a.png b.png -m {model_dir} --device {args.device}",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average at start "
                         f"{os.getloadavg()[0]:.1f}",
              **measure(trees, model_dir, args.device, a, b, args.runs)}
    if args.baseline:
        result["baseline_src"] = str(args.baseline)
    if args.check:
        result["max_abs_difference_vs_open_clip"] = float(run([sys.executable, "-c", CHECK, str(model_dir)],
                                                              SRC)[1].strip().splitlines()[-1])
    out = args.out or Path(__file__).parent / "results" / f"start_{ARCH}_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
