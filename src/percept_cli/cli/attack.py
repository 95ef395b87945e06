"""``percept attack 2afc|embed``: attack one 2AFC decision or one embedding, and report it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..models.zoo import DEFAULT_MODEL
from .command import PerceptCommand, PerceptGroup
from .errors import handle_errors
from .options import (CompileOpt, BatchSizeOpt, CheckpointOpt, HeadOpt, LoraOpt, Common, CropOpt, DeviceOpt, DtypeOpt, EpsOpt, ForceOpt,
                      ItersOpt, JsonOpt, ModelOpt, NormOpt, PoolingOpt, QuietOpt, RandomStartOpt, ResizeOpt,
                      RestartsOpt, SeedOpt, attack_settings, threat_dict)
from .output import Output

app = typer.Typer(help="Attack a 2AFC decision or an embedding with APGD (l_inf or l2).", no_args_is_help=True,
                  cls=PerceptGroup)

OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Save the adversarial image as 8-bit PNG "
                                                "(projected back into the ball; success re-checked).")]


SkipBadOpt = Annotated[bool, typer.Option("--skip-bad", help="Report unreadable target images and leave them out "
                                          "(the attacked image and 2AFC candidates cannot be skipped).")]


def _usable(targets: list[Path], skip_bad: bool, output: Output, required=()) -> tuple[list[Path], list]:
    """Header-check ``required`` and ``targets`` before any model work; -> (readable targets, failures).

    Raises:
        ImageReadError: a bad required image (it cannot be skipped), or bad targets without ``--skip-bad``.
        BadInputError: targets were given and none of them is readable.
    """
    from ..distances import check_files, first_failure_error
    from ..errors import BadInputError, ImageReadError

    failures = check_files([str(p) for p in [*required, *targets]])
    needed = {str(p) for p in required}
    bad_required = [f for f in failures if f.path in needed]
    if bad_required:
        raise ImageReadError(bad_required[0].path, bad_required[0].reason)
    if failures and not skip_bad:
        raise first_failure_error(failures)
    bad = {f.path for f in failures}
    kept = [p for p in targets if str(p) not in bad]
    if targets and not kept:
        raise BadInputError(f"none of the {len(targets)} target image(s) is readable; nothing to attack towards.")
    for f in failures:
        output.warn(f"skipped {f.path}: {f.reason}")
    return kept, failures


def _prepare(common: Common, output: Output, images: list[Path], out: Optional[Path], folders=()):
    """Validate files and --out (no input file, input folder or model; writable) before any model work,
    then load the metric: fp32 weights, --dtype being the attack's autocast precision."""
    from ..distances import check_files, first_failure_error
    from ..io.outputs import check_outputs, output_file, path_inputs

    failures = check_files([str(p) for p in images])
    if failures:
        raise first_failure_error(failures)
    if out is not None:
        on_disk = path_inputs([*folders, common.model, common.checkpoint, common.head, common.lora])
        check_outputs([output_file("--out", out, (".png",))], inputs=[*images, *on_disk], input_dirs=on_disk)
    return common.load_metric(output, dtype="fp32")


