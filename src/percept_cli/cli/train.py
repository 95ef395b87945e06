"""``percept train``: fare | tecoa | 2afc | push. Each command gathers its options, resolves the run's
configuration (defaults ← ``--config run.toml`` ← options given) and calls :func:`training.runner.run_training`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .command import PerceptCommand, PerceptGroup
from .errors import handle_errors
from .options import MODEL_HELP, DeviceOpt, JsonOpt, PoolingOpt, QuietOpt, WorkersOpt
from .output import Output

app = typer.Typer(cls=PerceptGroup, no_args_is_help=True, help="Fine-tune robust encoders: FARE, TeCoA, and "
                  "2AFC heads or LoRA on NIGHTS; publish the result.")

T = "Training"
A = "Adversary"
E = "Evaluation and checkpoints"

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Run directory (checkpoints, logs, and at the end the "
                                      "model itself: --model RUN_DIR loads it).", show_default=False)]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="A TOML file of settings (keys as the long "
                                                   "option names with _ for -); options given win.",
                                                   show_default=False)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint "
                                         "(same settings required).")]
TModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="The OpenCLIP encoder to start from: "
                                               + MODEL_HELP + " A trained run directory too.",
                                               show_default=False, rich_help_panel="Model")]
TCheckpointOpt = Annotated[Path | None, typer.Option("--checkpoint", help="Visual-encoder weights for --model "
                                                        "ARCH.", show_default=False, rich_help_panel="Model")]
StepsOpt = Annotated[int | None, typer.Option("--steps", min=1, help="Optimiser steps (FARE/TeCoA default "
                                                 "20000).", show_default=False, rich_help_panel=T)]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs (2AFC: 20 MLP, 8 LoRA).",
                                                  show_default=False, rich_help_panel=T)]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", "-b", min=1, help="Global batch size over all "
                                                 "processes (FARE/TeCoA 128, MLP 512, LoRA 32).",
                                                 show_default=False, rich_help_panel=T)]
MicroOpt = Annotated[int | None, typer.Option("--micro-batch", min=1, help="Rows per process and forward pass; "
                                                 "smaller than the batch share accumulates gradients.",
                                                 show_default=False, rich_help_panel=T)]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Peak learning rate.", show_default=False,
                                                rich_help_panel=T)]
WdOpt = Annotated[float | None, typer.Option("--weight-decay", help="Weight decay.", show_default=False,
                                                rich_help_panel=T)]
WarmupOpt = Annotated[int | None, typer.Option("--warmup", min=0, help="Linear warm-up steps (default 7 % of "
                                                  "the steps: 1400 of 20000).", show_default=False,
                                                  rich_help_panel=T)]
EpsOpt = Annotated[str | None, typer.Option("--eps", help="Radius of the training (and evaluation) attack, "
                                               "e.g. 4/255.", show_default=False, rich_help_panel=A)]
NormOpt = Annotated[str | None, typer.Option("--norm", help="linf | l2.", show_default=False, rich_help_panel=A)]
PgdStepsOpt = Annotated[int | None, typer.Option("--pgd-steps", min=0, help="PGD steps per batch (10).",
                                                    show_default=False, rich_help_panel=A)]
PgdStepOpt = Annotated[str | None, typer.Option("--pgd-step-size", help="PGD step size (1/255).",
                                                   show_default=False, rich_help_panel=A)]
EvalEveryOpt = Annotated[int | None, typer.Option("--eval-every", min=0, help="Held-out evaluation every N "
                                                     "steps (0: only at the end).", show_default=False,
                                                     rich_help_panel=E)]
EvalSizeOpt = Annotated[int | None, typer.Option("--eval-size", min=1, help="Held-out images evaluated.",
                                                    show_default=False, rich_help_panel=E)]
EvalItersOpt = Annotated[int | None, typer.Option("--eval-iters", min=1, help="APGD iterations of the "
                                                     "evaluation attack (100).", show_default=False,
                                                     rich_help_panel=E)]
SaveEveryOpt = Annotated[int | None, typer.Option("--save-every", min=0, help="Checkpoint every N steps "
                                                     "(and always at the end).", show_default=False,
                                                     rich_help_panel=E)]
LogEveryOpt = Annotated[int | None, typer.Option("--log-every", min=1, help="Log scalars every N steps.",
                                                    show_default=False, rich_help_panel=E)]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed of the data order, initialisation and "
                                                "attacks.", show_default=False)]
TDtypeOpt = Annotated[str | None, typer.Option("--dtype", help="Autocast precision: auto (bf16 on CUDA, fp32 "
                                                  "elsewhere) | fp32 | bf16 | fp16; weights stay fp32.",
                                                  show_default=False, rich_help_panel="Model")]

FARE_HELP = """FARE adversarial fine-tuning (unsupervised).

