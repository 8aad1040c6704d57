"""Where did the first NaN/Inf come from?  Search one flush's record in the
order things happen in a training step.

Order of events in a step: the weights exist first (a previous update may have
written NaN into them), then the forward computes activations in execution
order, then the loss, then the backward computes ∂ℓ/∂h in reverse execution
order, then the weight gradients.  The first non-finite tensor in that order is
where the trouble starts; whether that layer *produced* it or *received* it is
read from its neighbour in the same order: an activation is received when the
layer that ran just before it (or the model input, or the layer's own weight)
was already non-finite.  For a network with branches "the layer that ran just
before" is an approximation of "the layer that fed it" (stated in the record).
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import nn

from gradscope.outputs import first_float_tensor
from gradscope.record import LayerRecord, Record
from gradscope.stats import Stats, _native


def _loss_record(step: int) -> dict[str, Any]:
    """The record of a non-finite loss whose every recorded activation was finite."""
    return {
        "step": step,
        "layer": None,
        "type": None,
        "role": "loss",
        "dtype": None,
        "origin": "produced",
        "source": "the loss function (every recorded activation was finite)",
        "nonfinite_count": 1,
        "has_nan": None,
        "has_inf": None,
        "count": 1,
    }


# Parameter-free layers whose output is finite whenever their input is: each
# output element is bounded by its input's magnitude or by a constant
# (|relu(x)| <= |x|, |x·sigmoid(x)| <= |x|, |tanh(x)| <= 1, softmax in [0, 1]
# with the max subtracted first, a max-pool picks an input element, a reshape
# moves them).  Not here: anything that scales up (Dropout divides by 1 - p,
# SELU multiplies by 1.05: both can overflow fp16), averages (an fp16 sum can
# overflow) or takes a log (LogSoftmax).
_PASSES_FINITE = frozenset(
    {
        "ReLU", "ReLU6", "Hardtanh", "Sigmoid", "Tanh", "Hardsigmoid", "Hardswish", "SiLU", "GELU", "Mish",
        "Softsign", "Tanhshrink", "Softshrink", "Hardshrink", "ELU", "CELU", "Identity", "Flatten", "Unflatten",
        "MaxPool1d", "MaxPool2d", "MaxPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
        "Softmax", "Softmin",
    }
)  # fmt: skip


@cache
def _passive_class(cls: Any) -> bool:
    return cls.__module__.startswith("torch.nn.modules") and cls.__name__ in _PASSES_FINITE


def passes_finite(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch.nn's layers that cannot make a finite input
    non-finite (above; LeakyReLU when its slope is at most 1).  torch.nn's own
    classes only: a subclass may override ``forward``.  Called in the forward hook
    of every passive layer on unsampled steps: one cached lookup per class."""
    cls: Any = type(module)
    if cls is nn.LeakyReLU:
        return abs(float(module.negative_slope)) <= 1.0  # type: ignore[arg-type]
    return _passive_class(cls)


def _bad(stats: Stats | None) -> bool:
    return stats is not None and stats.nonfinite_count > 0


def _describe(
    layer: LayerRecord,
    role: str,
    stats: Stats | None,
    step: int,
    origin: str,
    source: str | None,
    weight_dtypes: dict[str, str] | None = None,
) -> dict[str, Any]:
    if role in ("activation", "gradient"):
        dtype = layer.output_dtype
    else:
        dtype = (weight_dtypes or {}).get(layer.name)
    return {
        "step": step,
        "layer": layer.name,
        "type": layer.type,
        "role": role,
        "dtype": dtype,
        "origin": origin,  # "produced" or "received"
        "source": source,  # what it came from (received) or which computation made it (produced)
        # The callers checked the statistics exist; None only reads as "unknown".
        "nonfinite_count": stats.nonfinite_count if stats is not None else None,
        "has_nan": stats.has_nan if stats is not None else None,
        "has_inf": stats.has_inf if stats is not None else None,
        "count": stats.count if stats is not None else None,
    }


