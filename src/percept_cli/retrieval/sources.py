"""What the items of a retrieval pool are, and how to decode them.

A source is a directory (searched recursively for image files; hidden files and folders are
skipped), a single image file, a list file (``.txt``: one path per line, ``#`` comments; ``.csv``:
a ``path`` column and an optional ``label`` column; relative paths are relative to the list file's
folder), or a WebDataset shard (``.tar``, also brace patterns such as ``shards/{00000..00009}.tar``).
:func:`collect_items` turns sources into a :class:`Listing` of :class:`Item` s sorted by key;
:func:`iter_item_batches` decodes items to uint8 batches in DataLoader workers, with exactly the
robustness of :func:`percept_cli.io.images.read_image` for files and shard members alike.

WebDataset shards. A shard is an uncompressed tar whose members are grouped into samples by key:
the member path up to the first ``.`` of its basename (``webdataset.tariterators.base_plus_ext``);
the rest is the member's extension. A sample's image is its first member whose extension is an
image extension (``jpg``, ``png``, ``webp``...); its label is the text of a ``cls``, ``label`` or
``txt`` member, if any. The ``webdataset`` package (extra ``percept[webdataset]``) provides the
brace expansion and this key/extension rule. Listing walks the tar headers with the standard
library's :mod:`tarfile` rather than with webdataset's iterators: those yield every member's bytes
but not where the bytes lie, so they would read whole shards at listing time and give no random
access afterwards. Recording each image member's data offset lets a DataLoader worker read one
member with one ``seek`` + ``read`` (items are decoded in any order, by several processes), and
listing reads headers only. A cut-off shard (a download interrupted) keeps its complete samples as
items; the sample in progress at the cut is dropped and the cut is reported in
:attr:`Listing.problems`.
"""

from __future__ import annotations

import csv
import os
import stat
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from PIL import Image

from ..errors import BadInputError, ImageReadError
from ..io.data import Failure, ImageFileDataset, decoding_loader
from ..io.images import IMAGE_EXTENSIONS, path_problem, read_image, read_image_bytes
from ..io.preprocess import Preprocess

LIST_EXTENSIONS = frozenset({".txt", ".csv"})
SHARD_EXTENSIONS = frozenset({".tar"})
LABEL_MEMBER_EXTENSIONS = ("cls", "label", "txt")  # the first present in a sample gives its label
_SHARD_IMAGE_EXTENSIONS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_MAX_LABEL_BYTES = 4096  # a label member longer than this is not a class label
_TAR_BLOCK = 512
_CSV_ERRORS_SHOWN = 5


@dataclass(frozen=True)
class Item:
    """One pool item: an image file or an image inside a WebDataset shard.

    ``key`` is unique and stable: a file's absolute path (``os.path.abspath``, symlinks not
    resolved), a shard sample's ``f"{abs_shard_path}#{sample_key}"``. ``path`` is the file or the
    shard; ``member`` the shard member name of the image (None for files); ``size`` the bytes of the
    file / of the member; ``mtime_ns`` the file's or the shard's ``st_mtime_ns``. ``offset`` (shard
    members, when known from listing) is where the member's data starts in the shard; it is not
    part of equality and need not be stored: without it the member is found by name.
    """

    key: str
    path: str
    member: str | None
    size: int
    mtime_ns: int
    label: str | None
    offset: int | None = field(default=None, compare=False)


@dataclass
class Listing:
    """Items sorted by key (keys unique), and the sources that were partly unreadable."""

    items: list[Item]
    problems: list[Failure] = field(default_factory=list)


# -- collecting ------------------------------------------------------------------------------------


