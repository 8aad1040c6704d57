"""The recorder's taps on sequence layers: gradient RMS per time step.

Which layers: every ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (time axis 1 with
``batch_first``, else 0; 0 for an unbatched 2-D input), plus the modules the
user marks with ``sequence_modules={"name": time_dim}`` (the time axis of the
module's first input and of its output).

What is measured, per call, on the device (``gradscope.timeprofile``):

* ``gradient``: ∂ℓ/∂(output)_t, the gradient the layers above send to each step
  of the output (where the loss enters the sequence);
* ``input_gradient``: ∂ℓ/∂x_t, the gradient that reached each step of the
  input.  For a recurrent layer this is the one that has gone through time:
  a fused ``nn.RNN`` carries ∂ℓ/∂h_{t+1} -> ∂ℓ/∂h_t inside its own kernel, so
  the output gradient alone never shows the recurrence, while ∂ℓ/∂x_t =
  W_ihᵀ·diag(f'(a_t))·∂ℓ/∂h_t carries ∂ℓ/∂h_t's through-time factor.

An input that does not require grad (raw features into the first layer) is
replaced, while recording, by ``x.detach().requires_grad_()``: the same values
and the same parameter gradients, plus the input gradient the layer computes
anyway for every layer but the first.  Nothing is kept: the hooks live on the
autograd graph and die with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradscope import host_copy
from gradscope.errors import GradscopeError
from gradscope.host_copy import HostBuffers, HostCopy
from gradscope.timeprofile import TimeProfile, time_sums


def recurrent_time_dim(module: nn.Module, tensor: torch.Tensor) -> int:
    """The time axis of an ``nn.RNNBase`` input/output tensor."""
    if tensor.dim() < 3:
        return 0  # unbatched: (T, features)
    return 1 if getattr(module, "batch_first", False) else 0


class SequenceTaps:
    """Per-time-step gradient profiles of the sequence layers among the hooked modules."""

    def __init__(
        self,
        model: nn.Module,
        selected: Sequence[tuple[str, nn.Module]],
        marked: Mapping[str, int] | None,
        is_closed: Callable[[], bool],
        note: Callable[[str], None],
    ) -> None:
        every = {(name or "model"): (name, module) for name, module in model.named_modules()}
        chosen = {name for name, _ in selected}
        self.marked: dict[str, int] = {}
        self.extra: list[tuple[str, nn.Module]] = []  # marked modules the selection left out
        for label, dim in (marked or {}).items():
            if label not in every:
                raise GradscopeError(
                    f"sequence_modules: the model has no module named {label!r}; "
                    f"use a qualified name from model.named_modules() (the model itself is 'model')"
                )
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
                raise GradscopeError(f"sequence_modules: time axis of {label!r} must be an int >= 0, not {dim!r}")
            name, module = every[label]
            self.marked[name] = dim
            if name not in chosen:
                self.extra.append((name, module))
        selected = [*selected, *self.extra]
        self.names = {name for name, module in selected if isinstance(module, nn.RNNBase)} | set(self.marked)
        self._is_closed = is_closed
        self._pending: list[tuple[str, str, list[int], int, torch.Tensor]] = []
        self._note = note

    def _time_dim(self, name: str, module: nn.Module, tensor: torch.Tensor) -> int | None:
        dim = self.marked[name] if name in self.marked else recurrent_time_dim(module, tensor)
        return dim if tensor.dim() > dim and tensor.shape[dim] > 0 else None

    def pre_hook(self, name: str, recording: Callable[[], bool]) -> Callable[..., Any]:
        """A forward pre-hook giving the input a gradient while recording (see module doc)."""

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not args or not recording() or not torch.is_grad_enabled():
                return None
            x = args[0]
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
                return (x.detach().requires_grad_(True), *args[1:])
            return None

        return hook

    def on_forward(self, key: str, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Register the time-profile gradient hooks of one call (a recorded forward)."""
        if not torch.is_grad_enabled():
            return
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            # A PackedSequence (or keyword input): its data is not laid out along one time axis.
            what = type(x).__name__ if x is not None else "keyword argument"
            self._note(f"{key}: its input is a {what}, not a tensor: gradients not measured along time")
            return
        dim = self._time_dim(name, module, output)
        if dim is not None and output.requires_grad:
            output.register_hook(self._hook(key, "gradient", list(output.shape), dim))
        dim = self._time_dim(name, module, x)
        if dim is not None and x.requires_grad:
            x.register_hook(self._hook(key, "input_gradient", list(x.shape), dim))

    def _hook(self, key: str, role: str, shape: list[int], dim: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not self._is_closed():
                self._pending.append((key, role, shape, dim, time_sums(grad, dim)))

        return hook

    def take(self) -> list[tuple[str, str, list[int], int, torch.Tensor]]:
        """The pending profiles, still on the device."""
        pending, self._pending = self._pending, []
        return pending

    def launch(self, buffers: HostBuffers) -> LaunchedProfiles:
        """The pending profiles on their way to the host: one packed copy per
        device started now (``gradscope.host_copy``: pinned memory and an event on
        CUDA), read by ``flush`` one flush later without draining the stream."""
        pending = self.take()
        copies = host_copy.copy_by_device([entry[4].reshape(-1) for entry in pending], buffers)
        return LaunchedProfiles([entry[:4] for entry in pending], copies)

    def flush(self, launched: LaunchedProfiles | None = None) -> list[tuple[str, str, TimeProfile]]:
        """The profiles of ``launched`` (default: those pending now) on the host."""
        if launched is None:
            launched = self.launch(HostBuffers())
        if not launched.entries:
            return []
        rows: list[torch.Tensor] = [torch.empty(0)] * len(launched.entries)
        for indices, copy in launched.copies:
            values = copy.wait().reshape(len(indices), -1)
            for i, row in zip(indices, values, strict=True):
                rows[i] = row
        return [
            (key, role, TimeProfile.from_sums(row, shape, dim))
            for (key, role, shape, dim), row in zip(launched.entries, rows, strict=True)
        ]


@dataclass
class LaunchedProfiles:
    """Time profiles whose copy to the host has started: (site, role, shape,
    time dim) of each, and per device the row indices and their packed copy."""

    entries: list[tuple[str, str, list[int], int]]
    copies: list[tuple[list[int], HostCopy]]
