"""A CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``: which values
cross between "device" and host while a watched run trains.

On the CPU every tensor is host memory, so a read of a device value (``float(t)``,
``.item()``, ``.tolist()``, ``.to("cpu")``) or a tensor built from Python data and
mixed into device work (``torch.tensor(...).to(device)``) costs nothing and no
CUDA-only test sees it here.  This guard tracks where values come from instead:

* **device values**: the model's parameters and the batch, and everything an
  operator computes from a device value (propagated through every ATen op,
  in-place ones included, by a ``TorchDispatchMode``);
* **the transfer**: what ``gradscope.host_copy.copy_to_host`` hands back is host
  memory (on CUDA a non-blocking copy into pinned memory, read once an event
  says it landed): the one sanctioned way from device to host;
* **host-born tensors**: tensors made from Python data (``aten::lift_fresh``)
  while the guard is on, and what is computed from them alone, except what
  ``gradscope.host_copy.copy_to_device`` returns (on CUDA a non-blocking copy
  from pinned memory): the one sanctioned way from host to device.

A violation is a host read of a device value (Python-level conversions, or
``aten::_local_scalar_dense``; a copy to the CPU is seen when it is read), or an
operator that mixes a host-born tensor with a device value (a host-to-device
copy on CUDA).  Each is recorded with the gradscope frames that caused it.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import gradscope.host_copy

DEVICE = "_gradscope_device_value"
HOST_BORN = "_gradscope_host_born"
_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def _mark(tensor: torch.Tensor, attr: str) -> None:
    setattr(tensor, attr, True)


def _has(tensor: Any, attr: str) -> bool:
    return isinstance(tensor, torch.Tensor) and getattr(tensor, attr, False)


def _where() -> str:
    frames = [f for f in traceback.extract_stack() if "/gradscope/" in f.filename and "/tests/" not in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/gradscope/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-5:]))


@dataclass
class Traffic:
    """What crossed, one line per kind of violation and place (with a count)."""

    violations: dict[str, int] = field(default_factory=dict)

    def add(self, what: str) -> None:
        line = f"{what} at {_where() or '(outside gradscope)'}"
        self.violations[line] = self.violations.get(line, 0) + 1

    def mark_device(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            _mark(tensor, DEVICE)


class _Propagate(TorchDispatchMode):
    def __init__(self, traffic: Traffic) -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        device = any(_has(t, DEVICE) for t in tensors)
        name = func.overloadpacket.__name__
        if device and name == "_local_scalar_dense":
            self.traffic.add("a device value read on the host (_local_scalar_dense)")
        if device and any(_has(t, HOST_BORN) for t in tensors):
            self.traffic.add("a tensor made from host data used in device work (a host-to-device copy)")
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name in ("lift_fresh", "lift_fresh_copy") or (not device and any(_has(t, HOST_BORN) for t in tensors)):
            for t in outs:  # made from host data, or computed from such alone
                _mark(t, HOST_BORN)
        elif device:
            for t in outs:
                _mark(t, DEVICE)
            if name.endswith("_") or "out" in kwargs:  # in place: what was written holds device values now
                for t in tensors[:1] + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]:
                    _mark(t, DEVICE)
        return out


@contextlib.contextmanager
def device_traffic(monkeypatch: pytest.MonkeyPatch) -> Iterator[Traffic]:
    """Track device values and host reads while the block runs (see the module docstring)."""
    traffic = Traffic()
    real_copy = gradscope.host_copy.copy_to_host

    def transfer(vector: torch.Tensor, buffers: gradscope.host_copy.HostBuffers) -> gradscope.host_copy.HostCopy:
        copy = real_copy(vector, buffers)
        values = copy.values.clone() if copy.values is vector else copy.values  # host memory of its own
        for attr in (DEVICE, HOST_BORN):
            if hasattr(values, attr):
                delattr(values, attr)
        return gradscope.host_copy.HostCopy(values, copy.event)

    def guarded(name: str) -> Any:
        real = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if _has(self, DEVICE):
                traffic.add(f"a device value read on the host (Tensor.{name})")
            return real(self, *args, **kwargs)

        return read

    real_to_device = gradscope.host_copy.copy_to_device

    def to_device(values: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        tensor = real_to_device(values, device, dtype)
        if hasattr(tensor, HOST_BORN):
            delattr(tensor, HOST_BORN)  # staged through pinned memory on CUDA: no stall
        return tensor

    with monkeypatch.context() as patch:
        patch.setattr(gradscope.host_copy, "copy_to_host", transfer)
        patch.setattr(gradscope.host_copy, "copy_to_device", to_device)
        for name in _READS:
            patch.setattr(torch.Tensor, name, guarded(name))
        with _Propagate(traffic):
            yield traffic


class SequenceNet(nn.Module):
    """A model that reaches every path between device and host: Conv + BatchNorm +
    ReLU, a GRU (time profiles, the recurrent diagnosis), a PReLU after a Linear
    (a learnt slope the diagnosis reads) and a Linear head.  Input (batch,
    ``channels``, time)."""

    def __init__(self, channels: int = 4, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, width, 3, padding=1)
        self.bn = nn.BatchNorm1d(width)
        self.act = nn.ReLU()
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.fc = nn.Linear(width, width)
        self.prelu = nn.PReLU()
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv(x))).transpose(1, 2)
        out, _ = self.rnn(h)
        return self.head(self.prelu(self.fc(out[:, -1])))
