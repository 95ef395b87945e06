"""One FARE training step vs. the cost of its parts.

Target (training issue): one FARE step <= 1.15x the sum of its parts, which are
  (a) k PGD forward+backward passes w.r.t. the input (the student in eval mode, as the attack runs it),
  (b) one no-grad teacher forward,
  (c) one student forward+backward w.r.t. the weights and the AdamW step;
the step itself is the real ``FARE.loss`` (teacher, random start, k PGD steps, student loss) followed by
the backward, optimizer step, zero_grad and scheduler step, as ``training/loop.py`` runs them. On a GPU,
bf16 autocast and channels-last (convolutional backbones, as ``prefers_channels_last`` decides) where
faster; the step's images/s is the number the issue asks for at ConvNeXt-B 224.

Random weights of the real OpenCLIP architecture (same compute as the pretrained model), no network.
Everything runs on the same batch. Each of ``--repeats`` rounds times the k+2 parts back to back and
one full step (order alternating, so load drifting on a shared machine hits both alike); medians over
rounds and the median of the per-round ratios are reported, warm-up rounds excluded. The step's phases
(before / inside / after the attack) come from clocks around ``pgd_perturb``.

    python benchmarks/bench_train.py --arch ViT-B-32 --batch 8 --device cpu
    python benchmarks/bench_train.py --device cuda --arch convnext_base_w --batch 128 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch


# -- memory --------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> None:
    """Start a new peak: torch's allocator peak on CUDA; the process's RSS high-water mark (VmHWM) on
    Linux, where writing 5 to /proc/self/clear_refs resets it (silently nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_mib(device: torch.device) -> float:
    """Peak since :func:`reset_peak`: CUDA max allocated, or the RSS high-water mark (ru_maxrss when
    /proc is not there, which is the whole process's peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _status_kib("VmHWM")
    return hwm / 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- set-up --------------------------------------------------------------------------------------------------
def build_encoder(arch: str, device: torch.device, channels_last: str):
    """A PixelEncoder around an OpenCLIP visual tower with random weights, fp32, backbone trainable (as
    ``training/setup.py``'s FARE job leaves it)."""
    import open_clip

    from percept_cli.models.encoder import PixelEncoder, prefers_channels_last

    torch.manual_seed(0)
    logging.disable(logging.WARNING)  # "no pretrained weights loaded" is the point here
    model = open_clip.create_model(arch, pretrained=None)
    logging.disable(logging.NOTSET)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    encoder = PixelEncoder(model.visual, pp["mean"], pp["std"], size).to(device)
    del model  # the text tower is not trained
    use_cl = prefers_channels_last(encoder.backbone, device) if channels_last == "auto" else channels_last == "on"
    encoder.set_channels_last(use_cl)
    encoder.backbone.requires_grad_(True)
    return encoder


def main() -> None:
    from percept_cli.training import methods
    from percept_cli.training.config import resolve_config
    from percept_cli.training.loop import (
        autocast_factory,
        build_optimizer,
        build_scheduler,
    )
    from percept_cli.training.methods import FARE, StepContext, fare_loss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32", help="an OpenCLIP architecture (convnext_base_w on a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="autocast precision")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                        help="auto: as percept decides (convolutional backbones on CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    autocast = autocast_factory(device, amp)
    k, batch = args.pgd_steps, args.batch

    config = resolve_config("fare", {}, {"data": "x", "out": "x", "pgd_steps": k, "batch_size": batch,
                                         "steps": 1000})
    encoder = build_encoder(args.arch, device, args.channels_last)
    method = FARE(encoder, config)
    student, teacher = method.module, method.teacher
    params = method.trainable_parameters()
    optimizer = build_optimizer(params, config)
    scheduler = build_scheduler(optimizer, config, config.steps)
    size = encoder.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    with torch.no_grad(), autocast():
        target = teacher(x).float()
    x_adv = (x + (torch.rand(x.shape, generator=g).to(device) * 2 - 1) * config.eps).clamp(0, 1)

    def input_pass(frozen: bool) -> None:
        """(a): one forward+backward w.r.t. the input with the student in eval mode, as the attack runs it:
        the parameters still require grad but accumulate nothing (autograd.grad w.r.t. the input only).
        ``frozen``: parameters not requiring grad instead (on the CPU torch then picks other kernels for
        some linear layers' backward: bmm instead of mm, slower; reported beside, not in the sum)."""
        student.eval()
        if frozen:
            student.requires_grad_(False)
        try:
            z = x_adv.detach().requires_grad_(True)
            with autocast():
                loss = fare_loss(student(z), target).sum()
            torch.autograd.grad(loss, z)
        finally:
            if frozen:
                encoder.backbone.requires_grad_(True)
            student.train()

    def teacher_forward() -> None:
        """(b): the frozen teacher, no grad."""
        with torch.no_grad(), autocast():
            teacher(x).float()

    def student_update() -> None:
        """(c): forward+backward w.r.t. the weights on the adversarial batch, AdamW step, zero_grad."""
        student.train()
        with autocast():
            loss = fare_loss(student(x_adv), target).sum()
        (loss / batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def parts_sequence() -> dict[str, float]:
        """k x (a), (b), (c) back to back, each timed (synchronised on CUDA)."""
        out = {"input_fwd_bwd": []}
        for _ in range(k):
            out["input_fwd_bwd"].append(timed(lambda: input_pass(False)))
        out["teacher_forward"] = timed(teacher_forward)
        out["student_fwd_bwd_adamw"] = timed(student_update)
        out["total"] = sum(out["input_fwd_bwd"]) + out["teacher_forward"] + out["student_fwd_bwd_adamw"]
        return out

    step_no = [0]

    def full_step() -> dict[str, float]:
        """The real step: FARE.loss, backward, optimizer and scheduler, as train_loop runs one micro-batch;
        returns its total and phases (clocks around pgd_perturb: 2 syncs per step on CUDA)."""
        sync(device)
        t0 = time.perf_counter()
        student.train()
        ctx = StepContext(step_no[0], list(range(batch)), batch, device, autocast, False)
        loss_sum, stats = method.loss(student, x, ctx)
        (loss_sum / batch).backward()
        window = {key: value.detach().float() for key, value in {"loss": loss_sum.detach(), **stats}.items()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step_no[0] += 1
        sync(device)
        t1 = time.perf_counter()
        del window
        return {"total": t1 - t0, "before_attack": marks["attack_start"] - t0,
                "attack": marks["attack_end"] - marks["attack_start"], "after_attack": t1 - marks["attack_end"]}

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    marks: dict[str, float] = {}
    original_pgd = methods.pgd_perturb

    def clocked_pgd(*a, **kw):
        sync(device)
        marks["attack_start"] = time.perf_counter()
        out = original_pgd(*a, **kw)
        sync(device)
        marks["attack_end"] = time.perf_counter()
        return out

    methods.pgd_perturb = clocked_pgd
    rounds, peaks = [], {"parts": 0.0, "full_step": 0.0}
    try:
        for _ in range(args.warmup):
            parts_sequence()
            full_step()
            input_pass(True)
        for rep in range(args.repeats):
            row = {}
            for name in (("parts", "full_step") if rep % 2 == 0 else ("full_step", "parts")):
                reset_peak(device)
                row[name] = parts_sequence() if name == "parts" else full_step()
                peaks[name] = max(peaks[name], peak_mib(device))
            row["input_fwd_bwd_frozen"] = timed(lambda: input_pass(True))
            row["ratio"] = row["full_step"]["total"] / row["parts"]["total"]
            rounds.append(row)
            print(json.dumps({"round": rep, "parts_s": round(row["parts"]["total"], 3),
                              "full_step_s": round(row["full_step"]["total"], 3), "ratio": round(row["ratio"], 3),
                              "load": os.getloadavg()[0]}), flush=True)
    finally:
        methods.pgd_perturb = original_pgd

    def med(values) -> float:
        return statistics.median(values)

    a = med([t for r in rounds for t in r["parts"]["input_fwd_bwd"]])
    a_frozen = med([r["input_fwd_bwd_frozen"] for r in rounds])
    b = med([r["parts"]["teacher_forward"] for r in rounds])
    c = med([r["parts"]["student_fwd_bwd_adamw"] for r in rounds])
    full = med([r["full_step"]["total"] for r in rounds])
    attack = med([r["full_step"]["attack"] for r in rounds])
    parts = k * a + b + c
    result = {
        "arch": args.arch, "device": str(device), "image_size": size, "batch": batch, "pgd_steps": k,
        "dtype": args.dtype, "channels_last": encoder.channels_last, "repeats": args.repeats,
        "warmup_rounds": args.warmup, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": {"platform": platform.machine(), "cpus": os.cpu_count(),
                    "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "load_average_at_end": os.getloadavg()},
        "parts": "parts_sum = pgd_steps * input_fwd_bwd + teacher_forward + student_fwd_bwd_adamw",
        "median_s": {"input_fwd_bwd": a, "input_fwd_bwd_frozen": a_frozen,
                     "teacher_forward": b, "student_fwd_bwd_adamw": c, "parts_sum": parts, "full_step": full,
                     "full_step_attack": attack,
                     "full_step_before_attack": med([r["full_step"]["before_attack"] for r in rounds]),
                     "full_step_after_attack": med([r["full_step"]["after_attack"] for r in rounds])},
        "ratio_full_vs_parts": full / parts,
        "ratio_full_vs_parts_paired_median": med([r["ratio"] for r in rounds]),
        "ratio_full_vs_parts_paired": [r["ratio"] for r in rounds],
        "ratio_attack_vs_k_input_fwd_bwd": attack / (k * a) if k else None,
        "ratio_full_vs_parts_with_frozen_input_passes": full / (k * a_frozen + b + c),
        "ratio_input_fwd_bwd_frozen_vs_params_require_grad": a_frozen / a,
        "target_ratio": 1.15,
        "overhead_s": full - parts,
        "full_step_images_per_s": batch / full,
        "peak_memory_mib": peaks,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process RSS high-water mark",
        "rounds": rounds,
    }
    name = f"train_fare_step_{args.arch}_{device.type}" + ("" if args.dtype == "fp32" else f"_{args.dtype}") + ".json"
    out = args.out or Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k_: v for k_, v in result.items() if k_ != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
