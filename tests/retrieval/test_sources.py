"""retrieval/sources.py: listing pool items (folders, files, list files, labels, WebDataset shards)
and decoding them in DataLoader workers exactly as image files are decoded."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_picture
from percept_cli.errors import BadInputError, ImageReadError
from percept_cli.io.data import iter_file_batches
from percept_cli.io.images import read_image
from percept_cli.io.preprocess import Preprocess
from percept_cli.retrieval.sources import Item, collect_items, iter_item_batches, read_item

PRE = Preprocess(16)


def _encode(seed: int, fmt: str = "PNG", size=(24, 20)) -> bytes:
    """The encoded bytes of a deterministic picture."""
    buffer = io.BytesIO()
    make_picture(seed, size).save(buffer, fmt)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _shard(path: Path, samples: list[dict]) -> Path:
    """A WebDataset shard written with webdataset's own TarWriter."""
    wds = pytest.importorskip("webdataset")
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def _all_batches(items, workers: int, batch_size: int = 3):
    """(positions, concatenated uint8 pixels, failures) of one pass of iter_item_batches."""
    positions, tensors, failures = [], [], []
    for pos, batch, failed in iter_item_batches(items, PRE, batch_size, num_workers=workers):
        positions += pos
        assert pos == sorted(pos)
        if batch is not None:
            assert batch.dtype == torch.uint8 and batch.shape[1:] == (3, 16, 16) and batch.shape[0] == len(pos)
            tensors.append(batch)
        failures += failed
        positions += [p for p, _ in failed]
    return sorted(positions), (torch.cat(tensors) if tensors else None), failures


@pytest.fixture
def tree(tmp_path):
    """root/{cat/a.png, cat/sub/b.jpg, dog/c.png, top.png} plus things a listing must skip."""
    root = tmp_path / "pool"
    _write(root / "cat" / "a.png", _encode(1))
    _write(root / "cat" / "sub" / "b.jpg", _encode(2, "JPEG"))
    _write(root / "dog" / "c.png", _encode(3))
    _write(root / "top.png", _encode(4))
    _write(root / ".hidden" / "x.png", _encode(5))
    _write(root / "cat" / ".y.png", _encode(6))
    _write(root / "dog" / "notes.md", b"not an image")
    return root


# -- folders, files, keys ----------------------------------------------------------------------------


def test_directory_listing_recursive_hidden_skipped_folder_labels(tree):
    listing = collect_items([tree], label_from_folder=True)
    expected = {os.path.join(str(tree), rel): label for rel, label in
                [("cat/a.png", "cat"), ("cat/sub/b.jpg", "cat"), ("dog/c.png", "dog"), ("top.png", None)]}
    assert [i.key for i in listing.items] == sorted(expected)
    assert {i.key: i.label for i in listing.items} == expected
    assert listing.problems == []
    for item in listing.items:
        st = os.stat(item.key)
        assert (item.path, item.member, item.size, item.mtime_ns) == (item.key, None, st.st_size, st.st_mtime_ns)
    assert all(i.label is None for i in collect_items([tree]).items)