def collect_items(sources: Sequence[str | Path], *, labels: str | Path | None = None,
                  label_from_folder: bool = False) -> Listing:
    """List the items of ``sources`` (see the module docstring for the kinds of source).

    ``label_from_folder``: a directory's image gets the name of its first-level subfolder under the
    source directory as label (files directly in the source directory: None). ``labels``: a CSV
    with ``path,label`` columns (paths relative to the CSV's folder or absolute; shard samples by
    their key ``shard.tar#sample``) whose labels override every other label. A file reached twice
    (directly and through its directory) is one item; its first non-empty label is kept.

    Raises:
        BadInputError: a missing source, an empty listing, a malformed list or labels CSV, a labels
            CSV naming files that are not in the sources, a shard without the webdataset package.
    """
    if not sources:
        raise BadInputError("no sources given: name image folders, image files, list files or .tar shards.")
    found: dict[str, Item] = {}
    problems: list[Failure] = []
    for source in sources:
        for item in _source_items(str(source), label_from_folder, problems):
            _add_item(found, item)
    if labels is not None:
        _apply_labels_csv(found, Path(labels))
    if not found:
        named = ", ".join(str(s) for s in list(sources)[:5]) + (", ..." if len(sources) > 5 else "")
        raise BadInputError(f"no images found in {named}.",
                            "Recognised image extensions: " + ", ".join(sorted(IMAGE_EXTENSIONS)) + ".")
    return Listing(items=[found[k] for k in sorted(found)], problems=problems)


def _add_item(found: dict[str, Item], item: Item) -> None:
    """Keep one item per key: the first, taking a later occurrence's label when the first had none."""
    previous = found.get(item.key)
    if previous is None:
        found[item.key] = item
    elif previous.label is None and item.label is not None:
        found[item.key] = replace(previous, label=item.label)


def _source_items(source: str, label_from_folder: bool, problems: list[Failure]) -> Iterator[Item]:
    """Items of one command-line source (expanding a brace pattern that names no existing path)."""
    if not os.path.lexists(source) and "{" in source and "}" in source:
        expanded = _brace_expand(source)
        if expanded != [source]:
            for path in expanded:
                yield from _path_items(path, label_from_folder, problems, allow_lists=True)
            return
    yield from _path_items(source, label_from_folder, problems, allow_lists=True)


def _path_items(path: str, label_from_folder: bool, problems: list[Failure], *, allow_lists: bool,
                origin: str | None = None) -> Iterator[Item]:
    """Items of a directory, image file, list file or shard; ``origin`` names where the path was read."""
    where = f"{origin}: " if origin else ""
    if os.path.isdir(path):
        yield from _directory_items(path, label_from_folder)
        return
    problem = path_problem(path)
    if problem is not None:
        raise BadInputError(f"{where}{path}: {problem}.")
    suffix = Path(path).suffix.lower()
    if suffix in SHARD_EXTENSIONS:
        items, cut = _shard_items(path)
        if cut is not None:
            problems.append(cut)
        yield from items
    elif suffix in LIST_EXTENSIONS:
        if not allow_lists:
            raise BadInputError(f"{where}{path}: a list file inside a list file is not supported.")
        yield from _list_items(path, problems)
    elif Path(path).name.lower().endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        raise BadInputError(f"{where}{path}: compressed shards are not supported (items are read by offset).",
                            "Use uncompressed .tar shards (WebDataset's usual layout).")
    else:
        yield _file_item(path, None)


def _file_item(path: str, label: str | None, st: os.stat_result | None = None) -> Item:
    """The item of one image file (``st``: its stat, taken now when not given)."""
    key = os.path.abspath(path)
    st = os.stat(key) if st is None else st
    return Item(key=key, path=key, member=None, size=st.st_size, mtime_ns=st.st_mtime_ns, label=label)


def _directory_items(directory: str, label_from_folder: bool) -> Iterator[Item]:
    """Image files under ``directory``, recursively, hidden files and folders skipped."""
    root = os.path.abspath(directory)
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        relative = os.path.relpath(folder, root)
        label = relative.split(os.sep)[0] if (label_from_folder and relative != ".") else None
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:  # a broken link or a file removed meanwhile: not an image of the pool
                continue
            if stat.S_ISREG(st.st_mode):  # regular files and links to them
                yield _file_item(path, label, st)


# -- list files ------------------------------------------------------------------------------------


def _list_items(list_file: str, problems: list[Failure]) -> Iterator[Item]:
    """Items named by a .txt or .csv list file (entries may be image files, folders or shards)."""
    base = os.path.dirname(os.path.abspath(list_file))
    for line, entry, label in _list_entries(list_file):
        path = entry if os.path.isabs(entry) else os.path.join(base, entry)
        origin = f"{list_file} line {line}"
        for item in _path_items(path, False, problems, allow_lists=False, origin=origin):
            yield replace(item, label=label) if label is not None else item


