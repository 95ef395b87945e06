"""``percept invert``: show what the metric considers the same, by inverting an embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..models.zoo import DEFAULT_MODEL
from .errors import handle_errors
from .options import (AttackDtypeOpt, CheckpointOpt, CropOpt, DeviceOpt, JsonOpt, ModelOpt, PoolingOpt, QuietOpt,
                      ResizeOpt,
                      geometry_options)
from .output import Output

HELP = """Invert the metric: images whose embedding matches a photo (--image) or a prompt (--text).

\b
  percept invert --image photo.png --seeds 0,1,2 --grid
  percept invert --text "a painting of a sunflower" --out inversions/
  percept invert --image photo.png --method augmented --judge clip-convnext-b
"""


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
    model: ModelOpt = DEFAULT_MODEL, checkpoint: CheckpointOpt = None, device: DeviceOpt = "auto",
    dtype: AttackDtypeOpt = "fp32", resize: ResizeOpt = None, crop: CropOpt = None,
    pooling: PoolingOpt = None,
    json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    import torch

    from ..devices import resolve_dtype
    from ..errors import BadInputError
    from ..inversion import InversionSettings, contact_sheet, invert, slug
    from ..metric import load_metric
    from ..io.outputs import OutputWrites, save_png

    if (image is None) == (text is None):
        raise BadInputError("give exactly one target: --image PATH or --text PROMPT.")
    if text is not None and not text.strip():
        raise BadInputError("--text is empty.")
    seed_list = parse_seeds(seeds)
    autocast = resolve_dtype(dtype)
    settings = InversionSettings(method=method, iters=iters, radius=radius, step_size=step_size, size=size, lr=lr,
                                 views=views,
                                 autocast_dtype=None if autocast == torch.float32 else autocast)
    if image is not None:
        from ..io.images import check_image

        try:
            check_image(image)
        except BadInputError as exc:
            if skip_bad:  # the only target: nothing usable remains after skipping it
                raise BadInputError(f"{exc}; it is the only target image, so nothing is left to invert.") from exc
            raise
    _check_out(out, slug(text) if text is not None else slug(image.stem), seed_list, grid, save_every,
               [image, model, checkpoint, judge])
    output = Output(json, quiet)
    with output.status(f"Loading {model} ..."):
        metric = load_metric(model, device=device, checkpoint=checkpoint, with_text=text is not None,
                             **geometry_options(resize, crop, pooling))
        judge_metric = load_metric(judge, device=device, with_text=text is not None) if judge else None
    if text is not None:
        target_emb, name = metric.embed_text([text])[0], slug(text)
        judge_target = judge_metric.embed_text([text])[0] if judge_metric else None
        target_pixels = None
    else:
        target_pixels = metric.pixels([str(image)])
        target_emb, name = metric.embed_pixels(target_pixels.to(metric.device)).detach()[0], slug(image.stem)
        judge_target = judge_metric.embed([str(image)])[0] if judge_metric else None

    writes = OutputWrites()  # a failed write still prints the similarities, then exits non-zero
    writes.attempt("--out", out, lambda: out.mkdir(parents=True, exist_ok=True))
    written_steps: list[str] = []

    def on_iteration(k, best, best_sim):
        if save_every and k % save_every == 0 and not writes.failures:
            steps = out / "steps"
            for s, img in zip(seed_list, best):
                path = steps / f"{name}_seed{s}_iter{k:04d}.png"
                if writes.attempt("--save-every", path, lambda: (steps.mkdir(exist_ok=True), save_png(path, img))):
                    written_steps.append(str(path))

    with output.progress(settings.iters, "Inverting") as advance:
        state = {"k": 0}

        def progress(n):
            state["k"] += n
            advance(n)

        def watch(k, best, best_sim):
            on_iteration(k, best, best_sim)
            if k % 10 == 0:
                advance(0, f"Inverting  best cos {float(best_sim.mean()):.3f}")

        result = invert(metric, target_emb, seed_list, settings, progress=progress, on_iteration=watch)
    outputs = []
    judge_sims = None
    if judge_metric is not None:
        with torch.no_grad():
            judge_sims = (judge_metric.embed_pixels(result.images.to(judge_metric.device)) * judge_target).sum(-1)
    for i, s in enumerate(seed_list):
        png = out / f"{name}_seed{s}.png"
        path = writes.attempt("--out", png, lambda: save_png(png, result.images[i]))
        outputs.append({"seed": s, "path": str(path) if path else None, "similarity": float(result.similarity[i]),
                        "judge_similarity": None if judge_sims is None else float(judge_sims[i])})
    grid_path = None
    if grid:
        labels = [f"seed {o['seed']}  cos {o['similarity']:.3f}" for o in outputs]
        sheet = contact_sheet(result.images, labels, target_pixels[0] if target_pixels is not None else None,
                              "target" if text is None else "", tile=result.images.shape[-1])
        png = out / f"{name}_grid.png"
        grid_path = writes.attempt("--grid", png, lambda: save_png(png, sheet))
    payload = {"model": metric.source.as_dict(), "device": str(metric.device),
               "target": {"kind": "text" if text is not None else "image", "value": text or str(image)},
               "method": settings.method, "iters": settings.iters, "radius": settings.radius,
               "step_size": settings.step_size, "size": result.images.shape[-1],
               "judge": judge_metric.source.as_dict() if judge_metric else None,
               "outputs": outputs, "grid": str(grid_path) if grid_path else None, "intermediate": written_steps}
    if writes.failures:
        payload["not_written"] = writes.failures
    output.result(payload, lambda console: _render(console, payload))
    writes.raise_if_failed()


def _check_out(out: Path, name: str, seeds: list[int], grid: bool, save_every: int, given: list) -> None:
    """Before any model work: no output is an input (image, model, checkpoint) or inside an input
    folder, and the --out folder can be written."""
    from ..io.outputs import check_outputs, output_file, output_folder, path_inputs

    specs = [output_folder("--out", out)] + ([output_folder("--save-every", out / "steps")] if save_every else [])
    if out.is_dir():  # the files it will hold (a folder still to be created holds no input)
        specs += [output_file("--out", out / f"{name}_seed{s}.png") for s in seeds]
        specs += [output_file("--grid", out / f"{name}_grid.png")] if grid else []
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
