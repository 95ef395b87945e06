"""Training checkpoints: one ``.safetensors`` file per checkpoint, written atomically.

It holds the trained module's tensors (``model/…``: trainable parameters and buffers; frozen weights come
from the base model again on resume), the optimizer's per-parameter state (``optim/<i>/<key>``), the
torch RNG states (``rng/cpu``, ``rng/cuda<N>``), and, as JSON in the safetensors metadata, the step,
the optimizer's parameter groups, the scheduler state and the run's configuration fingerprint.
Nothing is unpickled on resume. ``checkpoints/latest`` names the newest complete file; older ones
beyond ``keep`` are removed after the new one is in place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import BadInputError
from ..io.outputs import atomic_path


class CheckpointWriteError(BadInputError):
    """A checkpoint could not be written (a full disk, a read-only folder); nothing half-written is left."""


NAME = re.compile(r"^step_(\d{8})\.safetensors$")
LATEST = "latest"


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters and all buffers of ``module`` (by state-dict name)."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    params = {name for name, _ in module.named_parameters()}
    return {k: v for k, v in module.state_dict().items() if k in trainable or k not in params}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng/cuda{i}"] = state
    return out


def save_checkpoint(directory: Path, step: int, module: nn.Module, optimizer, scheduler, meta: dict,
                    keep: int = 2) -> Path:
    """Write ``step_<step>.safetensors`` atomically, point ``latest`` at it, prune to ``keep`` files."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().to("cpu").contiguous().clone() for k, v in trainable_state(module).items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim/{index}/{key}"] = value.detach().to("cpu").contiguous().clone()
    tensors.update(_rng_tensors())
    metadata = {"step": str(step), "param_groups": json.dumps(opt["param_groups"]),
                "scheduler": json.dumps(scheduler.state_dict()), "meta": json.dumps(meta)}
    path = directory / f"step_{step:08d}.safetensors"
    try:
        with atomic_path(path, fsync=True) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        with atomic_path(directory / LATEST) as tmp:
            tmp.write_text(path.name + "\n", encoding="utf-8")
    except OSError as exc:
        previous = latest_checkpoint(directory)
        kept = f"the last complete checkpoint ({previous.name}) is intact" if previous else "no checkpoint exists yet"
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {exc.strerror or exc}; {kept}.",
                                   "Free space (or fix the folder) and rerun with --resume.") from exc
    for old in sorted(p for p in directory.iterdir() if NAME.match(p.name))[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint (``latest`` if it names an existing file, else the highest step)."""
    if not directory.is_dir():
        return None
    pointer = directory / LATEST
    if pointer.is_file():
        named = directory / pointer.read_text(encoding="utf-8").strip()
        if NAME.match(named.name) and named.is_file():
            return named
    found = sorted(p for p in directory.iterdir() if NAME.match(p.name))
    return found[-1] if found else None


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata with JSON fields decoded).

    Raises:
        BadInputError: a file that is not a complete percept training checkpoint.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInputError(f"checkpoint {path} cannot be read ({exc}).") from exc
    if not {"step", "param_groups", "scheduler", "meta"} <= set(meta):
        raise BadInputError(f"{path} is not a percept training checkpoint.")
    decoded = {"step": int(meta["step"]), "param_groups": json.loads(meta["param_groups"]),
               "scheduler": json.loads(meta["scheduler"]), "meta": json.loads(meta["meta"])}
    return tensors, decoded


def restore(tensors: dict[str, torch.Tensor], meta: dict, module: nn.Module, optimizer, scheduler) -> int:
    """Load a checkpoint's state into ``module``, ``optimizer``, ``scheduler`` and the RNGs; returns the step."""
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    missing, unexpected = module.load_state_dict(model_state, strict=False)
    trainable = set(trainable_state(module))
    if unexpected or trainable & set(missing):
        raise BadInputError("the checkpoint does not fit this model (different architecture or head).")
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng/cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda"))]
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    return int(meta["step"])
