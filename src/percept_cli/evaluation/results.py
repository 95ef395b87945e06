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

# /2: `clean` is binarised accuracy, `clean_score` the LPIPS score; protocol. /3: a tie picks the left
# candidate (decision.py); `attack` is AttackSettings.to_dict(radius=False) (autocast "bf16", not
# "bfloat16"); fp32_checked / fp32_rejected replace low_precision_only.
SCHEMA = "percept.eval-2afc/3"


def check_schema(record, where: str) -> None:
    """Raise BadInputError unless ``record`` is a results document of this schema (an older one: say so)."""
    schema = record.get("schema") if isinstance(record, dict) else None
    if isinstance(schema, str) and schema.startswith("percept.eval-2afc/") and schema != SCHEMA:
        raise BadInputError(f"{where}: written by an older percept ({schema}; this one writes {SCHEMA}); "
                            "rerun the evaluation.")
    if schema != SCHEMA:
        raise BadInputError(f"{where}: not a percept eval-2afc results file.")


def settings_of(record: dict) -> dict:
    """The part of a results document that a resumed run must match."""
    return {key: record.get(key) for key in _MATCHING_KEYS}

# The settings a resumed run must share with the run it continues (every one changes the numbers;
# attack_batch_size is recorded only with Square Attack, whose random search depends on the batches).
_MATCHING_KEYS = ("dataset", "protocol", "attack", "radii", "seed", "model_options", "attack_batch_size")
PARTIAL_SCHEMA = "percept.eval-2afc-partial/2"  # /2: the settings and records of results schema /3
_MISSING = object()
# None: the model's/dataset's own (attack_batch_size: the device's default)
_DEFAULT_WHEN_NONE = {"resize", "crop", "pooling", "triplets", "image_list", "attack_batch_size"}


def versions() -> dict:
    import open_clip
    import torch

    from .. import __version__

    return {"percept": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


def new_record(settings: dict) -> dict:
    """An empty results document for ``settings`` (dataset, protocol, attack, radii, seed, model_options)."""
    return {"schema": SCHEMA, "status": "partial", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), **settings, "models": {}}


def save(path: Path, record: dict) -> None:
    """Write the document atomically (a reader sees the old or the new file, never half of one)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def partial_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.rank{rank}.partial.json")


def save_partial(path: Path, rank: int, model_key: str, records: dict, settings: dict,
                 wall_time_s: float | None = None) -> None:
    """Flush this process's records for one model next to the results file, with the run's settings
    and the model's wall time so far (earlier resumed runs included)."""
    payload = {"schema": PARTIAL_SCHEMA, "settings": {k: settings.get(k) for k in _MATCHING_KEYS},
               "model": model_key, "records": records, "wall_time_s": wall_time_s}
    with atomic_path(partial_path(path, rank)) as tmp:
        tmp.write_text(json.dumps(payload, allow_nan=False), encoding="utf-8")


def clear_partials(path: Path) -> None:
    for part in path.parent.glob(f"{path.name}.rank*.partial.json"):
        part.unlink(missing_ok=True)


def load_for_resume(path: Path, settings: dict) -> dict:
    """The document at ``path`` (with any partial flushes merged), checked against ``settings``.

    The results file (if any) and every partial file must carry exactly ``settings``.

    Raises:
        BadInputError: no results or partial file; a file that is unreadable, truncated, of another
            schema or not a results document; or settings that differ (one line naming each).
    """
    path = Path(path)
    where = f"--resume {path}"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        record = None
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{where}: cannot read ({exc}).") from exc
    partials = sorted(path.parent.glob(f"{path.name}.rank*.partial.json"))
    if record is None and not partials:
        raise BadInputError(f"{where}: file not found.")
    if record is None:
        record = new_record(settings)
    else:
        check_schema(record, where)
        _check_models(record.get("models"), where)
        _refuse_other_settings(settings_of(record), settings, where)
    for part in partials:
        data = _read_partial(part, where)
        _refuse_other_settings(data["settings"], settings, f"{where}: {part.name}")
        _merge(record, data["model"], data["records"], data.get("wall_time_s"))
    return record


