"""A second device on a CPU-only machine, for tests of device handling and host-device syncs.

Inside ``with SimulatedDevice() as dev:`` tensors put on ``dev.device`` (``cpu:7``) live in CPU
memory but behave, towards the code under test, as if they were on an accelerator:

* ``t.device`` says ``cpu:7``, and whatever is computed from them, or created with
  ``device=t.device``, is on it too; ``.cpu()``/``.to("cpu")`` bring a plain CPU tensor back;
* mixing them with plain CPU tensors raises PyTorch's own errors where a GPU would: indexing a
  CPU tensor with an index on the device ("indices should be either on cpu or on the same device
  as the indexed tensor (cpu)"), or an op on non-scalar tensors of both devices;
* ``dev.syncs`` counts what would make the host wait for the device: reading a value
  (``bool``/``int``/``float``/``item``/``tolist``), copying to the host, ``nonzero`` and
  boolean-mask indexing (whose result size only the device knows). A ``non_blocking`` copy to
  the host is not a sync, but reading its result is one unless at least :data:`QUEUED_BEHIND`
  device ops were issued after the copy (as with CUDA streams: the host then waits for the copy
  while the device still has that work to do).

A model's parameters are put on the device with ``dev.put_module(module)`` (undone on exit).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

_TAG = "_on_simulated_device"
_COPIED_AT = "_async_copy_from_simulated_device"
QUEUED_BEHIND = 8
_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy"}
_SIZE_FROM_DEVICE = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}
_INDEXING = {"__getitem__", "__setitem__", "index_select", "index_put", "index_put_", "take", "gather",
             "index_add", "index_add_", "index_copy", "index_copy_"}


def on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _TAG, False)


def _tag(t):
    if isinstance(t, torch.Tensor):
        setattr(t, _TAG, True)
    return t


class SimulatedDevice(TorchFunctionMode):
    """The mode: ``with SimulatedDevice() as dev``; ``dev.put(t)``, ``dev.put_module(m)``, ``dev.syncs``."""

    device = torch.device("cpu", 7)

    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()
        self._params: list[torch.Tensor] = []
        self._ops = 0  # device ops issued so far

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of the CPU tensor ``t`` on the simulated device."""
        return _tag(t.detach().clone().requires_grad_(t.requires_grad))

    def put_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Put ``module``'s parameters and buffers on the device (in place, undone on exit)."""
        for t in (*module.parameters(), *module.buffers()):
            self._params.append(_tag(t))
        return module

    def __exit__(self, *exc):
        for t in self._params:
            if hasattr(t, _TAG):
                delattr(t, _TAG)
        return super().__exit__(*exc)

    def _is_device(self, d) -> bool:
        return d is not None and torch.device(d) == self.device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if func == torch.Tensor.device.__get__:
            return self.device if on_device(args[0]) else func(*args)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        any_device = any(on_device(t) for t in tensors)
        if name in ("to", "cpu", "copy_"):
            return self._transfer(func, name, args, kwargs)
        if name in _READS and args and hasattr(args[0], _COPIED_AT):
            if self._ops - getattr(args[0], _COPIED_AT) < QUEUED_BEHIND:
                self.syncs["read of a fresh async copy"] += 1
        if self._is_device(kwargs.get("device")):  # a factory: torch.arange(n, device=x.device)
            kwargs["device"] = "cpu"
            return tree_map(_tag, func(*args, **kwargs))
        if any_device:
            self._check_mixing(name, args, tensors)
            self._count(name, args)
            self._ops += 1
        out = func(*args, **kwargs)
        if any_device and name not in _READS:
            out = tree_map(_tag, out)
        return out

    def _check_mixing(self, name, args, tensors) -> None:
        if name in _INDEXING:
            indexed, rest = args[0], tree_flatten(args[1:])[0]
            if not on_device(indexed) and any(on_device(t) for t in rest):
                raise RuntimeError("indices should be either on cpu or on the same device as the indexed "
                                   "tensor (cpu)")
            if on_device(indexed):
                return  # a CPU index into a device tensor is fine
        if any(not on_device(t) and t.dim() > 0 for t in tensors):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{self.device} and cpu! ({name})")

    def _count(self, name, args) -> None:
        if name in _READS or name in _SIZE_FROM_DEVICE:
            self.syncs[name] += 1
        elif name in ("__getitem__", "__setitem__"):
            index = tree_flatten(args[1])[0] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and on_device(i) for i in index):
                self.syncs[f"{name}[bool]"] += 1

    def _transfer(self, func, name, args, kwargs):
        blocking = not kwargs.get("non_blocking", False)
        if name == "copy_":  # dst.copy_(src): crosses devices freely; to the host it waits unless non_blocking
            if on_device(args[1]) and not on_device(args[0]):
                if blocking:
                    self.syncs["to host"] += 1
                else:
                    setattr(args[0], _COPIED_AT, self._ops)
            return func(*args, **kwargs)
        source, target = args[0], self._target(name, args[1:], kwargs)
        target = on_device(source) if target is None else target
        args = tuple("cpu" if self._is_spec(a) else a for a in args)
        if self._is_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if on_device(source) and not target and blocking:
            self.syncs["to host"] += 1
        out = func(*args, **kwargs)
        if out is source and on_device(source) != target:
            out = source.clone()  # a new tensor, on the other device
        return _tag(out) if target else out

    def _target(self, name, rest, kwargs):
        """True: the call moves to the device, False: to the CPU, None: it keeps the device."""
        if name == "cpu":
            return False
        if kwargs.get("device") is not None:
            return self._is_device(kwargs["device"])
        for a in rest:
            if isinstance(a, torch.Tensor):
                return on_device(a)
            if isinstance(a, (str, torch.device)):
                return self._is_device(a)
        return None

    def _is_spec(self, a) -> bool:
        return isinstance(a, (str, torch.device)) and self._is_device(a)