def _list_entries(list_file: str) -> Iterator[tuple[int, str, str | None]]:
    """(line number, path, label or None) of each entry of a list file."""
    if Path(list_file).suffix.lower() == ".csv":
        for line, row in _read_csv(list_file, required=("path",), optional=("label",)):
            yield line, row["path"], row.get("label") or None
        return
    with _open_text(list_file) as handle:
        for line, text in enumerate(handle, start=1):
            entry = text.strip()
            if entry and not entry.startswith("#"):
                yield line, entry, None


def _open_text(path: str | Path):
    """A text file opened as UTF-8 (a BOM tolerated)."""
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise BadInputError(f"{path}: cannot be read ({exc.strerror}).") from exc


def _read_csv(path: str | Path, required: tuple[str, ...], optional: tuple[str, ...] = ()
              ) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file with a header; BadInputError naming the file for bad structure."""
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise BadInputError(f"{path}: empty CSV file (a header with a `path` column is needed).") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise BadInputError(f"{path}: not a readable CSV file ({exc}).") from exc
        missing = [c for c in required if c not in header]
        if missing:
            raise BadInputError(f"{path}: the header has no {', '.join(repr(c) for c in missing)} column "
                                f"(found: {', '.join(header) or 'nothing'}).")
        wanted = [c for c in required + optional if c in header]
        columns = {c: header.index(c) for c in wanted}
        try:
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise BadInputError(f"{path} line {reader.line_num}: {len(row)} fields, the header has "
                                        f"{len(header)}.")
                values = {c: row[i].strip() for c, i in columns.items()}
                if not values[required[0]]:
                    raise BadInputError(f"{path} line {reader.line_num}: empty `{required[0]}`.")
                yield reader.line_num, values
        except (csv.Error, UnicodeDecodeError) as exc:
            raise BadInputError(f"{path} line {reader.line_num}: malformed CSV ({exc}).") from exc


# -- labels CSV ------------------------------------------------------------------------------------


def _apply_labels_csv(found: dict[str, Item], labels: Path) -> None:
    """Replace labels with those of a ``path,label`` CSV; every row must name a listed item."""
    if not labels.is_file():
        raise BadInputError(f"{labels}: {path_problem(labels) or 'not a file'} (the labels CSV).")
    base = os.path.dirname(os.path.abspath(labels))
    assigned: dict[str, str] = {}
    unknown: list[str] = []
    for line, row in _read_csv(labels, required=("path", "label")):
        key = _label_key(row["path"], base)
        label = row["label"] or None
        if key in assigned and assigned[key] != label:
            raise BadInputError(f"{labels} line {line}: {row['path']} has two labels "
                                f"({assigned[key]!r} and {label!r}).")
        if key not in found:
            unknown.append(row["path"])
            continue
        assigned[key] = label
    if unknown:
        shown = ", ".join(unknown[:_CSV_ERRORS_SHOWN]) + (f" and {len(unknown) - _CSV_ERRORS_SHOWN} more"
                                                          if len(unknown) > _CSV_ERRORS_SHOWN else "")
        raise BadInputError(f"{labels}: {len(unknown)} path(s) not among the listed items: {shown}.",
                            "Paths are relative to the CSV's folder or absolute; shard samples are "
                            "named SHARD.tar#KEY.")
    for key, label in assigned.items():
        found[key] = replace(found[key], label=label)


def _label_key(entry: str, base: str) -> str:
    """The item key a labels-CSV path names: an absolute file path, or ``abs_shard#sample`` for shards."""
    path, sep, sample = entry.partition("#")
    if sep and Path(path).suffix.lower() in SHARD_EXTENSIONS:
        return os.path.abspath(os.path.join(base, path)) + "#" + sample
    return os.path.abspath(os.path.join(base, entry))


# -- WebDataset shards -----------------------------------------------------------------------------


def _webdataset():
    """The webdataset module, or BadInputError saying how to install it."""
    try:
        import webdataset
        import webdataset.tariterators  # noqa: F401  (base_plus_ext)
    except ImportError as exc:
        raise BadInputError("WebDataset shards (.tar) and brace patterns need the webdataset package.",
                            "Install it with: pip install 'percept[webdataset]'.") from exc
    return webdataset


def _brace_expand(pattern: str) -> list[str]:
    """``shards/{000..009}.tar`` -> the ten paths (braceexpand, as WebDataset expands shard lists)."""
    _webdataset()
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


