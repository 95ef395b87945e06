"""A whole 2AFC evaluation run over several models: checks, resume, flushes, the results document.

:func:`prepare` does every check that needs no model (the dataset, every image header, the output
locations, the settings of a resumed file) and returns an :class:`EvalJob`; :func:`run` evaluates
its models one after the other through the caller's ``load_model``, skipping models a resumed
document already holds, flushing each process's finished records next to the results file
(``torchrun``: one partial file per rank) and saving the document atomically after each model.
Nothing here prints: progress is reported to an ``on_event`` callback as :class:`EvalEvent` values.

Example (``load_metric`` from :mod:`percept_cli`)::

    job = prepare(EvalRequest("nights", Path("NIGHTS"), models=["dreamsim"], out=Path("r.json")))
    record = run(job, lambda name: load_metric(name))
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..attacks import AttackSettings
from ..distributed import Dist
from ..errors import BadInputError
from ..io.outputs import OutputWrites, model_folder_names
from . import results, twoafc
from .datasets import DatasetIndex, first_per_group, load_dataset, subsample


@dataclass(frozen=True)
class EvalRequest:
    """What one evaluation run is asked to do.

    ``models`` in order (a name given twice is evaluated once); ``attack`` the base settings of the
    ``radii`` (ascending; empty: clean only); ``checkpoint``/``head``/``lora``/``dtype``/``resize``/``crop``/``pooling``
    how the models are loaded (recorded, so a resumed run must match); ``out`` the results file and
    ``resume`` a results file to continue (written to ``out`` if given, else to itself);
    ``save_adv`` a folder for adversarial references (one subfolder per model); ``skip_bad`` leaves
    out the triplets that use unreadable images instead of failing. ``attack_batch_size``: triplets
    per attack batch (None: 256 on a GPU, else ``batch_size``); APGD's results do not depend on it,
    Square Attack's do (with Square it is a setting a resumed run must share). ``labels`` name ``out`` and
    ``save_adv`` in messages and write failures (the CLI passes its option names); ``other_outputs``
    (label -> path) are further files checked with the others, ``other_inputs`` files that no output
    may replace.
    """

    dataset: str
    root: Path
    split: Optional[str] = None
    subsets: Sequence[str] = ()
    triplets: Optional[Path] = None
    image_list: Optional[Path] = None
    n: Optional[int] = None
    first: Optional[int] = None
    protocol: str = "paper"
    models: Sequence[str] = ()
    checkpoint: Optional[Path] = None
    head: Optional[Path] = None
    lora: Optional[Path] = None
    dtype: str = "fp32"
    resize: Optional[int] = None
    crop: Optional[str] = None
    pooling: Optional[str] = None
    attack: Optional[AttackSettings] = None
    radii: Sequence[float] = ()
    seed: int = 0
    batch_size: int = 32
    attack_batch_size: Optional[int] = None
    out: Optional[Path] = None
    resume: Optional[Path] = None
    save_adv: Optional[Path] = None
    flush_every: float = 60.0
    skip_bad: bool = False
    labels: dict = field(default_factory=lambda: {"out": "out", "save_adv": "save_adv"})
    other_outputs: dict = field(default_factory=dict)
    other_inputs: Sequence = ()


@dataclass
class EvalJob:
    """A checked request: the dataset (subsampled, unreadable triplets left out), each model once
    (``repeated``: name -> times given, for those given more than once), the plan, the results
    document to fill and where it goes (``out``; None: not saved), and the images left out."""

    request: EvalRequest
    index: DatasetIndex
    models: list[str]
    repeated: dict[str, int]
    plan: twoafc.EvalPlan
    record: dict
    out: Optional[Path]
    bad_images: list = field(default_factory=list)
    skipped_ids: list = field(default_factory=list)


@dataclass(frozen=True)
class EvalEvent:
    """What :func:`run` reports, in order, per model.

    ``kind``: ``"skipped"`` (complete in the resumed document, not evaluated again), ``"started"``
    (``total`` units of work: distinct images to embed plus triplets to attack), ``"advanced"``
    (``done`` more units; while attacking, ``clean`` and ``robust`` are this process's running
    accuracies, robust at the largest radius), ``"finished"``.
    """

    kind: str
    model: str
    total: int = 0
    done: int = 0
    clean: Optional[float] = None
    robust: Optional[float] = None


def unique_models(models: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """Each model once in first-given order, and how often each repeated one was given.

    >>> unique_models(["a", "b", "a"])
    (['a', 'b'], {'a': 2})
    """
    counts = Counter(models)
    return list(dict.fromkeys(models)), {name: k for name, k in counts.items() if k > 1}


def prepare(request: EvalRequest) -> EvalJob:
    """Check everything that needs no model and build the job (a resumed document is loaded here).

    Raises:
        BadInputError: no model; an unknown protocol; a dataset, image or output problem; attack
            radii for an odd-one-out dataset; a resumed file made with other settings.
    """
    models, repeated = unique_models(list(request.models))
    if not models:
        raise BadInputError("models: give at least one model.")
    if request.protocol not in twoafc.PROTOCOLS:
        raise BadInputError(f"unknown protocol '{request.protocol}'; use {' or '.join(twoafc.PROTOCOLS)}.")
    full_index = load_dataset(request.dataset, request.root, request.split, tuple(request.subsets or ()),
                              request.triplets, request.image_list)
    index = subsample(full_index, request.n, request.seed)
    index, bad_images, skipped_ids = check_images(index, request.skip_bad)  # every header, before any model
    if index.task != "2afc" and request.radii:
        raise BadInputError("THINGS odd-one-out is evaluated clean only, without attack radii.",
                            option_hints={"--attack": "Drop --attack/--sweep-eps."})
    attack_ids = first_per_group(index, request.first) if request.first is not None else None
    out = request.out or request.resume
    _check_outputs(request, out, full_index, models)
    settings = run_settings(request, index, models)
    record = results.load_for_resume(request.resume, settings) if request.resume else results.new_record(settings)
    if bad_images:
        record["skipped"] = {"images": [{"path": f.path, "reason": f.reason} for f in bad_images],
                             "triplets": skipped_ids}
    plan = twoafc.EvalPlan(list(request.radii), request.attack, request.batch_size, request.save_adv,
                           request.flush_every, attack_ids, request.protocol, request.attack_batch_size)
    return EvalJob(request, index, models, repeated, plan, record, out, bad_images, skipped_ids)


def run_settings(request: EvalRequest, index: DatasetIndex, models: list[str]) -> dict:
    """The settings part of the results document: everything a resumed run must share with it.

    The attack batch size only with Square Attack: its random search draws for the whole batch, so
    its outcomes depend on how triplets are batched; APGD seeds each triplet on its own.
    """
    settings = {"dataset": {"name": index.name, "root": str(Path(index.root).resolve()), "split": index.split,
                            "subsets": index.groups, "n": request.n, "first": request.first,
                            "n_triplets": len(index.items), "task": index.task,
                            "triplets": _resolved(request.triplets), "image_list": _resolved(request.image_list)},
                "protocol": request.protocol,
                "attack": None if request.attack is None else request.attack.to_dict(radius=False),
                "radii": list(request.radii), "seed": request.seed,
                "model_options": {"models": models, "checkpoint": _resolved(request.checkpoint),
                                  "dtype": request.dtype, "resize": request.resize,
                                  "crop": request.crop.strip().lower() if request.crop else None,
                                  "pooling": request.pooling}}
    for name in ("head", "lora"):  # recorded only when given, so results files written before them still resume
        if getattr(request, name) is not None:
            settings["model_options"][name] = _resolved(getattr(request, name))
    if request.attack is not None and request.attack.square_queries > 0 and request.radii:
        settings["attack_batch_size"] = request.attack_batch_size
    return settings


def check_images(index: DatasetIndex, skip_bad: bool):
    """Header-check every image of ``index`` (parallel); -> (index without bad triplets, failures, their ids).

    Raises:
        BadInputError: bad images without ``skip_bad`` (the first few listed, and the count), or no
            triplet left with them skipped.
    """
    from ..distances import bad_files_error, check_files

    failures = check_files(index.distinct_images())
    if not failures:
        return index, [], []
    if not skip_bad:
        raise bad_files_error(failures)
    reduced, dropped = twoafc.without_images(index, {f.path for f in failures})
    if not reduced.items:
        raise BadInputError(f"every triplet uses one of the {len(failures)} unreadable image(s); nothing to evaluate.")
    return reduced, failures, dropped


def _check_outputs(request: EvalRequest, out: Optional[Path], index: DatasetIndex, models: list[str]) -> None:
    """No output is, or is inside, the dataset (root, CSV, images), a model folder or another input file,
    and each can be written; ``save_adv`` is checked down to every model's radius folders."""
    from ..io.outputs import check_outputs, output_file, output_folder, path_inputs

    files = {request.labels["out"]: out, **request.other_outputs}
    specs = [output_file(label, path) for label, path in files.items() if path is not None]
    if request.save_adv is not None:
        label, base = request.labels["save_adv"], request.save_adv
        norm = request.attack.norm if request.attack is not None else "linf"
        specs.append(output_folder(label, base))
        specs += [output_folder(label, twoafc.adversarial_folder(base / folder, r, norm))
                  for folder in model_folder_names(models).values() for r in request.radii]
    root = Path(index.root)  # a folder (NIGHTS, BAPPS, THINGS) or the custom dataset's CSV
    on_disk = path_inputs([*models, request.checkpoint, request.head, request.lora, request.triplets, request.image_list, *request.other_inputs])
    check_outputs(specs, inputs=[root, *index.distinct_images(), *on_disk],
                  input_dirs=[*on_disk, *([root] if root.is_dir() else [])])


