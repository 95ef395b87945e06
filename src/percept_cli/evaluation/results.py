"""The self-describing results file of ``percept eval-2afc``, written atomically, resumable.

One JSON document: settings (dataset, split, N, first, protocol, seed, attack), versions, and per
model its source and resolved revision, device, dtype, preprocessing (the model's own and the one
the evaluation used), wall time, summary, and per-triplet outcomes.
While a run is going, each process also flushes its own partial records next to the file
(``<out>.rank<R>.partial.json``); ``--resume`` merges them, and the final write removes them.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from ..errors import BadInputError
from ..io.outputs import atomic_path

SCHEMA = "percept.eval-2afc/2"  # /2: `clean` is binarised accuracy, `clean_score` the LPIPS score; protocol


def check_schema(record, where: str) -> None:
    """Raise BadInputError unless ``record`` is a results document of this schema (an older one: say so)."""
    schema = record.get("schema") if isinstance(record, dict) else None
    if isinstance(schema, str) and schema.startswith("percept.eval-2afc/") and schema != SCHEMA:
        raise BadInputError(f"{where}: written by an older percept ({schema}; this one writes {SCHEMA}); "
                            "rerun the evaluation.")
    if schema != SCHEMA:
        raise BadInputError(f"{where}: not a percept eval-2afc results file.")
_MATCHING_KEYS = ("dataset", "protocol", "attack", "radii", "seed")


def versions() -> dict:
    import open_clip
    import torch

    from .. import __version__

    return {"percept": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


def new_record(settings: dict) -> dict:
    """An empty results document for ``settings`` (dataset, protocol, attack, radii, seed)."""
    return {"schema": SCHEMA, "status": "partial", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), **settings, "models": {}}


def save(path: Path, record: dict) -> None:
    """Write the document atomically (a reader sees the old or the new file, never half of one)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def partial_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.rank{rank}.partial.json")


def save_partial(path: Path, rank: int, model_key: str, records: dict) -> None:
    """Flush this process's records for one model next to the results file."""
    with atomic_path(partial_path(path, rank)) as tmp:
        tmp.write_text(json.dumps({"model": model_key, "records": records}, allow_nan=False), encoding="utf-8")


def clear_partials(path: Path) -> None:
    for part in path.parent.glob(f"{path.name}.rank*.partial.json"):
        part.unlink(missing_ok=True)


def load_for_resume(path: Path, settings: dict) -> dict:
    """The document at ``path`` (with any partial flushes merged), checked against ``settings``.

    Raises:
        BadInputError: missing/unreadable file, another schema, or different settings.
    """
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        record = None
    except (OSError, ValueError) as exc:
        raise BadInputError(f"--resume {path}: cannot read ({exc}).") from exc
    partials = sorted(Path(path).parent.glob(f"{Path(path).name}.rank*.partial.json"))
    if record is None and not partials:
        raise BadInputError(f"--resume {path}: file not found.")
    if record is None:
        record = new_record(settings)
    check_schema(record, f"--resume {path}")
    different = [k for k in _MATCHING_KEYS if record.get(k) != settings.get(k)]
    if different:
        raise BadInputError(f"--resume {path} was made with different {', '.join(different)}; "
                            "rerun with the same options or a new --out.")
    for part in partials:
        try:
            data = json.loads(part.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a flush interrupted mid-way can only be the temp file, but stay safe
        entry = record["models"].setdefault(data["model"], {"status": "partial", "triplets": []})
        known = {t["id"]: t for t in entry.get("triplets", [])}
        for key, rec in data["records"].items():
            if key not in known or (known[key].get("robust_correct") is None and rec.get("robust_correct") is not None):
                known[key] = rec
        entry["triplets"] = list(known.values())
    return record