@dataclass
class _Sample:
    """Members of one shard sample met so far: the first image member and the first label member."""

    key: str
    image: tarfile.TarInfo | None = None
    label_member: tuple[int, tarfile.TarInfo] | None = None  # (preference rank, member)


def _shard_items(shard: str) -> tuple[list[Item], Failure | None]:
    """Items of a shard (one per sample with an image member) and the cut, if the shard is cut off."""
    split = _webdataset().tariterators.base_plus_ext
    path = os.path.abspath(shard)
    st = os.stat(path)
    samples: dict[str, _Sample] = {}
    cut: str | None = None
    seen = 0
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                seen += 1
                if not info.isfile():
                    continue
                if info.offset_data + info.size > st.st_size:
                    cut = f"cut off inside member {info.name} (the shard is truncated)"
                    samples.pop(split(info.name)[0], None)  # its sample is incomplete
                    break
                _add_member(samples, info, split)
            else:
                cut = _end_problem(tar, st.st_size)
                _drop_last(samples, cut)
    except tarfile.ReadError as exc:
        if seen == 0:
            return [], Failure(path, f"not a readable tar archive ({exc})")
        cut = f"cut off or corrupt after {seen} tar member(s) ({exc})"
        _drop_last(samples, cut)
    labels = _read_labels(path, samples.values(), st.st_size)
    items = [Item(key=f"{path}#{s.key}", path=path, member=s.image.name, size=s.image.size,
                  mtime_ns=st.st_mtime_ns, label=labels.get(s.key), offset=s.image.offset_data)
             for s in samples.values() if s.image is not None]
    return items, (Failure(path, cut) if cut is not None else None)


def _drop_last(samples: dict[str, _Sample], cut: str | None) -> None:
    """At a cut between members, the sample in progress may miss members: leave it out."""
    if cut is not None and samples:
        samples.pop(next(reversed(samples)))


def _add_member(samples: dict[str, _Sample], info: tarfile.TarInfo, split) -> None:
    """File a tar member under its sample (image or label member); other members are ignored."""
    key, extension = split(info.name)
    if key is None or os.path.basename(info.name).startswith("."):
        return
    sample = samples.setdefault(key, _Sample(key))
    extension = extension.lower()
    if extension in _SHARD_IMAGE_EXTENSIONS:
        if sample.image is None:
            sample.image = info
    elif extension in LABEL_MEMBER_EXTENSIONS:
        rank = LABEL_MEMBER_EXTENSIONS.index(extension)
        if sample.label_member is None or rank < sample.label_member[0]:
            sample.label_member = (rank, info)


def _end_problem(tar: tarfile.TarFile, file_size: int) -> str | None:
    """Why the archive did not end with an end-of-archive (zero) block, or None when it did.

    :mod:`tarfile` stops silently at the end of the data or at an unreadable header once past the
    first member; a complete archive has a zero block where it stopped.
    """
    end = tar.offset
    tar.fileobj.seek(end)
    block = tar.fileobj.read(_TAR_BLOCK)
    if len(block) == _TAR_BLOCK and block.count(0) == _TAR_BLOCK:
        return None
    if end >= file_size:
        return "cut off after a member, before the end of the archive (the shard is truncated)"
    return f"unreadable tar header at byte {end} (the shard is corrupt or truncated)"


def _read_labels(shard: str, samples: Iterable[_Sample], file_size: int) -> dict[str, str]:
    """Sample key -> label text of its label member (stripped UTF-8; empty texts give no label)."""
    wanted = [(s.key, s.label_member[1]) for s in samples if s.label_member is not None and s.image is not None]
    labels: dict[str, str] = {}
    if not wanted:
        return labels
    with open(shard, "rb") as handle:
        for key, info in wanted:
            if info.size > _MAX_LABEL_BYTES or info.offset_data + info.size > file_size:
                continue
            handle.seek(info.offset_data)
            text = handle.read(info.size).decode("utf-8", errors="replace").strip()
            if text:
                labels[key] = text
    return labels


