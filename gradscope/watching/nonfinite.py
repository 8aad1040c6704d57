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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradscope.outputs import first_float_tensor
from gradscope.record import LayerRecord, Record
from gradscope.stats import Stats


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
# norms), and one sum per hooked layer's output and per forward's input.  NaN
# and inf propagate through a sum, so a sum is non-finite whenever one of its
# elements is; the converse needs an accumulator that cannot overflow:
#   * on accelerators the sums accumulate in float64 (fp32/fp16/bf16/fp8 values
#     cannot overflow it: 2^63 elements of 3.4e38 stay below 1.8e308; fp8 is
#     read without an fp32 copy).  A reduction there is bound by memory
#     bandwidth, so the wider accumulator costs next to nothing;
#   * on the CPU a float64 sum of fp32 values costs 3-4x the float32 one (77 vs
#     24 us for 256x1024, 141 vs 37 us for a 32x64x16x16 conv output, measured
#     2026-12-01, torch 2.13, 2 threads), which alone put watch(every=10) at
#     1.23x the bare MLP step and 1.28x the CNN step (target 1.02x).  So the CPU
#     sums in float32 and, since reading a CPU value stalls nothing, reads each
#     sum at once: a non-finite sum whose elements are all finite (an
#     overflow, e.g. an attention score tensor filled with finfo.min) is
#     checked element-wise then and there and written back as 0.  The flag
#     stays exact and the extra check runs only on overflow;
#   * MPS has no float64: float32 sums, where an overflow of finite values
#     (elements averaging above ~3e38/numel) reads as non-finite; the search
#     then names that output.
# Each sum is written into a preallocated device buffer (``out=``: one kernel
# per layer, nothing allocated, no Python object per layer but the name), and
# the step's flag is the float64 sum of that buffer, the loss and the norm
# (float64 so that finite per-layer sums cannot overflow when added up); it is
# copied into a host buffer and read:
#   * on the CPU at once (there is nothing to wait for), so training stops at
#     the step that went non-finite, before ``optimizer.step()`` applies it;
#   * on an accelerator once the copy has landed (``Event.query()``), at the
#     next ``step()`` call or at ``close()``, so the GPU's queue never drains.
#     The error then names the step that went non-finite, one step late.
# Only when the number is non-finite are the step's per-layer sums read back
# and searched (``locate_step``).
# Why a sum and not the extremes: one output instead of two, in one dtype for
# every input dtype (aminmax writes in the input's dtype and has no fp8
# kernel); the search only asks "finite or not".
# Under torch.compile the sums are ordinary graph outputs (no ``out=`` into a
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


# Dtypes whose finite values can sum past float32's maximum (fp16's 65,504 and
# fp8's 57,344 would need more than 5e33 elements).
_FLOAT32_SUM_MAY_OVERFLOW = (torch.float32, torch.float64, torch.bfloat16)


def _flag_dtype(device: torch.device) -> torch.dtype:
    """The accumulator of the per-output sums on ``device`` (see the comment above)."""
    return torch.float32 if device.type in ("cpu", "mps") else torch.float64


def _sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype the step's flags are added up in: float64, where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class FlagBuffer:
    """One step's per-layer sums: a device vector and a view of each of its slots,
    made once and reused (writing into a view costs no Python-side allocation)."""

    def __init__(self, device: torch.device, capacity: int = FLAG_SLOTS) -> None:
        self.device = device
        self.values = torch.zeros(capacity, dtype=_flag_dtype(device), device=device)
        self.slots = list(self.values.unbind(0))
        self.used = 0
        # The CPU reads each sum as it is written (see the comment above).
        self._host_view = self.values.numpy() if reads_are_free(device) else None

    def write(self, tensor: torch.Tensor) -> torch.Tensor:
        """Write the sum of ``tensor`` into the next slot and return the slot."""
        index = self.used
        slot = self.take_slot()
        torch.sum(tensor, dim=(), dtype=self.values.dtype, out=slot)
        view = self._host_view
        if (
            view is not None
            and tensor.dtype in _FLOAT32_SUM_MAY_OVERFLOW
            and not math.isfinite(view[index])
            and bool(torch.isfinite(tensor).all())
        ):
            slot.zero_()  # finite elements whose float32 sum overflowed: finite
        return slot

    def take_slot(self) -> torch.Tensor:
        if self.used == len(self.slots):  # more hooked calls than slots: double (rare, once)
            grown = torch.zeros(2 * len(self.slots), dtype=self.values.dtype, device=self.device)
            grown[: self.used].copy_(self.values)
            self.values = grown
            self.slots = list(grown.unbind(0))
            self._host_view = grown.numpy() if self._host_view is not None else None
        slot = self.slots[self.used]
        self.used += 1
        return slot

    def total(self) -> torch.Tensor:
        """The sum of the used slots, in float64 where the device has it (finite
        per-output sums near float32's maximum must not add up to inf)."""
        return self.values.narrow(0, 0, self.used).sum(dtype=_sum_dtype(self.device))


