"""The pool index: planning, build/open, incremental updates, resume after a crash, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_picture

import percept_cli.retrieval.index as index_mod
from percept_cli.errors import BadInputError
from percept_cli.metric import load_metric
from percept_cli.retrieval.index import (OldPart, Origin, Entry, build_index, model_digest, model_identity,
                                         open_index, part_fingerprint, plan_build, plan_parts)
from percept_cli.retrieval.sources import Item, collect_items

FLOAT16_TOL = 1e-3  # unit vectors stored in float16: |error| <= 2**-11 per coordinate, plus batch-order noise
SIZES = [(64, 48), (48, 64), (40, 40), (80, 32), (56, 72), (36, 50), (70, 44)]


@pytest.fixture(scope="module")
def metric(tiny_vit):
    return load_metric(str(tiny_vit[0]), device="cpu")


@pytest.fixture
def tree(tmp_path) -> Path:
    """Seven small pictures in two labelled folders (cats: 4, dogs: 3)."""
    root = tmp_path / "pool"
    for i, size in enumerate(SIZES):
        folder = root / ("cats" if i < 4 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        make_picture(i, size).save(folder / f"{i}.png")
    return root


def build(metric, root, out, **options):
    options = {"part_size": 3, "batch_size": 2, "num_workers": 0, **options}
    listing = collect_items([root], label_from_folder=True)
    return build_index(metric, listing, out, **options)


def by_key(index) -> dict[str, np.ndarray]:
    keys = index.metadata(("key",)).column("key").to_pylist()
    vectors = np.concatenate([np.asarray(v, dtype=np.float32) for v in index.vectors()])
    assert len(keys) == len(vectors) == index.n
    return dict(zip(keys, vectors))


def reference(metric, paths) -> dict[str, np.ndarray]:
    """Independent embeddings: PerceptualMetric.embed_files (normalised float32)."""
    result = metric.embed_files([str(p) for p in paths], batch_size=4)
    return {os.path.abspath(paths[i]): result.embeddings[j].cpu().numpy() for j, i in enumerate(result.indices)}


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.png"))


@pytest.fixture
def recorded(monkeypatch):
    """Keys handed to the decoder (what the build embeds), through the module's iter_item_batches."""
    seen: list[str] = []
    real = index_mod.iter_item_batches

    def recording(items, *args, **kwargs):
        seen.extend(item.key for item in items)
        yield from real(items, *args, **kwargs)

    monkeypatch.setattr(index_mod, "iter_item_batches", recording)
    return seen


def forwarded(metric):
    """A list that receives the batch size of every forward pass of the encoder, and its hook handle."""
    sizes: list[int] = []
    handle = metric.encoder.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    return sizes, handle