def read_member_bytes(item: Item) -> bytes:
    """The stored bytes of a shard item's image member.

    Reads at the offset recorded when listing if the shard is unchanged (same ``st_mtime_ns``),
    else finds the member by name.

    Raises:
        ImageReadError: naming the item's key: the shard is missing or unreadable, the member is
            not in it, or its data is cut off.
    """
    problem = path_problem(item.path)
    if problem is not None:
        raise ImageReadError(item.key, f"shard {item.path}: {problem}")
    try:
        if item.offset is not None and os.stat(item.path).st_mtime_ns == item.mtime_ns:
            with open(item.path, "rb") as handle:
                handle.seek(item.offset)
                data = handle.read(item.size)
        else:
            data = _find_member_bytes(item)
    except OSError as exc:
        raise ImageReadError(item.key, f"shard {item.path} cannot be read ({exc})") from exc
    if len(data) != item.size:
        raise ImageReadError(item.key, f"truncated member data ({len(data)} of {item.size} bytes; "
                                       "the shard changed or is cut off)")
    return data


def _find_member_bytes(item: Item) -> bytes:
    """Read a member by name (a shard changed since listing, or an item without an offset)."""
    try:
        with tarfile.open(item.path, "r:") as tar:
            try:
                info = tar.getmember(item.member or "")
            except KeyError:
                raise ImageReadError(item.key, f"member {item.member} is not in shard {item.path} "
                                               "(the shard changed since it was listed)") from None
            handle = tar.extractfile(info)
            if handle is None:
                raise ImageReadError(item.key, f"member {item.member} of {item.path} is not a regular file")
            return handle.read()
    except tarfile.TarError as exc:
        raise ImageReadError(item.key, f"shard {item.path} is not a readable tar archive ({exc})") from exc


# -- decoding --------------------------------------------------------------------------------------


def read_item(item: Item) -> Image.Image:
    """Decode an item to an 8-bit RGB PIL image (as :func:`read_image` does).

    Raises:
        ImageReadError: naming the item's key.
    """
    if item.member is None:
        try:
            return read_image(item.path)
        except ImageReadError as exc:
            if exc.path == item.key:
                raise
            raise ImageReadError(item.key, exc.reason, exc.hint) from exc
    return read_image_bytes(read_member_bytes(item), item.key)


def iter_item_batches(items: Sequence[Item], preprocess: Preprocess, batch_size: int,
                      num_workers: int | None = None, pin_memory: bool = False, *,
                      batches: Sequence[Sequence[int]] | None = None
                      ) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Yield (positions into ``items``, uint8 batch (B,3,S,S) or None, [(position, reason)]) in order.

    Decoded in DataLoader workers (``num_workers`` None: :func:`percept_cli.io.data.default_workers`),
    as :func:`percept_cli.io.data.iter_file_batches` decodes files; a bad image is a failure record
    with :func:`read_image`'s reason, never an exception. ``pin_memory``: batches in page-locked memory.

    ``batches``: explicit batches of positions into ``items`` (``batch_size`` is then not used to cut
    them), yielded in this order, each as one (positions, batch, failures) whose positions keep the
    batch's order; e.g. one pass (one DataLoader, one start of its workers) over several groups of
    items whose batches must not mix groups. None: consecutive batches of ``batch_size`` items.

    Raises:
        BadInputError: ``batch_size`` below 1, an empty explicit batch, or a position out of range.
    """
    if batch_size < 1:
        raise BadInputError(f"batch_size must be at least 1 (got {batch_size}).")
    if batches is not None:
        _check_batches(batches, len(items))
    sampler = _ExplicitBatches(batches) if batches is not None else None
    yield from decoding_loader(ImageFileDataset(items, preprocess, read=read_item), batch_size=batch_size,
                               batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)


class _ExplicitBatches:
    """A DataLoader ``batch_sampler`` that gives the batches it was made with, as lists, in order."""

    def __init__(self, batches: Sequence[Sequence[int]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield list(batch)


def _check_batches(batches: Sequence[Sequence[int]], n_items: int) -> None:
    """BadInputError for an empty batch or a position that is not in ``range(n_items)``."""
    for number, batch in enumerate(batches):
        if len(batch) == 0:
            raise BadInputError(f"batches: batch {number} is empty.")
        low, high = min(batch), max(batch)
        if low < 0 or high >= n_items:
            bad = low if low < 0 else high
            raise BadInputError(f"batches: batch {number} names position {bad}; there are {n_items} items.")
