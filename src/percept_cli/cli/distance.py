"""``percept distance``: distances between images, pairs, candidates or whole directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..zoo import DEFAULT_MODEL
from .errors import handle_errors
from .options import (BatchSizeOpt, CheckpointOpt, Common, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, QuietOpt,
                      SeedOpt, WorkersOpt)
from .output import Output

MAX_PRINTED_MATRIX = (40, 12)  # rows, cols shown as a table without --out

HELP = """Perceptual distance (1 - cosine of robust embeddings) between images.

\b
  percept distance A.png B.png              one distance
  percept distance REF.png C1.png C2.png    candidates ranked, nearest first (directories expand)
  percept distance --pairs pairs.csv        one distance per CSV row (a,b; relative to the CSV)
  percept distance DIR_A DIR_B --out d.npy  full matrix (.csv, .npy or .safetensors); one DIR: DIR vs itself
"""


@handle_errors
def distance(
    inputs: Annotated[Optional[List[str]], typer.Argument(help="Image files or directories.", show_default=False)] = None,
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="CSV of image pairs (first two columns).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write results: matrix .csv/.npy/.safetensors; "
                                                "pairs/ranking .csv/.json.")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Look for images in subdirectories.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Report and skip unreadable images instead of stopping.")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from .. import distances
    from ..outputs import MATRIX_FORMATS, TABLE_FORMATS, check_output_path

    common = Common(model, checkpoint, device, dtype, batch_size, workers, seed, json, quiet)
    output = Output(json, quiet)

    job = distances.plan_job(inputs or [], str(pairs) if pairs else None, recursive)
    files = job.files()
    if out is not None:
        check_output_path(out, MATRIX_FORMATS if job.mode == "matrix" else TABLE_FORMATS, files)
    elif job.mode == "matrix" and not json and (len(job.rows) > MAX_PRINTED_MATRIX[0]
                                               or len(job.cols) > MAX_PRINTED_MATRIX[1]):
        from ..errors import BadInputError

        raise BadInputError(f"a {len(job.rows)}x{len(job.cols)} matrix is too large to print; "
                            "pass --out FILE (.csv, .npy or .safetensors) or --json.")
    failures = distances.check_files(files)
    if failures and not skip_bad:
        raise distances.first_failure_error(failures)

    metric = common.load_metric(output)
    with output.progress(len(files) - len(failures), "Embedding") as advance:
        result = distances.run_job(metric, job, skip_bad=skip_bad, skipped=failures, progress=advance)
    for failure in result.skipped:
        output.warn(f"skipped {failure.path}: {failure.reason}")

    written = _write(out, result, common.describe(metric)) if out is not None else None
    payload = {**common.describe(metric), "mode": result.mode, "results": result.records,
               "skipped": [{"path": f.path, "reason": f.reason} for f in result.skipped],
               "out": str(written) if written else None}
    if result.matrix is not None:
        payload.update(rows=result.row_names, cols=result.col_names,
                       shape=list(result.matrix.shape))
        if out is None:
            payload["matrix"] = result.matrix.tolist()
    output.result(payload, lambda console: _render(console, result, written))


def _write(out: Path, result, settings: dict) -> Path:
    from ..outputs import write_matrix, write_table

    if result.matrix is not None:
        meta = {"model": settings["model"]["name"], "metric": "1 - cosine similarity"}
        return write_matrix(out, result.matrix.numpy(), result.row_names, result.col_names, meta)
    return write_table(out, result.records)


def _render(console, result, written: Optional[Path]) -> None:
    from rich.table import Table

    if result.mode == "pair":
        console.print(f"d = {result.records[0]['distance']:.4f}")
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
    table = Table(show_header=True, header_style="bold")
    if result.mode == "rank":
        table.title = f"distance to {result.records[0]['a']}" if result.records else None
        table.add_column("#", justify="right")
        table.add_column("candidate")
        table.add_column("distance", justify="right")
        for rec in result.records:
            table.add_row(str(rec["rank"]), rec["b"], f"{rec['distance']:.4f}")
    else:
        table.add_column("a")
        table.add_column("b")
        table.add_column("distance", justify="right")
        for rec in result.records:
            table.add_row(rec["a"], rec["b"], f"{rec['distance']:.4f}")
    console.print(table)
