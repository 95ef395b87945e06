"""``percept distance``: distances between images, pairs, candidates or whole directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..models.zoo import DEFAULT_MODEL
from .errors import handle_errors
from .options import (CompileOpt, BatchSizeOpt, CheckpointOpt, HeadOpt, LoraOpt, Common, CropOpt, DeviceOpt, DtypeOpt, ForceOpt, ItersOpt, JsonOpt,
                      ModelOpt, NormOpt, PoolingOpt, QuietOpt, RandomStartOpt, ResizeOpt, RestartsOpt, SeedOpt,
                      WorkersOpt, attack_settings, threat_dict)
from .output import Output

MAX_PRINTED_MATRIX = (40, 12)  # rows, cols shown as a table without --out

HELP = """Perceptual distance (1 - cosine of robust embeddings) between images.

\b
  percept distance A.png B.png              one distance
  percept distance REF.png C1.png C2.png    candidates ranked, nearest first (directories expand)
  percept distance --pairs pairs.csv        one distance per CSV row (a,b; relative to the CSV)
  percept distance DIR_A DIR_B --out d.npy  full matrix (.csv, .npy or .safetensors); one DIR: DIR vs itself
  percept distance A.png B.png --robust 4/255   also the range an attacker perturbing B can reach
"""


@handle_errors
def distance(
    inputs: Annotated[Optional[List[str]], typer.Argument(help="Image files or directories.", show_default=False)] = None,
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="CSV of image pairs (first two columns).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write results: matrix .csv/.npy/.safetensors; "
                                                "pairs/ranking .csv/.json.")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Look for images in subdirectories.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Report and skip unreadable images instead of stopping.")] = False,
    top: Annotated[Optional[int], typer.Option("--top", min=1, metavar="K", show_default=False,
                                               help="Ranking: list only the K nearest candidates.")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", min=0.0, metavar="D", show_default=False,
        help="Ranking: list only candidates within distance D of the reference (near-duplicates).")] = None,
    robust: Annotated[Optional[str], typer.Option(
        "--robust", help="Also report \\[min, max] distance an attacker perturbing the second image within this "
        "radius reaches (two APGD runs; an empirical bound, not a certificate).", rich_help_panel="Attack")] = None,
    norm: NormOpt = "linf",
    iters: ItersOpt = 100,
    restarts: RestartsOpt = 1,
    random_start: RandomStartOpt = True,
    force: ForceOpt = False,
    model: ModelOpt = DEFAULT_MODEL,
    checkpoint: CheckpointOpt = None, head: HeadOpt = None, lora: LoraOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    pooling: PoolingOpt = None, compile: CompileOpt = False,
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from .. import distances
    from ..io.outputs import OutputWrites

    settings = None
    if robust is not None:
        settings = attack_settings(norm, robust, iters, restarts, random_start, seed, dtype, force=force)
    common = Common(model=model, compile=compile, checkpoint=checkpoint, head=head, lora=lora, device=device, dtype=dtype, batch_size=batch_size,
                    workers=workers, seed=seed, json=json, quiet=quiet, resize=resize, crop=crop, pooling=pooling)
    output = Output(json, quiet)

    job = distances.plan_job(inputs or [], str(pairs) if pairs else None, recursive)
    if (top is not None or threshold is not None) and job.mode != "rank":
        from ..errors import BadInputError

        raise BadInputError(f"--top and --threshold apply to ranking (REF.png CANDIDATES...), not to {job.mode} mode.")
    if settings is not None:
        distances.check_robust_mode(job.mode)
    files = job.files()
    if out is not None:
        _check_out(out, job.mode, files, [*(inputs or []), pairs, model, checkpoint, head, lora])
    elif job.mode == "matrix" and not json and (len(job.rows) > MAX_PRINTED_MATRIX[0]
                                               or len(job.cols) > MAX_PRINTED_MATRIX[1]):
        from ..errors import BadInputError

        raise BadInputError(f"a {len(job.rows)}x{len(job.cols)} matrix is too large to print; "
                            "pass --out FILE (.csv, .npy or .safetensors) or --json.")
    failures = distances.check_files(files)
    if failures and not skip_bad:
        raise distances.first_failure_error(failures, job.origin)

    # with --robust the weights stay fp32 and --dtype is the attack's autocast precision
    metric = common.load_metric(output, dtype=None if settings is None else "fp32")
    with output.progress(len(files) - len(failures), "Embedding") as advance:
        result = distances.run_job(metric, job, skip_bad=skip_bad, skipped=failures, progress=advance, top=top,
                                   threshold=threshold)
    if settings is not None:
        with output.progress(2 * settings.iters * settings.restarts * -(-len(result.records) // batch_size),
                             "Attacking") as advance:
            distances.robust_intervals(metric, result, settings, batch_size=batch_size, progress=advance)
    for failure in result.skipped:
        output.warn(f"skipped {failure.path}: {failure.reason}")

    writes = OutputWrites()  # a failed write still prints the results, then exits non-zero
    written = (writes.attempt("--out", out, lambda: _write(out, result, common.describe(metric)))
               if out is not None else None)
    payload = {**common.describe(metric), "mode": result.mode, "results": result.records,
               "robust": None if settings is None else _robust_info(settings),
               "skipped": [{"path": f.path, "reason": f.reason} for f in result.skipped],
               "out": str(written) if written else None}
    if writes.failures:
        payload["not_written"] = writes.failures
    if result.matrix is not None:
        payload.update(rows=result.row_names, cols=result.col_names,
                       shape=list(result.matrix.shape))
        if written is None:
            payload["matrix"] = result.matrix.tolist()
    output.result(payload, lambda console: _render(console, result, written, payload["robust"]))
    writes.raise_if_failed()


def _check_out(out: Path, mode: str, files: list, given: list) -> None:
    """Before any model work: --out is no input (file, folder, model) and can be written."""
    from ..io.outputs import MATRIX_FORMATS, TABLE_FORMATS, check_outputs, output_file, path_inputs

    specs = [output_file("--out", out, MATRIX_FORMATS if mode == "matrix" else TABLE_FORMATS)]
    if mode == "matrix" and out.suffix.lower() == ".npy":  # the labels written beside it
        specs.append(output_file("--out", out.with_name(out.name + ".labels.json")))
    on_disk = path_inputs(given)
    check_outputs(specs, inputs=[*files, *on_disk], input_dirs=on_disk)


def _robust_info(settings) -> dict:
    return {**threat_dict(settings, decision=False), "perturbed": "b",
            "note": "empirical interval found by APGD, not a certificate"}


def _write(out: Path, result, settings: dict) -> Path:
    from ..io.outputs import write_matrix, write_table

    if result.matrix is not None:
        meta = {"model": settings["model"]["name"], "metric": "1 - cosine similarity"}
        return write_matrix(out, result.matrix.numpy(), result.row_names, result.col_names, meta)
    return write_table(out, result.records)


def _render(console, result, written: Optional[Path], robust: Optional[dict] = None) -> None:
    from rich.table import Table

    if result.mode == "pair":
        rec = result.records[0]
        extra = (f"  [{rec['low']:.4f}, {rec['high']:.4f}] under {robust['norm']} {robust['eps_text']}"
                 if robust else "")
        console.print(f"d = {rec['distance']:.4f}{extra}")
        if written is not None:
            console.print(f"wrote 1 distance to {written}")
        return
    if written is not None:
        what = (f"{result.matrix.shape[0]}x{result.matrix.shape[1]} distance matrix" if result.matrix is not None
                else f"{len(result.records)} distances")
        console.print(f"wrote {what} to {written}")
        return
    if result.matrix is not None:
        table = Table(show_header=True, header_style="bold")
        table.add_column("")
        for name in result.col_names:
            table.add_column(name, justify="right")
        for name, row in zip(result.row_names, result.matrix.tolist()):
            table.add_row(name, *(f"{v:.4f}" for v in row))
        console.print(table)
        return
    if result.mode == "rank" and not result.records:
        console.print("no candidate to list (all beyond --threshold, or skipped).")
        return
    table = Table(show_header=True, header_style="bold")
    if result.mode == "rank" and result.records:  # a line, not a table title: a long path must not wrap mid-name
        console.print(f"distance to {result.records[0]['a']}", markup=False, soft_wrap=True)
    if result.mode == "rank":
        table.add_column("#", justify="right")
        table.add_column("candidate")
        table.add_column("distance", justify="right")
        rows = [[str(rec["rank"]), rec["b"], f"{rec['distance']:.4f}"] for rec in result.records]
    else:
        table.add_column("a")
        table.add_column("b")
        table.add_column("distance", justify="right")
        rows = [[rec["a"], rec["b"], f"{rec['distance']:.4f}"] for rec in result.records]
    if robust:
        table.add_column(f"min under {robust['norm']} {robust['eps_text']}", justify="right")
        table.add_column("max", justify="right")
        rows = [row + [f"{rec['low']:.4f}", f"{rec['high']:.4f}"] for row, rec in zip(rows, result.records)]
        table.caption = "attack-found (empirical) range when the second image is perturbed; not a certificate"
    for row in rows:
        table.add_row(*row)
    console.print(table)