def test_keys_are_absolute_unresolved_stable_and_unique(tree, tmp_path, monkeypatch):
    link = tmp_path / "link"
    link.symlink_to(tree, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    first = collect_items(["link", "link/cat/a.png", str(tree / "dog")], label_from_folder=True)
    keys = [i.key for i in first.items]
    assert keys == sorted(set(keys))  # sorted, no duplicates
    assert str(tmp_path / "link" / "cat" / "a.png") in keys  # abspath, the symlink kept
    assert str(tree / "dog" / "c.png") in keys and len(keys) == 5  # 4 under link + c.png under its real path
    labels = {i.key: i.label for i in first.items}
    assert labels[str(tmp_path / "link" / "cat" / "a.png")] == "cat"  # the directory's label wins over none
    assert collect_items(["link", "link/cat/a.png", str(tree / "dog")], label_from_folder=True) == first


def test_file_given_twice_is_one_item(tree):
    listing = collect_items([tree / "cat" / "a.png", tree, tree / "cat" / "a.png"])
    assert [i.key for i in listing.items].count(str(tree / "cat" / "a.png")) == 1
    assert len(listing.items) == 4


# -- list files and labels ---------------------------------------------------------------------------


def test_txt_list_relative_to_the_list_file(tree, tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "pool.txt").write_text(f"# a comment\n../pool/cat/a.png\n\n  ../pool/dog/  \n{tree / 'top.png'}\n")
    monkeypatch.chdir(tree / "cat")  # relative to the list file, not to the working directory
    listing = collect_items([lists / "pool.txt"])
    assert [i.key for i in listing.items] == sorted(str(tree / p) for p in ("cat/a.png", "dog/c.png", "top.png"))
    (lists / "bad.txt").write_text("../pool/cat/a.png\n../pool/missing.png\n")
    with pytest.raises(BadInputError, match=r"bad\.txt line 2: .*missing\.png: file not found"):
        collect_items([lists / "bad.txt"])


def test_csv_list_with_labels_and_malformed_csv(tree, tmp_path):
    (tmp_path / "pool.csv").write_text("label,path\nfeline,pool/cat/a.png\n,pool/top.png\n")
    listing = collect_items([tmp_path / "pool.csv"])
    assert {i.key: i.label for i in listing.items} == {str(tree / "cat/a.png"): "feline", str(tree / "top.png"): None}
    (tmp_path / "nopath.csv").write_text("file,label\npool/top.png,x\n")
    with pytest.raises(BadInputError, match=r"nopath\.csv: the header has no 'path' column"):
        collect_items([tmp_path / "nopath.csv"])
    (tmp_path / "ragged.csv").write_text("path,label\npool/top.png,x,extra\n")
    with pytest.raises(BadInputError, match=r"ragged\.csv line 2"):
        collect_items([tmp_path / "ragged.csv"])


def test_labels_csv_overrides_and_names_unknown_files(tree, tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "labels.csv").write_text(f"path,label\n../pool/cat/a.png,tabby\n{tree / 'top.png'},misc\n")
    listing = collect_items([tree], labels=meta / "labels.csv", label_from_folder=True)
    assert {i.key: i.label for i in listing.items} == {
        str(tree / "cat/a.png"): "tabby", str(tree / "cat/sub/b.jpg"): "cat",
        str(tree / "dog/c.png"): "dog", str(tree / "top.png"): "misc"}
    unknown = [f"ghost{k}.png" for k in range(7)]
    (meta / "unknown.csv").write_text("path,label\n../pool/top.png,x\n" + "".join(f"{u},y\n" for u in unknown))
    with pytest.raises(BadInputError) as caught:
        collect_items([tree], labels=meta / "unknown.csv")
    message = str(caught.value)
    assert "unknown.csv" in message and "7 path(s)" in message and "2 more" in message
    assert all(u in message for u in unknown[:5]) and unknown[5] not in message and unknown[6] not in message


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(BadInputError, match=r"nowhere\.png: file not found"):
        collect_items([tmp_path / "nowhere.png"])
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty" / ".hidden.png", _encode(0))
    with pytest.raises(BadInputError, match="no images found"):
        collect_items([tmp_path / "empty"])
    with pytest.raises(BadInputError):
        collect_items([])


# -- WebDataset shards -------------------------------------------------------------------------------


def _samples(n: int, start: int = 0) -> list[dict]:
    """n WebDataset samples: a PNG (or JPEG every third) image and a class member."""
    out = []
    for i in range(start, start + n):
        ext, fmt = ("jpg", "JPEG") if i % 3 == 2 else ("png", "PNG")
        out.append({"__key__": f"img{i:03d}", ext: _encode(i, fmt), "cls": str(i % 2).encode()})
    return out


def test_shard_items_decode_like_the_same_files(tmp_path):
    samples = [dict(s, txt=b"a caption") for s in _samples(5)]
    del samples[4]["cls"]
    samples[4]["txt"] = b" only-text \n"  # no cls member: the txt member is the label
    rgba, deep = io.BytesIO(), io.BytesIO()  # alpha over white and 16-bit rescaling, as for files
    make_picture(7, (24, 20)).convert("RGBA").resize((20, 24)).save(rgba, "PNG")
    Image.fromarray((np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) * 130)).save(deep, "PNG")
    samples += [{"__key__": "img005", "png": rgba.getvalue()}, {"__key__": "img006", "png": deep.getvalue()}]
    shard = _shard(tmp_path / "shard-0.tar", samples)
    folder = tmp_path / "files"
    files = [_write(folder / f"{s['__key__']}.{'jpg' if 'jpg' in s else 'png'}", s.get("jpg", s.get("png")))
             for s in samples]
    listing = collect_items([shard])
    assert [i.key for i in listing.items] == [f"{shard}#img{i:03d}" for i in range(7)]
    assert [i.label for i in listing.items] == ["0", "1", "0", "1", "only-text", None, None]  # cls before txt
    assert [i.member for i in listing.items] == [f.name for f in files]
    assert [i.size for i in listing.items] == [f.stat().st_size for f in files]
    assert {i.mtime_ns for i in listing.items} == {shard.stat().st_mtime_ns}
    _, pixels, failures = _all_batches(listing.items, workers=1, batch_size=2)
    reference = torch.cat([b for _, b, _ in iter_file_batches(files, PRE, 2, num_workers=0)])
    assert failures == [] and torch.equal(pixels, reference)
    for item, path in zip(listing.items, files):
        assert np.array_equal(np.asarray(read_item(item)), np.asarray(read_image(path)))