def touch_later(path: Path, seconds: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def part_files(out: Path) -> set[str]:
    return {p.name for p in (out / "parts").iterdir()}


# -- planning (pure) -------------------------------------------------------------------------------


def item(key: str, size: int = 10, mtime: int = 1, label: str | None = None) -> Item:
    return Item(key=key, path=key, member=None, size=size, mtime_ns=mtime, label=label)


def old_part(digest: str, name: str, items: list[Item], errors: dict[str, str] | None = None) -> OldPart:
    errors = errors or {}
    entries, row = [], 0
    for it in items:
        if it.key in errors:
            entries.append(Entry(it, Origin(name, -1, errors[it.key])))
        else:
            entries.append(Entry(it, Origin(name, row)))
            row += 1
    return OldPart(name, part_fingerprint(digest, items), tuple(entries))


def test_plan_of_a_new_index_cuts_the_listing_in_key_order():
    digest = "d" * 64
    items = [item(k) for k in "abcdefg"]
    plan = plan_parts([], items, part_size=3, digest=digest)
    assert [[e.item.key for e in p.entries] for p in plan.parts] == [list("abc"), list("def"), ["g"]]
    assert all(e.origin is None for p in plan.parts for e in p.entries)
    assert (plan.new, plan.changed, plan.deleted, plan.kept, plan.to_embed) == (7, 0, 0, 0, 7)
    # the fingerprint covers key, size, mtime, label and the model/storage digest: any change renames the part
    assert plan.parts[0].name == plan_parts([], items, part_size=3, digest=digest).parts[0].name
    variants = [[item("a", size=11)] + items[1:], [item("a", mtime=2)] + items[1:],
                [item("a", label="x")] + items[1:]]
    for other in variants:
        assert plan_parts([], other, part_size=3, digest=digest).parts[0].name != plan.parts[0].name
    assert plan_parts([], items, part_size=3, digest="e" * 64).parts[0].name != plan.parts[0].name
    assert len({p.name for p in plan.parts}) == 3


def test_plan_reuses_intact_parts_and_carries_the_rest():
    d = "d" * 64
    p1 = old_part(d, "p1" * 12, [item("a"), item("b"), item("c")])
    p2 = old_part(d, "p2" * 12, [item("d"), item("e"), item("f")], errors={"e": "broken"})
    p3 = old_part(d, "p3" * 12, [item("g"), item("h"), item("i")])
    listing = [item("a"), item("b"), item("c"),            # p1 intact
               item("d"), item("e"),                      # p2 lost f (deleted in sync mode)
               item("g"), item("h", mtime=9), item("i"),  # p3: h changed
               item("bb"), item("z")]                     # new
    plan = plan_parts([p1, p2, p3], listing, part_size=3, digest=d)
    assert (plan.new, plan.changed, plan.deleted, plan.kept) == (2, 1, 1, 7)  # kept: a b c d e g i
    assert plan.parts[0].reused and plan.parts[0].name == p1.name and plan.parts[0].to_embed == 0
    assert not any(p.reused for p in plan.parts[1:])
    new_parts = [[e.item.key for e in p.entries] for p in plan.parts[1:]]
    assert new_parts == [["bb", "d", "e"], ["g", "h", "i"], ["z"]]
    origin = {e.item.key: e.origin for p in plan.parts for e in p.entries}
    assert origin["d"] == Origin(p2.name, 0) and origin["e"] == Origin(p2.name, -1, "broken")  # carried
    assert origin["g"] == Origin(p3.name, 0) and origin["i"] == Origin(p3.name, 2)
    assert origin["h"] is None and origin["bb"] is None and origin["z"] is None  # to embed
    assert plan.to_embed == 3


def test_plan_in_add_mode_keeps_unlisted_items_and_a_label_change_rewrites_without_embedding():
    d = "d" * 64
    p1 = old_part(d, "a1" * 12, [item("a"), item("b")])
    p2 = old_part(d, "b2" * 12, [item("c"), item("d")])
    plan = plan_parts([p1, p2], [item("c", label="new"), item("e")], mode="add", part_size=2, digest=d)
    assert (plan.new, plan.deleted, plan.kept, plan.changed) == (1, 0, 4, 0)  # kept: a b c d
    assert plan.parts[0].reused and plan.parts[0].name == p1.name  # a, b not listed: kept as they are
    keys = [[e.item.key for e in p.entries] for p in plan.parts[1:]]
    assert keys == [["c", "d"], ["e"]]
    c = plan.parts[1].entries[0]
    assert c.item.label == "new" and c.origin == Origin(p2.name, 0)  # relabelled, embedding copied
    synced = plan_parts([p1, p2], [item("c"), item("d")], mode="sync", part_size=2, digest=d)
    assert synced.deleted == 2 and [p.name for p in synced.parts] == [p2.name]


def test_plan_merges_small_parts_instead_of_fragmenting():
    d = "d" * 64
    small = old_part(d, "c3" * 12, [item("a")])
    plan = plan_parts([small], [item("a"), item("b")], part_size=4, digest=d)
    assert len(plan.parts) == 1 and not plan.parts[0].reused
    assert [(e.item.key, e.origin) for e in plan.parts[0].entries] == [("a", Origin(small.name, 0)), ("b", None)]
    # unchanged, it plans the same part again (same fingerprint, same name): nothing to rebuild
    again = plan_parts([small], [item("a")], part_size=4, digest=d)
    assert again.parts[0].fingerprint == small.fingerprint and again.to_embed == 0


def test_plan_rejects_bad_options():
    with pytest.raises(BadInputError, match="mode"):
        plan_parts([], [item("a")], mode="merge", digest="d")
    with pytest.raises(BadInputError, match="part_size"):
        plan_parts([], [item("a")], part_size=0, digest="d")


# -- building and reading --------------------------------------------------------------------------


def test_build_then_open_gives_the_metric_embeddings_and_metadata(metric, tree, tmp_path):
    out = tmp_path / "pool.idx"
    summary = build(metric, tree, out)
    index = open_index(out)
    files = image_files(tree)
    assert (summary.new, summary.items, summary.ok, summary.failed, summary.parts_total) == (7, 7, 7, 0, 3)
    assert (index.n, index.dim, len(index.vectors())) == (7, 16, 3)
    assert all(v.dtype == np.float16 and isinstance(v, np.memmap) for v in index.vectors())
    stored, expected = by_key(index), reference(metric, files)
    assert sorted(stored) == sorted(expected)
    for key, vector in stored.items():
        np.testing.assert_allclose(vector, expected[key], atol=FLOAT16_TOL, rtol=0)
        assert abs(np.linalg.norm(vector) - 1) < 2e-3
    meta = index.metadata()
    assert meta.column_names == ["key", "path", "member", "label"]
    keys = meta.column("key").to_pylist()
    assert keys == sorted(os.path.abspath(p) for p in files)  # a fresh build: global ids in key order
    assert meta.column("path").to_pylist() == keys and set(meta.column("member").to_pylist()) == {None}
    assert meta.column("label").to_pylist() == [Path(k).parent.name for k in keys]
    codes, names = index.label_codes()
    assert names == ["cats", "dogs"] and codes.tolist() == [0, 0, 0, 0, 1, 1, 1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"] == "percept.index/1" and manifest["storage_dtype"] == "float16"
    assert manifest["counts"] == {"items": 7, "ok": 7, "failed": 0, "labels": {"cats": 4, "dogs": 3}}
    weights = Path(metric.source.weights)
    assert manifest["model"]["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["model"]["compute_dtype"] == "fp32" and manifest["model"]["preprocess"]["image_size"] == 224
    assert [p["n_items"] for p in manifest["parts"]] == [3, 3, 1]
    assert part_files(out) == {f"{p['name']}{s}" for p in manifest["parts"] for s in (".npy", ".parquet", ".done")}
    first = pq.read_table(out / "parts" / f"{manifest['parts'][0]['name']}.parquet").to_pydict()
    assert first["row"] == [0, 1, 2] and first["status"] == ["ok"] * 3 and first["key"] == keys[:3]
    assert first["size"] == [os.path.getsize(k) for k in keys[:3]]
    assert first["mtime_ns"] == [os.stat(k).st_mtime_ns for k in keys[:3]]


def test_float32_storage_and_a_dtype_change_is_refused(metric, tree, tmp_path):
    out = tmp_path / "f32.idx"
    build(metric, tree, out, storage_dtype="float32")
    index = open_index(out)
    expected = reference(metric, image_files(tree))
    for key, vector in by_key(index).items():
        assert index.vectors()[0].dtype == np.float32
        np.testing.assert_allclose(vector, expected[key], atol=1e-5, rtol=0)
    with pytest.raises(BadInputError, match="stores float32 vectors"):
        build(metric, tree, out, storage_dtype="float16")
    with pytest.raises(BadInputError, match="storage dtype"):
        build(metric, tree, tmp_path / "x.idx", storage_dtype="int8")


def test_update_embeds_only_new_and_changed_and_equals_a_fresh_build(metric, tree, tmp_path, recorded):
    out = tmp_path / "pool.idx"
    build(metric, tree, out)
    before = json.loads((out / "manifest.json").read_text())
    first_part = out / "parts" / f"{before['parts'][0]['name']}.npy"
    first_mtime = first_part.stat().st_mtime_ns
    recorded.clear()
    added, changed, deleted = tree / "dogs" / "9.png", tree / "dogs" / "5.png", tree / "dogs" / "6.png"
    make_picture(9, (50, 50)).save(added)
    make_picture(20, SIZES[5]).save(changed)  # new content
    touch_later(changed)
    deleted.unlink()
    plan = plan_build(metric, collect_items([tree], label_from_folder=True), out, part_size=3)
    assert (plan.new, plan.changed, plan.deleted, plan.to_embed) == (1, 1, 1, 2)  # a dry run writes nothing
    assert recorded == []
    sizes, hook = forwarded(metric)
    try:
        summary = build(metric, tree, out)
    finally:
        hook.remove()
    assert sorted(recorded) == sorted([str(added), str(changed)])  # nothing else was decoded
    assert sum(sizes) == 2  # nor embedded
    assert (summary.new, summary.changed, summary.deleted, summary.kept) == (1, 1, 1, 5)
    assert (summary.embedded, summary.items, summary.ok) == (2, 7, 7)
    after = json.loads((out / "manifest.json").read_text())
    # the cats part (0, 1, 2) is untouched: same name, same file, not rewritten
    assert after["parts"][0]["name"] == before["parts"][0]["name"] and first_part.stat().st_mtime_ns == first_mtime
    assert summary.parts_reused >= 1 and summary.copied >= 2  # 3.png and 4.png carried into new parts
    assert part_files(out) == {f"{p['name']}{s}" for p in after["parts"] for s in (".npy", ".parquet", ".done")}
    updated = by_key(open_index(out))
    assert str(deleted) not in updated
    fresh_out = tmp_path / "fresh.idx"
    build(metric, tree, fresh_out)
    fresh = by_key(open_index(fresh_out))
    assert sorted(updated) == sorted(fresh) == sorted(str(p) for p in image_files(tree))
    for key in fresh:
        np.testing.assert_allclose(updated[key], fresh[key], atol=FLOAT16_TOL, rtol=0)
    expected = reference(metric, [changed])[str(changed)]  # the new content's embedding, not the old one's
    np.testing.assert_allclose(updated[str(changed)], expected, atol=FLOAT16_TOL, rtol=0)
    assert json.loads((out / "manifest.json").read_text())["counts"]["labels"] == {"cats": 4, "dogs": 3}


def test_add_mode_keeps_items_that_are_not_listed(metric, tree, tmp_path, recorded):
    out = tmp_path / "pool.idx"
    build(metric, tree / "cats", out, part_size=2)
    recorded.clear()
    summary = build(metric, tree / "dogs", out, mode="add", part_size=2)
    assert sorted(recorded) == sorted(str(p) for p in image_files(tree / "dogs"))
    assert (summary.new, summary.deleted, summary.kept, summary.items) == (3, 0, 4, 7)
    assert sorted(by_key(open_index(out))) == sorted(str(p) for p in image_files(tree))
    recorded.clear()
    summary = build(metric, tree / "dogs", out, part_size=2)  # sync: the cats are dropped, nothing embedded
    assert recorded == [] and (summary.deleted, summary.items) == (4, 3)
    assert sorted(by_key(open_index(out))) == sorted(str(p) for p in image_files(tree / "dogs"))


def test_unreadable_images_are_recorded_counted_and_not_retried(metric, tree, tmp_path, recorded):
    (tree / "cats" / "junk.png").write_bytes(b"this is not a png")
    good = tree / "cats" / "0.png"
    (tree / "cats" / "cut.png").write_bytes(good.read_bytes()[:60])
    out = tmp_path / "pool.idx"
    summary = build(metric, tree, out)
    bad = sorted([str(tree / "cats" / "cut.png"), str(tree / "cats" / "junk.png")])
    assert (summary.items, summary.ok, summary.failed) == (9, 7, 2)
    assert sorted(k for k, _ in summary.failures) == bad and all(reason for _, reason in summary.failures)
    index = open_index(out)
    assert index.n == 7 and sorted(k for k, _ in index.failures()) == bad
    assert not set(bad) & set(by_key(index))
    manifest = index.manifest
    assert manifest["counts"]["failed"] == 2 and sum(p["n_ok"] for p in manifest["parts"]) == 7
    rows = {}
    for part in manifest["parts"]:
        table = pq.read_table(out / "parts" / f"{part['name']}.parquet").to_pylist()
        rows.update({r["key"]: r for r in table})
    for key in bad:
        assert rows[key]["status"] == "error" and rows[key]["row"] == -1 and rows[key]["error"]
    recorded.clear()
    again = build(metric, tree, out)
    assert recorded == [] and again.failed == 2  # unchanged files: their failure is kept, not retried


def test_a_run_that_fails_midway_resumes_where_it_stopped(metric, tree, tmp_path, recorded):
    out, whole = tmp_path / "pool.idx", tmp_path / "whole.idx"
    calls = []

    def crash_on_second_part(n):
        calls.append(n)
        if len(calls) == 2:  # part_size == batch_size: the first part is written, the second in flight
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(metric, tree, out, part_size=2, progress=crash_on_second_part)
    with pytest.raises(BadInputError, match="no manifest.json"):
        open_index(out)
    done = sorted((out / "parts").glob("*.done"))
    assert len(done) == 1
    recorded.clear()
    summary = build(metric, tree, out, part_size=2)
    assert (summary.parts_reused, summary.parts_written, summary.embedded) == (1, 3, 5)
    assert len(recorded) == 5 and len(set(recorded)) == 5
    build(metric, tree, whole, part_size=2)
    assert_same_index(out, whole)


def assert_same_index(a: Path, b: Path) -> None:
    """The same parts, bit-identical vectors and equal tables."""
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["parts"] == mb["parts"] and ma["counts"] == mb["counts"] and ma["generation"] == mb["generation"]
    assert part_files(a) == part_files(b)
    for part in ma["parts"]:
        name = part["name"]
        assert np.array_equal(np.load(a / "parts" / f"{name}.npy"), np.load(b / "parts" / f"{name}.npy"))
        assert (a / "parts" / f"{name}.npy").read_bytes() == (b / "parts" / f"{name}.npy").read_bytes()
        assert pq.read_table(a / "parts" / f"{name}.parquet").equals(pq.read_table(b / "parts" / f"{name}.parquet"))


@pytest.fixture
def loaders(monkeypatch):
    """The keyword arguments of every DataLoader the decoding makes (io.data builds them all)."""
    import percept_cli.io.data as data_module

    made: list[dict] = []
    real = data_module.DataLoader

    def counting(*args, **kwargs):
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(data_module, "DataLoader", counting)
    return made


def markers_at_each_batch(out: Path) -> tuple[list[int], callable]:
    """A list that receives the number of .done markers written since now when each batch is reported,
    and the progress callback that fills it."""
    before = set((out / "parts").glob("*.done"))
    seen: list[int] = []
    return seen, lambda n: seen.append(len(set((out / "parts").glob("*.done")) - before))


def expected_part(metric, keys: list[str], batch_size: int) -> np.ndarray:
    """A part's float16 vectors as the part alone gives them: embed_files over its keys, same batches."""
    return metric.embed_files(keys, batch_size=batch_size).embeddings.cpu().numpy().astype(np.float16)


def stored(out: Path, part: dict) -> tuple[list[str], np.ndarray]:
    keys = pq.read_table(out / "parts" / f"{part['name']}.parquet").column("key").to_pylist()
    return keys, np.load(out / "parts" / f"{part['name']}.npy")


def test_all_parts_are_decoded_in_one_pass_each_in_its_own_batches(metric, tree, tmp_path, loaders, recorded):
    out = tmp_path / "pool.idx"
    seen, progress = markers_at_each_batch(out)
    sizes, hook = forwarded(metric)
    try:
        summary = build(metric, tree, out, num_workers=1, progress=progress)
    finally:
        hook.remove()
    assert len(loaders) == 1 and len(loaders[0]["batch_sampler"]) == 5  # one DataLoader, one worker start
    assert recorded == sorted(str(p) for p in image_files(tree))  # each item decoded once, in part order
    # a 1-image probe of the embedding size (a new index), then parts of 3, 3, 1 items in batches of 2:
    # no batch crosses a part boundary
    assert sizes == [1, 2, 1, 2, 1, 1] and summary.parts_written == 3
    assert seen == [0, 0, 1, 1, 2]  # each part written as soon as its last batch is embedded
    manifest = json.loads((out / "manifest.json").read_text())
    for part in manifest["parts"]:
        keys, vectors = stored(out, part)
        assert vectors.tobytes() == expected_part(metric, keys, 2).tobytes()  # as if built alone


def test_one_pass_over_parts_with_carried_items_copies_them_bit_for_bit(metric, tree, tmp_path, loaders, recorded):
    out = tmp_path / "pool.idx"
    build(metric, tree, out, part_size=4)  # parts cats/0-3, dogs/4-6
    old = {}
    for part in json.loads((out / "manifest.json").read_text())["parts"]:
        keys, vectors = stored(out, part)
        old.update(zip(keys, np.array(vectors)))
    first, last = tree / "cats" / "0.png", tree / "dogs" / "6.png"
    for seed, path in ((30, first), (31, last)):
        make_picture(seed, (44, 44)).save(path)
        touch_later(path)
    loaders.clear()
    recorded.clear()
    seen, progress = markers_at_each_batch(out)
    summary = build(metric, tree, out, part_size=2, progress=progress)
    # new parts [0 new, 1], [2, 3], [4, 5], [6 new]: two carried-only parts between the two to embed
    assert (summary.parts_written, summary.embedded, summary.copied) == (4, 2, 5)
    assert len(loaders) == 1 and recorded == [str(first), str(last)]
    assert seen == [0, 3]  # the carried-only parts are written before the last part's batch
    parts = json.loads((out / "manifest.json").read_text())["parts"]
    assert [p["n_items"] for p in parts] == [2, 2, 2, 1]
    for part in parts:
        keys, vectors = stored(out, part)
        for key, vector in zip(keys, vectors):
            if key in (str(first), str(last)):
                assert vector.tobytes() == expected_part(metric, [key], 2)[0].tobytes()
            else:
                assert vector.tobytes() == old[key].tobytes()


DRIVER = """
import sys, time
from percept_cli.metric import load_metric
from percept_cli.retrieval.index import build_index
from percept_cli.retrieval.sources import collect_items

metric = load_metric(sys.argv[1], device="cpu")
listing = collect_items([sys.argv[2]], label_from_folder=True)
build_index(metric, listing, sys.argv[3], part_size=2, batch_size=2, num_workers=0,
            progress=lambda n: time.sleep(0.4))
"""


def test_kill_9_during_a_build_loses_only_the_parts_in_flight(metric, tiny_vit, tree, tmp_path, recorded):
    out, whole, driver = tmp_path / "pool.idx", tmp_path / "whole.idx", tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    proc = subprocess.Popen([sys.executable, str(driver), str(tiny_vit[0]), str(tree), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / "parts").is_dir() or not list((out / "parts").glob("*.done")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    finished = len(list((out / "parts").glob("*.done")))
    assert 1 <= finished < 4
    (out / "parts" / ".leftover.npy.0123456789ab.tmp").write_bytes(b"half a file")  # as a kill mid-write leaves
    recorded.clear()
    summary = build(metric, tree, out, part_size=2)
    assert summary.parts_reused == finished and summary.parts_written == 4 - finished
    assert len(recorded) == 7 - 2 * finished
    build(metric, tree, whole, part_size=2)
    assert_same_index(out, whole)  # leftovers cleaned, the same files as an uninterrupted build


# -- refusals --------------------------------------------------------------------------------------


def test_another_model_is_refused_naming_both(metric, other_vit, tree, tmp_path):
    out = tmp_path / "pool.idx"
    build(metric, tree, out)
    other = load_metric(str(other_vit), device="cpu")
    ours, theirs = model_identity(metric)["weights_sha256"], model_identity(other)["weights_sha256"]
    assert ours != theirs
    with pytest.raises(BadInputError) as caught:
        build(other, tree, out)
    message = str(caught.value)
    assert str(metric.source.name) in message and str(other_vit) in message
    assert ours[:12] in message and theirs[:12] in message
    index = open_index(out)
    index.check_model(metric)  # the same model: no error
    with pytest.raises(BadInputError, match=theirs[:12]):
        index.check_model(other)
    bf16 = load_metric(str(metric.source.location), device="cpu", dtype="bf16")
    with pytest.raises(BadInputError, match="compute dtype bf16"):
        index.check_model(bf16)
    assert model_digest(model_identity(metric), "float16") != model_digest(model_identity(bf16), "float16")


@pytest.fixture(scope="module")
def built(metric, tmp_path_factory) -> Path:
    """An index of seven pictures, built once (tests damage copies of it)."""
    root = tmp_path_factory.mktemp("built")
    for i, size in enumerate(SIZES):
        make_picture(i, size).save(root / f"{i}.png")
    build(metric, root, root / "pool.idx")
    return root / "pool.idx"


def _truncate_npy(out: Path) -> None:
    npy = sorted((out / "parts").glob("*.npy"))[0]
    npy.write_bytes(npy.read_bytes()[:-10])


def _manifest_edit(change):
    def edit(out: Path) -> None:
        path = out / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    return edit


@pytest.mark.parametrize("damage, message", [
    (_truncate_npy, "truncated"),
    (lambda out: sorted((out / "parts").glob("*.parquet"))[-1].unlink(), "is missing"),
    (lambda out: sorted((out / "parts").glob("*.parquet"))[0].write_bytes(b"PAR1"), "unreadable or truncated"),
    (lambda out: (out / "manifest.json").unlink(), "not a percept index \\(no manifest.json\\); was it built"),
    (lambda out: (out / "manifest.json").write_text('{"schema": "percept.index/1", "parts": ['), "damaged"),
    (_manifest_edit(lambda m: m.update(schema="percept.index/2")), "newer percept"),
    (_manifest_edit(lambda m: m.update(schema="someone.else/1")), "not a percept index manifest"),
    (_manifest_edit(lambda m: m["parts"][0].update(n_ok=m["parts"][0]["n_ok"] - 1)), "the manifest says"),
    (_manifest_edit(lambda m: m.update(dim="16")), "damaged manifest"),
])
def test_damaged_indexes_are_refused(built, tmp_path, damage, message):
    out = tmp_path / "pool.idx"
    shutil.copytree(built, out)
    open_index(out)
    damage(out)
    with pytest.raises(BadInputError, match=message):
        open_index(out)


def test_unusable_folders_are_refused(metric, tree, tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        open_index(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInputError, match="not a folder"):
        open_index(tmp_path / "file")
    with pytest.raises(BadInputError, match="not a folder"):
        build(metric, tree, tmp_path / "file")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not empty and is not a percept index"):
        build(metric, tree, busy)
    assert sorted(os.listdir(busy)) == ["notes.txt"]


def test_set_faiss_rewrites_only_that_entry(metric, tree, tmp_path):
    out = tmp_path / "pool.idx"
    build(metric, tree, out)
    index = open_index(out)
    before = dict(index.manifest)
    index.set_faiss({"kind": "flat", "generation": before["generation"]})
    after = json.loads((out / "manifest.json").read_text())
    assert after["faiss"] == {"kind": "flat", "generation": before["generation"]}
    assert {k: v for k, v in after.items() if k != "faiss"} == {k: v for k, v in before.items() if k != "faiss"}
    build(metric, tree, out)  # an update keeps the entry (its generation tells whether it is current)
    assert open_index(out).manifest["faiss"]["kind"] == "flat"