def run(job: EvalJob, load_model: Callable[[str], object], dist: Optional[Dist] = None,
        writes: Optional[OutputWrites] = None, on_event: Optional[Callable[[EvalEvent], None]] = None) -> dict:
    """Evaluate every model of ``job`` and return its completed results document.

    ``load_model(name)`` gives the ``PerceptualMetric`` of a model; ``writes`` collects saves of the
    results file that failed (the run goes on; None: a fresh collector); ``dist`` is this process's
    place in a ``torchrun`` job (None: a single process; only rank 0 saves the document).

    Raises:
        whatever ``load_model`` raises; OutputNotWrittenError when an adversarial image cannot be written.
    """
    dist = dist if dist is not None else Dist()
    writes = writes if writes is not None else OutputWrites()
    emit = on_event or (lambda event: None)
    folders = model_folder_names(job.models)  # save_adv/<model folder>/<radius>/<id>.png
    for name in job.models:
        plan = job.plan if job.plan.save_adv is None else replace(job.plan, save_adv=job.plan.save_adv / folders[name])
        _evaluate_one(job, name, plan, load_model, dist, writes, emit)
    job.record["status"] = "complete"
    if dist.is_main and job.out is not None:
        out = job.out
        if writes.attempt(job.request.labels["out"], out, lambda: results.save(out, job.record) or out):
            results.clear_partials(out)  # kept when the file could not be written: still resumable
    return job.record