def first_nonfinite(
    record: Record,
    step: int,
    *,
    loss_finite: bool | None = None,
    include_gradients: bool = True,
    weight_dtypes: dict[str, str] | None = None,
    input_finite: bool | None = None,
) -> dict[str, Any] | None:
    """The first non-finite tensor of one step's record, or None.

    ``weight_dtypes`` maps layer names to their weight's dtype (for the weight
    roles).  ``include_gradients=False`` ignores ∂ℓ/∂h and weight gradients (used under a
    GradScaler, whose overflowing steps are expected and skipped by the scaler).
    ``input_finite``: whether the input of the first layer was finite, when the
    record has no model-input statistics (the model itself was not called, as
    under Lightning); None = not observed, which is never read as either.
    """
    layers = sorted(record.layers, key=lambda layer: layer.index)
    for layer in layers:
        if _bad(layer.weight):
            source = "the previous optimizer update"
            return _describe(layer, "weight", layer.weight, step, "produced", source, weight_dtypes)
    previous: LayerRecord | None = None
    for layer in layers:
        act = layer.activation
        if _bad(act):
            if previous is None:
                known = record.input is not None or input_finite is not None
                received = _bad(record.input) if record.input is not None else input_finite is False
                if not known:
                    source = f"the forward of {layer.name} or its input (the input was not observed)"
                    return _describe(layer, "activation", act, step, "unknown", source)
                source = f"the input of {layer.name}" if received else f"the forward of {layer.name}"
            else:
                received = _bad(previous.activation)
                source = previous.name if received else f"the forward of {layer.name}"
            return _describe(layer, "activation", act, step, "received" if received else "produced", source)
        if act is not None:
            previous = layer
    if loss_finite is False:
        return _loss_record(step)
    if not include_gradients:
        return None
    with_grad = [layer for layer in layers if layer.gradient is not None]
    for position in range(len(with_grad) - 1, -1, -1):  # backward runs in reverse order
        layer = with_grad[position]
        if _bad(layer.gradient):
            after = with_grad[position + 1] if position + 1 < len(with_grad) else None
            if after is None:
                origin, source = "produced", "the backward of the loss"
            elif _bad(after.gradient):  # pragma: no cover - the search order makes this impossible
                origin, source = "received", after.name
            elif _bad(after.weight_grad):
                # One backward made both: the layer after took a finite ∂ℓ/∂h and gave out a
                # non-finite weight gradient and ∂ℓ/∂h.  Named there, as the per-step check of
                # an unsampled step names it (by that weight gradient): one event, one layer.
                source = (
                    f"the backward of {after.name}: its ∂ℓ/∂h was finite, its weight gradient and the "
                    f"∂ℓ/∂h it passed back to {layer.name} are not"
                )
                return _describe(after, "weight_grad", after.weight_grad, step, "produced", source, weight_dtypes)
            else:
                origin, source = "produced", f"the backward of {after.name}"
            return _describe(layer, "gradient", layer.gradient, step, origin, source)
    for layer in reversed(layers):  # backward order: the deepest first
        if _bad(layer.weight_grad):
            received = _bad(layer.gradient)
            source = f"∂ℓ/∂h of {layer.name}" if received else f"the weight-gradient computation of {layer.name}"
            origin = "received" if received else "produced"
            return _describe(layer, "weight_grad", layer.weight_grad, step, origin, source, weight_dtypes)
    return None


