"""A whole ``percept train`` run without the CLI: checks, set-up per method, the loop, the model directory.

``run_training(config, resume=..., on_event=...)`` never prints; progress comes to ``on_event``.
Everything that can be checked without a model (settings, the run directory, the data, a resume's
configuration) is checked before the model loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BadInputError
from ..io.outputs import atomic_path
from .checkpoint import latest_checkpoint, read_checkpoint, restore
from .config import TrainConfig, config_difference
from .export import write_json
from .loop import Hooks, build_optimizer, build_scheduler, train_loop

CONFIG_FILE = "train_config.json"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    total_steps: int
    resumed_from: int | None
    last_log: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    model_files: list[str] = field(default_factory=list)


def prepare_run_dir(config: TrainConfig, resume: bool) -> tuple[Path, Path | None]:
    """The run directory (created) and the checkpoint to resume from (None: start at step 0).

    Raises:
        BadInputError: a non-empty directory without ``--resume``, a ``--resume`` of a directory that holds
            no run, or of a run made with other settings (the differing settings named).
    """
    run_dir = Path(config.out)
    saved_path = run_dir / CONFIG_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInputError(f"--out {run_dir} is a file, not a directory.")
    if resume:
        if not saved_path.is_file():
            raise BadInputError(f"--resume: {run_dir} holds no training run (no {CONFIG_FILE}).")
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        if saved.get("method") != config.method:
            raise BadInputError(f"--resume: {run_dir} is a '{saved.get('method')}' run, not '{config.method}'.")
        diff = config_difference(saved.get("fingerprint", {}), config)
        if diff:
            raise BadInputError(f"--resume: {run_dir} was made with other settings ({', '.join(diff)}).",
                                "Resume with the same settings, or start a new run with another --out.")
        return run_dir, latest_checkpoint(run_dir / "checkpoints")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise BadInputError(f"--out {run_dir} already exists and is not empty.",
                            "Pass --resume to continue the run in it, or choose another --out.")
    return run_dir, None


def write_config(run_dir: Path, config: TrainConfig, extra: dict) -> None:
    """``train_config.json``: the resolved settings, their fingerprint and facts about the run (atomic)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = {"method": config.method, "config": config.to_dict(), "fingerprint": config.fingerprint(), **extra}
    write_json(run_dir / CONFIG_FILE, doc)


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    from ..devices import resolve_dtype

    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    dtype = resolve_dtype(config.dtype)
    return None if dtype == torch.float32 else dtype


def run_training(config: TrainConfig, *, resume: bool = False,
                 on_event: Callable[[str, dict], None] = lambda kind, payload: None) -> TrainResult:
    """Train as ``config`` says; see the package docs. Returns where the run ended.

    Raises:
        BadInputError: bad settings, data or run directory (before any training step where it can be known).
        ModelUnavailableError, ModelFormatError: the base model cannot be loaded.
    """
    from ..devices import resolve_device
    from ..distributed import barrier, device_for, init

    if config.method == "2afc" and config.head == "lora":
        import importlib.util

        if importlib.util.find_spec("peft") is None:  # before any data or model work
            raise BadInputError("LoRA training needs the peft package: pip install 'percept[train]'.")
    run_dir, checkpoint = prepare_run_dir(config, resume)
    dist = init(config.device)
    device = resolve_device(device_for(dist, config.device))
    amp = _amp_dtype(config, device)
    torch.manual_seed(config.seed)
    from .setup import build_job

    job = build_job(config, dist, device, amp, on_event)
    if dist.is_main:
        write_config(run_dir, config, {"base": job.base, "plan": job.plan.__dict__})
    barrier(dist)
    optimizer = build_optimizer(job.method.trainable_parameters(), config)
    scheduler = build_scheduler(optimizer, config, job.plan.total_steps)
    start, resumed_from = 0, None
    if checkpoint is not None:
        tensors, meta = read_checkpoint(checkpoint)
        if meta["meta"].get("base_sha256") != job.base.get("weights_sha256"):
            raise BadInputError(f"--resume: {checkpoint} was trained from other base weights than "
                                f"'{config.model}'.")
        start = resumed_from = restore(tensors, meta, job.method.module, optimizer, scheduler)
        if dist.is_main:
            trim_log(run_dir / "log.jsonl", start)
        on_event("resume", {"step": start, "path": str(checkpoint)})
    if dist.is_main:
        check_free_space(run_dir, job.method.module, job.base.get("weights"), config.keep_checkpoints)
    hooks = Hooks(batches=job.batches, evaluate=job.evaluate, on_event=on_event)
    state = train_loop(job.method, config, job.plan, dist, device, amp, run_dir, optimizer, scheduler, start,
                       hooks, {"base_sha256": job.base.get("weights_sha256"), "kind": config.kind})
    result = TrainResult(run_dir, state.step, job.plan.total_steps, resumed_from, state.last_log)
    if dist.is_main:
        result.model_files = job.export(run_dir)
        on_event("exported", {"files": result.model_files})
    barrier(dist)
    result.last_eval = _last_eval(run_dir)
    return result


def check_free_space(run_dir: Path, module: torch.nn.Module, base_weights: str | None, keep: int,
                     free: int | None = None) -> None:
    """BadInputError before the first step when ``run_dir``'s disk cannot hold the checkpoints (``keep`` + 1
    while a new one is written: trainable tensors and two Adam moments) and the final model (about the
    base weights' size)."""
    import shutil

    from .checkpoint import trainable_state

    trainable = sum(t.numel() * 4 for t in trainable_state(module).values())
    needed = 3 * trainable * (max(1, keep) + 1) + (Path(base_weights).stat().st_size if base_weights else 0)
    free = shutil.disk_usage(run_dir).free if free is None else free
    if free < needed:
        raise BadInputError(f"{run_dir} has {free / 2**30:.2f} GiB free; this run's checkpoints and model need "
                            f"about {needed / 2**30:.2f} GiB.", "Free space or choose another --out.")


def trim_log(path: Path, step: int) -> None:
    """Drop the log records after ``step`` (written by an interrupted run after its last checkpoint), so
    a resumed run's log reads as an uninterrupted one's. A torn last line is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _last_eval(run_dir: Path) -> dict:
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return {}
    last = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "eval":
            last = record
    return last
