"""The training loop shared by every method: DistributedDataParallel, gradient accumulation, autocast,
logs, periodic evaluation, checkpoints and resume.

One optimiser step per global batch: each process runs ``accum`` micro-batches (gradient sync only on
the last, ``DistributedDataParallel.no_sync`` before), each micro-batch loss is summed over its rows and
divided by the rows the process takes per step, and DDP averages over processes: the gradient is the
global batch mean's. Only rank 0 writes logs, checkpoints and the model.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..distributed import Dist, barrier
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .data import Plan
from .methods import Method, StepContext

Event = Callable[[str, dict], None]


def build_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam with the run's lr, betas and weight decay."""
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up ``(step+1)/warmup``, then a half cosine to 0
    at ``total`` (the schedule of open_clip's ``cosine_lr``, used by the FARE/TeCoA recipe), or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


def warmup_steps(config: TrainConfig, total: int) -> int:
    return round(0.07 * total) if config.warmup is None else int(config.warmup)


def build_scheduler(optimizer, config: TrainConfig, total: int):
    warm = warmup_steps(config, total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warm, config.schedule))


@dataclass
class LoopState:
    """Where a run stands, for logs and the progress display."""

    step: int = 0
    images: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_log: dict = field(default_factory=dict)


class JsonlLog:
    """Scalar logs: one JSON object per line in ``log.jsonl`` (appended, flushed each line), and TensorBoard
    event files under ``tensorboard/`` when the ``tensorboard`` package is installed."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.handle = open(run_dir / "log.jsonl", "a", encoding="utf-8") if enabled else None  # noqa: SIM115 (open for the run)
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the optional extra is not installed: JSONL only
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.writer is not None:
            self.writer.close()


def autocast_factory(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def wrap_ddp(module: torch.nn.Module, dist: Dist, device: torch.device):
    """``module`` in DistributedDataParallel under torchrun (NCCL on GPUs, gloo on CPU), else itself."""
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def _sum_across(dist: Dist, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum every tensor over processes (one all-reduce) and return Python floats (one host sync)."""
    if not values:
        return {}
    keys = sorted(values)
    flat = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(flat)
    return dict(zip(keys, flat.tolist()))


@dataclass
class Hooks:
    """What the loop calls besides the method: ``batches(start_step)`` yields per step the micro-batches'
    data (aligned with the step's slots), ``evaluate(step)`` returns held-out numbers (rank 0), and
    ``on_event(kind, payload)`` reports progress (``step``, ``log``, ``eval``, ``checkpoint``)."""

    batches: Callable
    evaluate: Callable[[int], dict] | None = None
    on_event: Event = lambda kind, payload: None


def train_loop(method: Method, config: TrainConfig, plan: Plan, dist: Dist, device: torch.device,
               amp_dtype: torch.dtype | None, run_dir: Path, optimizer, scheduler, start_step: int,
               hooks: Hooks, meta: dict) -> LoopState:
    """Run steps ``start_step .. plan.total_steps``; checkpoint every ``config.save_every`` steps and at the end."""
    model = wrap_ddp(method.module, dist, device)
    autocast = autocast_factory(device, amp_dtype)
    log = JsonlLog(run_dir, dist.is_main, config.tensorboard)
    state = LoopState(step=start_step)
    window: dict[str, torch.Tensor] = {}
    rows_in_window = 0
    t_window = time.perf_counter()
    method.module.train()
    try:
        for step, micro_data, slots in hooks.batches(start_step):
            ctx_log = config.log_every > 0 and ((step + 1) % config.log_every == 0 or step + 1 == plan.total_steps)
            for j, (data, rows) in enumerate(zip(micro_data, slots)):
                ctx = StepContext(step, rows, plan.batch_size, device, autocast, ctx_log)
                sync = j == len(micro_data) - 1
                with (contextlib.nullcontext() if sync or not dist.enabled else model.no_sync()):
                    loss_sum, stats = method.loss(model, data, ctx)
                    (loss_sum / plan.per_rank).backward()
                for key, value in {"loss": loss_sum.detach(), **stats}.items():
                    window[key] = window.get(key, 0) + value.detach().float()
                rows_in_window += len(rows)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step = step + 1
            state.images += plan.batch_size
            hooks.on_event("step", {"step": state.step, "total": plan.total_steps})
            if ctx_log:
                window["rows"] = torch.tensor(float(rows_in_window), device=device)
                totals = _sum_across(dist, window)
                elapsed = time.perf_counter() - t_window
                record = _log_record(state.step, totals, scheduler.get_last_lr()[0], elapsed)
                state.last_log = record
                log.write(record)
                hooks.on_event("log", record)
                window, rows_in_window, t_window = {}, 0, time.perf_counter()
            if config.eval_every and state.step % config.eval_every == 0 and state.step < plan.total_steps:
                _evaluate(hooks, state.step, dist, log)
            if config.save_every and state.step % config.save_every == 0 and state.step < plan.total_steps:
                _checkpoint(run_dir, state.step, method, optimizer, scheduler, meta, config, dist, hooks, plan)
        if state.step > start_step or start_step == plan.total_steps:
            _checkpoint(run_dir, state.step, method, optimizer, scheduler, meta, config, dist, hooks, plan)
        _evaluate(hooks, state.step, dist, log)
    finally:
        log.close()
    return state


def _log_record(step: int, totals: dict[str, float], lr: float, elapsed: float) -> dict:
    rows = max(1.0, totals.pop("rows", 1.0))
    record = {"kind": "train", "step": step, "lr": lr, "loss": totals.pop("loss") / rows}
    for key, value in totals.items():
        if key.endswith("correct"):
            record[key.replace("correct", "accuracy")] = value / rows
        else:
            record[key] = value / rows
    record["images_per_s"] = rows / elapsed if elapsed > 0 else None
    return record


def _evaluate(hooks: Hooks, step: int, dist: Dist, log: JsonlLog) -> None:
    if hooks.evaluate is None:
        return
    if dist.is_main:
        result = hooks.evaluate(step)
        if result:
            record = {"kind": "eval", "step": step, **result}
            log.write(record)
            hooks.on_event("eval", record)
    barrier(dist)


def _checkpoint(run_dir, step, method, optimizer, scheduler, meta, config, dist, hooks, plan: Plan) -> None:
    if dist.is_main:
        # the data order is a function of (seed, epoch); where the run stands in it, for the record
        order = {"seed": config.seed, "epoch": step // plan.steps_per_epoch,
                 "batch_in_epoch": step % plan.steps_per_epoch, "world": plan.world, "accum": plan.accum}
        path = save_checkpoint(run_dir / "checkpoints", step, method.module, optimizer, scheduler,
                               {**meta, "data_order": order}, keep=config.keep_checkpoints)
        hooks.on_event("checkpoint", {"step": step, "path": str(path)})
    barrier(dist)