Keeps the embeddings of perturbed images close to the original model's embeddings of the clean ones.

\b
  percept train fare --data images/ --model clip-convnext-b --eps 4/255 --steps 20000 --out runs/fare-cx
  torchrun --nproc_per_node 8 -m percept_cli train fare --data 'shards/{00000..00999}.tar' --out runs/fare
  percept train fare ... --out runs/fare-cx --resume           continue after an interruption
"""
TECOA_HELP = """TeCoA adversarial fine-tuning (supervised).

Zero-shot classification of perturbed images with the model's own text tower (prompts "This is a photo
of a {class}.").

\b
  percept train tecoa --data train/ --classnames classes.txt --model clip-convnext-b --out runs/tecoa
"""
TWOAFC_HELP = """Fine-tune on NIGHTS 2AFC judgements: an MLP head or LoRA adapters.

Clean training with a hinge loss: an MLP head on the frozen encoder, or LoRA adapters inside it.

\b
  percept train 2afc --root nights/ --head mlp --model rclip-f-convnext-b --out runs/mlp-cx
  percept train 2afc --root nights/ --head lora --model rclip-f-convnext-b --out runs/lora-cx
"""
PUSH_HELP = """Upload a finished run's model files to the Hugging Face Hub (no checkpoints).

\b
  percept train push runs/fare-cx --repo ORG/NAME --dry-run     list what would be uploaded
