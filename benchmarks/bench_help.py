"""How long `percept --help` takes in a fresh process (target: well under a second).

    python benchmarks/bench_help.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "help.json")
    args = parser.parse_args()
    script = Path(sys.executable).parent / "percept"
    cmd = [str(script), "--help"] if script.exists() else [sys.executable, "-m", "percept_cli", "--help"]
    subprocess.run(cmd, capture_output=True, check=True)  # warm the OS file cache
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    result = {"command": " ".join(cmd), "runs": args.runs, "median_s": statistics.median(times),
              "max_s": max(times), "min_s": min(times)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
