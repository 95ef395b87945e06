"""Weights in, without waste: read only the tensors wanted, straight to the target device, into a
model built without random initialisation.

* :func:`read_state_dict` is the only place that deserialises weights (``safetensors``, or
  ``torch.load(weights_only=True)``); with ``select`` it reads only some tensors (the vision tower
  of a full CLIP checkpoint), and it puts them on ``device`` as it reads them.
* :func:`build_without_init` builds a module whose parameters live on the ``meta`` device (no memory,
  no random initialisation); its buffers are built for real, so the ones a module computes in its
  constructor and no checkpoint holds (attention masks, position ids) have their values.
* :func:`assign_weights` then makes the checkpoint's tensors the module's parameters
  (``load_state_dict(assign=True)``), cast to the dtypes the module was built with.
* :func:`quiet_logging` silences what open_clip and timm log while they build a model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ModelFormatError

Selector = Callable[[list[str]], list[str]]


def tower(prefix: str) -> Selector:
    """A ``select`` for :func:`read_state_dict`: the keys under ``prefix`` if any has it, else every key
    (a tower saved on its own). The prefix is kept; :func:`strip_prefix` removes it."""
    def select(keys: list[str]) -> list[str]:
        under = [k for k in keys if k.startswith(prefix)]
        return under or keys
    return select


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state`` with ``prefix`` removed from the keys that have it."""
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _load_device(device: torch.device | str) -> str:
    """Where safetensors can put tensors directly: ``cpu`` or ``cuda:N``; anything else loads on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return "cpu"


def _unwrap(state, path: Path) -> dict:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFormatError(f"{path} does not contain a state dict of tensors.")
    return state


def _module_prefix(keys: list[str]) -> str:
    """``module.`` when every key has DistributedDataParallel's prefix, else ``""``."""
    return "module." if keys and all(k.startswith("module.") for k in keys) else ""


def read_state_dict(path: str | Path, device: torch.device | str = "cpu", *,
                    select: Selector | None = None) -> dict[str, torch.Tensor]:
    """A flat tensor state dict from ``.safetensors`` or (weights-only) ``.pt/.pth/.bin/.ckpt``, on ``device``.

    Unwraps ``state_dict``/``model``/``model_state_dict`` containers and strips a
    DistributedDataParallel ``module.`` prefix. ``select`` (all keys -> keys to keep, e.g. :func:`tower`)
    picks the tensors to return; from ``.safetensors`` only those are read, from zip ``.pt`` files the
    others are memory-mapped and never read. No tensor returned is backed by the file.

    Raises:
        ModelFormatError: unreadable file, or a pickle that needs more than tensors.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path, _load_device(device), select)
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise ModelFormatError(
            f"{path} holds Python objects besides tensors; percept only loads weights_only checkpoints.",
            "Re-save it as a plain state dict, ideally as .safetensors.") from exc
    except ModelFormatError:
        raise
    except Exception as exc:  # safetensors/zip/pickle raise assorted types for a corrupt file
        raise ModelFormatError(f"cannot read weights from {path}: {exc}") from exc
    state = _unwrap(state, path)
    state = strip_prefix(state, _module_prefix(list(state)))
    wanted = set(select(list(state)) if select else state)
    # copy=True: no parameter stays backed by the mapped file (a file rewritten in place would break it)
    return {k: v.to(_load_device(device), copy=True) for k, v in state.items() if k in wanted}


def _read_safetensors(path: Path, device: str, select: Selector | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=device) as handle:  # checks the header
        keys = list(handle.keys())
        prefix = _module_prefix(keys)
        names = {key: key[len(prefix):] for key in keys}
        wanted = set(select(list(names.values())) if select else names.values())
        keys = [key for key in keys if names[key] in wanted]
        if device == "cpu" and sys.byteorder == "little":
            state = _read_into_torch_memory(path, keys, handle)
        else:
            state = {key: handle.get_tensor(key) for key in keys}
    return {names[key]: tensor for key, tensor in state.items()}


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_into_torch_memory(path: Path, keys: list[str], handle) -> dict[str, torch.Tensor]:
    """Tensors ``keys`` of a safetensors file whose header ``handle`` has checked, each read with one
    ``readinto`` into memory torch allocated: one copy out of the page cache, at an aligned address.

    (safetensors' own CPU tensors are views of a memory map at unaligned addresses: MKL/oneDNN round
    differently on those, and copying them costs a second pass.) Dtypes not listed here come from
    ``handle``, copied.
    """
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
        state = {}
        for key in keys:
            info = header[key]
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                state[key] = handle.get_tensor(key).clone()
                continue
            start, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=dtype)
            raw = tensor.view(-1).view(torch.uint8).numpy()
            file.seek(8 + size + start)
            if raw.size != end - start or file.readinto(raw) != raw.size:
                raise ModelFormatError(f"cannot read weights from {path}: tensor {key} is truncated.")
            state[key] = tensor
    return state


_BUILDING = threading.local()  # how deep this thread is inside parameters_on_meta()
_PATCH = {"lock": threading.Lock(), "users": 0}
_ORIGINAL_REGISTER = nn.Module.register_parameter


def _register_parameter(module: nn.Module, name: str, param) -> None:
    """``nn.Module.register_parameter`` that, inside :func:`parameters_on_meta` (this thread only), moves
    the new parameter to the meta device: what random initialisation then does to it costs nothing."""
    if param is not None and getattr(_BUILDING, "depth", 0) and not param.is_meta:
        param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
    _ORIGINAL_REGISTER(module, name, param)


# Initialisers (torch.nn.init's, and the in-place tensor ops timm's and open_clip's are made of). On meta
# tensors they compute nothing, but some still cost milliseconds each through torch's Python meta kernels.
_INITIALISERS = frozenset({
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "orthogonal_",
    "sparse_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "erfinv_", "clamp_",
    "clamp_min_", "clamp_max_", "mul_", "add_", "sub_", "div_", "fill_", "zero_", "copy_", "exponential_",
    "bernoulli_", "random_"})


class _SkipInitOnMeta(TorchFunctionMode):
    """Returns a meta tensor unchanged from an initialiser instead of running it (this thread only:
    function modes are per thread)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        target = args[0] if args else None
        if isinstance(target, torch.Tensor) and target.is_meta and getattr(func, "__name__", "") in _INITIALISERS:
            return target
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device, and their initialisers skipped;
    buffers, and modules other threads build meanwhile, are untouched."""
    with _PATCH["lock"]:
        _PATCH["users"] += 1
        nn.Module.register_parameter = _register_parameter
    _BUILDING.depth = getattr(_BUILDING, "depth", 0) + 1
    try:
        with _SkipInitOnMeta():
            yield
    finally:
        _BUILDING.depth -= 1
        with _PATCH["lock"]:
            _PATCH["users"] -= 1
            if _PATCH["users"] == 0:
                nn.Module.register_parameter = _ORIGINAL_REGISTER


def build_without_init(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` with its parameters on the meta device (see :func:`parameters_on_meta`).

    A module whose constructor needs its parameters' values (none that percept loads does) is built
    again the ordinary way; :func:`assign_weights` fills either kind.
    """
    try:
        with parameters_on_meta():
            return factory()
    except (NotImplementedError, RuntimeError, TypeError):  # data read from a meta tensor, or no meta kernel
        return factory()  # a config that cannot be built at all raises again here


