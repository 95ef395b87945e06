"""Writing results to disk: output paths checked before any work, files written atomically.

:func:`check_outputs` is the one guard every command calls before loading a model: an output
that is, or resolves to, an input file, or lies inside an input folder or dataset root, is
refused, and every output location is probed for writability. Files are then written through
a temp file in the target folder and ``os.replace`` (a crash or Ctrl-C never leaves a
half-written file under the user's name), created with the process umask like any other file.
If a write still fails at the end, :class:`OutputWrites` records it so the command can print
its results and then say which path could not be written.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, TypeVar

import numpy as np

from ..errors import BadInputError, PerceptError

MATRIX_FORMATS = (".csv", ".npy", ".safetensors")
TABLE_FORMATS = (".csv", ".json")
T = TypeVar("T")


@dataclass(frozen=True)
class OutputSpec:
    """One place a command writes to: ``option`` (e.g. ``--out``), ``path``, and whether it is a
    ``folder`` the command fills (created if missing) or a file, with its allowed ``formats``."""

    option: str
    path: Path
    folder: bool = False
    formats: tuple[str, ...] = ()


def output_file(option: str, path: str | Path, formats: Sequence[str] = ()) -> OutputSpec:
    return OutputSpec(option, Path(path), False, tuple(formats))


def output_folder(option: str, path: str | Path) -> OutputSpec:
    return OutputSpec(option, Path(path), True)


def path_inputs(values: Iterable[Optional[str | Path]]) -> list[Path]:
    """The values that name something on disk (e.g. a local model folder, ``local-dir:`` stripped)."""
    found = []
    for value in values:
        if value is None:
            continue
        text = str(value)
        text = text[len("local-dir:"):] if text.startswith("local-dir:") else text
        if text and os.path.exists(text):
            found.append(Path(text))
    return found


def _identity(path: Path) -> Optional[tuple[int, int]]:
    """(device, inode) of what ``path`` resolves to, or None if nothing is there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _existing_folders(path: Path) -> Iterable[Path]:
    """``path`` (symlinks and ``..`` resolved) and each of its ancestors that exists, nearest first."""
    resolved = Path(os.path.realpath(path))
    for folder in (resolved, *resolved.parents):
        if folder.is_dir():
            yield folder


def check_outputs(outputs: Iterable[OutputSpec], inputs: Iterable[str | Path] = (),
                  input_dirs: Iterable[str | Path] = ()) -> None:
    """Refuse unusable output locations before any work (all checks are cheap; no model involved).

    Each output must have an allowed extension (files), a folder that exists (files), must not be
    or resolve to an input file (compared by device and inode: symlinks, ``..``, hard links and
    case-insensitive file systems included), must not lie inside an input folder or dataset root,
    must differ from the other outputs, and its folder must accept a new file (probed by creating
    and removing one).

    Raises:
        BadInputError: naming the option and the path, for the first problem found.
    """
    outputs = list(outputs)
    files = {ident: Path(p) for p in inputs if (ident := _identity(Path(p))) is not None}
    folders = {ident: Path(p) for p in input_dirs if (ident := _identity(Path(p))) is not None}
    seen: dict[str, OutputSpec] = {}
    for spec in outputs:
        _check_one(spec, files, folders)
        key = os.path.normcase(os.path.realpath(spec.path))
        if key in seen and seen[key] != spec:
            raise BadInputError(f"{spec.option} {spec.path} is also the path given to {seen[key].option}; "
                                "give each output its own path.")
        seen[key] = spec
    for spec in outputs:
        _probe_writable(spec)


def _check_one(spec: OutputSpec, files: dict, folders: dict) -> None:
    where = f"{spec.option} {spec.path}"
    path = spec.path
    if not spec.folder:
        if spec.formats and path.suffix.lower() not in spec.formats:
            raise BadInputError(f"{where}: unsupported format '{path.suffix or '(none)'}'; "
                                f"use one of {', '.join(spec.formats)}.")
        if path.is_dir():
            raise BadInputError(f"{where} is a directory; give a file name.")
        if not path.parent.is_dir():
            raise BadInputError(f"{where}: folder {path.parent} does not exist.")
        ident = _identity(path)
        if ident is not None and ident in files:
            raise BadInputError(f"{where} is the input file {files[ident]}; refusing to overwrite it.",
                                "Choose another output path.")
    elif path.exists() and not path.is_dir():
        raise BadInputError(f"{where} exists and is not a folder.")
    for folder in _existing_folders(path):
        ident = _identity(folder)
        if ident in folders:
            raise BadInputError(f"{where} is inside the input folder {folders[ident]}; refusing to write there.",
                                "Choose an output path outside the inputs.")


def _probe_writable(spec: OutputSpec) -> None:
    """Create and remove a file where ``spec`` will be written (the nearest existing folder)."""
    folder = next(iter(_existing_folders(spec.path if spec.folder else spec.path.parent)), None)
    try:
        if folder is None:
            raise OSError("no existing parent folder")
        fd, probe = _create_temp(folder, ".percept-write-test")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BadInputError(f"{spec.option} {spec.path}: cannot write in {folder} "
                            f"({exc.strerror or exc}).") from None