def test_brace_pattern_and_labels_csv_for_shard_samples(tmp_path):
    _shard(tmp_path / "shard-0.tar", _samples(2))
    _shard(tmp_path / "shard-1.tar", _samples(2, start=2))
    (tmp_path / "labels.csv").write_text("path,label\nshard-1.tar#img003,special\n")
    listing = collect_items([str(tmp_path / "shard-{0..1}.tar")], labels=tmp_path / "labels.csv")
    assert [i.key for i in listing.items] == [f"{tmp_path}/shard-{i // 2}.tar#img{i:03d}" for i in range(4)]
    assert [i.label for i in listing.items] == ["0", "1", "0", "special"]


def test_shard_without_webdataset_asks_to_install_it(tmp_path, monkeypatch):
    shard = _shard(tmp_path / "s.tar", _samples(1))
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(BadInputError, match=r"percept\[webdataset\]"):
        collect_items([shard])


def _member_spans(shard: Path) -> dict[str, list[tuple[int, int]]]:
    """Sample key -> (data start, data end) of its members, read with tarfile independently."""
    spans: dict[str, list[tuple[int, int]]] = {}
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            spans.setdefault(info.name.split(".")[0], []).append((info.offset_data, info.offset_data + info.size))
    return spans


def test_cut_off_shard_keeps_complete_samples_and_reports_the_cut(tmp_path):
    shard = _shard(tmp_path / "full.tar", _samples(4))
    data = shard.read_bytes()
    spans = _member_spans(shard)
    start, end = max(spans["img002"])  # the image of the third sample (members are written in sorted order)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:(start + end) // 2])
    listing = collect_items([cut])
    assert [i.key.split("#")[1] for i in listing.items] == ["img000", "img001"]
    assert len(listing.problems) == 1 and listing.problems[0].path == str(cut)
    assert "truncated" in listing.problems[0].reason
    _, pixels, failures = _all_batches(listing.items, workers=0)
    assert failures == [] and pixels.shape[0] == 2


