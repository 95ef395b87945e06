"""The pool index under torchrun (2 CPU processes, gloo): the same files as a 1-process build, and a
resumed build in which the ranks agree on the parts left to do."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from conftest import make_picture

from percept_cli.metric import load_metric
from percept_cli.retrieval.index import build_index
from percept_cli.retrieval.sources import collect_items

SIZES = [(64, 48), (48, 64), (40, 40), (80, 32), (56, 72), (36, 50), (70, 44)]

DRIVER = """
import json, sys
from dataclasses import asdict
from percept_cli import distributed
from percept_cli.metric import load_metric
import percept_cli.retrieval.index as index_module
from percept_cli.retrieval.index import build_index
from percept_cli.retrieval.sources import collect_items

decoded = []  # the keys this rank decodes and embeds
real_batches = index_module.iter_item_batches


def recording(items, *args, **kwargs):
    decoded.extend(item.key for item in items)
    yield from real_batches(items, *args, **kwargs)


index_module.iter_item_batches = recording

model, pool, full, resumed, report = sys.argv[1:6]
dist = distributed.init("cpu")
metric = load_metric(model, device="cpu")
listing = collect_items([pool], label_from_folder=True)
done = {"full": 0, "resumed": 0}
keys = {}
summaries = {}
for name, out in (("full", full), ("resumed", resumed)):
    def progress(n, name=name):
        done[name] += n
    decoded.clear()
    summary = build_index(metric, listing, out, part_size=2, batch_size=2, num_workers=0, dist=dist,
                          progress=progress)
    keys[name] = list(decoded)
    summaries[name] = asdict(summary)
    summaries[name].pop("seconds")
with open(f"{report}.rank{dist.rank}.json", "w") as handle:
    json.dump({"world": dist.world, "enabled": dist.enabled, "progress": done, "keys": keys,
               "summaries": summaries}, handle)
distributed.shutdown(dist)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_index(a: Path, b: Path) -> None:
    """The same manifest parts, bit-identical vector files, equal tables, no other part files."""
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["parts"] == mb["parts"] and ma["counts"] == mb["counts"] and ma["generation"] == mb["generation"]
    assert sorted(os.listdir(a / "parts")) == sorted(os.listdir(b / "parts"))
    for part in ma["parts"]:
        name = part["name"]
        assert (a / "parts" / f"{name}.npy").read_bytes() == (b / "parts" / f"{name}.npy").read_bytes()
        assert pq.read_table(a / "parts" / f"{name}.parquet").equals(pq.read_table(b / "parts" / f"{name}.parquet"))


def test_two_process_build_equals_one_process_build(tiny_vit, tmp_path):
    pool = tmp_path / "pool"
    for i, size in enumerate(SIZES):
        folder = pool / ("cats" if i < 4 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        make_picture(i, size).save(folder / f"{i}.png")
    single = tmp_path / "single.idx"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs (OMP_NUM_THREADS=1)
    try:
        metric = load_metric(str(tiny_vit[0]), device="cpu")
        listing = collect_items([pool], label_from_folder=True)
        build_index(metric, listing, single, part_size=2, batch_size=2, num_workers=0)
    finally:
        torch.set_num_threads(threads)
    manifest = json.loads((single / "manifest.json").read_text())
    assert len(manifest["parts"]) == 4

    # a build killed after parts 0 and 2: their markers stay, the others' are gone, no manifest
    resumed = tmp_path / "resumed.idx"
    shutil.copytree(single, resumed)
    (resumed / "manifest.json").unlink()
    redo = [manifest["parts"][1]["name"], manifest["parts"][3]["name"]]
    for name in redo:
        (resumed / "parts" / f"{name}.done").unlink()
        (resumed / "parts" / f"{name}.npy").write_bytes(b"half")
    (resumed / "parts" / ".stale.parquet.0123456789ab.tmp").write_bytes(b"leftover")

    full, report, driver = tmp_path / "double.idx", tmp_path / "report", tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(driver), str(tiny_vit[0]), str(pool), str(full), str(resumed), str(report)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 and r["enabled"] for r in ranks)
    assert ranks[0]["summaries"] == ranks[1]["summaries"]  # every rank returns the whole job's summary
    whole, again = ranks[0]["summaries"]["full"], ranks[0]["summaries"]["resumed"]
    assert (whole["embedded"], whole["parts_written"], whole["items"], whole["ok"]) == (7, 4, 7, 7)
    # contiguous blocks: rank 0 embeds parts 0-1 (the first 4 keys), rank 1 parts 2-3 (the last 3)
    keys = sorted(str(p) for p in pool.rglob("*.png"))
    assert [r["keys"]["full"] for r in ranks] == [keys[:4], keys[4:]]
    assert [r["progress"]["full"] for r in ranks] == [4, 3]
    _same_index(single, full)

    redo_items = manifest["parts"][1]["n_items"] + manifest["parts"][3]["n_items"]
    assert (again["parts_written"], again["parts_reused"], again["embedded"]) == (2, 2, redo_items)
    assert [r["keys"]["resumed"] for r in ranks] == [keys[2:4], keys[6:]]  # parts 1 and 3, one per rank
    assert [r["progress"]["resumed"] for r in ranks] == [2, 1]
    _same_index(single, resumed)  # the half-written files replaced, the leftover deleted
    vectors = np.concatenate([np.load(full / "parts" / f"{p['name']}.npy") for p in manifest["parts"]])
    assert vectors.shape == (7, 16) and np.all(np.isfinite(vectors))
