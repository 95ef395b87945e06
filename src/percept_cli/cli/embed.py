"""``percept embed``: embed image files and directories, and save the embeddings with their paths."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List

import typer

from ..models.zoo import DEFAULT_MODEL
from .errors import handle_errors
from .options import (CompileOpt, BatchSizeOpt, CheckpointOpt, HeadOpt, LoraOpt, Common, CropOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt,
                      PoolingOpt, QuietOpt, ResizeOpt, WorkersOpt)
from .output import Output

HELP = """Embed images and save the embeddings with their paths (to reuse them without the model).

\b
  percept embed photos/ --out emb.safetensors       tensor 'embeddings' + paths and model in the metadata
  percept embed a.png b.png --out emb.npy           matrix + emb.npy.paths.json (the row paths)
  percept embed photos/ -r --out emb.parquet        one row per image (Parquet)

Rows are L2-normalised, so a dot product is the cosine similarity and 1 - it the distance.
Read them back in Python with percept_cli.embeddings.read_embeddings(path).
"""


@handle_errors
def embed_command(
    sources: Annotated[List[str], typer.Argument(help="Image files or directories.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Embeddings file: .safetensors, .npy (+ .paths.json) "
                                      "or .parquet.", show_default=False)],
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Look for images in subdirectories.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Report and skip unreadable images instead of "
                                           "stopping.")] = False,
    model: ModelOpt = DEFAULT_MODEL,
    checkpoint: CheckpointOpt = None, head: HeadOpt = None, lora: LoraOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    pooling: PoolingOpt = None, compile: CompileOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from ..distances import bad_files_error, check_files
    from ..embeddings import FORMATS, check_format, embed_to_file, expand_sources, sidecar_path
    from ..io.outputs import check_outputs, output_file, path_inputs

    common = Common(model=model, compile=compile, checkpoint=checkpoint, head=head, lora=lora, device=device, dtype=dtype, batch_size=batch_size,
                    workers=workers, json=json, quiet=quiet, resize=resize, crop=crop, pooling=pooling)
    output = Output(json, quiet)
    files = expand_sources(sources, recursive)
    specs = [output_file("--out", out, FORMATS)]
    if out.suffix.lower() == ".npy":
        specs.append(output_file("--out", sidecar_path(out), (".json",)))
    on_disk = path_inputs([*sources, model, checkpoint, head, lora])  # never write into what is read
    check_outputs(specs, inputs=[*files, *on_disk], input_dirs=on_disk)
    check_format(out)
    failures = check_files(files)
    if failures and not skip_bad:
        raise bad_files_error(failures)
    if len(failures) == len(files):
        from ..errors import BadInputError

        raise BadInputError("no readable images left to embed.")

    metric = common.load_metric(output)
    with output.progress(len(files) - len(failures), "Embedding") as advance:
        export = embed_to_file(metric, files, out, skip_bad=skip_bad, skipped=failures, progress=advance,
                               settings={"batch_size": batch_size})
    for failure in export.skipped:
        output.warn(f"skipped {failure.path}: {failure.reason}")
    payload = {**common.describe(metric), "out": str(export.path),
               "paths_file": str(export.sidecar) if export.sidecar else None,
               "n": len(export.paths), "dim": export.dim,
               "skipped": [{"path": f.path, "reason": f.reason} for f in export.skipped]}
    payload.pop("seed", None)
    output.result(payload, lambda console: _render(console, payload))


def _render(console, p: dict) -> None:
    extra = f" (row paths in {p['paths_file']})" if p["paths_file"] else ""
    skipped = f"; skipped {len(p['skipped'])} unreadable file(s)" if p["skipped"] else ""
    console.print(f"wrote {p['n']} embeddings of dimension {p['dim']} to {p['out']}{extra}{skipped}", markup=False)
