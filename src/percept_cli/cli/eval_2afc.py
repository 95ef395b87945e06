"""``percept eval-2afc``: agreement with human 2AFC judgements, clean and under attack."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..models.zoo import DEFAULT_MODEL
from .errors import handle_errors
from .options import (BatchSizeOpt, CheckpointOpt, CropOpt, DeviceOpt, EpsOpt, ForceOpt, ItersOpt, JsonOpt, QuietOpt,
                      RandomStartOpt, PoolingOpt, ResizeOpt, RestartsOpt, SeedOpt, WorkersOpt, attack_settings,
                      check_radii, geometry_options)
from .output import Output

HELP = """Score metrics against human 2AFC judgements (NIGHTS, BAPPS, THINGS, custom), clean and under attack.

\b
  percept eval-2afc --dataset nights --root NIGHTS_DIR --split test
  percept eval-2afc --dataset nights --root NIGHTS_DIR --attack linf --n 500 --out results.json
  percept eval-2afc --dataset bapps --root BAPPS_DIR --attack l2 --eps 3 --first 1000
  percept eval-2afc --dataset nights --root D --attack linf --sweep-eps 0,1,2,4,8/255 --plot curve.png
  torchrun --nproc_per_node=4 -m percept_cli eval-2afc ...   (data-parallel, same numbers)
