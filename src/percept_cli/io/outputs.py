"""Writing results to disk atomically: a temp file in the target directory, then ``os.replace``.

A crash or Ctrl-C never leaves a half-written file under the user's chosen name,
and an output path that is one of the inputs is refused before any work starts.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import BadInputError

MATRIX_FORMATS = (".csv", ".npy", ".safetensors")
TABLE_FORMATS = (".csv", ".json")


def check_output_path(path: str | Path, formats: Sequence[str], inputs: Iterable[str | Path] = ()) -> Path:
    """Validate an output path before any work: known extension, existing folder, not an input.

    Raises:
        BadInputError: otherwise.
    """
    out = Path(path)
    if out.suffix.lower() not in formats:
        raise BadInputError(f"--out {out}: unsupported format '{out.suffix or '(none)'}'; "
                            f"use one of {', '.join(formats)}.")
    if not out.parent.exists() or not out.parent.is_dir():
        raise BadInputError(f"--out {out}: folder {out.parent} does not exist.")
    if out.is_dir():
        raise BadInputError(f"--out {out} is a directory.")
    resolved = out.resolve()
    for item in inputs:
        if Path(item).resolve() == resolved:
            raise BadInputError(f"--out {out} is one of the input files; refusing to overwrite it.")
    return out


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        elif suffix == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, matrix.astype(np.float32))
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