def test_no_cut_off_member_ever_becomes_an_item(tmp_path):
    samples = [dict(s, txt=b"a caption, after the image") for s in _samples(3)]  # members: cls, image, txt
    shard = _shard(tmp_path / "full.tar", samples)
    data = shard.read_bytes()
    spans = _member_spans(shard)
    data_end = max(e for s in spans.values() for _, e in s)
    archive_end = -(-data_end // 512) * 512  # the last member's data padded to a 512-byte block
    originals = {i.key.split("#")[1]: np.asarray(read_item(i)) for i in collect_items([shard]).items}
    cut = tmp_path / "cut.tar"
    for length in range(256, len(data), 131):
        cut.write_bytes(data[:length])
        try:
            listing = collect_items([cut])
        except BadInputError:
            listing = None  # nothing complete yet
        # kept: samples whose members all lie before the cut and whose end is known, i.e. the next
        # sample's first header was read whole (its data starts before the cut) or the archive ended
        order = list(spans)
        nexts = [min(b for b, _ in spans[k]) for k in order[1:]] + [archive_end + 512]
        complete = {k for k, nxt in zip(order, nexts) if all(e <= length for _, e in spans[k]) and nxt <= length}
        keys = {i.key.split("#")[1] for i in listing.items} if listing is not None else set()
        assert keys == complete, length
        if listing is None:
            continue
        assert len(listing.problems) == (1 if length < archive_end + 512 else 0), length  # + a zero block
        for item in listing.items:
            assert np.array_equal(np.asarray(read_item(item)), originals[item.key.split("#")[1]])


# -- bad images, workers -----------------------------------------------------------------------------


def test_bad_images_in_a_folder_and_a_shard_are_failures_with_read_image_reasons(tmp_path):
    good, garbage, truncated, empty = _encode(1), b"definitely not an image", _encode(2)[:200], b""
    folder = tmp_path / "files"
    bad_files = [_write(folder / f"{name}.png", data) for name, data in
                 [("b_garbage", garbage), ("c_truncated", truncated), ("d_empty", empty)]]
    _write(folder / "a_good.png", good)
    shard = _shard(tmp_path / "s.tar", [{"__key__": "e_good", "png": good}, {"__key__": "f_garbage", "png": garbage},
                                        {"__key__": "g_truncated", "png": truncated},
                                        {"__key__": "h_empty", "png": empty}])
    items = collect_items([folder, shard]).items  # the folder's keys sort before the shard's
    positions, pixels, failures = _all_batches(items, workers=1, batch_size=4)
    assert positions == list(range(8))

    def reason(path):
        with pytest.raises(ImageReadError) as caught:
            read_image(path)
        return caught.value.reason

    reasons = [reason(p) for p in bad_files]
    assert reasons[2] == "empty file (0 bytes)" and "not an image" in reasons[0] and "truncated" in reasons[1]
    assert sorted(failures) == list(zip([1, 2, 3, 5, 6, 7], reasons + reasons))
    good_pixels = PRE.uint8(read_image(folder / "a_good.png"))
    assert pixels.shape[0] == 2 and torch.equal(pixels[0], good_pixels) and torch.equal(pixels[1], good_pixels)
    with pytest.raises(ImageReadError) as caught:
        read_item(items[5])
    assert caught.value.path == items[5].key


def test_zero_and_one_worker_give_identical_results(tree, tmp_path):
    shard = _shard(tmp_path / "s.tar", _samples(3) + [{"__key__": "zz_bad", "png": b"junk"}])
    items = collect_items([tree, shard]).items
    assert len(items) == 8
    zero, one = _all_batches(items, workers=0), _all_batches(items, workers=1)
    assert zero[0] == one[0] == list(range(8))
    assert torch.equal(zero[1], one[1]) and zero[2] == one[2] == [(7, zero[2][0][1])]


def test_shard_item_found_by_name_when_the_shard_changed_or_the_offset_is_unknown(tmp_path):
    shard = _shard(tmp_path / "s.tar", _samples(3))
    item = collect_items([shard]).items[1]
    expected = np.asarray(read_item(item))
    stored = Item(key=item.key, path=item.path, member=item.member, size=item.size, mtime_ns=item.mtime_ns,
                  label=item.label)  # as rebuilt from an index's metadata: no offset
    assert stored == item and np.array_equal(np.asarray(read_item(stored)), expected)
    wrong_offset = Item(item.key, item.path, item.member, item.size, item.mtime_ns - 1, item.label, offset=0)
    assert np.array_equal(np.asarray(read_item(wrong_offset)), expected)  # mtime differs: looked up by name
    gone = Item(item.key, item.path, "nothere.png", item.size, item.mtime_ns, None)
    with pytest.raises(ImageReadError, match="not in shard"):
        read_item(gone)


# -- explicit batches --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_explicit_batches_are_yielded_as_given_with_failures_in_place(tree, tmp_path, workers):
    shard = _shard(tmp_path / "s.tar", _samples(2) + [{"__key__": "zz_bad", "png": b"junk"}])
    (tree / "dog" / "d_bad.png").write_bytes(b"not a png either")
    items = collect_items([tree, shard]).items
    bad = [i for i, item in enumerate(items) if item.key.endswith(("zz_bad", "d_bad.png"))]
    good = [i for i in range(len(items)) if i not in bad]
    assert len(items) == 8 and len(bad) == 2
    # out of order, a failure between good items, a batch of one failure only
    batches = [[good[3], good[0]], [bad[1], good[1], good[2]], [good[5]], [bad[0]], [good[4]]]
    got = list(iter_item_batches(items, PRE, 3, num_workers=workers, batches=batches))
    assert len(got) == len(batches)
    for batch, (positions, pixels, failed) in zip(batches, got):
        assert positions == [p for p in batch if p not in bad]  # the batch's own order, not sorted
        assert [p for p, _ in failed] == [p for p in batch if p in bad]
        for p, reason in failed:
            with pytest.raises(ImageReadError) as caught:
                read_item(items[p])
            assert reason == caught.value.reason
        expected = [PRE.uint8(read_item(items[p])) for p in positions]
        assert (pixels is None) == (not expected)
        if expected:
            assert torch.equal(pixels, torch.stack(expected))


def test_explicit_batches_one_loader_not_cut_by_batch_size_and_checked(tree, monkeypatch):
    import percept_cli.io.data as data_module  # where every decoding DataLoader is built

    made = []
    real = data_module.DataLoader

    def counting(*args, **kwargs):
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(data_module, "DataLoader", counting)
    items = collect_items([tree]).items
    got = list(iter_item_batches(items, PRE, 1, batches=[[3, 1, 0, 2]]))  # batch_size does not cut it
    assert [(pos, tuple(px.shape)) for pos, px, _ in got] == [([3, 1, 0, 2], (4, 3, 16, 16))]
    assert len(made) == 1 and made[0]["num_workers"] == 0  # one batch: decoded here, no worker to start
    for batches, message in [([[0], []], "batch 1 is empty"), ([[0, 4]], "position 4; there are 4"),
                             ([[-1]], "position -1")]:
        with pytest.raises(BadInputError, match=message):
            list(iter_item_batches(items, PRE, 2, batches=batches))
