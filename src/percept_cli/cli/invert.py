"""``percept invert``: show what the metric considers the same, by inverting an embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..models.zoo import DEFAULT_MODEL
from .errors import handle_errors
from .options import (CompileOpt, CheckpointOpt, HeadOpt, LoraOpt, Common, CropOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, PoolingOpt,
                      QuietOpt, ResizeOpt)
from .output import Output

HELP = """Invert the metric: images whose embedding matches a photo (--image) or a prompt (--text).

\b
  percept invert --image photo.png --seeds 0,1,2 --grid
  percept invert --text "a painting of a sunflower" --out inversions/
  percept invert --image photo.png --method augmented --judge clip-convnext-b
"""

FLAGS = {"out_dir": "--out", "grid": "--grid", "save_every": "--save-every"}  # run_inversion's names -> options


def parse_seeds(text: str) -> list[int]:
    from ..errors import BadInputError

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise BadInputError(f"--seeds must be integers separated by commas; got '{text}'.") from None
    if not seeds:
        raise BadInputError("--seeds is empty.")
    return seeds


@handle_errors
def invert_command(
    image: Annotated[Optional[Path], typer.Option("--image", help="Feature inversion: target = this photo's "
                                                  "embedding.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Text inversion: target = this prompt's CLIP text "
                                                "embedding.")] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds, one reconstruction each "
                                       "(optimised together).")] = "0",
    method: Annotated[str, typer.Option("--method", help="apgd (the paper's recipe) | augmented (Adam over "
                                        "augmented views).")] = "apgd",
    iters: Annotated[Optional[int], typer.Option("--iters", min=1, help="Iterations (default 500 apgd, "
                                                 "1000 augmented).", show_default=False)] = None,
    radius: Annotated[float, typer.Option("--radius", help="l2 radius around the start (the regulariser).")] = 100.0,
    step_size: Annotated[float, typer.Option("--step-size", help="Initial APGD step size.")] = 200.0,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate (--method augmented).")] = 0.1,
    views: Annotated[int, typer.Option("--views", min=1, help="Augmented views per step (--method augmented).")]
    = 8,
    size: Annotated[Optional[int], typer.Option("--size", help="Output resolution (default: the model's input "
                                                "size).", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG files.")] = Path("inversions"),
    save_every: Annotated[int, typer.Option("--save-every", min=0, help="Also save intermediate images every N "
                                            "iterations (0: off).")] = 0,
    grid: Annotated[bool, typer.Option("--grid", help="Write one labelled contact sheet of target and "
                                       "reconstructions.")] = False,
    judge: Annotated[Optional[str], typer.Option("--judge", help="Also report the similarity under this model.")]
    = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Accepted as by the other commands; --image is the "
                                           "only image, so an unreadable one still stops the run (exit 2).")]
    = False,
    model: ModelOpt = DEFAULT_MODEL, checkpoint: CheckpointOpt = None, head: HeadOpt = None, lora: LoraOpt = None, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32", resize: ResizeOpt = None, crop: CropOpt = None,
    pooling: PoolingOpt = None, compile: CompileOpt = False,
    json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    from ..errors import BadInputError
    from ..inversion import InversionSettings, InversionTarget, run_inversion
    from ..io.outputs import OutputNotWrittenError

    if (image is None) == (text is None):
        raise BadInputError("give exactly one target: --image PATH or --text PROMPT.")
    if text is not None and not text.strip():
        raise BadInputError("--text is empty.")
    seed_list = parse_seeds(seeds)
    settings = InversionSettings(method=method, iters=iters, radius=radius, step_size=step_size, size=size, lr=lr,
                                 views=views, autocast_dtype=dtype)
    if image is not None:
        _check_image(image, skip_bad)
    target = InversionTarget.text(text) if text is not None else InversionTarget.image(image)
    _check_out(out, target.name, seed_list, grid, save_every, [image, model, checkpoint, head, lora, judge])
    # weights stay fp32 (--dtype is the optimisation's autocast); the judge keeps its own preprocessing
    common = Common(model=model, compile=compile, checkpoint=checkpoint, head=head, lora=lora, device=device, dtype=dtype, json=json, quiet=quiet,
                    resize=resize, crop=crop, pooling=pooling)
    output = Output(json, quiet)
    metric = common.load_metric(output, with_text=text is not None, dtype="fp32")
    judge_metric = (common.load_metric(output, judge, with_text=text is not None, dtype="fp32", geometry=False)
                    if judge else None)
    with output.progress(settings.iters, "Inverting") as advance:
        def watch(k, best, best_sim):
            if k % 10 == 0:
                advance(0, f"Inverting  best cos {float(best_sim.mean()):.3f}")

        run = run_inversion(metric, target, seed_list, settings, out, judge=judge_metric, save_every=save_every,
                            grid=grid, progress=advance, on_iteration=watch)
    failures = [{**f, "option": FLAGS[f["option"]]} for f in run.failures]
    payload = _payload(run, metric, judge_metric)
    if failures:
        payload["not_written"] = failures
    output.result(payload, lambda console: _render(console, payload))
    if failures:  # the similarities were shown; the command still fails
        raise OutputNotWrittenError(failures)


def _check_image(image: Path, skip_bad: bool) -> None:
    """Header-check the --image target before any model work (BadInputError/ImageReadError, exit 2)."""
    from ..errors import BadInputError
    from ..io.images import check_image

    try:
        check_image(image)
    except BadInputError as exc:
        if skip_bad:  # the only target: nothing usable remains after skipping it
            raise BadInputError(f"{exc}; it is the only target image, so nothing is left to invert.") from exc
        raise


def _payload(run, metric, judge_metric) -> dict:
    """The JSON document of one run."""
    judge = run.judge_similarity
    outputs = [{"seed": s, "path": str(path) if path else None, "similarity": float(run.similarity[i]),
                "judge_similarity": None if judge is None else float(judge[i])}
               for i, (s, path) in enumerate(zip(run.seeds, run.paths))]
    st = run.settings
    return {"model": metric.source.as_dict(), "device": str(metric.device),
            "target": {"kind": run.target.kind, "value": run.target.value},
            "method": st.method, "iters": st.iters, "radius": st.radius, "step_size": st.step_size,
            "size": run.images.shape[-1], "judge": judge_metric.source.as_dict() if judge_metric else None,
            "outputs": outputs, "grid": str(run.grid) if run.grid else None,
            "intermediate": [str(p) for p in run.intermediate]}


def _check_out(out: Path, name: str, seeds: list[int], grid: bool, save_every: int, given: list) -> None:
    """Before any model work: no output is an input (image, model, checkpoint) or inside an input
    folder, and the --out folder can be written."""
    from ..inversion import grid_file, seed_file
    from ..io.outputs import check_outputs, output_file, output_folder, path_inputs

    specs = [output_folder("--out", out)] + ([output_folder("--save-every", out / "steps")] if save_every else [])
    if out.is_dir():  # the files it will hold (a folder still to be created holds no input)
        specs += [output_file("--out", seed_file(out, name, s)) for s in seeds]
        specs += [output_file("--grid", grid_file(out, name))] if grid else []
    on_disk = path_inputs(given)
    check_outputs(specs, inputs=on_disk, input_dirs=on_disk)


def _render(console, p: dict) -> None:
    from rich.table import Table

    console.print(f"{p['method']} inversion of {p['target']['kind']} '{p['target']['value']}'", markup=False,
                  soft_wrap=True)  # a line, not a table title: a long path or prompt must not wrap mid-word
    table = Table(header_style="bold")
    table.add_column("seed", justify="right")
    table.add_column("file")
    table.add_column("cos (model)", justify="right")
    if p["judge"]:
        table.add_column(f"cos ({p['judge']['name']})", justify="right")
    for o in p["outputs"]:
        row = [str(o["seed"]), o["path"] or "(not written)", f"{o['similarity']:.4f}"]
        if p["judge"]:
            row.append(f"{o['judge_similarity']:.4f}")
        table.add_row(*row)
    console.print(table)
    if p["grid"]:
        console.print(f"contact sheet: {p['grid']}")