def _read_partial(part: Path, where: str) -> dict:
    """A partial file's content, checked; a truncated or foreign one is refused, never skipped."""
    redo = "delete it to redo that work, or use a new --out"
    try:
        data = json.loads(part.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{where}: partial file {part} is unreadable or truncated ({exc}); {redo}.") from exc
    if not isinstance(data, dict) or data.get("schema") != PARTIAL_SCHEMA or not isinstance(data.get("settings"), dict):
        raise BadInputError(f"{where}: {part} is not a partial file of this percept version (its settings "
                            f"cannot be checked); {redo}.")
    records = data.get("records")
    if not isinstance(data.get("model"), str) or not isinstance(records, dict) or not all(
            isinstance(r, dict) and r.get("id") == k for k, r in records.items()):
        raise BadInputError(f"{where}: partial file {part} is damaged; {redo}.")
    return data


def _check_models(models, where: str) -> None:
    ok = isinstance(models, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("triplets", []), list)
        and all(isinstance(t, dict) and "id" in t for t in entry.get("triplets", [])) for entry in models.values())
    if not ok:
        raise BadInputError(f"{where}: damaged results file ('models' is not what percept writes); "
                            "rerun with a new --out.")


def _merge(record: dict, model_key: str, records: dict, wall_time_s=None) -> None:
    """Add a partial file's records to the model's entry; a finished record wins over an unfinished one.
    The entry's ``wall_time_s`` becomes the longest one flushed (ranks run side by side)."""
    entry = record["models"].setdefault(model_key, {"status": "partial", "triplets": []})
    if isinstance(wall_time_s, (int, float)):
        entry["wall_time_s"] = max(float(entry.get("wall_time_s") or 0.0), float(wall_time_s))
    known = {t["id"]: t for t in entry.get("triplets", [])}
    for key, rec in records.items():
        if key not in known or (known[key].get("robust_correct") is None and rec.get("robust_correct") is not None):
            known[key] = rec
    entry["triplets"] = list(known.values())


def _refuse_other_settings(made_with: dict, now: dict, where: str) -> None:
    """BadInputError naming every setting that differs: ``WHERE was made with a=1 b=2; now a=3 b=4``."""
    old, new = _flat(made_with), _flat(json.loads(json.dumps(now)))
    keys = list(new) + [k for k in old if k not in new]
    differ = [k for k in keys if old.get(k, _MISSING) != new.get(k, _MISSING)]
    if not differ:
        return

    def side(flat: dict) -> str:
        norm = flat.get("norm") if flat.get("norm") in ("linf", "l2") else "l2"
        shown = [f"{k}={_show(k, flat[k], norm)}" for k in differ if k in flat]
        return " ".join(shown) or "(not recorded)"

    raise BadInputError(f"{where} was made with {side(old)}; now {side(new)}. "
                        "Rerun with the same options, or use a new --out.")


def _flat(settings: dict) -> dict:
    """Leaf settings by short name: dataset.name -> dataset, attack.norm -> norm, radii -> eps."""
    flat: dict = {}

    def walk(value, name: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, name if key == "name" else key)
        else:
            flat[name] = value

    for key in _MATCHING_KEYS:
        walk(settings.get(key) if isinstance(settings, dict) else None, "eps" if key == "radii" else key)
    return flat


def _show(key: str, value, norm: str) -> str:
    from ..attacks.threat import format_eps

    if value is None:
        return "default" if key in _DEFAULT_WHEN_NONE else "none"
    if isinstance(value, bool):
        return str(value).lower()
    if key == "eps" and isinstance(value, list):
        return ",".join(format_eps(v, norm) if isinstance(v, (int, float)) else str(v) for v in value) or "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