# -- the per-step check ------------------------------------------------------
#
# A sampled step is searched through its full record at its flush.  Every other
# step leaves a few device scalars behind, with no host sync: the loss, the
# global gradient norm (already computed every step from exact per-parameter
# norms), and the extremes of each hooked layer's output and of each forward's
# input (one ``aminmax`` per tensor, NaN-propagating: a NaN or inf element makes
# the min or the max non-finite, and finite elements never do, whatever their
# size).  fp8 has no aminmax kernel: its flag is its float32 sum, which NaN and
# inf propagate through and which cannot overflow (57,344 x 2^63 < 3.4e38).
# Why extremes and not a sum: a float32 sum of fp32 values overflows to inf on
# finite values (2,048 elements of 2e35, or an attention score tensor filled
# with finfo.min), a false alarm that would stop a healthy run; a float64 sum
# cannot overflow but costs 3-4x the float32 one on the CPU (77 vs 24 us for
# 256x1024, 141 vs 37 us for a 32x64x16x16 conv output; aminmax 31 and 68 us,
# and 24 us against 44 for fp16), which put watch(every=10) at 1.23x the bare
# MLP step and 1.28x the CNN step (measured 2026-12-01, torch 2.13, 2 threads).
# Each pair is written into preallocated device rows of its dtype (``out=``:
# one kernel per layer, nothing allocated, no Python object per layer but the
# name); nothing is read in the hook.  The step's flag is the largest magnitude
# in those rows (a max: finite cells never add up to inf) plus the loss and the
# norm, in float64; it is copied into a host buffer and read:
#   * on the CPU at once (there is nothing to wait for), so training stops at
#     the step that went non-finite, before ``optimizer.step()`` applies it;
#   * on an accelerator once the copy has landed (``Event.query()``), at the
#     next ``step()`` call or at ``close()``, so the GPU's queue never drains.
#     The error then names the step that went non-finite, one step late.
# Only when the number is non-finite are the step's per-layer flags read back
# and searched (``locate_step``).  A sum of finite loss, norm and largest
# magnitude that still overflows (float64 values near 1.8e308, or float32 on
# MPS, which has no float64) is a flag the search finds finite: ``locate_step``
# returns None and nothing is said.
# Under torch.compile the pairs are ordinary graph outputs (no ``out=`` into a
# buffer Dynamo would have to guard), collected the same way.