@app.command("2afc", cls=PerceptCommand)
@handle_errors
def attack_2afc_command(
    ref: Annotated[Path, typer.Option("--ref", help="Reference image (the one perturbed).", show_default=False)],
    left: Annotated[Path, typer.Option("--left", help="First candidate (x0).", show_default=False)],
    right: Annotated[Path, typer.Option("--right", help="Second candidate (x1).", show_default=False)],
    label: Annotated[Optional[str], typer.Option("--label", help="left | right: the correct candidate "
                                                 "(default: the model's own clean decision).")] = None,
    loss: Annotated[str, typer.Option("--loss", help="ce | margin.")] = "ce",
    square: Annotated[bool, typer.Option("--square", help="Also run Square Attack (margin loss, p_init 0.8) on a "
                                         "point APGD left unbroken: the paper's gradient-masking check.")] = False,
    square_queries: Annotated[int, typer.Option("--square-queries", min=1, help="Queries for --square (the paper: "
                                                "5000).")] = 5000,
    out: OutOpt = None,
    skip_bad: SkipBadOpt = False,
    norm: NormOpt = "linf", eps: EpsOpt = None, iters: ItersOpt = 100, restarts: RestartsOpt = 1,
    random_start: RandomStartOpt = True, force: ForceOpt = False,
    model: ModelOpt = DEFAULT_MODEL, checkpoint: CheckpointOpt = None, head: HeadOpt = None, lora: LoraOpt = None, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32", batch_size: BatchSizeOpt = 32, resize: ResizeOpt = None, crop: CropOpt = None,
    pooling: PoolingOpt = None, compile: CompileOpt = False, seed: SeedOpt = 0, json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Flip a 2AFC decision: perturb REF so the other candidate looks closer."""
    import torch

    from ..attacks.tasks import attack_2afc_embedded, rounded_2afc
    from ..errors import BadInputError
    from ..io.outputs import OutputWrites, save_png

    if label is not None and label.lower() not in {"left", "right", "0", "1"}:
        raise BadInputError(f"--label must be left or right; got '{label}'.")
    if loss not in {"ce", "margin"}:
        raise BadInputError(f"--loss must be ce or margin; got '{loss}'.")
    settings = attack_settings(norm, eps, iters, restarts, random_start, seed, dtype, loss,
                               square_queries if square else 0, force=force)
    common = Common(model=model, compile=compile, checkpoint=checkpoint, head=head, lora=lora, device=device, dtype=dtype, batch_size=batch_size,
                    seed=seed, json=json, quiet=quiet, resize=resize, crop=crop, pooling=pooling)
    output = Output(json, quiet)
    _usable([], skip_bad, output, required=[ref, left, right])
    metric = _prepare(common, output, [ref, left, right], out)
    pixels = metric.pixels([str(ref), str(left), str(right)])
    y = None if label is None else torch.tensor([0 if label.lower() in {"left", "0"} else 1])
    with torch.no_grad():  # the candidates are embedded once, for the attack and the saved-file check
        e_left, e_right = (metric.embed_pixels(p.to(metric.device)) for p in (pixels[1:2], pixels[2:3]))
    with output.progress(settings.iters * settings.restarts, "APGD") as advance:
        report = attack_2afc_embedded(metric, pixels[0:1], e_left, e_right, y, settings, early_stop=False,
                                      progress=advance)
    payload = {**common.describe(metric), "threat": threat_dict(settings), **_twoafc_payload(report, label)}
    writes = OutputWrites()  # a failed save still prints the report, then exits non-zero
    if out is not None:
        adv = rounded_2afc(metric, report, pixels[0:1], e_left, e_right, settings)
        if writes.attempt("--out", out, lambda: save_png(out, adv.pixels[0])) is not None:
            payload["saved"] = {"path": str(out), "in_ball": bool(adv.in_ball[0]),
                                "still_broken": bool(adv.broken[0]), "sim_left": float(adv.similarity[0, 0]),
                                "sim_right": float(adv.similarity[0, 1])}
    if writes.failures:
        payload["not_written"] = writes.failures
    output.result(payload, lambda c: _render_2afc(c, payload))
    writes.raise_if_failed()


def _flag(values) -> Optional[bool]:
    """The first row of an optional (B,) bool tensor as a JSON value (None stays None)."""
    return None if values is None else bool(values[0])


def _twoafc_payload(report, label: Optional[str]) -> dict:
    """The JSON fields of one attacked triplet (row 0 of ``report``); decisions by :mod:`percept_cli.decision`."""
    from ..decision import decision

    names = ["left", "right"]

    def sims(similarity) -> dict:
        left_sim, right_sim = float(similarity[0, 0]), float(similarity[0, 1])
        return {"sim_left": left_sim, "sim_right": right_sim, "decision": names[decision(left_sim, right_sim)]}

    clean = sims(report.clean_similarity)
    return {"label": names[int(report.label[0])], "label_source": "given" if label else "model's clean decision",
            "clean": {**clean, "tie": clean["sim_left"] == clean["sim_right"]},
            "adversarial": sims(report.adv_similarity),
            "clean_correct": bool(report.clean_correct[0]), "robust_correct": bool(report.robust_correct[0]),
            "flipped": bool(report.flipped[0]), "perturbation_norm": float(report.perturbation_norm[0]),
            "found_by_square": _flag(report.found_by_square),
            "fp32_checked": _flag(report.fp32_checked), "fp32_rejected": _flag(report.fp32_rejected),
            "evaluations": report.evaluations}


def _render_2afc(console, p: dict) -> None:
    t = p["threat"]
    tie = p["clean"]["tie"]
    source = p["label_source"]
    if tie and source != "given":
        source += ": the clean similarities tie, and a tie picks the left candidate"
    console.print(f"label: {p['label']} ({source})")
    for key in ("clean", "adversarial"):
        r = p[key]
        console.print(f"{key:<12} sim(ref, left) = {r['sim_left']:.4f}   sim(ref, right) = {r['sim_right']:.4f}"
                      f"   -> {r['decision']}")
    if not p["clean_correct"]:
        verdict = "already wrong before the attack" + (" (a tie picks the left candidate)" if tie else "")
    elif p["flipped"]:
        verdict = "decision FLIPPED by the attack"
    else:
        verdict = "decision held (robust at this radius)"
    console.print(f"{verdict}; ||delta||_{'inf' if t['norm'] == 'linf' else '2'} = {p['perturbation_norm']:.5f}"
                  f" (budget {t['norm']} {t['eps_text']}, APGD {t['iters']} iters x {t['restarts']} restart(s))")
    if p.get("found_by_square"):
        console.print("warning: Square Attack broke this point where APGD did not (possible gradient masking).")
    elif p.get("found_by_square") is False and p["clean_correct"] and not p["flipped"]:
        console.print(f"Square Attack ({t['square_queries']} queries) found nothing either: no sign of gradient "
                      "masking at this radius.")
    if p.get("fp32_rejected"):
        console.print(f"note: the {t['autocast']} attack claimed a flip that fp32 did not confirm; it kept "
                      "attacking, and every verdict here is fp32.")
    elif p.get("fp32_checked"):
        console.print(f"note: the {t['autocast']} attack's flip was confirmed in fp32.")
    if "saved" in p:
        s = p["saved"]
        effect = "the decision is still lost" if s["still_broken"] else "the model decides correctly again"
        console.print(f"saved {s['path']}: 8-bit, {'inside' if s['in_ball'] else 'OUTSIDE'} the ball; "
                      f"on the saved pixels {effect}")


@app.command("embed", cls=PerceptCommand)
@handle_errors
def attack_embed_command(
    image: Annotated[Path, typer.Argument(help="Image to perturb.", show_default=False)],
    untargeted: Annotated[bool, typer.Option("--untargeted", help="Push the embedding away from itself (Eq. 6).")]
    = False,
    target: Annotated[Optional[List[Path]], typer.Option("--target", help="Target image or directory "
                                                         "(repeatable): pull the embedding towards them (Eq. 5).")]
    = None,
    out: OutOpt = None,
    skip_bad: SkipBadOpt = False,
    norm: NormOpt = "linf", eps: EpsOpt = None, iters: ItersOpt = 100, restarts: RestartsOpt = 1,
    random_start: RandomStartOpt = True, force: ForceOpt = False,
    model: ModelOpt = DEFAULT_MODEL, checkpoint: CheckpointOpt = None, head: HeadOpt = None, lora: LoraOpt = None, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32", batch_size: BatchSizeOpt = 32, resize: ResizeOpt = None, crop: CropOpt = None,
    pooling: PoolingOpt = None, compile: CompileOpt = False, seed: SeedOpt = 0, json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Move an image's embedding: away from itself (--untargeted) or towards targets (--target)."""
    from ..attacks import attack_embedding
    from ..attacks.tasks import rounded_embedding
    from ..errors import BadInputError
    from ..io.images import list_images
    from ..io.outputs import OutputWrites, save_png

    if untargeted == bool(target):
        raise BadInputError("choose exactly one of --untargeted or --target IMAGE (at least one target).")
    targets = [p for t in (target or []) for p in (list_images(t) if t.is_dir() else [t])]
    settings = attack_settings(norm, eps, iters, restarts, random_start, seed, dtype, force=force)
    common = Common(model=model, compile=compile, checkpoint=checkpoint, head=head, lora=lora, device=device, dtype=dtype, batch_size=batch_size,
                    seed=seed, json=json, quiet=quiet, resize=resize, crop=crop, pooling=pooling)
    output = Output(json, quiet)
    targets, skipped = _usable(targets, skip_bad, output, required=[image])
    metric = _prepare(common, output, [image, *targets], out, folders=target or [])
    x = metric.pixels([str(image)])
    t_pixels = metric.pixels([str(p) for p in targets]) if targets else None
    with output.progress(settings.iters * settings.restarts, "APGD") as advance:
        report = attack_embedding(metric, x, t_pixels, settings, progress=advance)
    payload = {**common.describe(metric), "threat": threat_dict(settings, decision=False),
               "mode": "untargeted" if untargeted else "targeted", "distance_to": report.reference,
               "clean_distance": float(report.clean_distance[0]), "adv_distance": float(report.adv_distance[0]),
               "perturbation_norm": float(report.perturbation_norm[0]),
               "targets": [str(p) for p in targets],
               "skipped": [{"path": f.path, "reason": f.reason} for f in skipped]}
    if report.distances_per_target is not None:
        payload["adv_distance_per_target"] = report.distances_per_target[0].tolist()
    writes = OutputWrites()
    if out is not None:
        adv = rounded_embedding(metric, report, x, settings)
        if writes.attempt("--out", out, lambda: save_png(out, adv.pixels[0])) is not None:
            payload["saved"] = {"path": str(out), "in_ball": bool(adv.in_ball[0]), "distance": float(adv.distance[0])}
    if writes.failures:
        payload["not_written"] = writes.failures
    output.result(payload, lambda c: _render_embed(c, payload))
    writes.raise_if_failed()


def _render_embed(console, p: dict) -> None:
    t = p["threat"]
    what = "its clean self" if p["mode"] == "untargeted" else f"{len(p['targets'])} target(s) (mean)"
    console.print(f"distance to {what}: clean {p['clean_distance']:.4f} -> adversarial {p['adv_distance']:.4f}")
    console.print(f"||delta||_{'inf' if t['norm'] == 'linf' else '2'} = {p['perturbation_norm']:.5f} "
                  f"(budget {t['norm']} {t['eps_text']}, APGD {t['iters']} iters x {t['restarts']} restart(s))")
    if "saved" in p:
        s = p["saved"]
        console.print(f"saved {s['path']}: 8-bit, {'inside' if s['in_ball'] else 'OUTSIDE'} the ball, "
                      f"distance after rounding {s['distance']:.4f}")