ALIGNMENT = 64  # bytes: what torch's CPU allocator gives


def _fitted(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, in memory aligned as torch allocates it.

    safetensors hands out CPU tensors at unaligned addresses, and MKL/oneDNN kernels round differently on
    those (last-bit differences in the embeddings): such tensors are copied once, as ``load_state_dict``'s
    copy into the initialised parameters did.
    """
    if tensor.dtype != dtype:
        return tensor.to(dtype)
    if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % ALIGNMENT:
        return tensor.clone()
    return tensor


def assign_weights(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    """Make ``state``'s tensors the parameters/buffers of ``module``, each cast to the dtype the module was
    built with (as a copying ``load_state_dict`` would); copied only when cast or unaligned (:func:`_fitted`).

    Raises:
        RuntimeError: keys or shapes that do not fit (``load_state_dict``'s own message), or a parameter
            left without weights.
    """
    own = module.state_dict(keep_vars=True)
    state = {k: _fitted(v, own[k].dtype if k in own else v.dtype) for k, v in state.items()}
    result = module.load_state_dict(state, strict=strict, assign=True)
    empty = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if empty:
        raise RuntimeError(f"no weights for {', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''}")
    return result


_LIBRARY_LOGGERS = ("timm", "open_clip")  # timm logs through ``timm.*`` loggers while building models


class _DropOpenClipChatter(logging.Filter):
    """Drops records below ERROR logged from open_clip's source files (it logs on the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        module = sys.modules.get("open_clip")
        if record.levelno >= logging.ERROR or not getattr(module, "__file__", None):
            return True
        package = os.path.join(os.path.dirname(os.path.abspath(module.__file__)), "")
        return not os.path.abspath(record.pathname).startswith(package)


@contextlib.contextmanager
def quiet_logging():
    """Silence the INFO/WARNING chatter that open_clip and timm log while building models, and nothing else.

    The ``timm``/``open_clip`` loggers are raised to ERROR; a filter on the root *logger* (it sees only
    records logged on the root logger itself, not those propagated from the user's loggers) drops
    open_clip's ``logging.info(...)`` calls. An unconfigured root logger gets Python's last-resort handler
    for the duration, so those calls do not run ``logging.basicConfig()`` behind the user's back.
    Everything is restored on exit; other loggers are untouched.
    """
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    levels = [logger.level for logger in loggers]
    chatter = _DropOpenClipChatter()
    stand_in = None
    if not logging.root.handlers:
        stand_in = logging.lastResort or logging.NullHandler()
        logging.root.addHandler(stand_in)
    logging.root.addFilter(chatter)
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        logging.root.removeFilter(chatter)
        if stand_in is not None:
            logging.root.removeHandler(stand_in)