PENDING_CHECKS = 4  # unsampled steps whose flag may be in flight at once
FLAG_SLOTS = 64  # initial per-step capacity of the flag buffer (grown by doubling)


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a value of ``device`` costs no pipeline stall (the CPU runs ops synchronously)."""
    return device.type == "cpu"


def _completion_event(device: torch.device) -> Any:
    """An event recorded after the flag's copy, to ask without blocking whether it
    landed; None when the copy was synchronous (the CPU, and accelerators other
    than CUDA, whose copy to the host blocks)."""
    if reads_are_free(device) or device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype the step's flags are added up in: float64, where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class _Rows:
    """A device matrix of (min, max) rows in one dtype, and views of each row's two
    cells, made once and reused (writing into a view allocates nothing)."""

    def __init__(self, dtype: torch.dtype, device: torch.device, capacity: int) -> None:
        self.values = torch.zeros(capacity, 2, dtype=dtype, device=device)
        self.pairs = [tuple(row.unbind(0)) for row in self.values.unbind(0)]
        self.used = 0

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.used == len(self.pairs):  # more hooked calls than rows: double (rare, once)
            grown = torch.zeros(2 * len(self.pairs), 2, dtype=self.values.dtype, device=self.values.device)
            grown[: self.used].copy_(self.values)
            self.values = grown
            self.pairs = [tuple(row.unbind(0)) for row in grown.unbind(0)]
        pair = self.pairs[self.used]
        self.used += 1
        return pair  # type: ignore[return-value]


class FlagBuffer:
    """One step's per-output flags, in preallocated device rows: one matrix per
    input dtype for the extremes (``aminmax`` writes in its input's dtype) and
    one float32 matrix for the sums of fp8 outputs."""

    def __init__(self, device: torch.device, capacity: int = FLAG_SLOTS) -> None:
        self.device = device
        self.capacity = capacity
        self._rows: dict[tuple[torch.dtype, bool], _Rows] = {}
        self.used = 0

    def reset(self) -> None:
        self.used = 0
        for rows in self._rows.values():
            rows.used = 0

    def write(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flag of ``tensor`` in the next row of its dtype: its (min, max), or
        for fp8 its float32 sum twice (fp8's largest value, 57,344, times 2^63
        elements stays below float32's maximum, so the sum cannot overflow)."""
        extremes = _native(tensor.dtype)
        key = (tensor.dtype if extremes else torch.float32, extremes)
        rows = self._rows.get(key)
        if rows is None:
            rows = self._rows[key] = _Rows(key[0], self.device, self.capacity)
        lo, hi = rows.take()
        self.used += 1
        if extremes:
            torch.aminmax(tensor, out=(lo, hi))
            return lo, hi
        torch.sum(tensor, dim=(), dtype=torch.float32, out=lo)
        return lo, lo

    def holds(self) -> set[int]:
        """Ids of the cells written this step (flags outside them are added apart)."""
        return {id(cell) for rows in self._rows.values() for pair in rows.pairs[: rows.used] for cell in pair}

    def total(self) -> torch.Tensor:
        """The largest magnitude of every written cell (a max, not a sum: cells near
        the dtype's maximum cannot add up to inf), NaN as soon as one cell is NaN
        (amax propagates NaN) and inf as soon as one is ±inf."""
        dtype = _sum_dtype(self.device)
        used = [rows.values.narrow(0, 0, rows.used) for rows in self._rows.values() if rows.used]
        parts = [cells.abs().amax().to(dtype) for cells in used]
        return parts[0] if len(parts) == 1 else torch.stack(parts).amax()


def _flags(tensor: torch.Tensor, buffer: FlagBuffer | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The flag pair of ``tensor`` (see the comment above), written into ``buffer``
    when it is on the buffer's device; queued, not read."""
    flat = tensor.detach()  # out= refuses inputs that require grad
    if flat.numel() == 0:
        return None
    if torch.compiler.is_compiling() or buffer is None or flat.device != buffer.device:
        if _native(flat.dtype):
            lo, hi = torch.aminmax(flat)
            return lo, hi
        total = flat.sum(dtype=torch.float32)
        return total, total
    return buffer.write(flat)


class ForwardSentinel:
    """The forward-hook side of the check: called by the Recorder for every hooked
    call (``Recorder.sentinel``).

    For each forward it keeps a flag of the first hooked layer's input (None
    when that input holds no floating-point tensor: token ids are finite by
    type), and, on forwards the Recorder does not record, a flag of each hooked
    output in execution order.  A flag is a (min, max) pair of device scalars,
    finite iff the tensor is (for fp8 its sum, twice), which is all the search
    reads.  Nothing is read on the host here.

    A layer that cannot turn finite values into NaN/inf (``passes_finite``) and
    whose input is the output just flagged is not flagged again: its output is
    non-finite only if that input was, so the search names the same layer
    without it, and the CNN benchmark's unsampled step reads 6 of its 18 large
    activations less (one in-place ReLU after each BatchNorm).
    """

    def __init__(self) -> None:
        self.enabled = True  # False while the scope is paused (evaluation forwards)
        self.activations: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.inputs: list[tuple[str, tuple[torch.Tensor, torch.Tensor] | None]] = []
        # where each input's forward starts in ``activations``: with gradient accumulation
        # a step runs several forwards whose layers have the same names
        self.input_starts: list[int] = []
        self.starts_taken: list[int] = []  # ``input_starts`` of the step ``take`` handed over last
        self.buffer: FlagBuffer | None = None  # this step's slots (see FlagBuffer)
        self._free: list[FlagBuffer] = []  # buffers whose step was read, for reuse
        self._calls: dict[str, int] = {}
        self._forward_start = True
        self._last_flagged: weakref.ref | None = None  # the output flagged last (not kept alive)

    def begin_forward(self) -> None:
        """A new forward starts (root forward pre-hook, ``Scope.mark_forward``)."""
        self._forward_start = True
        self._calls.clear()
        self._last_flagged = None

    def _flag(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.buffer is None and not torch.compiler.is_compiling():
            self.buffer = self._free.pop() if self._free else FlagBuffer(tensor.device)
            self.buffer.reset()
        return _flags(tensor, self.buffer)

    def forward(self, name: str, module: nn.Module, args: Any, output: Any, recording: bool) -> None:
        if not self.enabled:
            return
        shown = name or "model"
        call = self._calls.get(shown, 0) + 1
        self._calls[shown] = call
        key = shown if call == 1 else f"{shown}#{call}"
        if self._forward_start:
            self._forward_start = False
            found = first_float_tensor(args)
            self.inputs.append((key, self._flag(found[0]) if found is not None else None))
            self.input_starts.append(len(self.activations))
        if recording:
            return  # the Recorder takes the exact extremes itself
        found = first_float_tensor(output)
        if found is None:
            return
        compiling = torch.compiler.is_compiling()
        if not compiling and self._last_flagged is not None and passes_finite(module):
            arg = first_float_tensor(args)
            if arg is not None and arg[0] is self._last_flagged():
                return  # finite in, finite out: the flag of its input says it all
        flag = self._flag(found[0])
        if flag is not None:
            self.activations.append((key, *flag))
            if not compiling:
                self._last_flagged = weakref.ref(found[0])

    def take(self) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor]], list[Any], FlagBuffer | None]:
        """This step's flags and the buffer that holds them; the next step starts empty."""
        activations, inputs, buffer = self.activations, self.inputs, self.buffer
        self.starts_taken, self.input_starts = self.input_starts, []
        self.activations, self.inputs, self.buffer = [], [], None
        self.begin_forward()
        return activations, inputs, buffer

    def release(self, buffer: FlagBuffer | None) -> None:
        """A step's buffer was read: reuse it (bounded by PENDING_CHECKS + 1 in flight)."""
        if buffer is not None and len(self._free) <= PENDING_CHECKS:
            self._free.append(buffer)


