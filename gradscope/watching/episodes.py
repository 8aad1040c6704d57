"""Non-finite episodes of a watched run: where the first NaN/Inf of a step came
from (the search itself is ``gradscope.watching.nonfinite``), the one finding
that names an episode until a sampled step is finite again, and the error that
stops training.

The error is raised once per non-finite *step*, not once per run: catching
``GradscopeError`` and skipping the batch (``zero_grad``, no ``optimizer.step``)
is the documented way to drop a bad batch, and the run then goes on, so the
next non-finite step must stop the update again, before ``optimizer.step()``,
naming its own layer.  An alert is still one per episode (the finding stays the
same while the run stays non-finite); ``first`` stays the run's first step and
the later ones are counted (``later``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from gradscope.errors import GradscopeError
from gradscope.record import Record
from gradscope.recorder import Recorder
from gradscope.report import Finding
from gradscope.training import clip_advice, nonfinite_finding
from gradscope.watching.agreement import Agreement, first_of
from gradscope.watching.nonfinite import (
    LayerInfo,
    StepFlags,
    first_nonfinite,
    locate_gradient,
    locate_step,
    nonfinite_kinds,
)
from gradscope.watching.norms import NormHistogram
from gradscope.watching.overflow import OverflowedNorms
from gradscope.watching.step_norms import NORM, StepNorms
from gradscope.watching.update_ratio import UpdateRatios

Alerting = Callable[[int, dict[str, list[Finding]]], Any]

# The later non-finite steps the report lists (all are counted): bounded, like the
# spike steps (gradscope.training.SpikeSummary.MAX_STEPS).
MAX_LATER = 20


def inputs_finite(flags: list[Any] | None) -> bool | None:
    """Whether every forward's first input was finite (a non-float input is), from the
    sentinel's flags of a sampled step; None when no forward was seen."""
    if not flags:
        return None
    pairs = [extremes for _, extremes in flags if extremes is not None]
    if not pairs:
        return True
    # double: a flag is a float64 sum, finite beyond fp32's range (gradscope.watching.nonfinite)
    values = torch.stack([torch.stack([lo.detach().cpu().double(), hi.detach().cpu().double()]) for lo, hi in pairs])
    return bool(torch.isfinite(values).all())


def reduced_evidence(
    record: Record, ring: torch.Tensor | None, step: int, every: int, losses: list[tuple[int, float]]
) -> bool:
    """Whether the numbers every rank holds after a flush's reduction show a NaN/Inf
    at ``step`` (its statistics, global norm or loss): the same answer on every rank."""
    loss = dict(losses).get(step)
    return in_trouble(record, ring, step, every) or (loss is not None and not math.isfinite(loss))


def in_trouble(record: Record, ring: torch.Tensor | None, step: int, every: int) -> bool:
    """Whether this sampled step saw a non-finite tensor or gradient norm."""
    if ring is not None and not math.isfinite(float(ring[NORM, step % every])):
        return True
    return any(
        stats is not None and stats.nonfinite_count > 0
        for layer in record.layers
        for stats in (layer.activation, layer.gradient)
    )