def _flag_sum(tensor: torch.Tensor, buffer: FlagBuffer | None) -> torch.Tensor | None:
    """A sum of ``tensor`` that is non-finite exactly when an element is (see the
    comment above), written into a slot of ``buffer`` when it is on the buffer's
    device; queued, not read (the CPU reads it, which stalls nothing)."""
    flat = tensor.detach()  # out= refuses inputs that require grad
    if flat.numel() == 0:
        return None
    if torch.compiler.is_compiling() or buffer is None or flat.device != buffer.device:
        return flat.sum(dtype=_sum_dtype(flat.device))
    return buffer.write(flat)


class ForwardSentinel:
    """The forward-hook side of the check: called by the Recorder for every hooked
    call (``Recorder.sentinel``).

    For each forward it keeps a flag of the first hooked layer's input (None
    when that input holds no floating-point tensor: token ids are finite by
    type), and, on forwards the Recorder does not record, a flag of each hooked
    output in execution order.  A flag is a device scalar that is finite iff the
    tensor is (its sum); entries keep the (key, flag, flag) shape of a
    (key, min, max) pair, which is all the search reads.  Nothing is read on the
    host here.
    """

    def __init__(self) -> None:
        self.enabled = True  # False while the scope is paused (evaluation forwards)
        self.activations: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.inputs: list[tuple[str, tuple[torch.Tensor, torch.Tensor] | None]] = []
        self.buffer: FlagBuffer | None = None  # this step's slots (see FlagBuffer)
        self._free: list[FlagBuffer] = []  # buffers whose step was read, for reuse
        self._calls: dict[str, int] = {}
        self._forward_start = True

    def begin_forward(self) -> None:
        """A new forward starts (root forward pre-hook, ``Scope.mark_forward``)."""
        self._forward_start = True
        self._calls.clear()

    def _flag(self, tensor: torch.Tensor) -> torch.Tensor | None:
        if self.buffer is None and not torch.compiler.is_compiling():
            self.buffer = self._free.pop() if self._free else FlagBuffer(tensor.device)
            self.buffer.used = 0
        return _flag_sum(tensor, self.buffer)

    def forward(self, name: str, args: Any, output: Any, recording: bool) -> None:
        if not self.enabled:
            return
        shown = name or "model"
        call = self._calls.get(shown, 0) + 1
        self._calls[shown] = call
        key = shown if call == 1 else f"{shown}#{call}"
        if self._forward_start:
            self._forward_start = False
            found = first_float_tensor(args)
            flag = self._flag(found[0]) if found is not None else None
            self.inputs.append((key, (flag, flag) if flag is not None else None))
        if recording:
            return  # the Recorder takes the exact extremes itself
        found = first_float_tensor(output)
        if found is None:
            return
        flag = self._flag(found[0])
        if flag is not None:
            self.activations.append((key, flag, flag))

    def take(self) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor]], list[Any], FlagBuffer | None]:
        """This step's flags and the buffer that holds them; the next step starts empty."""
        activations, inputs, buffer = self.activations, self.inputs, self.buffer
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
        in_buffer = set() if buffer is None else {id(slot) for slot in buffer.slots[: buffer.used]}
        parts += [flag for _, flag, _ in activations if id(flag) not in in_buffer]
        parts += [pair[0] for _, pair in inputs if pair is not None and id(pair[0]) not in in_buffer]
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
    False: only the float32 sum of squares overflowed; None: cannot tell now);
    ``gradient_bad(layer)`` whether ∂ℓ/∂h of that layer was non-finite (None:
    not recorded, as on unsampled steps).
    """
    if not bad:
        return None
    modules = {layer.module: layer for layer in layers if layer.name == layer.module}
    ranked = sorted(bad, key=lambda p: -(owner.index if (owner := owner_of(p, modules)) is not None else -1))
    parameter = ranked[0]
    layer = owner_of(parameter, modules)
    name = layer.name if layer is not None else None
    kinds = elements(parameter)
    if kinds is not None and not any(kinds):
        origin = "produced"
        source = (
            f"the squared gradient norm of {parameter} overflowed float32 (norm above ~1.8e19, every element "
            "finite), as clip_grad_norm_ would compute it"
        )
    else:
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
    inputs = {key: (next(input_iter) if extremes is not None else True) for key, extremes in flags.inputs}
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
        starts_forward = key in inputs and (first_bad == 0 or flags.activations[first_bad - 1][0] not in inputs)
        if first_bad == 0 or starts_forward:
            received = inputs.get(key) is False
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