def check_output_path(path: str | Path, formats: Sequence[str], inputs: Iterable[str | Path] = (),
                      input_dirs: Iterable[str | Path] = (), option: str = "--out") -> Path:
    """:func:`check_outputs` for a single output file; returns it as a ``Path``.

    Raises:
        BadInputError: see :func:`check_outputs`.
    """
    check_outputs([output_file(option, path, formats)], inputs, input_dirs)
    return Path(path)


def _create_temp(folder: Path, stem: str) -> tuple[int, Path]:
    """A new, exclusive file in ``folder``, mode 0666 minus the process umask (as ``open`` creates)."""
    for _ in range(100):
        candidate = folder / f"{stem}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    The file gets the permissions a plain ``open(path, "w")`` would give (0666 minus the umask).
    ``fsync``: flush the file's data to the disk before the rename (files whose loss on a power cut
    would cost much work: training checkpoints, FAISS indexes).
    """
    target = Path(path)
    fd, tmp = _create_temp(target.parent, f".{target.name}")
    os.close(fd)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class OutputNotWrittenError(PerceptError):
    """The work finished and its results were printed, but some outputs could not be written."""

    def __init__(self, failures: Sequence[dict], hint: str = "The results were printed instead."):
        self.failures = list(failures)
        what = "; ".join(f"{f['option']} {f['path']} ({f['reason']})" for f in self.failures)
        super().__init__(f"could not write {what}.", hint)


class OutputWrites:
    """Final writes that must not lose the results: a failed write is recorded, not raised.

    ``attempt(option, path, write)`` returns ``write()``'s value, or None if it raised ``OSError``;
    ``failures`` lists what failed (for the JSON document), ``raise_if_failed()`` raises
    :class:`OutputNotWrittenError` once the results have been shown.
    """

    def __init__(self) -> None:
        self.failures: list[dict] = []

    def attempt(self, option: str, path: str | Path, write: Callable[[], T]) -> Optional[T]:
        try:
            return write()
        except OSError as exc:
            failure = {"option": option, "path": str(path), "reason": exc.strerror or str(exc)}
            if failure not in self.failures:  # a flush retried every minute is reported once
                self.failures.append(failure)
            return None

    def raise_if_failed(self) -> None:
        if self.failures:
            raise OutputNotWrittenError(self.failures)


def model_folder_names(models: Sequence[str]) -> dict[str, str]:
    """One distinct, file-name-safe, lower-case folder name per model string (order kept).

    ``clip-vit-b-16`` stays as is, ``hf-hub:org/name`` becomes ``hf-hub-org-name``; names that
    would collide (also on a case-insensitive file system) get ``-2``, ``-3``, ... in order.
    """
    names: dict[str, str] = {}
    used: set[str] = set()
    for model in models:
        if model in names:
            continue
        base = re.sub(r"[^a-z0-9._-]+", "-", model.lower()).strip("-.")[:80] or "model"
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}-{k}"
        names[model] = name
        used.add(name)
    return names


def write_matrix(path: str | Path, matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str],
                 metadata: dict | None = None) -> Path:
    """Write a distance matrix as .csv (labelled), .npy, or .safetensors (labels in metadata)."""
    target = Path(path)
    suffix = target.suffix.lower()
    with atomic_path(target) as tmp:
        if suffix == ".csv":
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(["", *cols])
                for name, values in zip(rows, matrix):
                    writer.writerow([name, *(f"{v:.8g}" for v in values)])
        elif suffix == ".npy":  # labels beside it: <out>.labels.json {"rows": [...], "cols": [...], metadata}
            with open(tmp, "wb") as fh:
                np.save(fh, matrix.astype(np.float32))
            with atomic_path(target.with_name(target.name + ".labels.json")) as tmp_labels:
                labels = {"rows": list(rows), "cols": list(cols), **(metadata or {})}
                tmp_labels.write_text(json.dumps(labels, indent=1) + "\n", encoding="utf-8")
        elif suffix == ".safetensors":
            import torch
            from safetensors.torch import save_file

            meta = {"rows": json.dumps(list(rows)), "cols": json.dumps(list(cols))}
            meta.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()})
            save_file({"distance": torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))},
                      str(tmp), metadata=meta)
        else:
            raise BadInputError(f"unsupported matrix format '{suffix}'.")
    return target


def write_table(path: str | Path, records: Sequence[dict]) -> Path:
    """Write a list of flat records as .csv (header from the first record) or .json."""
    target = Path(path)
    with atomic_path(target) as tmp:
        if target.suffix.lower() == ".json":
            tmp.write_text(json.dumps(list(records), indent=2) + "\n", encoding="utf-8")
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                fields = list(records[0]) if records else []
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(records)
    return target


def save_png(path: str | Path, pixels) -> Path:
    """Write a (3,H,W) [0,1] tensor (or a PIL image) as an 8-bit RGB PNG, atomically."""
    from PIL import Image

    if not isinstance(pixels, Image.Image):
        import torch

        arr = (pixels.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        pixels = Image.fromarray(np.ascontiguousarray(arr))
    target = Path(path)
    with atomic_path(target) as tmp:
        pixels.save(tmp, format="PNG")
    return target
