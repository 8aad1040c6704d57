"""A flush: the numbers of the steps since the previous flush move to the host
(one packed transfer; one reduction under torch.distributed), the training
rules and (on a full flush) the layer diagnosis run, alerts fire, and the
result joins the run's aggregate, the ring of recent flushes and the dashboards.

Each function is one step of ``flush``, in order.

A flush has two halves.  ``launch`` is the device side: the statistics are
finalised and packed into one vector per device, whose copy to the host starts
(pinned memory and a CUDA event, ``gradscope.host_copy``), or under
torch.distributed the packed all-reduces are issued (asynchronously).
``complete`` is the host side: the vector is read, then the rules, alerts, the
aggregate, the dashboards and ``scope.recent``.  Immediately (``flush``), both
run at the sampled step.  With a late read (``Scope.read_late``: the default
on CUDA), ``complete`` runs one flush later, so the stream is never drained to
read statistics (see ``gradscope.watching.late`` for when and what it changes).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gradscope import host_copy
from gradscope.distributed import is_writer
from gradscope.errors import GradscopeError
from gradscope.host_copy import HostCopy
from gradscope.record import Record
from gradscope.recorder import FlushTransfer
from gradscope.report import Finding
from gradscope.training import skipped_steps_finding, spike_finding
from gradscope.watching.alerts import Alert
from gradscope.watching.episodes import in_trouble, reduced_evidence
from gradscope.watching.flush_result import FlushResult
from gradscope.watching.model_snapshot import SnapshotLaunch, launch_snapshot
from gradscope.watching.packing import PackLayout, Unpacked, pack, unpack
from gradscope.watching.scaling import divide_stats
from gradscope.watching.step_norms import NORM, SCALE, StepNorms
from gradscope.watching.training_state import RingReading
from gradscope.watching.weights import WeightLaunch

if TYPE_CHECKING:
    from gradscope.watching.scope import Scope

logger = logging.getLogger("gradscope")


@dataclass
class PendingFlush:
    """A launched flush: everything its host side needs, taken at the sampled step."""

    step: int
    sampled: bool
    full: bool
    raise_errors: bool
    steps: list[int]  # the optimizer steps this flush covers
    transfer: FlushTransfer
    layout: PackLayout
    ring_flags: StepNorms  # which ring slots held a loss, scale, norm (a snapshot: later steps reuse the slots)
    sample_scaled: bool  # weight gradients of the sampled step were still scaled
    input_finite: bool | None  # known at launch (no forward, or no float input); else read from the flush
    input_copy: HostCopy | None  # under a group: the input flag on its own way to the host (local, not reduced)
    held: dict[str, Any] | None  # the non-finite record this rank held at launch (its stop flag)
    weights: WeightLaunch | None = None  # a full flush's weights measurement, packed with it
    snapshot: SnapshotLaunch | None = None  # a full flush's model tensors for the diagnosis (model_snapshot)
    late: bool = False  # completed after this step's optimizer.step() (see complete_sampled_record)

    def ready(self) -> bool:
        """Whether its copies have landed (never blocks)."""
        return (
            self.transfer.ready()
            and (self.input_copy is None or self.input_copy.ready())
            and (self.snapshot is None or self.snapshot.ready())
        )


def input_flag(input_flags: list[Any] | None) -> tuple[bool | None, torch.Tensor | None]:
    """Whether the sampled step's forwards' first inputs were finite, when known
    without reading the device (no forward seen: None; no float input: True); else
    a device scalar, the number of non-finite ones (no host read)."""
    if not input_flags:
        return None, None
    flags = [pair[0] for _, pair in input_flags if pair is not None]
    if not flags:
        return True, None
    device = flags[0].device
    values = torch.stack([flag.detach().reshape(()).to(device, torch.float64) for flag in flags])
    return None, (~torch.isfinite(values)).sum(dtype=torch.float64)


def launch(
    scope: Scope,
    step: int,
    *,
    sampled: bool,
    raise_errors: bool,
    full: bool = False,
    input_flags: list[Any] | None = None,
) -> PendingFlush:
    """The device side of a flush (no host read): pack and start the transfer."""
    episodes = scope._episodes
    group = scope._recorder.group
    stop = episodes.held is not None if episodes.agreement is not None else None
    known, flag = input_flag(input_flags)
    input_copy = None
    if flag is not None and group is not None:
        # Local to this rank (a rank's own input), so not in the summed vector.
        input_copy = host_copy.copy_to_host(flag.reshape(1), scope._input_buffers)
        flag = None
    weights = scope._regularisation.launch_weights() if full and sampled else None
    snapshot = None
    if full and sampled and scope.diagnose:
        snapshot = launch_snapshot(scope.model, scope._recorder.record.layers, scope._snapshot_buffers)
    packed, layout = pack(scope._norms, scope._ratios, stop, flag, weights.vector if weights is not None else None)
    transfer = scope._recorder.launch_flush(packed)
    ring_flags = copy.copy(scope._norms)
    ring_flags.loss_given = list(ring_flags.loss_given)
    ring_flags.scale_given = list(ring_flags.scale_given)
    ring_flags.norm_given = list(ring_flags.norm_given)
    ring_flags.optimizer_at = list(ring_flags.optimizer_at)
    steps = list(range(scope._last_flushed + 1, step + 1))
    scope._last_flushed = step
    scope._training.flushes += 1
    return PendingFlush(
        step=step,
        sampled=sampled,
        full=full,
        raise_errors=raise_errors,
        steps=steps,
        transfer=transfer,
        layout=layout,
        ring_flags=ring_flags,
        sample_scaled=scope._sample_scaled,
        input_finite=known,
        input_copy=input_copy,
        held=episodes.held,
        weights=weights,
        snapshot=snapshot,
    )


def layer_record(scope: Scope, transfer: FlushTransfer) -> tuple[Record, torch.Tensor | None]:
    """This flush's per-layer statistics, as a Record of its own, and the extra
    numbers reduced in the same collective (see Recorder.flush)."""
    recorder = scope._recorder
    for layer in recorder.record.layers:
        layer.stats = {}
        layer.time = {}
    recorder.record.input = None
    host_extra = recorder.complete_flush(transfer)
    layers = [dataclasses.replace(layer, stats=dict(layer.stats)) for layer in recorder.record.layers if layer.stats]
    record = Record(layers=layers, input=recorder.record.input, steps=1, reduction=dict(recorder.record.reduction))
    return record, host_extra


def gather(scope: Scope, pending: PendingFlush) -> tuple[Record, Unpacked]:
    """Everything a launched flush carries, on the host (reduced over the group)."""
    record, host = layer_record(scope, pending.transfer)
    group = scope._recorder.group
    ranks = group.size if group is not None else 1
    unpacked = unpack(host, pending.layout, scope.every, ranks, reduced=group is not None)
    if pending.input_copy is not None:
        unpacked.inputs_nonfinite = float(pending.input_copy.wait()[0])
    return record, unpacked


def complete_sampled_record(
    scope: Scope, record: Record, host: Unpacked, step: int, full: bool, late: bool = False
) -> bool:
    """Parameter statistics for a NaN/Inf search, and the check that hooks fired.
    Returns whether the step was in trouble and its parameters could not be taken
    (``late``: optimizer.step() of this step already changed them)."""
    missed = False
    if late:
        # Read one flush late, the weights are no longer those of this step's
        # forward: statistics of them now would describe the wrong weights.  The
        # search goes on with the record, the exact per-parameter gradient norms
        # and the losses; the record says what it could not see.
        missed = not full and in_trouble(record, host.ring, step, scope.every)
    elif not full and in_trouble(record, host.ring, step, scope.every):
        # Parameter statistics are skipped on most steps, but a NaN/Inf search
        # needs them: the weights are still those of this forward (step() runs
        # before optimizer.step()), so take them now.  Local to this rank (no
        # collective): under DDP only some ranks may be in trouble.
        extra = scope._recorder.parameter_stats()
        for layer in record.layers:
            layer.stats.update(extra.get(layer.name, {}))
    if not scope._hooks_checked:
        check_hooks_fired(scope, host.names)
    return missed


def check_hooks_fired(scope: Scope, grad_names: list[str]) -> None:
    """Warn once when a sampled step trained the model (gradients arrived) yet
    no hook of the recorder fired: a model compiled with ``torch.compile``
    and run before ``watch`` attached keeps running the graph it traced
    without the hooks."""
    scope._hooks_checked = True
    recorder = scope._recorder
    if recorder.record.layers or not grad_names or not recorder._selected:
        return
    message = (
        "no layer was recorded although gradients arrived: if the model was compiled with torch.compile "
        "and run before gradscope.watch attached, its compiled graph has no hooks; attach watch before "
        "the first compiled call (compile after gradscope.watch)"
    )
    scope._aggregate.record.note(message)
    if is_writer():
        logger.warning("gradscope: %s", message)


def unscale(record: Record, scale: float, weight_grads_scaled: bool) -> Record:
    """Divide gradient statistics by the GradScaler's scale (weight gradients only
    when ``scaler.unscale_`` had not run)."""
    for layer in record.layers:
        if "gradient" in layer.stats:
            layer.stats["gradient"] = divide_stats(layer.stats["gradient"], scale)
        if "weight_grad" in layer.stats and weight_grads_scaled:
            layer.stats["weight_grad"] = divide_stats(layer.stats["weight_grad"], scale)
    return record


def observe_scales(scope: Scope, steps: list[int], ring: torch.Tensor | None, flags: StepNorms) -> None:
    """Each step's GradScaler scale, in order, for the steps it skipped and its
    calibration (``gradscope.training.ScalerSteps``, held by the update-ratio rule)."""
    if ring is None:
        return
    scales = ring[SCALE].tolist()
    for t in steps:
        slot = t % flags.every
        if flags.scale_given[slot]:
            scope._rates.scaler.observe(t, scales[slot])


def measure_overflow(scope: Scope, pending: PendingFlush, ring: torch.Tensor | None) -> dict[str, float]:
    """A sampled step whose global norm reads inf: when every gradient element is
    finite, only float32's sum of squares overflowed (a GradScaler's scale grown
    for ~100k bf16 steps): its true norm, read now (the rare path), replaces inf
    (gradscope.watching.overflow).  Not one flush late (the gradients are the next
    step's) nor under a group (the norm is reduced over ranks).  Returns the true
    norms of the parameters whose own float32 norm overflowed."""
    if ring is None or not pending.sampled or pending.late or scope._recorder.group is not None:
        return {}
    slot = pending.step % scope.every
    if not pending.ring_flags.norm_given[slot] or math.isfinite(float(ring[NORM, slot])):
        return {}
    scaled = pending.sample_scaled and pending.ring_flags.scale_given[slot]
    scale = float(ring[SCALE, slot]) if scaled else None
    grads = [(name, grad) for name, _, grad in scope._norms.local_parameters() if grad is not None]
    return scope._training.overflowed.measure(pending.step, grads, scale) or {}


def drop_skipped_gradients(scope: Scope, record: Record, sampled: bool, reading: RingReading) -> None:
    """The GradScaler skips a step whose scaled gradients overflowed: its gradient
    statistics are not the ones training uses, so leave them out.  A non-finite
    global norm over finite gradients is no overflow but the norm of still-scaled
    gradients overflowing (bf16 under a huge scale, which the scaler does not
    skip): their statistics are kept."""
    norms = reading.global_norms
    if scope._norms.scaler_seen and sampled and norms and not math.isfinite(norms[-1][1]):
        grads = [layer.stats.get(role) for layer in record.layers for role in ("gradient", "weight_grad")]
        if not any(stats is not None and stats.nonfinite_count > 0 for stats in grads):
            return
        for layer in record.layers:
            layer.stats.pop("gradient", None)
            layer.stats.pop("weight_grad", None)
        scope._aggregate.record.note("steps skipped by the GradScaler are left out of the gradient statistics")


def locate(
    scope: Scope,
    record: Record,
    host: Unpacked,
    reading: RingReading,
    step: int,
    sampled: bool,
    param_grad_norms: dict[str, float],
    input_finite: bool | None,
) -> dict[str, Any] | None:
    """Where the first NaN/Inf of this flush started (a sampled step is searched
    whole; under torch.distributed the record every rank agrees on)."""
    episodes = scope._episodes
    located = None
    if sampled:
        located = episodes.locate(
            record, step, reading.first_bad_norm, reading.losses, param_grad_norms, input_finite=input_finite
        )
    if episodes.agreement is not None and (
        host.stop > 0 or (sampled and reduced_evidence(record, host.ring, step, scope.every, reading.losses))
    ):
        # Every rank holds the same reduced numbers, so all agree here on one record:
        # the earliest any rank found, at this step or held from an unsampled one.
        if located is not None and located.get("step") == step and located.get("layer") is not None:
            # Found in the reduced statistics, as every rank finds it: say whether this
            # rank's own rows held it, so that the rank named is the one they came from.
            held = scope._recorder.held_nonfinite(str(located["layer"]), str(located.get("role")))
            located = {**located, "seen_here": held is not False}
        located = episodes.agree(located)
        if located is not None and located.get("step") != step:
            located.setdefault("read", f"at step {step}, the first flush after it: all ranks stop there together")
    return located


def name_spike_parameters(
    scope: Scope, findings: list[Finding], reading: RingReading, step: int, param_grad_norms: dict[str, float]
) -> None:
    """A spike at this very step: the parameters with the largest gradient norms, in its evidence."""
    if reading.spike is None or reading.spike.step != step or not param_grad_norms:
        return
    scopes = scope._norms.scopes
    if reading.spike.optimizer in scopes.labels:  # several optimizers: the spiking one's parameters
        mine = scopes.names[scopes.labels.index(reading.spike.optimizer)]
        param_grad_norms = {name: norm for name, norm in param_grad_norms.items() if name in mine}
    top = scope._training.spikes.add_parameter_norms(step, param_grad_norms)
    for finding in findings:
        if finding.code == "gradient-spike":
            finding.evidence["largest_parameter_norms"] = top


def recorded_layers(scope: Scope, record: Record) -> set[str]:
    """Layers some rank has recorded in this run (this flush's included)."""
    return {layer.name for layer in record.layers} | scope._aggregate.layer_names()


def layer_gradient_norms(scope: Scope, param_grad_norms: dict[str, float], record: Record) -> dict[str, float]:
    """The gradient norm of each recorded layer's main weight at the sampled step
    (0 where the weight had no gradient), by layer name as the update ratios are."""
    trainable = {ref.name for ref in scope._norms.trainable()}  # a frozen weight has none by design
    recorded = recorded_layers(scope, record)
    return {
        name: param_grad_norms.get(ref.name, 0.0)
        for name, ref in scope._ratios.weight_refs()
        if ref.name in trainable and name in recorded
    }


def update_ratios_by_step(
    ratios: list[tuple[int, list[str], Any]], recorded: set[str] | None = None
) -> dict[int, dict[str, float]]:
    """Step -> layer -> ‖Δw‖/‖w‖; ``recorded``: keep only these layers (under a group the
    ratios cover every selected layer, the record the layers some rank ran)."""
    out: dict[int, dict[str, float]] = {}
    for ratio_step, layer_names, values in ratios:
        for name, value in zip(layer_names, values.tolist(), strict=True):
            if recorded is None or name in recorded:
                out.setdefault(ratio_step, {})[name] = value
    return out


def findings_by_source(
    scope: Scope,
    record: Record,
    step: int,
    *,
    sampled: bool,
    full: bool,
    reading: RingReading,
    located: dict[str, Any] | None,
    update_ratios: dict[int, dict[str, float]],
    clip: dict[str, Any] | None,
    model: Any = None,
) -> dict[str, list[Finding]]:
    """The findings of this flush, by the source that produced them (a source that
    ran and found nothing clears its earlier findings)."""
    nonfinite: list[Finding] = []
    if located is not None:
        nonfinite.append(scope._episodes.finding(located, clip))
    training: list[Finding] = []
    if reading.spike is not None:
        spike_clip = scope._training.clip(reading.spike)  # the spiking optimizer's own (several optimizers)
        training.append(spike_finding(reading.spike, scope._training.spikes, spike_clip))
    training.extend(scope._rates.observe(step, update_ratios, reading.global_norms, reading.losses))
    if scope._norms.scaler_seen:
        skipped = skipped_steps_finding(
            scope._training.skipped, scope._last_flushed + 1, scope._training.last_scale, scope._rates.scaler
        )
        if skipped is not None:
            training.append(skipped)
    sources: dict[str, list[Finding]] = {"training": training}
    if sampled or located is not None:
        sources["nonfinite"] = nonfinite  # a sampled step is searched whole: absence clears
    if sampled and full and record.layers:
        if not scope._spans.excludes(step):  # a non-finite step's diagnosis is not said: the next step is due
            scope._last_diagnosed = step
        diagnosed = scope._diagnose(record, model)
        if located is not None:
            # The watch's own record of this step says where it started; the
            # diagnosis reads the same statistics with less context.
            diagnosed = [f for f in diagnosed if f.code != "nonfinite"]
        sources["diagnosis"] = diagnosed
    if not nonfinite and sampled:
        scope._episodes.episode = None
    return sources


def regularisation_findings(
    scope: Scope,
    step: int,
    full: bool,
    param_grad_norms: dict[str, float],
    reading: RingReading,
    sources: dict[str, list[Finding]],
    weights: tuple[WeightLaunch, torch.Tensor] | None = None,
) -> list[Finding]:
    """Weight decay, weights over time, validation (``gradscope.watching.regularisation``),
    added to the training source: cached between measurements, evaluated every flush."""
    if scope._spans.excludes(step):
        # A non-finite step's weights and losses would poison the weights over time
        # and the validation gap: its cached findings stand as they were.
        full, weights = False, None
    found = scope._regularisation.flush(
        step,
        full=full,
        param_grad_norms=param_grad_norms,
        losses=[(t, loss) for t, loss in reading.losses if not scope._spans.is_bad(t)],
        writer=scope._writer,
        weights=weights,
    )
    sources["training"].extend(found)
    return found


def keep_result(scope: Scope, result: FlushResult, steps: list[int]) -> None:
    """Into the ring of recent flushes and the dashboards."""
    last = scope.recent[-1] if scope.recent else None
    if not steps and not result.record.layers and last is not None:
        # Only the update ratio of the last sampled step arrived (at close).
        last.update_ratios.update(result.update_ratios)
    else:
        scope.recent.append(result)
    first_bad = scope._layer_history.add_flush(
        result.step, result.record, result.global_norms, result.losses, result.clip
    )
    first_bad, scope._heatmap_due = first_bad or scope._heatmap_due, False
    if scope._writer is not None:
        scope._writer.write_flush(
            result,
            skipped_steps=scope._training.skipped if scope._norms.scaler_seen else None,
            history=scope._layer_history,
            first_bad=first_bad,
        )


def error_to_raise(
    scope: Scope, located: dict[str, Any] | None, alerts: list[Alert], spike: Finding | None = None
) -> GradscopeError | None:
    """The error that stops training (``raise_on``), once per event: a user who
    catches it and skips the batch goes on, and must be stopped again by the next
    one (not once per run).  The events: each non-finite step
    (``NonfiniteEpisodes.error``), each spike of this flush (``spike``: a spike at
    the next step is a new spiky batch though its finding is still active, so no
    alert), each appearance or escalation of another finding in ``raise_on``.
    Under torch.distributed all of them come from reduced numbers: every rank
    decides the same (``gradscope.watching.agreement``)."""
    if located is not None and "nonfinite" in scope.raise_on:
        error = scope._episodes.error()
        if error is not None:
            return error
    if spike is not None and "gradient-spike" in scope.raise_on:
        return GradscopeError(f"{spike.message}; stopping (raise_on includes 'gradient-spike')", spike.to_dict())
    for alert in alerts:
        finding = alert.finding
        if (
            alert.kind in ("appeared", "escalated")
            and finding.code in scope.raise_on
            and finding.code not in ("nonfinite", "gradient-spike")
        ):
            return GradscopeError(
                f"{finding.message}; stopping (raise_on includes {finding.code!r})", finding.to_dict()
            )
    return None


def flush(
    scope: Scope,
    step: int,
    *,
    sampled: bool,
    raise_errors: bool,
    full: bool = False,
    input_flags: list[Any] | None = None,
) -> GradscopeError | None:
    """Move this flush's numbers to the host and run the training rules; a
    ``full`` flush also carries parameter statistics and runs the diagnosis."""
    pending = launch(scope, step, sampled=sampled, raise_errors=raise_errors, full=full, input_flags=input_flags)
    return complete(scope, pending)


def complete(scope: Scope, pending: PendingFlush) -> GradscopeError | None:
    """The host side of a launched flush: read it (waiting only if its copy has
    not landed), run the rules, alert, keep the result."""
    step, sampled, full, steps = pending.step, pending.sampled, pending.full, pending.steps
    record, host = gather(scope, pending)
    missed = complete_sampled_record(scope, record, host, step, full, pending.late) if sampled else False
    overflowed = measure_overflow(scope, pending, host.ring)
    # The ring as read below, without reading it into the run's state yet: the
    # step's search comes first, so that a bad step never enters the norm history.
    reading = scope._training.peek(steps, host.ring, pending.ring_flags)
    if reading.scale_now is not None:
        record = unscale(record, reading.scale_now, pending.sample_scaled)
    drop_skipped_gradients(scope, record, sampled, reading)
    param_grad_norms = (
        dict(zip(host.names, host.param_norms.tolist(), strict=True)) if host.param_norms is not None else {}
    )
    param_grad_norms.update((name, norm) for name, norm in overflowed.items() if name in param_grad_norms)
    input_finite = pending.input_finite if host.inputs_nonfinite is None else host.inputs_nonfinite == 0
    episodes = scope._episodes
    later = None
    if episodes.agreement is not None and pending.held is None and episodes.held is not None:
        # Held after this flush was launched: the next flush's stop flag carries it.
        later, episodes.held = episodes.held, None
    located = locate(scope, record, host, reading, step, sampled, param_grad_norms, input_finite)
    if later is not None:
        episodes.held = later
    if located is not None:
        scope._spans.mark(int(located["step"]))  # before its norm is read
    elif sampled:
        # Searched whole and finite: a non-finite episode ends here (a bad batch
        # caught and skipped), and every signal resumes (gradscope.watching.divergence).
        scope._spans.clear(step)
    reading = scope._training.read(steps, host.ring, pending.ring_flags)
    if reading.ceiling_found and is_writer():
        logger.warning("gradscope: %s", scope._training.ceiling.message())
    observe_scales(scope, steps, host.ring, pending.ring_flags)
    if reading.scale_now is not None:
        scope._training.scale_history.append((step, reading.scale_now))
    clip = scope._training.clip()
    if located is not None and pending.late and located.get("step") == step:
        located.setdefault(
            "read",
            "one flush late (Scope.read_late): optimizer.step() of this step already ran"
            + ("; its weights were not measured, the search used the layer record" if missed else ""),
        )
    if sampled:
        scope._rates.observe_gradients(layer_gradient_norms(scope, param_grad_norms, record))
    grouped = scope._recorder.group is not None
    update_ratios = update_ratios_by_step(host.ratios, recorded_layers(scope, record) if grouped else None)
    sources = findings_by_source(
        scope,
        record,
        step,
        sampled=sampled,
        full=full,
        reading=reading,
        located=located,
        update_ratios=update_ratios,
        clip=clip,
        model=pending.snapshot.host_model(scope.model) if pending.snapshot is not None else None,
    )
    findings = [f for group in sources.values() for f in group]
    name_spike_parameters(scope, findings, reading, step, param_grad_norms)
    weights = (pending.weights, host.weights) if pending.weights is not None and host.weights is not None else None
    findings.extend(regularisation_findings(scope, step, sampled and full, param_grad_norms, reading, sources, weights))
    # A flush that covers no new step (at close) ran the training rules without a norm or loss.
    alerts = scope._announcer.alert(step, sources, partial=() if steps else ("training",))
    scope._aggregate.merge(record, step=step)
    result = FlushResult(
        step=step,
        record=record,
        global_norms=reading.global_norms,
        losses=reading.losses,
        loss_scale=reading.scale_now,
        update_ratios=update_ratios,
        param_grad_norms=param_grad_norms,
        clip=clip,
        findings=findings,
        alerts=[alert.finding for alert in alerts if alert.kind != "cleared"],
    )
    keep_result(scope, result, steps)
    spike = next((f for f in sources["training"] if f.code == "gradient-spike"), None) if reading.spike else None
    error = error_to_raise(scope, located, alerts, spike) if pending.raise_errors else None
    if error is not None and pending.late:
        # Raised by a later step() (the one that read this flush): say which step it belongs to.
        error = GradscopeError(
            f"{error}; found at step {step}, read one flush late (Scope.read_late) by step {scope._step}",
            error.record,
        )
    return error
