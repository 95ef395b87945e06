"""``percept eval-2afc``: agreement with human 2AFC judgements, clean and under attack.

The command checks its options, hands one :class:`~percept_cli.evaluation.runner.EvalRequest` to
the library (``runner.prepare`` then ``runner.run``) and renders what comes back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..models.zoo import DEFAULT_MODEL
from .errors import handle_errors
from .options import (BatchSizeOpt, CheckpointOpt, HeadOpt, LoraOpt, Common, CropOpt, DeviceOpt, DtypeOpt, EpsOpt, ForceOpt, ItersOpt,
                      JsonOpt, ModelsOpt, PoolingOpt, QuietOpt, RandomStartOpt, ResizeOpt, RestartsOpt, SeedOpt,
                      WorkersOpt, attack_settings, check_radii)
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
    attack_batch_size: Annotated[Optional[int], typer.Option(
        "--attack-batch-size", min=1, show_default=False, rich_help_panel="Attack",
        help="Triplets attacked together (default: 256 on a GPU, else --batch-size). APGD's results do not "
             "depend on it; with --attack square they do, so --resume then needs the same value.")] = None,
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
    model: ModelsOpt = None,
    models_file: Annotated[Optional[Path], typer.Option("--models-file", help="File with one model per line.",
                                                        rich_help_panel="Model")] = None,
    checkpoint: CheckpointOpt = None, head: HeadOpt = None, lora: LoraOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "fp32",
    batch_size: BatchSizeOpt = 32, workers: WorkersOpt = None, resize: ResizeOpt = None, crop: CropOpt = None,
    pooling: PoolingOpt = None,
    seed: SeedOpt = 0, json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    from .. import distributed
    from ..evaluation import runner
    from ..io.outputs import OutputWrites

    settings, radii = _attack_options(attack, sweep_eps, eps, iters, restarts, random_start, seed, dtype, loss,
                                      square_queries, force)
    _check_options(protocol, first, n, radii, plot)
    if radii and attack_batch_size is None:  # resolved here, so a results file records the number used
        from ..devices import resolve_device
        from ..evaluation.twoafc import default_attack_batch_size

        attack_batch_size = default_attack_batch_size(resolve_device(device), batch_size)
    request = runner.EvalRequest(
        dataset=dataset, root=root, split=split, subsets=tuple(subset or ()), triplets=triplets,
        image_list=image_list, n=n, first=first, protocol=protocol.strip().lower(),
        models=_model_names(model, models_file), checkpoint=checkpoint, head=head, lora=lora, resize=resize, crop=crop, pooling=pooling,
        dtype="fp32" if settings is not None else dtype,  # an attack autocasts; its weights stay fp32
        attack=settings, radii=radii, seed=seed, batch_size=batch_size, attack_batch_size=attack_batch_size,
        out=out, resume=resume, save_adv=save_adv,
        flush_every=flush_every, skip_bad=skip_bad,
        labels={"out": "--out" if out is not None else "--resume", "save_adv": "--save-adv"},
        other_outputs={"--plot": plot}, other_inputs=[models_file])
    job = runner.prepare(request)  # exit 2 on any bad input, before model work

    dist = distributed.init(device)
    output = Output(json, quiet or not dist.is_main)
    common = Common(model=job.models[0], checkpoint=checkpoint, head=head, lora=lora, device=distributed.device_for(dist, device),
                    dtype=request.dtype, batch_size=batch_size, workers=workers, seed=seed, resize=resize, crop=crop,
                    pooling=pooling)
    writes = OutputWrites()  # a failed write still prints the results, then exits non-zero
    try:
        if dist.is_main:
            _announce(output, job)
        with contextlib.closing(_Events(output)) as events:
            record = runner.run(job, lambda name: common.load_metric(output, name), dist, writes, on_event=events)
    finally:
        distributed.shutdown(dist)
    if not dist.is_main:
        return
    if plot is not None:
        writes.attempt("--plot", plot, lambda: _plot(plot, record, settings.norm if settings else "linf"))
    output.result(_summary(record, job.out, writes), lambda console: _render(console, record, job.index, settings))
    writes.raise_if_failed()


def _model_names(model: Optional[List[str]], models_file: Optional[Path]) -> list[str]:
    """--model values then --models-file lines (no blanks or # comments); the default model if none."""
    from ..errors import BadInputError

    models = list(model or [])
    if models_file is not None:
        if not models_file.is_file():
            raise BadInputError(f"--models-file {models_file} not found.")
        models += [ln.strip() for ln in models_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return models or [DEFAULT_MODEL]


def _attack_options(attack, sweep_eps, eps, iters, restarts, random_start, seed, dtype, loss, square_queries, force):
    """-> (AttackSettings or None, radii): --attack linf|l2 [square], --eps or --sweep-eps."""
    from ..errors import BadInputError

    kinds = [a.strip().lower() for a in (attack or [])]
    unknown = [a for a in kinds if a not in {"linf", "l2", "square"}]
    if unknown or len({k for k in kinds if k != "square"}) > 1:
        raise BadInputError(f"--attack takes linf or l2 (one of them), plus optionally square; got {', '.join(kinds)}.")
    if not kinds and not sweep_eps:
        return None, []
    norm = next((k for k in kinds if k != "square"), "linf")
    settings = attack_settings(norm, eps, iters, restarts, random_start, seed, dtype, loss,
                               square_queries if "square" in kinds else 0, force=force)
    radii = parse_sweep(sweep_eps, norm) if sweep_eps else [settings.eps]
    if sweep_eps:
        check_radii(radii, settings.norm, force)
    return settings, radii


def _check_options(protocol: str, first: Optional[int], n: Optional[int], radii: list[float],
                   plot: Optional[Path]) -> None:
    """Combinations of options that cannot work (BadInputError, exit 2)."""
    from ..errors import BadInputError
    from ..evaluation.twoafc import PROTOCOLS

    if plot is not None:
        _check_plot(plot, radii)
    if protocol.strip().lower() not in PROTOCOLS:
        raise BadInputError(f"unknown --protocol '{protocol.strip().lower()}'; use {' or '.join(PROTOCOLS)}.")
    if first is not None and n is not None:
        raise BadInputError("--first and --n cannot be combined: --first attacks the first N triplets and scores "
                            "all of them clean; --n evaluates a seeded random subset.")
    if first is not None and not radii:
        raise BadInputError("--first selects the triplets to attack; add --attack or --sweep-eps.")


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


def _announce(output: Output, job) -> None:
    """stderr lines before the work: models given more than once, skipped images, no --out."""
    for name, count in job.repeated.items():
        output.info(f"{name} given {'twice' if count == 2 else f'{count} times'}; evaluated once.")
    if job.bad_images:
        shown = ", ".join(f.path for f in job.bad_images[:5]) + (" ..." if len(job.bad_images) > 5 else "")
        output.warn(f"skipped {len(job.skipped_ids)} triplet(s) that use {len(job.bad_images)} unreadable image(s): "
                    f"{shown}")
    if job.out is None and job.plan.radii:
        output.warn("no --out: results are not saved and an interrupted run cannot be resumed.")


class _Events:
    """The runner's events on stderr: a progress bar per model, a line for a model already done."""

    def __init__(self, output: Output):
        self.output, self.bars, self.advance = output, contextlib.ExitStack(), None

    def __call__(self, event) -> None:
        if event.kind == "skipped":
            self.output.info(f"{event.model}: complete in the resumed file, skipped.")
        elif event.kind == "started":
            self.advance = self.bars.enter_context(self.output.progress(event.total, event.model))
        elif event.kind == "advanced" and self.advance is not None:
            text = None if event.robust is None else \
                f"{event.model}  clean {event.clean:.1%}  robust {event.robust:.1%}"
            self.advance(event.done, text)
        elif event.kind == "finished":
            self.close()

    def close(self) -> None:
        self.bars.close()
        self.advance = None


def _summary(record: dict, out: Optional[Path], writes) -> dict:
    """The --json document: the results document without per-triplet records, where it was saved."""
    summary = {k: v for k, v in record.items() if k != "models"}
    summary["models"] = {k: {kk: vv for kk, vv in m.items() if kk != "triplets"} for k, m in record["models"].items()}
    summary["out"] = str(out) if out and not any(f["path"] == str(out) for f in writes.failures) else None
    if writes.failures:
        summary["not_written"] = writes.failures
    return summary


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
    _legend(console, record, index, summaries, show_score, settings)


def _legend(console, record: dict, index, summaries: list[dict], show_score: bool, settings) -> None:
    """What the columns mean, how the attack's fp32 confirmations went, and Square Attack's finds."""
    if index.task == "2afc":
        clean_text = ("clean: share of triplets where the more similar candidate is the one most people chose "
                      "(p > 0.5; a tie picks the left candidate, as in the authors' code)")
    else:
        clean_text = ("clean: share of triplets where the model's most similar pair is the one people kept (the "
                      "third image is the odd one out; a tie is wrong)")
    console.print(clean_text + ("; score: LPIPS/DreamSim 2AFC score (soft labels, ties 0.5)" if show_score else "")
                  + ("; robust: share of attacked triplets whose majority answer the model still gives after APGD "
                     "(wrong-when-clean counts as broken)." if record["radii"] else "."), style="dim")
    if any("fp32_checked" in s["overall"] for s in summaries):
        checked, rejected = (sum(sum(s["overall"].get(key) or []) for s in summaries)
                             for key in ("fp32_checked", "fp32_rejected"))
        console.print(f"{record['attack']['autocast']} autocast: a claimed break counts only once fp32 confirms it; "
                      f"{checked} triplet-radius pair(s) needed that check, and in {rejected} fp32 rejected a claim "
                      "(the attack went on).", style="dim")
    if settings is not None and settings.square_queries > 0:
        found = sum(any(t.get("square_found") or []) for e in record["models"].values() for t in e["triplets"])
        console.print(f"Square Attack found {found} triplet(s) APGD missed"
                      + (" - possible gradient masking." if found else "."))