def _evaluate_one(job: EvalJob, name: str, plan, load_model, dist: Dist, writes: OutputWrites, emit) -> None:
    """One model: resume its records, evaluate the rest with periodic flushes, store its entry."""
    entry = job.record["models"].get(name)
    if entry is not None and entry.get("status") == "complete":
        emit(EvalEvent("skipped", name))
        return
    records = {t["id"]: t for t in (entry or {}).get("triplets", [])}
    metric = load_model(name)
    earlier = float((entry or {}).get("wall_time_s") or 0.0)  # the resumed runs' part
    started = time.monotonic()

    def wall_time() -> float:
        return round(earlier + time.monotonic() - started, 3)

    flush = None
    if job.out is not None:
        label, out, settings = job.request.labels["out"], job.out, results.settings_of(job.record)

        def flush(recs: dict) -> None:
            writes.attempt(label, results.partial_path(out, dist.rank), lambda: results.save_partial(
                out, dist.rank, name, recs, settings, wall_time_s=wall_time()))

    attacked = len(job.index.items) if plan.attack_ids is None else len(plan.attack_ids)
    emit(EvalEvent("started", name, total=len(job.index.distinct_images()) + (attacked if plan.radii else 0)))
    merged = twoafc.evaluate_model(metric, job.index, plan, records, dist, progress=_progress(name, emit),
                                   flush=flush)
    emit(EvalEvent("finished", name))
    order = {item.id: k for k, item in enumerate(job.index.items)}
    job.record["models"][name] = {
        "status": "complete", "model": metric.source.as_dict(), "device": str(metric.device),
        "dtype": metric.dtype_name, "image_size": metric.image_size, "preprocess": metric.preprocess.as_dict(),
        "eval_preprocess": (twoafc.input_preprocess(metric, job.index, plan.protocol) or metric.preprocess).as_dict(),
        "world_size": dist.world, "wall_time_s": wall_time(),
        "summary": twoafc.summarize(job.index, merged, plan.radii),
        "triplets": sorted(merged.values(), key=lambda r: order[r["id"]]),
    }
    if dist.is_main and job.out is not None:
        out = job.out
        writes.attempt(job.request.labels["out"], out, lambda: results.save(out, job.record))


def _progress(name: str, emit) -> Callable[..., None]:
    """The evaluation's progress callback, as ``advanced`` events (running accuracies while attacking)."""
    def progress(k: int, phase: str, records: Optional[dict] = None) -> None:
        clean = robust = None
        if phase == "attack" and records:
            done = [r for r in records.values() if r.get("robust_correct") is not None]
            if done:
                robust = sum(r["robust_correct"][-1] for r in done) / len(done)
                clean = sum(bool(r["clean_correct"]) for r in records.values()) / len(records)
        emit(EvalEvent("advanced", name, done=k, clean=clean, robust=robust))

    return progress


def _resolved(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(Path(path).resolve())