@dataclass
class StepFlags:
    """What one unsampled step left on the device for the check (a few scalars
    and the per-parameter squared gradient norms; no activation is kept)."""

    step: int
    loss: torch.Tensor | float | None
    names: list[str]  # parameter names of ``squares``
    squares: torch.Tensor | None  # exact squared gradient norm per parameter (None: not measured)
    activations: list[tuple[str, torch.Tensor, torch.Tensor]]
    inputs: list[Any]
    slot: int
    event: Any = None
    same_step: bool = True  # read before optimizer.step() of this step (weights and .grad unchanged)
    buffer: FlagBuffer | None = None  # holds the activation and input flags until the step is read
    input_starts: list[int] = field(default_factory=list)  # index in ``activations`` where each input's forward starts


@dataclass
class StepCheck:
    """The per-step non-finite check of a Scope (see the comment above)."""

    sentinel: ForwardSentinel = field(default_factory=ForwardSentinel)
    pending: deque[StepFlags] = field(default_factory=deque)
    _host: torch.Tensor | None = None
    _host_view: Any = None
    _next_slot: int = 0

    def discard(self) -> list[Any]:
        """Drop the activation flags of a sampled step (its record has them); return its input flags."""
        # ``inputs`` views the buffer; the flush reads them within this step() call,
        # before the next forward writes into the buffer again.
        _, inputs, buffer = self.sentinel.take()
        self.sentinel.release(buffer)
        return inputs

    def record(
        self,
        step: int,
        loss: torch.Tensor | float | None,
        names: list[str],
        squares: torch.Tensor | None,
        total: torch.Tensor | None = None,
    ) -> None:
        """Queue the flag of unsampled step ``step`` (device ops and one copy, no sync).

        ``squares``: the per-parameter squared gradient norms (kept for the search);
        ``total``: the global norm the Scope computed from them (non-finite exactly
        when one of them is), so the flag costs no reduction of its own.
        """
        activations, inputs, buffer = self.sentinel.take()
        # What the buffer holds is summed at once; flags outside it (another
        # device, a compiled region) and the step's scalars are added to that sum.
        parts: list[torch.Tensor] = [buffer.total()] if buffer is not None and buffer.used else []
        in_buffer = set() if buffer is None else buffer.holds()
        pairs = [(lo, hi) for _, lo, hi in activations] + [pair for _, pair in inputs if pair is not None]
        parts += [cell for pair in pairs if id(pair[0]) not in in_buffer for cell in pair]
        host_loss = loss if loss is not None and not isinstance(loss, torch.Tensor) else None
        if isinstance(loss, torch.Tensor):
            parts.append(loss)
        if total is not None:
            parts.append(total)
        elif squares is not None and squares.numel():
            parts.append(squares.sum())
        if not parts and host_loss is None:
            self.sentinel.release(buffer)
            return
        device = parts[0].device if parts else torch.device("cpu")
        flag = parts[0].reshape(()).to(_sum_dtype(device)) if parts else torch.zeros((), dtype=torch.float64)
        for part in parts[1:]:
            flag = flag + part.reshape(()).to(device=device, dtype=flag.dtype)
        if host_loss is not None:
            flag = flag + host_loss  # a Python number: a kernel argument, no host-to-device copy
        host = self._buffer(device)
        slot = self._next_slot
        self._next_slot = (slot + 1) % PENDING_CHECKS
        host[slot : slot + 1].copy_(flag.reshape(1), non_blocking=device.type == "cuda")
        event = _completion_event(device)
        self.pending.append(
            StepFlags(
                step,
                loss,
                names,
                squares,
                activations,
                inputs,
                slot,
                event,
                same_step=reads_are_free(device),
                buffer=buffer,
                input_starts=self.sentinel.starts_taken,
            )
        )

    def _buffer(self, device: torch.device) -> torch.Tensor:
        if self._host is None:
            self.prepare(device)
        assert self._host is not None
        return self._host

    def prepare(self, device: torch.device) -> None:
        """Allocate the host buffer the flags land in (pinned for CUDA, so the copy
        is asynchronous) and its numpy view, read without a Tensor method."""
        # float64: a finite float64 sum above fp32's range must not read as inf.
        self._host = torch.zeros(PENDING_CHECKS, dtype=torch.float64, pin_memory=device.type == "cuda")
        self._host_view = self._host.numpy()

    def poll(self, wait: bool = False) -> StepFlags | None:
        """The first pending step whose flag has landed and is non-finite, or None.

        Clean steps are dropped.  ``wait=True`` waits for every flag (flush,
        close); otherwise only for the oldest when PENDING_CHECKS are in flight
        (its host slot is about to be reused), which bounds the lag.
        """
        while self.pending:
            flags = self.pending[0]
            if flags.event is not None and not flags.event.query():
                if not wait and len(self.pending) < PENDING_CHECKS:
                    return None
                flags.event.synchronize()
            self.pending.popleft()
            if not math.isfinite(float(self._host_view[flags.slot])):
                return flags
            self.sentinel.release(flags.buffer)
        return None

    def clear(self) -> None:
        self.pending.clear()