class NonfiniteEpisodes:
    """The first non-finite step of the run and the finding of the current episode."""

    def __init__(
        self,
        recorder: Recorder,
        norms: StepNorms,
        ratios: UpdateRatios,
        history: NormHistogram,
        raise_on: tuple[str, ...],
        agreement: Agreement | None = None,
    ) -> None:
        self.recorder = recorder
        self.norms = norms
        self.ratios = ratios
        self.history = history
        self.raise_on = raise_on
        self.first: dict[str, Any] | None = None  # the run's first non-finite step
        self.episode: Finding | None = None  # the nonfinite finding of the current non-finite episode
        self.latest: dict[str, Any] | None = None  # the record of the latest located non-finite step
        self.raised_step: int | None = None  # the step of the last record an error was returned for
        # With raise_on "nonfinite": the steps that stopped training after ``first``
        # (each error was caught), the first MAX_LATER of them, and how many in all.
        self.later: list[int] = []
        self.later_count = 0
        # Called with every located non-finite record (the layer x step history marks it).
        self.on_located: Callable[[dict[str, Any]], None] | None = None
        # Under torch.distributed: every rank keeps the same record (gradscope.watching.agreement).
        self.agreement = agreement
        # The true norms of steps whose float32 norm overflowed (set by the Scope).
        self.overflowed: OverflowedNorms | None = None
        # With an agreement: this rank's record of an unsampled step that went
        # non-finite, kept for the next flush (which stops every rank).
        self.held: dict[str, Any] | None = None

    @property
    def stopping(self) -> bool:
        """Whether a non-finite step raises (``raise_on`` includes "nonfinite")."""
        return "nonfinite" in self.raise_on

    def agree(self, located: dict[str, Any] | None) -> dict[str, Any] | None:
        """The record every rank keeps: the earliest any rank found, held or at this
        flush (a collective: call it only where every rank does, from reduced numbers)."""
        if self.agreement is None:
            return located
        positions = {layer.name: layer.index for layer in self.layer_infos()}
        mine = first_of([self.held, located], positions)
        self.held = None
        return self.agreement.first_record(mine, positions)

    def hold(self, flags: StepFlags) -> None:
        """Under torch.distributed, an unsampled step whose own flag was non-finite:
        search this rank's tensors now, while they are those of the step, and keep
        the record for the next flush (no alert, no error: the other ranks may not
        have seen it; ``gradscope.watching.agreement``)."""
        if self.held is not None or (self.episode is not None and not self.stopping):
            return  # the first of the episode is already known (and, not stopping, enough)
        located = locate_step(
            flags, self.layer_infos(), self.norms.local_parameters(), include_gradients=not self.norms.scaler_seen
        )
        if located is not None and not flags.same_step:
            located["read"] = "one step late (accelerator): optimizer.step() of this step already ran"
        self.held = located

    def layer_infos(self) -> list[LayerInfo]:
        return [
            LayerInfo(layer.name, layer.module, layer.type, layer.index, layer.output_dtype)
            for layer in sorted(self.recorder.record.layers, key=lambda layer: layer.index)
        ]

    def locate(
        self,
        record: Record,
        step: int,
        bad_norm: int | None,
        losses: list[tuple[int, float]],
        param_grad_norms: dict[str, float],
        input_flags: list[Any] | None = None,
        *,
        input_finite: bool | None = None,
    ) -> dict[str, Any] | None:
        """The first NaN/Inf of a sampled step, searched in its record (the steps in
        between are searched by their per-step check, ``gradscope.watching.nonfinite``).
        ``input_finite``: whether the forwards' inputs were finite, when the caller
        read it already (a late flush) instead of handing over ``input_flags``."""
        loss_at_step = dict(losses).get(step)
        loss_finite = None if loss_at_step is None else math.isfinite(loss_at_step)
        located = first_nonfinite(
            record,
            step,
            loss_finite=loss_finite,
            include_gradients=not self.norms.scaler_seen,
            weight_dtypes=self.ratios.weight_dtypes,
            input_finite=inputs_finite(input_flags) if input_flags else input_finite,
        )
        if located is None and bad_norm == step and not self.norms.scaler_seen:
            located = self._locate_in_parameters(record, step, param_grad_norms)
        return located

    def _locate_in_parameters(
        self, record: Record, step: int, param_grad_norms: dict[str, float]
    ) -> dict[str, Any] | None:
        # Parameter statistics are sampled, their norms exact: a non-finite norm is
        # a NaN/inf element the sample missed, or a sum of squares that overflowed
        # float32 -- non-finite either way, as clip_grad_norm_ would see it.
        bad = [name for name, value in param_grad_norms.items() if not math.isfinite(value)]
        params = self.norms.local_parameters()
        grads = {name: grad for name, _, grad in params}
        forward_finite = not any(
            layer.activation is not None and layer.activation.nonfinite_count > 0 for layer in record.layers
        )
        by_name = {layer.name: layer for layer in record.layers}

        def gradient_bad(name: str) -> bool | None:
            layer = by_name.get(name)
            return None if layer is None or layer.gradient is None else layer.gradient.nonfinite_count > 0

        def elements(parameter: str) -> tuple[bool, bool] | None:
            grad = grads.get(parameter)
            return None if grad is None else nonfinite_kinds(grad)

        return locate_gradient(
            step,
            bad,
            self.layer_infos(),
            dtypes={name: str(value.dtype).removeprefix("torch.") for name, value, _ in params},
            elements=elements,
            forward_finite=forward_finite,
            gradient_bad=gradient_bad,
        )

    def finding(self, located: dict[str, Any], clip: dict[str, Any] | None) -> Finding:
        """The nonfinite finding for a step that saw NaN/inf: the first such step of
        the run names it, and it stays the same finding (one alert) while later
        steps stay non-finite, until a sampled step is finite again."""
        located = self._qualified(located)
        if self.on_located is not None:
            self.on_located(located)
        self._remember(located)
        if self.episode is None:
            self.episode = nonfinite_finding(located, clip)
        return self.episode

    def _remember(self, located: dict[str, Any]) -> None:
        """The run's first non-finite record, the latest, and the later steps that
        stop training (bounded; a run that goes on non-finite without raising has
        the alert history and the layer x step history for that)."""
        self.latest = located
        if self.first is None:
            self.first = located
            return
        step = int(located.get("step") or 0)
        if not self.stopping or step == self.first.get("step") or (self.later and self.later[-1] == step):
            return
        self.later_count += 1
        if len(self.later) < MAX_LATER:
            self.later.append(step)

    def _qualified(self, located: dict[str, Any]) -> dict[str, Any]:
        """What the record can prove.  With only layers that have parameters hooked
        (tier "light"), an activation whose recorded predecessor was finite may have
        been made non-finite by a parameter-free layer in between (GPT-2's GELU before
        c_proj): "produced" there is not shown, so the origin is unknown and the
        source names both candidates."""
        if not self.recorder.parametrised_only or located.get("role") != "activation":
            return located
        if located.get("origin") != "produced":
            return located
        layer = located.get("layer")
        source = (
            f"the forward of {layer} or a parameter-free layer that ran before it "
            "(tier='light' hooks only layers with parameters; tier='full' tells them apart)"
        )
        return {**located, "origin": "unknown", "source": source}

    def error(self) -> GradscopeError | None:
        """The error for the latest located non-finite step, once per step (None when
        not stopping, or when that step's error was returned already).  Under
        torch.distributed every rank holds the same records (``agree``), so every
        rank decides the same."""
        latest = self.latest
        if not self.stopping or latest is None:
            return None
        step = int(latest.get("step") or 0)
        if self.raised_step is not None and step <= self.raised_step:
            return None
        self.raised_step = step
        message = nonfinite_finding(latest, None).message  # this step's own layer, not the episode's first
        return GradscopeError(message + "; stopping (raise_on includes 'nonfinite')", record=dict(latest))

    def bad_step(self, flags: StepFlags, alert: Alerting) -> GradscopeError | None:
        """An unsampled step whose check flag was non-finite: find where, alert, and
        return the error to raise (None for a false alarm or when not raising)."""
        located = None
        if self.episode is None or self.stopping:
            # Within an episode the search runs only when this step must stop too (the
            # user caught the last error and went on); else the run goes on non-finite
            # and one search per step would cost a host read each.
            located = locate_step(
                flags, self.layer_infos(), self.norms.local_parameters(), include_gradients=not self.norms.scaler_seen
            )
        if located is None and flags.same_step and flags.squares is not None and self.overflowed is not None:
            # No NaN/Inf found: a global norm over finite gradients overflowed float32;
            # its true norm, for the norm history (gradscope.watching.overflow).
            grads = [(name, grad) for name, _, grad in self.norms.local_parameters() if grad is not None]
            self.overflowed.measure(flags.step, grads, None)
        if located is None:
            if self.episode is not None:
                # Already reported: the finding's life story follows it (the same finding: no new alert).
                alert(flags.step, {"nonfinite": [self.episode]})
            return None
        if not flags.same_step:
            located["read"] = "one step late (accelerator): optimizer.step() of this step already ran"
        finding = self.finding(located, clip_advice(self.history))
        alert(flags.step, {"nonfinite": [finding]})
        return self.error()
