"""2AFC and odd-one-out evaluation of one model: clean agreement with people, and under attack.

Per model, work happens in fixed global batches so that a resumed run and a run spread over
several processes compute every batch exactly as an uninterrupted single-process run does:

1. every distinct image is decoded and embedded once (DataLoader workers decode), in batches of the
   global first-use order, with the protocol's geometry (:func:`input_preprocess`); the references
   to attack keep their decoded pixels for step 3 (:mod:`.pixels`: bit-identical, bounded memory);
2. per triplet: ``clean_correct`` (the metric's choice by :mod:`percept_cli.decision`, a tie picking
   the left candidate as in the authors' code, is the majority's, p > 0.5), the paper's binarised
   accuracy, and the LPIPS/DreamSim score ``(d0<d1)(1-p) + (d1<d0)p + 0.5(d0==d1)`` with p the
   fraction of people who chose the right candidate;
3. under attack, the triplets to attack (all, or ``plan.attack_ids``) that the model gets right are
   attacked in batches of ``attack_batch_size`` of the list of such triplets (each triplet's random
   start is seeded by its dataset position, so APGD's outcome does not depend on the batches; Square
   Attack's random search does), APGD on the reference with both candidates'
   embeddings fixed, early stopping on; radii ascending, each radius attacking the survivors of
   the previous one (a point broken inside a smaller ball is broken inside every larger one).
   An autocast (bf16/fp16) attack's claimed breaks are confirmed in fp32; per triplet and radius,
   ``fp32_checked`` says a claim needed that confirmation and ``fp32_rejected`` that fp32 refused one
   (None when the attack ran in fp32).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import decision
from ..attacks import AttackSettings
from ..attacks.tasks import attack_2afc_embedded, save_ready
from ..distributed import Dist, gather
from ..errors import BadInputError, ImageReadError
from ..io.data import iter_file_batches
from ..io.preprocess import Preprocess
from .datasets import DatasetIndex, OddOneOut
from .pixels import PIXEL_CACHE_BYTES, ReferencePixels

Progress = Callable[..., None]
PROTOCOLS = ("paper", "native")
FP32_COUNTS = ("fp32_checked", "fp32_rejected")  # summary counts of an autocast attack's fp32 confirmations
CUDA_ATTACK_BATCH = 256  # triplets per attack batch on a GPU unless asked otherwise


@dataclass
class EvalPlan:
    """What to measure: ``radii`` ascending (empty = clean only) with ``attack`` as base settings.

    ``attack_ids``: the ids of the triplets to attack (None: every one); clean scores cover all.
    ``protocol``: ``paper`` or ``native`` (see :func:`input_preprocess`).
    ``attack_batch_size``: triplets per attack batch (None: :func:`default_attack_batch_size`).
    ``pixel_cache_bytes``: memory for the references' pixels kept between the passes (:mod:`.pixels`).
    """

    radii: list[float]
    attack: Optional[AttackSettings]
    batch_size: int = 32
    save_adv: Optional[Path] = None
    flush_every: float = 60.0
    attack_ids: Optional[frozenset] = None
    protocol: str = "paper"
    attack_batch_size: Optional[int] = None
    pixel_cache_bytes: int = PIXEL_CACHE_BYTES


def default_attack_batch_size(device, batch_size: int) -> int:
    """Triplets per attack batch: :data:`CUDA_ATTACK_BATCH` on a GPU (large batches keep it busy
    whatever the embedding batch size), else ``batch_size`` (a CPU gains nothing from larger ones)."""
    return CUDA_ATTACK_BATCH if torch.device(device).type == "cuda" else int(batch_size)


def input_preprocess(metric, index: DatasetIndex, protocol: str = "paper") -> Optional[Preprocess]:
    """The geometry the evaluation feeds the model, or None for the model's own preprocessing.

    ``paper``: BAPPS' 64x64 patches are upsampled to the model's input size without a crop, with
    bilinear antialiased resizing (torchvision's default ``Resize``, as the paper's authors do);
    other datasets use the model's own preprocessing. ``native``: the model's own for every dataset.

    Raises:
        BadInputError: an unknown protocol.
    """
    if protocol not in PROTOCOLS:
        raise BadInputError(f"unknown protocol '{protocol}'; use {' or '.join(PROTOCOLS)}.")
    if protocol == "paper" and index.name == "bapps":
        return Preprocess(metric.image_size, crop=False, interpolation="bilinear")
    return None


def without_images(index: DatasetIndex, bad) -> tuple[DatasetIndex, list[str]]:
    """``index`` without the items that use any of the image paths in ``bad`` (``--skip-bad``).

    Returns:
        (the reduced index, with groups left empty removed; the ids of the items left out).
    """
    bad = set(bad)
    kept, dropped = [], []
    for item in index.items:
        paths = item.images if isinstance(item, OddOneOut) else (item.ref, item.left, item.right)
        (dropped if bad.intersection(paths) else kept).append(item)
    groups = [g for g in index.groups if any(item.group == g for item in kept)]
    return replace(index, items=kept, groups=groups), [item.id for item in dropped]


def score_2afc(d_left: float, d_right: float, p_right: float) -> float:
    """LPIPS/DreamSim 2AFC score: agreement with the fraction of people; a tie scores 0.5."""
    return float(d_left < d_right) * (1 - p_right) + float(d_right < d_left) * p_right + 0.5 * float(d_left == d_right)


def score_odd_one_out(s01: float, s02: float, s12: float) -> float:
    """1 if the pair people kept (0,1) is the most similar; a tie for the maximum shares the point."""
    best = max(s01, s02, s12)
    return (1.0 / [s01, s02, s12].count(best)) if s01 == best else 0.0


def embed_distinct(metric, paths: list[str], needed: set[str], batch_size: int, dist: Dist,
                   progress: Optional[Progress] = None, preprocess: Optional[Preprocess] = None,
                   keep: Optional[ReferencePixels] = None) -> dict[str, torch.Tensor]:
    """Embeddings (CPU) of the global batches that contain a needed image, shared by all ranks.

    ``keep`` is offered this process's decoded uint8 pixels (the references to attack).

    Raises:
        ImageReadError: an image that cannot be decoded.
    """
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    mine = [b for k, b in enumerate(batches) if dist.owns(k) and needed.intersection(b)]
    flat = [p for b in mine for p in b]
    local: dict[str, torch.Tensor] = {}
    if flat:
        local = _embed_paths(metric, flat, batch_size, preprocess or metric.preprocess, progress, keep)
    merged: dict[str, torch.Tensor] = {}
    for part in gather(dist, local):
        merged.update(part)
    return merged


@torch.no_grad()
def _embed_paths(metric, paths: list[str], batch_size: int, geometry: Preprocess, progress, keep) -> dict:
    """``metric.embed_files`` of ``paths`` (same arithmetic: uint8 on the device, /255, ``embed_pixels``),
    also offering each decoded uint8 batch to ``keep``. Returns path -> embedding (CPU).

    Raises:
        ImageReadError: an image that cannot be decoded.
    """
    device = metric.device
    rows, order = [], []
    for idx, batch, failed in iter_file_batches(paths, geometry, batch_size, metric.num_workers,
                                                device.type == "cuda"):
        if failed:
            raise ImageReadError(failed[0].path, failed[0].reason)
        x = batch.to(device, non_blocking=True).to(torch.float32).div_(255.0)
        rows.append(metric.embed_pixels(x, check=False))  # queued on a GPU; the CPU goes on below
        names = [paths[i] for i in idx]
        if keep is not None:
            keep.offer(names, batch)
        order.extend(names)
        if progress:
            progress(len(idx))
    return dict(zip(order, torch.cat(rows).cpu())) if rows else {}


def _refs_to_attack(index: DatasetIndex, plan: EvalPlan, records: dict) -> set[str]:
    """References of the triplets the attack pass may attack (before clean correctness is known)."""
    refs = set()
    for item in index.items:
        rec = records.get(item.id)
        unfinished = rec is None or (rec.get("attacked") and rec.get("clean_correct")
                                     and rec.get("robust_correct") is None)
        if unfinished and (plan.attack_ids is None or item.id in plan.attack_ids):
            refs.add(item.ref)
    return refs


def _needed(index: DatasetIndex, records: dict, attacking: bool) -> set[str]:
    need: set[str] = set()
    for item in index.items:
        rec = records.get(item.id)
        if rec is None or (attacking and rec.get("attacked") and rec.get("clean_correct")
                           and rec.get("robust_correct") is None):
            need.update(item.images if isinstance(item, OddOneOut) else (item.ref, item.left, item.right))
    return need


def evaluate_model(metric, index: DatasetIndex, plan: EvalPlan, records: dict, dist: Dist, *,
                   progress: Optional[Progress] = None, flush: Optional[Callable[[dict], None]] = None) -> dict:
    """Fill ``records`` (triplet id -> outcome) for every item of ``index``; returns the merged records."""
    attacking = bool(plan.radii) and index.task == "2afc"
    preprocess = input_preprocess(metric, index, plan.protocol)
    needed = _needed(index, records, attacking)
    keep = ReferencePixels(_refs_to_attack(index, plan, records) if attacking else (),
                           preprocess or metric.preprocess, max_bytes=plan.pixel_cache_bytes,
                           batch_size=plan.batch_size, num_workers=metric.num_workers)
    embeddings = embed_distinct(metric, index.distinct_images(), needed, plan.batch_size, dist,
                                progress=(lambda n: progress(n, phase="embed")) if progress else None,
                                preprocess=preprocess, keep=keep)
    for item in index.items:
        if item.id not in records:
            attacked = attacking and (plan.attack_ids is None or item.id in plan.attack_ids)
            records[item.id] = _clean_record(item, embeddings, len(plan.radii) if attacked else 0)
    if attacking:
        _attack_all(metric, index, plan, records, embeddings, dist, progress, flush, keep)
    merged: dict = {}
    for part in gather(dist, records):
        for key, rec in part.items():
            if key not in merged or (merged[key].get("robust_correct") is None and rec.get("robust_correct") is not None):
                merged[key] = rec
    return merged


def _clean_record(item, emb: dict, n_radii: int) -> dict:
    if isinstance(item, OddOneOut):
        a, b, c = (emb[p] for p in item.images)
        s01, s02, s12 = float(a @ b), float(a @ c), float(b @ c)
        return {"id": item.id, "group": item.group, "similarities": [s01, s02, s12],
                "clean_score": score_odd_one_out(s01, s02, s12), "clean_correct": s01 > max(s02, s12)}
    ref = emb[item.ref]
    s_left, s_right = float(ref @ emb[item.left]), float(ref @ emb[item.right])
    d_left, d_right = (min(2.0, max(0.0, 1.0 - s)) for s in (s_left, s_right))  # 1 - cos, in [0, 2]
    label = item.label
    margin = (s_right - s_left) if label == decision.RIGHT else (s_left - s_right)  # sim(correct) - sim(wrong)
    rec = {"id": item.id, "group": item.group, "p_right": item.p_right, "label": label, "d_left": d_left,
           "d_right": d_right, "clean_score": score_2afc(d_left, d_right, item.p_right),
           "clean_correct": bool(decision.is_correct(s_left, s_right, label)), "clean_margin": margin,
           "attacked": n_radii > 0, "robust_correct": None, "margin": None, "fp32_checked": None,
           "fp32_rejected": None}
    if n_radii and not rec["clean_correct"]:  # already wrong: broken at every radius, nothing to attack
        rec.update(robust_correct=[False] * n_radii, margin=[margin] * n_radii)
    return rec


def _attack_all(metric, index, plan, records, embeddings, dist, progress, flush, pixels: ReferencePixels) -> None:
    """Attack the clean-correct triplets to attack, in this process's attack batches (a resumed run
    attacks only the unfinished triplets of each batch)."""
    position = {item.id: k for k, item in enumerate(index.items)}
    targets = [item for item in index.items if records[item.id]["attacked"] and records[item.id]["clean_correct"]]
    size = plan.attack_batch_size or default_attack_batch_size(metric.device, plan.batch_size)
    batches = [targets[i:i + size] for i in range(0, len(targets), size)]
    todo = [[t for t in batch if records[t.id]["robust_correct"] is None] if dist.owns(k) else []
            for k, batch in enumerate(batches)]
    pixels.retain(t.ref for batch in todo for t in batch)
    last_flush = time.monotonic()
    for batch in todo:
        if not batch:
            continue
        _attack_batch(metric, batch, plan, records, embeddings, position, pixels)
        if progress:
            progress(len(batch), phase="attack", records=records)
        if flush and time.monotonic() - last_flush >= plan.flush_every:
            flush(records)
            last_flush = time.monotonic()


def _attack_batch(metric, batch, plan, records, embeddings, position, pixels: ReferencePixels) -> None:
    ref = pixels.batch([t.ref for t in batch])
    e_ref = torch.stack([embeddings[t.ref] for t in batch])
    e_left = torch.stack([embeddings[t.left] for t in batch])
    e_right = torch.stack([embeddings[t.right] for t in batch])
    label = torch.tensor([t.label for t in batch])
    ids = torch.tensor([position[t.id] for t in batch])
    n = len(plan.radii)
    out = [{"robust_correct": [True] * n, "margin": [records[t.id]["clean_margin"]] * n,
            "square_found": [False] * n, "fp32_checked": [False] * n, "fp32_rejected": [False] * n} for t in batch]
    autocast = True  # False once a report says the attack ran in fp32 (no confirmations to count)
    alive = torch.arange(len(batch))
    for r, eps in enumerate(plan.radii):
        if alive.numel() == 0:
            break
        report = attack_2afc_embedded(metric, ref[alive], e_left[alive], e_right[alive], label[alive],
                                      replace(plan.attack, eps=eps), early_stop=True, example_ids=ids[alive],
                                      e_ref=e_ref[alive])
        held = report.robust_correct.cpu()
        checks = (report.fp32_checked, report.fp32_rejected)  # None: the attack ran in fp32
        autocast = autocast and checks[0] is not None
        _record_radius(out, alive.tolist(), r, held, report.margin.cpu(), report.found_by_square,
                       checks if autocast else None)
        if plan.save_adv is not None:
            _save_adversarial(plan.save_adv, [batch[i] for i in alive.tolist()], report.x_adv, ref[alive], eps,
                              plan.attack.norm)
        alive = alive[held]
    for t, result in zip(batch, out):
        if plan.attack.square_queries <= 0:
            result["square_found"] = None
        if not autocast:
            result["fp32_checked"] = result["fp32_rejected"] = None
        records[t.id].update(result)


def _record_radius(out: list[dict], rows: list[int], r: int, held, margin, square_found, checks) -> None:
    """Outcomes at radius index ``r`` of the attacked rows; a break is carried to every larger radius.

    ``checks``: the report's (fp32_checked, fp32_rejected) flags, or None for an fp32 attack.
    """
    n = len(out[0]["robust_correct"])
    for j, row in enumerate(rows):
        if checks is not None:
            out[row]["fp32_checked"][r] = bool(checks[0][j])
            out[row]["fp32_rejected"][r] = bool(checks[1][j])
        if bool(held[j]):
            out[row]["margin"][r] = float(margin[j])
            continue
        for later in range(r, n):
            out[row]["robust_correct"][later] = False
            out[row]["margin"][later] = float(margin[j])
        if square_found is not None and bool(square_found[j]):
            out[row]["square_found"][r] = True


def adversarial_folder(folder: Path, eps: float, norm: str) -> Path:
    """Where one model's adversarial references at radius ``eps`` go: ``folder/<radius>`` (``4/255`` as
    ``4_255``); ``folder`` is the model's own folder, ``DIR/<model folder>`` (see ``model_folder_names``)."""
    from ..attacks import format_eps

    return folder / format_eps(eps, norm).replace("/", "_")