def _host_extremes(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[bool]:
    """Whether each (lo, hi) pair is finite, in one transfer (slow path only)."""
    if not pairs:
        return []
    values = torch.stack([torch.stack([lo.detach().cpu().double(), hi.detach().cpu().double()]) for lo, hi in pairs])
    return torch.isfinite(values).all(dim=1).tolist()


def nonfinite_kinds(tensor: torch.Tensor) -> tuple[bool, bool]:
    """(has NaN, has inf) of ``tensor``, read now (slow path only)."""
    with torch.no_grad():
        return bool(torch.isnan(tensor).any()), bool(torch.isinf(tensor).any())


@dataclass(frozen=True)
class LayerInfo:
    """A hooked layer as the Scope knows it: its call-site name, module and type."""

    name: str
    module: str
    type: str
    index: int
    dtype: str | None = None  # of the output


def owner_of(parameter: str, modules: dict[str, LayerInfo]) -> LayerInfo | None:
    """The hooked layer that owns ``parameter`` directly (``0.weight`` -> layer ``0``)."""
    module = parameter.rpartition(".")[0] or "model"
    return modules.get(module)


def locate_gradient(
    step: int,
    bad: Sequence[str],
    layers: Sequence[LayerInfo],
    *,
    dtypes: dict[str, str],
    elements: Callable[[str], tuple[bool, bool] | None],
    forward_finite: bool,
    gradient_bad: Callable[[str], bool | None] = lambda name: None,
) -> dict[str, Any] | None:
    """The first non-finite weight gradient in backward order (the deepest owner
    first), from the exact per-parameter norms.

    ``elements(param)`` is (has NaN, has inf) of the gradient's elements (both
    False: only the float32 sum of squares overflowed, not an event; None:
    cannot tell now); None when no parameter is left;
    ``gradient_bad(layer)`` whether ∂ℓ/∂h of that layer was non-finite (None:
    not recorded, as on unsampled steps).
    """
    # A gradient whose elements are all finite only overflowed float32's sum of
    # squares (norm above ~1.8e19): no NaN/Inf event (gradscope.watching.overflow).
    kinds_of = {p: elements(p) for p in bad}
    bad = [p for p, kinds in kinds_of.items() if kinds is None or any(kinds)]
    if not bad:
        return None
    modules = {layer.module: layer for layer in layers if layer.name == layer.module}
    ranked = sorted(bad, key=lambda p: -(owner.index if (owner := owner_of(p, modules)) is not None else -1))
    parameter = ranked[0]
    layer = owner_of(parameter, modules)
    name = layer.name if layer is not None else None
    kinds = kinds_of[parameter]
    upstream = gradient_bad(name) if name is not None else None
    if upstream is None and forward_finite and name is not None:
        origin = "received"
        source = (
            f"∂ℓ/∂h of {name}: the forward was finite, so the backward of {name} or of a layer after it made "
            "the gradient non-finite (∂ℓ/∂h is recorded on sampled steps only)"
        )
    elif upstream:
        origin, source = "received", f"∂ℓ/∂h of {name}"
    elif upstream is False:
        origin, source = "produced", f"the weight-gradient computation of {name}"
    else:
        origin, source = "unknown", f"the gradient of {parameter}"
    if kinds is None:
        source += " (its elements could not be read at this step: possibly only its float32 norm overflowed)"
    return {
        "step": step,
        "layer": name,
        "type": layer.type if layer is not None else None,
        "role": "weight_grad",
        "parameter": parameter,
        "dtype": dtypes.get(parameter),
        "origin": origin,
        "source": source + " (found by its exact gradient norm)",
        "nonfinite_count": None,
        "has_nan": kinds[0] if kinds is not None else None,
        "has_inf": kinds[1] if kinds is not None else None,
        "count": None,
    }


def _forward_of(index: int, starts: Sequence[int]) -> int | None:
    """Which forward of the step activation ``index`` belongs to (the last one started at or before it)."""
    found = None
    for forward, start in enumerate(starts):
        if start <= index:
            found = forward
    return found


def locate_step(
    flags: StepFlags,
    layers: Sequence[LayerInfo],
    params: Sequence[tuple[str, torch.Tensor, torch.Tensor | None]],
    *,
    include_gradients: bool,
) -> dict[str, Any] | None:
    """Where unsampled step ``flags.step`` went non-finite, in the order things
    happen in a step (weights, forward, loss, backward), or None when the flag
    was a false alarm (a finite sum that overflowed).

    Weights are read now: exact when the check ran before ``optimizer.step()``
    (``flags.same_step``); one step late, a weight made non-finite by this
    step's own update cannot be told from one that was before the forward, so
    a weight is blamed only together with the activation it spoiled.
    """
    step = flags.step
    by_module = {layer.module: layer for layer in layers if layer.name == layer.module}
    by_name = {layer.name: layer for layer in layers}
    dtypes = {name: str(p.dtype).removeprefix("torch.") for name, p, _ in params}
    with torch.no_grad():
        bad_weights = [name for name, p, _ in params if not bool(torch.isfinite(p).all())]
    act_ok = _host_extremes([(lo, hi) for _, lo, hi in flags.activations])
    input_ok = _host_extremes([extremes for _, extremes in flags.inputs if extremes is not None])
    input_iter = iter(input_ok)
    input_by_forward = [next(input_iter) if extremes is not None else True for _, extremes in flags.inputs]
    inputs = {key: ok for (key, _), ok in zip(flags.inputs, input_by_forward, strict=True)}
    first_bad = next((i for i, ok in enumerate(act_ok) if not ok), None)

    def weight_record(parameter: str, layer: LayerInfo | None) -> dict[str, Any]:
        update = "the previous optimizer update" if flags.same_step else "an optimizer update (at or before this step)"
        return {
            "step": step,
            "layer": layer.name if layer is not None else None,
            "type": layer.type if layer is not None else None,
            "role": "weight",
            "parameter": parameter,
            "dtype": dtypes.get(parameter),
            "origin": "produced",
            "source": update,
            "nonfinite_count": None,
            "has_nan": None,
            "has_inf": None,
            "count": None,
        }

    if bad_weights and flags.same_step:
        ranked = sorted(bad_weights, key=lambda p: o.index if (o := owner_of(p, by_module)) is not None else 1 << 30)
        return weight_record(ranked[0], owner_of(ranked[0], by_module))
    if first_bad is not None:
        key = flags.activations[first_bad][0]
        layer = by_name.get(key)
        module = layer.module if layer is not None else key.partition("#")[0]
        spoiled = [p for p in bad_weights if (p.rpartition(".")[0] or "model") == module]
        if spoiled:
            return weight_record(spoiled[0], layer)
        forward = _forward_of(first_bad, flags.input_starts) if len(flags.input_starts) == len(flags.inputs) else None
        if forward is not None:
            # The forward (micro-batch) the bad activation belongs to, by position: keyed by
            # layer name, a later micro-batch's finite input hid an earlier one's NaN.
            starts_forward = flags.input_starts[forward] == first_bad
            input_bad = input_by_forward[forward] is False
        else:
            starts_forward = key in inputs and (first_bad == 0 or flags.activations[first_bad - 1][0] not in inputs)
            input_bad = inputs.get(key) is False
        if first_bad == 0 or starts_forward:
            received = input_bad
            source = f"the input of {key}" if received else f"the forward of {key}"
        else:
            received = False  # the layer that ran just before was finite
            source = f"the forward of {key}"
        return {
            "step": step,
            "layer": key,
            "type": layer.type if layer is not None else None,
            "role": "activation",
            "dtype": layer.dtype if layer is not None else None,
            "origin": "received" if received else "produced",
            "source": source,
            "nonfinite_count": None,
            "has_nan": None,
            "has_inf": None,
            "count": None,
        }
    if not all(inputs.values()):
        key = next(k for k, ok in inputs.items() if not ok)
        layer = by_name.get(key)
        return {
            "step": step,
            "layer": key,
            "type": layer.type if layer is not None else None,
            "role": "input",
            "dtype": None,
            "origin": "received",
            "source": f"the input of {key} (the batch or the code before the first hooked layer)",
            "nonfinite_count": None,
            "has_nan": None,
            "has_inf": None,
            "count": None,
        }
    loss = flags.loss.detach().double().cpu() if isinstance(flags.loss, torch.Tensor) else flags.loss
    if loss is not None and not math.isfinite(float(loss)):
        return _loss_record(step)
    if include_gradients and flags.squares is not None and flags.squares.numel():
        finite = torch.isfinite(flags.squares.detach().float().cpu()).tolist()
        bad = [name for name, ok in zip(flags.names, finite, strict=True) if not ok]
        grads = {name: grad for name, _, grad in params}

        def elements(parameter: str) -> tuple[bool, bool] | None:
            grad = grads.get(parameter)
            return nonfinite_kinds(grad) if flags.same_step and grad is not None else None

        return locate_gradient(step, bad, layers, dtypes=dtypes, elements=elements, forward_finite=True)
    return None