"""


def parse_sweep(text: str, norm: str) -> list[float]:
    """Radii from ``0,1,2,4,8/255`` (a trailing /D applies to every value without one) or ``0.5,1,3``.

    Zero is dropped (it is the clean accuracy); the rest must be positive and are sorted.
    """
    from ..attacks import parse_eps
    from ..errors import BadInputError

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise BadInputError("--sweep-eps is empty.")
    suffix = "/" + parts[-1].split("/", 1)[1] if "/" in parts[-1] else ""
    radii = []
    for part in parts:
        value = part if "/" in part or not suffix else part + suffix
        if value.split("/")[0].strip() in {"0", "0.0"}:
            continue
        radii.append(parse_eps(value))
    return sorted(set(radii))


@handle_errors
def eval_2afc(
    dataset: Annotated[str, typer.Option("--dataset", help="nights | bapps | things | custom.", show_default=False)],
    root: Annotated[Path, typer.Option("--root", help="Dataset folder (custom: the CSV file).", show_default=False)],
    split: Annotated[Optional[str], typer.Option("--split", help="NIGHTS: train|val|test|test_imagenet|"
                                                 "test_no_imagenet (default test); BAPPS: train|val (default val).")]
    = None,
    subset: Annotated[Optional[List[str]], typer.Option("--subset", help="BAPPS subset(s) (repeatable; default all).")]
    = None,
    triplets: Annotated[Optional[Path], typer.Option("--triplets", help="THINGS triplet file "
                                                     "(default ROOT/triplets.txt).")] = None,
    image_list: Annotated[Optional[Path], typer.Option("--image-list", help="THINGS, Hebart et al.'s triplet "
                                                       "format: the 1854 image paths, one per line (default "
                                                       "ROOT/image_paths.txt).")] = None,
    n: Annotated[Optional[int], typer.Option("--n", min=1, help="Seeded random subset: N triplets (per subset for "
                                             "BAPPS), the same for every model.")] = None,
    first: Annotated[Optional[int], typer.Option("--first", min=1, help="Attack only the first N triplets (per "
                                                 "subset for BAPPS, in sorted path order), as the paper; clean "
                                                 "accuracy over all.")] = None,
    protocol: Annotated[str, typer.Option("--protocol", help="paper: the authors' dataset-specific choices "
                                          "(BAPPS upsampled bilinear, no crop); native: each model's own "
                                          "preprocessing everywhere.")] = "paper",
    attack: Annotated[Optional[List[str]], typer.Option("--attack", help="linf | l2 (APGD on the reference); add "
                                                        "--attack square for the gradient-free sanity check.")] = None,
    eps: EpsOpt = None,
    sweep_eps: Annotated[Optional[str], typer.Option("--sweep-eps", help="Radii for the accuracy-vs-radius curve, "
                                                     "e.g. 0,1,2,4,8/255.")] = None,
    iters: ItersOpt = 100, restarts: RestartsOpt = 1, random_start: RandomStartOpt = True, force: ForceOpt = False,
    loss: Annotated[str, typer.Option("--loss", help="ce | margin.")] = "ce",
    square_queries: Annotated[int, typer.Option("--square-queries", min=1, help="Queries for --attack square.")] = 5000,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Results JSON (per-triplet outcomes; saved "
                                                "every --flush-every seconds).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue an interrupted run from its results "
                                                   "file.")] = None,
    save_adv: Annotated[Optional[Path], typer.Option("--save-adv", help="Write adversarial references as PNG here.")]
    = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Accuracy-vs-radius plot (.png; needs matplotlib).")]
    = None,
    flush_every: Annotated[float, typer.Option("--flush-every", min=0.0, help="With --out: seconds between saves "
                                               "of finished work, so a crash loses at most that (0: after every "
                                               "batch).")] = 60.0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Report unreadable images and leave out the triplets "
                                           "that use them (counted in the results) instead of stopping.")] = False,
    model: Annotated[Optional[List[str]], typer.Option("--model", "-m", help="Model(s) to compare (repeatable).",
                                                       envvar="PERCEPT_MODEL", rich_help_panel="Model")] = None,
    models_file: Annotated[Optional[Path], typer.Option("--models-file", help="File with one model per line.",
                                                        rich_help_panel="Model")] = None,
    checkpoint: CheckpointOpt = None, device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 | bf16 | fp16: encoder precision for clean "
                                       "evaluation; with --attack the attack's autocast precision (weights fp32, "
                                       "verdicts checked in fp32).", rich_help_panel="Model")] = "fp32",
    batch_size: BatchSizeOpt = 32, workers: WorkersOpt = None, resize: ResizeOpt = None, crop: CropOpt = None,
    pooling: PoolingOpt = None,
    seed: SeedOpt = 0, json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    from .. import distributed
    from ..evaluation import results as eval_results
    from ..evaluation.datasets import first_per_group, load_dataset, subsample
    from ..errors import BadInputError
    from ..evaluation.twoafc import PROTOCOLS, EvalPlan
    from ..io.outputs import OutputWrites, model_folder_names

    models = list(model or [])
    if models_file is not None:
        if not models_file.is_file():
            raise BadInputError(f"--models-file {models_file} not found.")
        models += [ln.strip() for ln in models_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    models = models or [DEFAULT_MODEL]
    kinds = [a.strip().lower() for a in (attack or [])]
    unknown = [a for a in kinds if a not in {"linf", "l2", "square"}]
    if unknown or len({k for k in kinds if k != "square"}) > 1:
        raise BadInputError(f"--attack takes linf or l2 (one of them), plus optionally square; got {', '.join(kinds)}.")
    norm = next((k for k in kinds if k != "square"), "linf")
    settings, radii = None, []
    if kinds or sweep_eps:
        settings = attack_settings(norm, eps, iters, restarts, random_start, seed, dtype, loss,
                                   square_queries if "square" in kinds else 0, force=force)
        radii = parse_sweep(sweep_eps, norm) if sweep_eps else [settings.eps]
        if sweep_eps:
            check_radii(radii, settings.norm, force)
        dtype = "fp32"
    if plot is not None:
        _check_plot(plot, radii)
    protocol = protocol.strip().lower()
    if protocol not in PROTOCOLS:
        raise BadInputError(f"unknown --protocol '{protocol}'; use {' or '.join(PROTOCOLS)}.")
    if first is not None and n is not None:
        raise BadInputError("--first and --n cannot be combined: --first attacks the first N triplets and scores "
                            "all of them clean; --n evaluates a seeded random subset.")
    if first is not None and not radii:
        raise BadInputError("--first selects the triplets to attack; add --attack or --sweep-eps.")
    out_option, out = ("--out" if out is not None else "--resume"), out or resume
    full_index = load_dataset(dataset, root, split, subset or (), triplets, image_list)
    index = subsample(full_index, n, seed)
    index, bad_images, skipped_ids = _check_images(index, skip_bad)  # every header, before any model work
    if index.task != "2afc" and radii:
        raise BadInputError("THINGS odd-one-out is evaluated clean only; drop --attack/--sweep-eps.")
    attack_ids = first_per_group(index, first) if first is not None else None
    _check_outputs({out_option: out, "--plot": plot, "--save-adv": save_adv}, full_index, models, radii, norm,
                   [*models, checkpoint, models_file, triplets, image_list])
    config = {"dataset": {"name": index.name, "root": str(Path(index.root).resolve()), "split": index.split,
                          "subsets": index.groups, "n": n, "first": first, "n_triplets": len(index.items),
                          "task": index.task, "triplets": _resolved(triplets), "image_list": _resolved(image_list)},
              "protocol": protocol,
              "attack": None if settings is None else {
                  "norm": settings.norm, "iters": settings.iters, "restarts": settings.restarts, "loss": settings.loss,
                  "random_start": settings.random_start, "square_queries": settings.square_queries,
                  "square_p_init": settings.square_p_init if settings.square_queries else None,
                  "autocast": None if settings.autocast_dtype is None else str(settings.autocast_dtype)[6:]},
              "radii": radii, "seed": seed,
              "model_options": {"models": models, "checkpoint": _resolved(checkpoint), "dtype": dtype,
                                "resize": resize, "crop": crop.strip().lower() if crop else None, "pooling": pooling}}
    record = eval_results.load_for_resume(resume, config) if resume else eval_results.new_record(config)
    if bad_images:
        record["skipped"] = {"images": [{"path": f.path, "reason": f.reason} for f in bad_images],
                             "triplets": skipped_ids}

    dist = distributed.init(device)
    output = Output(json, quiet or not dist.is_main)
    if bad_images and dist.is_main:
        shown = ", ".join(f.path for f in bad_images[:5]) + (" ..." if len(bad_images) > 5 else "")
        output.warn(f"skipped {len(skipped_ids)} triplet(s) that use {len(bad_images)} unreadable image(s): {shown}")
    if out is None and radii and dist.is_main:
        output.warn("no --out: results are not saved and an interrupted run cannot be resumed.")
    plan = EvalPlan(radii, settings, batch_size, save_adv, flush_every, attack_ids, protocol)
    folders = model_folder_names(models)  # --save-adv DIR/<model folder>/<radius>/<id>.png
    writes = OutputWrites()  # a failed write still prints the results, then exits non-zero
    try:
        for name in models:
            model_plan = replace(plan, save_adv=save_adv / folders[name]) if save_adv is not None else plan
            _run_model(name, index, model_plan, record, out, dist, output, writes,
                       dict(checkpoint=checkpoint, device=distributed.device_for(dist, device), dtype=dtype,
                            batch_size=batch_size, workers=workers, seed=seed,
                            geometry=geometry_options(resize, crop, pooling)))
        record["status"] = "complete"
        if dist.is_main and out is not None:
            if writes.attempt(out_option, out, lambda: eval_results.save(out, record) or out):
                eval_results.clear_partials(out)  # kept when the file could not be written: still resumable
    finally:
        distributed.shutdown(dist)
    if not dist.is_main:
        return
    if plot is not None:
        writes.attempt("--plot", plot, lambda: _plot(plot, record, settings.norm if settings else "linf"))
    summary = {k: v for k, v in record.items() if k != "models"}
    summary["models"] = {k: {kk: vv for kk, vv in m.items() if kk != "triplets"} for k, m in record["models"].items()}
    summary["out"] = str(out) if out and not any(f["path"] == str(out) for f in writes.failures) else None
    if writes.failures:
        summary["not_written"] = writes.failures
    output.result(summary, lambda console: _render(console, record, index, settings))
    writes.raise_if_failed()


def _check_outputs(outputs: dict, index, models: list[str], radii: list[float], norm: str, given: list) -> None:
    """Before any model work: no output is, or is inside, the dataset (root, CSV, images), a model folder or
    another input file, and each can be written; ``--save-adv`` is checked down to every radius folder."""
    from ..evaluation.twoafc import adversarial_folder
    from ..io.outputs import check_outputs, model_folder_names, output_file, output_folder, path_inputs

    specs = [output_file(option, path) for option, path in outputs.items()
             if path is not None and option != "--save-adv"]
    base = outputs.get("--save-adv")
    if base is not None:
        specs.append(output_folder("--save-adv", base))
        specs += [output_folder("--save-adv", adversarial_folder(base / folder, r, norm))
                  for folder in model_folder_names(models).values() for r in radii]
    root = Path(index.root)  # a folder (NIGHTS, BAPPS, THINGS) or the custom dataset's CSV
    on_disk = path_inputs(given)
    check_outputs(specs, inputs=[root, *index.distinct_images(), *on_disk],
                  input_dirs=[*on_disk, *([root] if root.is_dir() else [])])


def _run_model(name, index, plan, record, out, dist, output, writes, load_kwargs) -> None:
    import torch

    from ..evaluation import results as eval_results
    from ..evaluation.twoafc import evaluate_model, input_preprocess, summarize
    from ..metric import load_metric

    entry = record["models"].get(name)
    if entry is not None and entry.get("status") == "complete":
        output.info(f"{name}: complete in the resumed file, skipped.")
        return
    records = {t["id"]: t for t in (entry or {}).get("triplets", [])}
    torch.manual_seed(load_kwargs["seed"])
    with output.status(f"Loading {name} ..."):
        metric = load_metric(name, device=load_kwargs["device"], dtype=load_kwargs["dtype"],
                             checkpoint=load_kwargs["checkpoint"], batch_size=load_kwargs["batch_size"],
                             num_workers=load_kwargs["workers"], **load_kwargs["geometry"])
    earlier = float((entry or {}).get("wall_time_s") or 0.0)  # the resumed runs' part
    started = time.monotonic()
    flush = None
    if out is not None:
        def flush(recs):
            elapsed = round(earlier + time.monotonic() - started, 3)
            writes.attempt("--out", eval_results.partial_path(out, dist.rank), lambda: eval_results.save_partial(
                out, dist.rank, name, recs, eval_results.settings_of(record), wall_time_s=elapsed))
    attacked = len(index.items) if plan.attack_ids is None else len(plan.attack_ids)
    total = len(index.distinct_images()) + (attacked if plan.radii else 0)
    with output.progress(total, f"{name}") as advance:
        def progress(k, phase, records=None):
            text = None
            if phase == "attack" and records:
                done = [r for r in records.values() if r.get("robust_correct") is not None]
                if done:
                    acc = sum(r["robust_correct"][-1] for r in done) / len(done)
                    clean = sum(bool(r["clean_correct"]) for r in records.values()) / len(records)
                    text = f"{name}  clean {clean:.1%}  robust {acc:.1%}"
            advance(k, text)

        merged = evaluate_model(metric, index, plan, records, dist, progress=progress, flush=flush)
    order = {item.id: k for k, item in enumerate(index.items)}
    record["models"][name] = {
        "status": "complete", "model": metric.source.as_dict(), "device": str(metric.device),
        "dtype": metric.dtype_name, "image_size": metric.image_size, "preprocess": metric.preprocess.as_dict(),
        "eval_preprocess": (input_preprocess(metric, index, plan.protocol) or metric.preprocess).as_dict(),
        "world_size": dist.world,
        "wall_time_s": round(earlier + time.monotonic() - started, 3),
        "summary": summarize(index, merged, plan.radii),
        "triplets": sorted(merged.values(), key=lambda r: order[r["id"]]),
    }
    if dist.is_main and out is not None:
        writes.attempt("--out", out, lambda: eval_results.save(out, record))


def _resolved(path: Optional[Path]) -> Optional[str]:
    return None if path is None else str(Path(path).resolve())


def _check_images(index, skip_bad: bool):
    """Header-check every image of ``index`` (parallel); -> (index without bad triplets, failures, their ids).

    Raises:
        BadInputError: bad images without ``--skip-bad`` (the first few listed, and the count), or no
            triplet left with them skipped.
    """
    from ..distances import bad_files_error, check_files
    from ..errors import BadInputError
    from ..evaluation.twoafc import without_images

    failures = check_files(index.distinct_images())
    if not failures:
        return index, [], []
    if not skip_bad:
        raise bad_files_error(failures)
    reduced, dropped = without_images(index, {f.path for f in failures})
    if not reduced.items:
        raise BadInputError(f"every triplet uses one of the {len(failures)} unreadable image(s); nothing to evaluate.")
    return reduced, failures, dropped


def _check_plot(path: Path, radii: list[float]) -> None:
    """--plot draws accuracy against the radius: refused (exit 2) without an attack or a sweep."""
    from ..errors import BadInputError

    if not radii:
        raise BadInputError("--plot draws accuracy against the attack radius; add --attack or --sweep-eps, "
                            "or drop --plot.")
    if path.suffix.lower() not in {".png", ".pdf", ".svg"}:
        raise BadInputError(f"--plot {path}: use .png, .pdf or .svg.")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInputError("--plot needs matplotlib: pip install 'percept[plot]'.") from None


def _plot(path: Path, record: dict, norm: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.outputs import atomic_path

    scale = 255 if norm == "linf" else 1
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=150)
    for name, entry in record["models"].items():
        overall = entry["summary"]["overall"]
        xs = [0.0] + [r * scale for r in record["radii"]]
        ys = [overall["clean"]] + overall.get("robust", [])
        ax.plot(xs[:len(ys)], [100 * y for y in ys], marker="o", label=name)
    ax.set_xlabel("eps (x/255, l_inf)" if norm == "linf" else "eps (l2)")
    ax.set_ylabel("2AFC accuracy (%)")
    ax.set_title(f"{record['dataset']['name']} {record['dataset']['split'] or ''}: accuracy under APGD ({norm})")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower())
    plt.close(fig)


def _render(console, record: dict, index, settings) -> None:
    from rich.table import Table

    from ..attacks import format_eps

    radii = record["radii"]
    summaries = [entry["summary"] for entry in record["models"].values()]
    n_attacked = summaries[0]["overall"].get("n_attacked") if summaries else None
    attacked = f"; robust accuracy over {n_attacked} attacked" if n_attacked is not None else ""
    task = "2AFC" if index.task == "2afc" else "odd-one-out"
    which = " ".join(p for p in (index.name, index.split) if p)
    console.print(f"{task} agreement with people (%): {which} "
                  f"({record['dataset']['n_triplets']} triplets{attacked}; protocol {record['protocol']})")
    if record.get("skipped"):
        console.print(f"left out {len(record['skipped']['triplets'])} triplet(s) that use unreadable images "
                      "(--skip-bad).", style="dim")
    show_score = index.task == "2afc" and (index.name == "bapps" or any(
        abs(s["overall"]["clean"] - s["overall"]["clean_score"]) > 1e-12 for s in summaries))
    table = Table(header_style="bold")
    table.add_column("model", no_wrap=True)
    groups = index.groups if len(index.groups) > 1 else []
    for g in groups:
        table.add_column(g, justify="right")
    table.add_column("clean" if not groups else "mean", justify="right")
    if show_score:
        table.add_column("score", justify="right")
    for r in radii:
        table.add_column(f"{settings.norm} {format_eps(r, settings.norm)}", justify="right")
    for name, entry in record["models"].items():
        s = entry["summary"]
        row = [name] + [f"{100 * s['groups'][g]['clean']:.1f}" for g in groups] + [f"{100 * s['overall']['clean']:.1f}"]
        row += [f"{100 * s['overall']['clean_score']:.1f}"] if show_score else []
        row += [f"{100 * v:.1f}" for v in s["overall"].get("robust", [])]
        table.add_row(*row)
    console.print(table)
    if index.task == "2afc":
        clean_text = ("clean: share of triplets where the nearer candidate is the one most people chose (p > 0.5; "
                      "a tie is wrong)")
    else:
        clean_text = ("clean: share of triplets where the model's most similar pair is the one people kept (the "
                      "third image is the odd one out; a tie is wrong)")
    console.print(clean_text + ("; score: LPIPS/DreamSim 2AFC score (soft labels, ties 0.5)" if show_score else "")
                  + ("; robust: share of attacked triplets whose majority answer the model still gives after APGD "
                     "(wrong-when-clean counts as broken)." if radii else "."), style="dim")
    low = sum(sum(s["overall"].get("low_precision_only") or []) for s in summaries)
    if low:
        console.print(f"{low} triplet-radius pair(s) broken only in {record['attack']['autocast'] or 'low-precision'}"
                      " autocast; the fp32 check held them, so they count as robust.", style="dim")
    if settings is not None and settings.square_queries > 0:
        found = sum(any(t.get("square_found") or []) for e in record["models"].values() for t in e["triplets"])
        console.print(f"Square Attack found {found} triplet(s) APGD missed"
                      + (" - possible gradient masking." if found else "."))