def _save_adversarial(folder: Path, items, x_adv, x, eps, norm) -> None:
    """Write the batch's adversarial references (8-bit, inside the ball) as ``<triplet id>.png``.

    Raises:
        OutputNotWrittenError: a file could not be written (naming it).
    """
    from ..io.outputs import OutputNotWrittenError, save_png

    q, _ = save_ready(x_adv, x, eps, norm)
    path = adversarial_folder(folder, eps, norm)
    try:
        path.mkdir(parents=True, exist_ok=True)
        for item, pixels in zip(items, q):
            path = adversarial_folder(folder, eps, norm) / (item.id.replace("/", "__") + ".png")
            save_png(path, pixels)
    except OSError as exc:
        raise OutputNotWrittenError([{"option": "--save-adv", "path": str(path), "reason": exc.strerror or str(exc)}],
                                    "The evaluation stopped; the work flushed so far can be resumed.") from exc


def summarize(index: DatasetIndex, records: dict, radii: list[float]) -> dict:
    """Per group and overall: ``clean`` (binarised accuracy, the headline), ``clean_score`` (LPIPS/
    DreamSim score, ties 0.5), ``n``; with radii, ``n_attacked`` and ``robust`` per radius (over the
    attacked triplets), and, for an autocast attack, the counts per radius of triplets whose claimed
    break needed an fp32 confirmation (``fp32_checked``) and of those where fp32 refused one
    (``fp32_rejected``).

    Overall is the mean over subsets for BAPPS (as published; counts are summed), the mean over
    triplets otherwise.
    """
    by_group: dict[str, list[dict]] = {g: [] for g in index.groups}
    for item in index.items:
        by_group[item.group].append(records[item.id])
    groups = {g: _stats(recs, radii) for g, recs in by_group.items() if recs}
    if index.name != "bapps":
        return {"overall": _stats([records[item.id] for item in index.items], radii), "groups": groups}
    stats = list(groups.values())
    overall: dict = {}
    for key in ("n", "clean", "clean_score", "n_attacked", "robust", *FP32_COUNTS):
        values = [s[key] for s in stats if key in s]
        if not values or (len(values) != len(stats) and key not in FP32_COUNTS):
            continue
        if key in ("clean", "clean_score"):
            overall[key] = sum(values) / len(values)
        elif key == "robust":
            overall[key] = [sum(v[r] for v in values) / len(values) for r in range(len(radii))]
        elif key in FP32_COUNTS:
            overall[key] = [sum(v[r] for v in values) for r in range(len(radii))]
        else:
            overall[key] = sum(values)
    return {"overall": overall, "groups": groups}


def _stats(recs: list[dict], radii: list[float]) -> dict:
    n = len(recs)
    out = {"n": n, "clean": sum(bool(r["clean_correct"]) for r in recs) / n,
           "clean_score": sum(r["clean_score"] for r in recs) / n}
    attacked = [r for r in recs if r.get("attacked")]
    if radii and attacked:
        out["n_attacked"] = len(attacked)
        out["robust"] = [sum(bool(r["robust_correct"][k]) for r in attacked) / len(attacked) for k in range(len(radii))]
        for key in FP32_COUNTS:
            flags = [r[key] for r in attacked if r.get(key) is not None]
            if flags:
                out[key] = [sum(bool(f[k]) for f in flags) for k in range(len(radii))]
    return out
