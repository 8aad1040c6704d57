"""The model tensors the diagnosis reads, copied to the host with the flush.

During a watched run the diagnosis (every full flush) reads a few of the
model's own tensors: the recurrent weights ``weight_hh_l*`` / ``weight_hr_l*``
of an RNN, LSTM or GRU (their spectral radius and norm,
``gradscope.diagnose.recurrent``) and the learnt slope of a PReLU
(``DiagnosisContext.negative_slope``).  Read from the module when the flush is
read, each was a device-to-host copy that drains a CUDA stream (and, read one
flush late, described weights the optimizer had already changed).  Instead
they are packed into one vector at the full flush's launch, copied without
blocking like the flush itself (``gradscope.host_copy``), and the diagnosis
reads them through ``HostModel``: the model with those tensors answered from
the host copy and everything else (sizes, flags) from the module.

Sharded parameters (DTensor) are gathered whole with ``full_tensor()`` at
launch, a collective every rank of a watched run reaches together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradscope import host_copy
from gradscope.diagnose.recurrent import RECURRENT_TYPES
from gradscope.host_copy import HostBuffers, HostCopy
from gradscope.placement import whole_tensor
from gradscope.record import LayerRecord


def _read_tensors(module: nn.Module, layer_type: str) -> list[str]:
    """Names of ``module``'s own parameters the diagnosis reads."""
    names = [name for name, _ in module.named_parameters(recurse=False)]
    if layer_type in RECURRENT_TYPES:
        return [n for n in names if n.startswith(("weight_hh_l", "weight_hr_l"))]
    if layer_type == "PReLU":
        return [n for n in names if n == "weight"]
    return []


@dataclass
class SnapshotLaunch:
    """The copy of the snapshot on its way: per device, which (module, name, shape)
    lie where in the packed vector."""

    parts: list[tuple[list[tuple[str, str, torch.Size]], HostCopy]]

    def ready(self) -> bool:
        return all(copy.ready() for _, copy in self.parts)

    def host_model(self, model: nn.Module) -> HostModel:
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for entries, copy in self.parts:
            values = copy.wait()
            offset = 0
            for module_name, name, shape in entries:
                size = shape.numel()
                tensors.setdefault(module_name, {})[name] = values[offset : offset + size].view(shape)
                offset += size
        return HostModel(model, tensors)


def launch_snapshot(model: nn.Module, layers: list[LayerRecord], buffers: HostBuffers) -> SnapshotLaunch | None:
    """Start the copy of the tensors the diagnosis will read (device work only)."""
    entries: list[tuple[str, str, torch.Size]] = []
    values: list[torch.Tensor] = []
    seen: set[str] = set()
    for layer in layers:
        if layer.module in seen or layer.call != 1:
            continue
        seen.add(layer.module)
        try:
            module = model if layer.module == "model" else model.get_submodule(layer.module)
        except AttributeError:
            continue
        for name in _read_tensors(module, layer.type):
            value = whole_tensor(getattr(module, name))
            entries.append((layer.module, name, value.shape))
            values.append(value.reshape(-1))
    if not values:
        return None
    copies = host_copy.copy_by_device(values, buffers)
    return SnapshotLaunch([([entries[i] for i in indices], copy) for indices, copy in copies])


class HostModule:
    """A module whose snapshotted tensors are answered from the host copy."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self._module = module
        self._tensors = tensors

    def __getattr__(self, name: str) -> Any:
        tensors = self.__dict__.get("_tensors", {})
        if name in tensors:
            return tensors[name]
        return getattr(self.__dict__["_module"], name)

    def named_parameters(self, recurse: bool = False) -> Any:
        """The snapshotted parameters only: nothing else may be read on the host."""
        return iter(self._tensors.items())


class HostModel:
    """The model as the diagnosis sees it during a watched run (see the module docstring)."""

    def __init__(self, model: nn.Module, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        self._model = model
        self._tensors = tensors

    def get_submodule(self, name: str) -> Any:
        module = self._model.get_submodule(name)
        tensors = self._tensors.get(name)
        return HostModule(module, tensors) if tensors is not None else module

    def named_parameters(self, prefix: str = "", recurse: bool = True, **kwargs: Any) -> Any:
        root = self._tensors.get("model")
        if root is not None and not recurse:  # the model itself is the RNN / PReLU
            return iter(root.items())
        return self._model.named_parameters(prefix, recurse, **kwargs)

    def __getattr__(self, name: str) -> Any:
        root = self.__dict__["_tensors"].get("model", {})
        if name in root:
            return root[name]
        return getattr(self.__dict__["_model"], name)