"""


NOT_SETTINGS = ("config", "resume", "json", "quiet", "set_")
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Any other setting as KEY=VALUE (repeatable; the "
                                                  "keys of --config), e.g. --set val_fraction=0.05 --set "
                                                  "keep_checkpoints=3.", show_default=False)]


def _settings(options: dict) -> dict:
    """The run settings a command's options give: those given (not None), paths as text, then ``--set`` pairs.

    Raises:
        BadInputError: a ``--set`` without ``=``, or one naming a setting an option also gives.
    """
    from ..errors import BadInputError

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()
                if v is not None and k not in NOT_SETTINGS}
    for pair in options.get("set_") or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise BadInputError(f"--set {pair}: write KEY=VALUE, e.g. --set val_fraction=0.05.")
        if key in settings:
            raise BadInputError(f"--set {key} repeats a setting given already (an option or an earlier --set).")
        settings[key] = value.strip()
    return settings


def _run(method: str, config_file: Path | None, settings: dict, resume: bool, json: bool, quiet: bool) -> None:
    from ..training.config import read_toml, resolve_config
    from ..training.runner import run_training

    output = Output(json, quiet)
    file_settings = read_toml(config_file) if config_file is not None else {}
    config = resolve_config(method, file_settings, settings)
    with TrainProgress(output) as progress:
        result = run_training(config, resume=resume, on_event=progress.event)
    payload = {"run_dir": str(result.run_dir), "method": config.kind, "steps": result.steps,
               "total_steps": result.total_steps, "resumed_from": result.resumed_from,
               "last_train": result.last_log, "last_eval": result.last_eval, "model_files": result.model_files}
    output.result(payload, lambda console: _render(console, payload))


def _render(console, p: dict) -> None:
    console.print(f"{p['method']}: {p['steps']}/{p['total_steps']} steps in {p['run_dir']}"
                  + (f" (resumed from step {p['resumed_from']})" if p["resumed_from"] is not None else ""),
                  markup=False)
    for title, record in (("last train log", p["last_train"]), ("last evaluation", p["last_eval"])):
        numbers = {k: v for k, v in record.items() if isinstance(v, float)}
        if numbers:
            console.print(f"{title}: " + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items()), markup=False)
    console.print(f"model: --model {p['run_dir']}", markup=False)


class TrainProgress:
    """A rich progress bar on stderr (interactive only) with the latest loss and statistics; resume,
    evaluation and checkpoint lines as info messages."""

    def __init__(self, output: Output):
        self.output = output
        self.bar = None
        self.task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False

    def event(self, kind: str, payload: dict) -> None:
        if kind == "step":
            self._advance(payload)
        elif kind == "log" and self.bar is not None:
            text = f"step {payload['step']} loss {payload['loss']:.4g}" + "".join(
                f" {k} {v:.3g}" for k, v in payload.items()
                if k.endswith(("distortion", "accuracy")) and isinstance(v, float))
            ips = payload.get("images_per_s")
            self.bar.update(self.task, description=text + (f" {ips:.0f} img/s" if ips else ""))
        elif kind == "eval":
            numbers = ", ".join(f"{k} {v:.4g}" for k, v in payload.items() if isinstance(v, float))
            self._info(f"eval at step {payload['step']}: {numbers}")
        elif kind == "resume":
            self._info(f"resuming from step {payload['step']} ({payload['path']})")
        elif kind == "features":
            self._info(f"computing encoder features of {payload['images']} images once")

    def _info(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message, markup=False)
        else:
            self.output.info(message)

    def _advance(self, payload: dict) -> None:
        if not self.output.interactive:
            return
        if self.bar is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=self.output.err,
                                transient=True)
            self.bar.start()
            self.task = self.bar.add_task("training", total=payload["total"], completed=payload["step"] - 1)
        self.bar.update(self.task, completed=payload["step"])


@app.command("fare", help=FARE_HELP, cls=PerceptCommand)
@handle_errors
def fare(data: Annotated[str | None, typer.Option("--data", help="Images: a folder, a list file or WebDataset "
                                                     "shards.", show_default=False)] = None,
         out: OutOpt = None, config: ConfigOpt = None, resume: ResumeOpt = False, model: TModelOpt = None,
         checkpoint: TCheckpointOpt = None, steps: StepsOpt = None, batch_size: BatchOpt = None,
         micro_batch: MicroOpt = None, lr: LrOpt = None, weight_decay: WdOpt = None, warmup: WarmupOpt = None,
         eps: EpsOpt = None, norm: NormOpt = None, pgd_steps: PgdStepsOpt = None, pgd_step_size: PgdStepOpt = None,
         eval_every: EvalEveryOpt = None, eval_size: EvalSizeOpt = None, eval_iters: EvalItersOpt = None,
         save_every: SaveEveryOpt = None, log_every: LogEveryOpt = None, seed: SeedOpt = None,
         dtype: TDtypeOpt = None, device: Annotated[str | None, DeviceOpt.__metadata__[0]] = None,
         workers: WorkersOpt = None, pooling: PoolingOpt = None, set_: SetOpt = None,
         json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    _run("fare", config, _settings(locals()), resume, json, quiet)


@app.command("tecoa", help=TECOA_HELP, cls=PerceptCommand)
@handle_errors
def tecoa(data: Annotated[str | None, typer.Option("--data", help="Labelled images: a folder DATA/CLASS/*, or WebDataset shards with cls members.",
                                                      show_default=False)] = None,
          classnames: Annotated[Path | None, typer.Option("--classnames", help="Class names, one per line in "
                                                             "sorted folder order (or 'folder,name' lines).",
                                                             show_default=False)] = None,
          out: OutOpt = None, config: ConfigOpt = None, resume: ResumeOpt = False, model: TModelOpt = None,
          checkpoint: TCheckpointOpt = None, steps: StepsOpt = None, batch_size: BatchOpt = None,
          micro_batch: MicroOpt = None, lr: LrOpt = None, weight_decay: WdOpt = None, warmup: WarmupOpt = None,
          eps: EpsOpt = None, norm: NormOpt = None, pgd_steps: PgdStepsOpt = None,
          pgd_step_size: PgdStepOpt = None, eval_every: EvalEveryOpt = None, eval_size: EvalSizeOpt = None,
          eval_iters: EvalItersOpt = None, save_every: SaveEveryOpt = None, log_every: LogEveryOpt = None,
          seed: SeedOpt = None, dtype: TDtypeOpt = None,
          device: Annotated[str | None, DeviceOpt.__metadata__[0]] = None, workers: WorkersOpt = None,
          set_: SetOpt = None, json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    _run("tecoa", config, _settings(locals()), resume, json, quiet)


@app.command("2afc", help=TWOAFC_HELP, cls=PerceptCommand)
@handle_errors
def twoafc(root: Annotated[Path | None, typer.Option("--root", help="The NIGHTS root (data.csv, ref/, "
                                                        "distort/).", show_default=False)] = None,
           dataset: Annotated[str | None, typer.Option("--dataset", help="nights.", show_default=False)] = None,
           head: Annotated[str | None, typer.Option("--head", help="mlp (on the frozen encoder) | lora "
                                                       "(adapters inside it, through peft).",
                                                       show_default=False)] = None,
           out: OutOpt = None, config: ConfigOpt = None, resume: ResumeOpt = False, model: TModelOpt = None,
           checkpoint: TCheckpointOpt = None, epochs: EpochsOpt = None, steps: StepsOpt = None,
           batch_size: BatchOpt = None, micro_batch: MicroOpt = None, lr: LrOpt = None,
           margin: Annotated[float | None, typer.Option("--margin", help="Hinge margin (0.05).",
                                                           show_default=False, rich_help_panel=T)] = None,
           lora_r: Annotated[int | None, typer.Option("--lora-r", min=1, help="LoRA rank (16).",
                                                         show_default=False, rich_help_panel=T)] = None,
           lora_alpha: Annotated[float | None, typer.Option("--lora-alpha", help="LoRA alpha (32).",
                                                               show_default=False, rich_help_panel=T)] = None,
           lora_dropout: Annotated[float | None, typer.Option("--lora-dropout", help="LoRA dropout (0.2).",
                                                                 show_default=False, rich_help_panel=T)] = None,
           eval_attack: Annotated[bool | None, typer.Option("--eval-attack/--no-eval-attack", help="Also the "
                                                               "APGD l_inf robust val accuracy at --eps.",
                                                               show_default=False, rich_help_panel=E)] = None,
           eps: EpsOpt = None, eval_every: EvalEveryOpt = None, eval_iters: EvalItersOpt = None,
           save_every: SaveEveryOpt = None, log_every: LogEveryOpt = None, seed: SeedOpt = None,
           dtype: TDtypeOpt = None, device: Annotated[str | None, DeviceOpt.__metadata__[0]] = None,
           workers: WorkersOpt = None, pooling: PoolingOpt = None, set_: SetOpt = None,
           json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    _run("2afc", config, _settings(locals()), resume, json, quiet)


@app.command("push", help=PUSH_HELP, cls=PerceptCommand)
@handle_errors
def push(run_dir: Annotated[Path, typer.Argument(help="A finished run directory.", show_default=False)],
         repo: Annotated[str, typer.Option("--repo", help="Hub repo ORG/NAME (created if missing).",
                                           show_default=False)],
         private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
         dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files, upload nothing.")] = False,
         json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    from ..training.export import push as push_files

    output = Output(json, quiet)
    files = push_files(run_dir, repo, private=private, dry_run=dry_run)
    payload = {"repo": repo, "dry_run": dry_run, "files": files}
    verb = "would upload" if dry_run else "uploaded"
    output.result(payload, lambda console: console.print(f"{verb} {len(files)} files to {repo}:\n  "
                                                         + "\n  ".join(files), markup=False))
