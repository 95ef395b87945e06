"""Our ``eval-2afc`` numbers beside the ones published for the zoo models.

``compare_with_paper(load_results(path))`` reads a results document (schema
``percept.eval-2afc/2``, see :mod:`.results`) and pairs every summary number with the zoo's
:class:`~percept_cli.models.zoo.PublishedResult` for the same model, benchmark (dataset, split,
subset), threat model and radius. No torch import: this is bookkeeping on a JSON file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import BadInputError
from ..models.zoo import THREATS, ModelSpec, find_spec
from .results import check_schema

_NIGHTS_SPLITS = {"test": "nights", "test_imagenet": "nights_imagenet", "test_no_imagenet": "nights_no_imagenet"}


def load_results(path: str | Path) -> dict:
    """The results document at ``path``.

    Raises:
        BadInputError: missing or unreadable file, not JSON, or not an eval-2afc results document.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path}: file not found.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable JSON file ({type(exc).__name__}).") from None
    check_schema(doc, str(path))
    if not (isinstance(doc.get("models"), dict)
            and isinstance(doc.get("dataset"), dict) and isinstance(doc.get("radii") or [], list)
            and isinstance(doc.get("attack") or {}, dict)
            and all(isinstance(e, dict) and isinstance(e.get("summary") or {}, dict) for e in doc["models"].values())):
        raise BadInputError(f"{path}: not a percept eval-2afc results file (write one with "
                            "`percept eval-2afc ... --out results.json`).")
    return doc


def paper_benchmark(dataset: str, split: str | None, group: str | None = None) -> str | None:
    """The zoo benchmark key of a dataset/split (and BAPPS subset), or None if nothing is published for it.

    >>> paper_benchmark("nights", "test_imagenet")
    'nights_imagenet'
    """
    if dataset == "nights":
        return _NIGHTS_SPLITS.get(split or "test")
    if dataset == "bapps" and (split or "val") == "val":
        return "bapps" if group is None else f"bapps_{group}"
    if dataset == "things":
        return "things"
    return None


def threat_label(norm: str | None, eps: float | None) -> str:
    """``clean``, ``linf 4/255`` (radii on the 8-bit grid) or ``l2 3``."""
    if norm is None:
        return "clean"
    steps = eps * 255
    if norm == "linf" and abs(steps - round(steps)) < 1e-6:
        return f"linf {round(steps)}/255"
    return f"{norm} {eps:g}"


def _published(spec: ModelSpec | None, benchmark: str | None, norm: str | None, eps: float | None):
    if spec is None or benchmark is None:
        return None
    for result in spec.published:
        ball = THREATS[result.threat]
        if result.benchmark != benchmark:
            continue
        if (ball is None and norm is None) or (ball is not None and norm == ball[0]
                                               and math.isclose(eps, ball[1], rel_tol=1e-6)):
            return result
    return None


def _row(scope: tuple[str, str | None], norm, eps, fraction, spec) -> dict:
    label, benchmark = scope
    ours = None if fraction is None else 100.0 * fraction
    paper = _published(spec, benchmark, norm, eps)
    diff = None if ours is None or paper is None else ours - paper.value
    return {"benchmark": label, "threat": threat_label(norm, eps), "ours": None if ours is None else round(ours, 2),
            "paper": None if paper is None else paper.value, "diff": None if diff is None else round(diff, 2),
            "source": None if paper is None else paper.source}


def _scope_rows(scope: tuple[str, str | None], stats: dict, norm: str | None, radii: list[float], spec) -> list[dict]:
    """Rows for one scope (label, benchmark key or None): clean, then one per radius."""
    rows = [_row(scope, None, None, stats.get("clean"), spec)]
    robust = stats.get("robust") or []
    for k, eps in enumerate(radii):
        rows.append(_row(scope, norm, eps, robust[k] if k < len(robust) else None, spec))
    return rows


def _scope(dataset: str, split: str | None, group: str | None = None) -> tuple[str, str | None]:
    key = paper_benchmark(dataset, split, group)
    return key or " ".join(x for x in (dataset, split, group) if x), key


def compare_with_paper(doc: dict) -> dict:
    """Per model of ``doc``, our numbers beside the published ones.

    Returns ``{"dataset", "split", "n_triplets", "models": [{"name", "zoo", "rows": [...]}]}``; each row
    has ``benchmark``, ``threat``, ``ours`` and ``paper`` (%), ``diff`` (ours − paper, points) and the
    paper number's ``source``; ``paper``/``diff``/``source`` are None where nothing was published.
    Models without a summary (unfinished runs) have no rows and ``status`` partial.
    """
    dataset = doc["dataset"]
    name, split = dataset.get("name"), dataset.get("split")
    norm = (doc.get("attack") or {}).get("norm")
    radii = [float(r) for r in doc.get("radii") or []]
    models = []
    for key, entry in doc["models"].items():
        zoo_name = (entry.get("model") or {}).get("zoo")
        spec = find_spec(zoo_name) if zoo_name else None
        summary = entry.get("summary")
        rows = []
        if summary:
            rows = _scope_rows(_scope(name, split), summary.get("overall", {}), norm, radii, spec)
            groups = summary.get("groups") or {}
            if name == "bapps":
                for group, stats in groups.items():
                    rows += _scope_rows(_scope(name, split, group), stats, norm, radii, spec)
        models.append({"name": key, "zoo": spec.name if spec else None,
                       "status": "complete" if summary else "partial", "rows": rows})
    return {"dataset": name, "split": split, "n_triplets": dataset.get("n_triplets"), "models": models}
