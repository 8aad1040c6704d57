"""``gradscope.watch``: watch a training run, cheaply enough to leave on.

How a step is observed
----------------------
Call ``scope.step(optimizer, scaler=None, loss=None)`` once per optimizer step,
after backward and before ``optimizer.step()`` (or ``scope.attach(optimizer)``
to do it from an optimizer pre-step hook).  Steps are numbered from 0 by these
calls; step ``k`` is *sampled* when ``k % every == 0``.  Whether a step is
sampled is decided before its forward runs: right after the previous
``step()`` call the recorder is started (next step sampled) or stopped (its
hooks then return at once and do nothing measurable).

Every step, on the device, with no host sync: the global gradient norm (one
norm per parameter, then the norm of those norms) into a ring of ``every``
slots, the loss if given, the GradScaler's scale if given.  On a sampled step,
additionally: per-layer statistics of activations and ∂ℓ/∂h (the Recorder),
per-parameter gradient norms, and a snapshot of a sample of the layer weights
for the update ratio ‖Δw‖/‖w‖ (resolved by an optimizer post-step hook, else
at the next ``step()``).  Statistics of weights and weight gradients, which
only the layer diagnosis reads, come with it: on sampled steps at least
DIAGNOSE_EVERY_STEPS apart, or at once when a step saw a NaN/Inf.

Cost (README "Cost", ``benchmarks/overhead.py``): inside a hook each eager op
is several times slower than in a loop (the model's kernels have just evicted
the caches), so hooks only take each tensor's extremes and a fixed-size
sample copy (``stats.take_sample``); sums and histograms run at the flush.
``tier="light"`` hooks only layers that own parameters and measures gradient
norms on sampled steps only.  At the sampled step's
``step()`` call everything moves to the host in one flush, the rules run, and
alerts fire (``gradscope.watching.alerts``: one alert when a finding appears,
escalates, changes layers or clears; a run summary at close).

Non-finite values are checked at *every* step (``gradscope.watching.nonfinite``):
an unsampled step leaves one device flag (loss, global norm, the exact min/max of
each hooked output: one ``aminmax`` per hooked tensor into preallocated rows, a
sum for fp8), read at once on the CPU,
so training stops at the step that went non-finite, before ``optimizer.step()``;
on an accelerator it is read once its copy has landed (the next ``step()`` or
``close()``), without stalling the queue.  With ``tier="light"`` a NaN made in
backward only (finite loss and outputs) waits for the next sampled step.

Late read (``Scope.read_late``; on by default on CUDA, off on the CPU, where
reading costs no stall): a sampled step only *launches* its flush (packing on
the device, a non-blocking copy into reused pinned memory, a CUDA event;
under torch.distributed the all-reduces issued asynchronously).  Its host side
(rules, alerts, dashboards, ``scope.recent``) runs at the first ``step()``
after it whose copy has landed, at the latest at the next flush (which then
waits for it), and at ``report()``, ``paused()``, ``validation()`` and ``close()``, so nothing is
lost: the final report equals an immediate read's.  Under torch.distributed
it runs only at the next flush and at ``close()`` (a point every rank reaches
together; ``report()`` mid-run does not read it).  What changes: alerts and
``on_finding`` of flush N come at a later ``step()`` with flush N's step
number; an error of ``raise_on`` raised from it is raised by that later
``step()`` and names step N; a sampled step in trouble is searched without
statistics of its weights (optimizer.step() has changed them; the record's
``read`` says so), its gradients and activations are its own.  Flushes at the
diagnosis cadence (DIAGNOSE_EVERY_STEPS) are read late too: the weights they
measure (``gradscope.watching.weights``) are reduced on the device at the step
and travel in the flush's own vector, so they are the step's weights.

Gradient accumulation: statistics are per *optimizer step*; the forwards and
backwards of all micro-batches of a sampled step are merged into its record,
as they come once more than a few hundred wait (``recorder.PENDING_ENTRIES``),
so memory does not grow with the number of micro-batches.  Forwards under
``no_grad``/``inference_mode`` are not recorded unless ``record_no_grad=True``.

GradScaler: pass it to ``step``; the scale is read at flush, a decrease of the
scale counts as a skipped step, and gradient statistics (∂ℓ/∂h always, weight
gradients unless ``scaler.unscale_`` already ran) are divided by the scale, so
every number gradscope reports is *unscaled* (``report.run["gradients"]``).
Non-finite gradients are then expected now and then (the scaler skips those
steps) and are counted, not raised; non-finite activations and losses still are.

Memory: running aggregates (merged statistics, a fixed-size norm histogram, a
64-step spike window, a few numbers per layer and per finding) plus a ring of
the last ``ring`` flushes.  Nothing grows with the number of steps, and
between two ``step()`` calls the statistics waiting for the flush are capped
(``recorder.PENDING_ENTRIES``), whatever the number of micro-batches.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradscope.distributed import is_writer, mean_over_group
from gradscope.errors import GradscopeError
from gradscope.host_copy import HostBuffers
from gradscope.learning_rate import LearningRateMonitor
from gradscope.optimizer_audit import base_optimizer
from gradscope.record import Record
from gradscope.recorder import Recorder
from gradscope.report import Finding, Report
from gradscope.training import SpikeSummary, with_run_clip
from gradscope.watching.aggregate import RunningRecord
from gradscope.watching.agreement import Agreement
from gradscope.watching.alerts import AlertTracker
from gradscope.watching.announce import Announcer
from gradscope.watching.divergence import NonfiniteSpans
from gradscope.watching.episodes import NonfiniteEpisodes
from gradscope.watching.final_report import final_report
from gradscope.watching.flush import PendingFlush, complete, launch
from gradscope.watching.flush_result import FlushResult
from gradscope.watching.history import RunHistory
from gradscope.watching.nonfinite import StepCheck, StepFlags, reads_are_free
from gradscope.watching.options import DIAGNOSE_EVERY_STEPS, RAISE_CODES, TIERS, WATCH_SAMPLE, check_arguments
from gradscope.watching.regularisation import RegularisationWatch, check_stop_on
from gradscope.watching.scaling import active_scaler, grads_already_unscaled
from gradscope.watching.step_norms import StepNorms
from gradscope.watching.training_state import TrainingState
from gradscope.watching.update_ratio import UpdateRatios

logger = logging.getLogger("gradscope")

__all__ = ["DIAGNOSE_EVERY_STEPS", "RAISE_CODES", "TIERS", "WATCH_SAMPLE", "FlushResult", "Scope"]


class Scope:
    """A watched training run.  Create it with ``gradscope.watch`` (same arguments).

    Hooks are attached on construction and removed by ``close()`` (or leaving the
    ``with`` block).  Beyond ``watch``'s arguments: ``ring`` is how many recent
    flushes ``scope.recent`` keeps (each a ``FlushResult``); ``diagnose=False``
    runs only the training rules (no ``gradscope.diagnose`` per flush).
    ``raise_on`` takes codes among RAISE_CODES; ``tier`` one of TIERS.

    The parts (one job each): ``StepNorms`` (the every-step ring of norm, loss,
    scale), ``UpdateRatios``, ``TrainingState`` (run-level norms, spikes, scale),
    ``NonfiniteEpisodes``, ``Announcer`` (alerts and the run summary), the
    ``flush`` steps and ``final_report``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 1,
        log_dir: str | None = None,
        formats: Sequence[str] = ("fp16",),
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        on_finding: Callable[[Finding], Any] | None = None,
        raise_on: Sequence[str] = ("nonfinite",),
        ring: int = 8,
        diagnose: bool = True,
        tier: str = "full",
        sequence_modules: Mapping[str, int] | None = None,
        stop_on: Sequence[str] = (),
        record_no_grad: bool = False,
        process_group: Any = None,
    ) -> None:
        check_arguments(every, tier, formats, raise_on)
        stop_on = check_stop_on(stop_on)
        self.model = model
        self.every = int(every)
        self.tier = tier
        self.formats = tuple(formats)
        self.raise_on = tuple(raise_on)
        self.diagnose = diagnose
        self.log_dir = log_dir
        self.recent: deque[FlushResult] = deque(maxlen=ring)
        self._report: Report | None = None
        self._step = 0
        self._last_flushed = -1
        self._sample_scaled = False  # weight gradients of the sampled step still scaled
        self._optimizer_handles: list[Any] = []
        self._paused = False
        self._closed = False
        self._hooks_checked = False
        self._rates = LearningRateMonitor()  # update-ratio and learning-rate-too-high (gradscope.learning_rate)
        # A run may step several optimizers, each given to step() in turn (a GAN's G and
        # D): the layers the sampled step's optimizer does not update are owed a sample
        # of their update ratio, taken at the next step of an optimizer that updates
        # them (``_owed_snapshot``); the optimizers already asked since the sampled step.
        self._owed: set[str] = set()
        self._owed_asked: set[int] = set()
        # The run's non-finite steps, episode by episode: what every run-level part leaves out.
        self._spans = NonfiniteSpans()
        self._rates.excludes = self._spans.is_bad
        self._aggregate = RunningRecord(self._spans)
        self._diagnose_failed = False
        self._last_diagnosed = -DIAGNOSE_EVERY_STEPS

        self._build_parts(model, log_dir, on_finding, include, exclude, sequence_modules, record_no_grad, process_group)
        # Read flushes one flush late (see "Late read" above): on CUDA, where an
        # immediate read drains the stream; settable (tests run the CUDA path on the CPU).
        device = _first_device(model)
        self.read_late = not reads_are_free(device) and device.type == "cuda"
        self._pending_flush: PendingFlush | None = None  # launched, not read yet
        self._late_error: GradscopeError | None = None  # from a late read outside step(): raised by the next step()
        self._input_buffers = HostBuffers()  # the sampled step's input flag under a group (gradscope.watching.flush)
        self._snapshot_buffers = HostBuffers()  # the model tensors a full flush's diagnosis reads (model_snapshot)
        self._recorder.attach()
        self._recorder.start()  # step 0 is sampled
        # Weight decay, weights over time, eval-mode mistakes, validation (gradscope.watching.regularisation).
        self._regularisation = RegularisationWatch(
            model, self._recorder.parameter_table, tuple(stop_on), self._recorder.group
        )

    def _build_parts(
        self,
        model: nn.Module,
        log_dir: str | None,
        on_finding: Callable[[Finding], Any] | None,
        include: Sequence[str] | None,
        exclude: Sequence[str] | None,
        sequence_modules: Mapping[str, int] | None,
        record_no_grad: bool,
        process_group: Any,
    ) -> None:
        self._writer = None
        if log_dir is not None:
            from gradscope.tensorboard import DashboardWriter

            self._writer = DashboardWriter.for_rank_zero(log_dir, formats=self.formats)
        self._announcer = Announcer(self._writer, on_finding, self._spans)
        # Moments and histograms of tensors above 2 x WATCH_SAMPLE elements come from
        # a strided sample (errors in gradscope.stats); counts stay exact, and so do
        # the extremes of activations and ∂ℓ/∂h.  Weights and weight gradients are
        # sampled whole: the exact per-step gradient norms see every NaN/inf there.
        self._recorder = Recorder(
            model,
            include=include,
            exclude=exclude,
            parametrised_only=self.tier == "light",
            sample=WATCH_SAMPLE,
            exact_parameter_extremes=False,
            sequence_modules=sequence_modules,
            record_no_grad=record_no_grad,
            process_group=process_group,
        )
        # A residual sum a normalisation reads (post-LN BERT, pre-LN GPT-2) is the
        # scale the depth diagnosis needs for the layers before it: recorded too.
        self._recorder.norm_inputs = True
        # Parameters are looked up by name at each step (never kept: FSDP swaps and
        # frees parameter storage), from the recorder's table, built after sharding.
        self._norms = StepNorms(self._recorder, self.every, self.tier)
        self._ratios = UpdateRatios(self._recorder)
        self._training = TrainingState(self._spans)
        # Under torch.distributed every rank stops at the same step, with the same
        # record of where (gradscope.watching.agreement).
        group = self._recorder.group
        self._agreement = Agreement(group) if group is not None else None
        self._episodes = NonfiniteEpisodes(
            self._recorder, self._norms, self._ratios, self._training.history, self.raise_on, self._agreement
        )
        # The layer x step history behind the heatmaps and report.run["history"]
        # (gradscope.watching.history), marked at every located non-finite value.
        self._layer_history = RunHistory()
        self._heatmap_due = False
        self._episodes.on_located = self._mark_nonfinite
        self._episodes.overflowed = self._training.overflowed
        self._check = StepCheck()  # the per-step non-finite check (gradscope.watching.nonfinite)
        self._recorder.sentinel = self._check.sentinel
        self._check.prepare(_first_device(model))

    # -- the parts' state, by the names callers know -----------------------------
    @property
    def on_finding(self) -> Callable[[Finding], Any] | None:
        return self._announcer.on_finding

    @on_finding.setter
    def on_finding(self, value: Callable[[Finding], Any] | None) -> None:
        self._announcer.on_finding = value

    @property
    def clip_max_norm(self) -> float | None:
        """The trainer's gradient-clipping max norm (set by integrations), for the summary."""
        return self._training.clip_max_norm

    @clip_max_norm.setter
    def clip_max_norm(self, value: float | None) -> None:
        self._training.clip_max_norm = value

    @property
    def clip_max_value(self) -> float | None:
        """The trainer's clip-by-value threshold (set by integrations), for the summary."""
        return self._training.clip_max_value

    @clip_max_value.setter
    def clip_max_value(self, value: float | None) -> None:
        self._training.clip_max_value = value

    @property
    def first_nonfinite(self) -> dict[str, Any] | None:
        """The record of the run's first non-finite step (None while finite)."""
        return self._episodes.first

    @property
    def _spikes(self) -> SpikeSummary:
        return self._training.spikes

    @property
    def _tracker(self) -> AlertTracker:
        return self._announcer.tracker

    # -- lifecycle --------------------------------------------------------------
    def __enter__(self) -> Scope:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # Leaving on an exception: no collective (another rank may never reach it),
        # so a failing job fails as fast as it would without gradscope; and a
        # pending non-finite error is only recorded (an exception is on its way).
        self._close(collective=exc_type is None, raise_pending=exc_type is None)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def steps(self) -> int:
        """Optimizer steps observed so far."""
        return self._step

    def close(self, collective: bool = True, *, raise_pending: bool = True) -> Report:
        """Flush what is left, remove every hook, build and return the full report,
        and print the run summary (on the ``gradscope`` logger).

        Safe to call twice (the second call returns the same report).  With a
        reduction group the last flush is collective (every rank must close);
        ``collective=False`` (what leaving the ``with`` block on an exception
        does) skips it: statistics not flushed yet are dropped.

        Raises:
            GradscopeError: with ``raise_on`` containing "nonfinite", when a step
                whose check was still in flight (on an accelerator, the last
                step) went non-finite; the scope is closed and the report built.
                ``raise_pending=False`` (an exception is already on its way) only
                records it.
        """
        return self._close(collective=collective, raise_pending=raise_pending)

    def _close(self, collective: bool, raise_pending: bool) -> Report:
        if self._closed:
            assert self._report is not None
            return self._report
        self._closed = True
        pending: GradscopeError | None = None
        try:
            bad = self._check.poll(wait=True)  # steps whose flag was still in flight
            if bad is not None:
                pending = self._bad_step(bad) if collective else self._episodes.bad_step(bad, self._announcer.alert)
            late = self._read_pending(wait=True, collective=collective)
            pending = pending or self._late_error or late
            self._late_error = None
            self._ratios.resolve()
            self._last_flush(collective)
            if self._agreement is not None and collective and pending is None:
                pending = self._episodes.error()  # a held record the last flush agreed on
        finally:
            self._recorder.close()
            self._regularisation.close()
            self._ratios.close()
            handles, self._optimizer_handles = self._optimizer_handles, []
            for handle in handles:
                handle.remove()
            self._norms.close()
        self._report = final_report(self)
        if self._writer is not None:
            try:
                self._writer.write_report(self._report, step=max(self._step - 1, 0))
            finally:
                self._writer.close()
        self._announcer.print_summary(self._report)
        if pending is not None and raise_pending:
            raise pending
        return self._report

    def _last_flush(self, collective: bool) -> None:
        """What is left, flushed at close.  With a reduction group the recorder's
        flush is a collective: every rank flushes (unless closing on an exception)."""
        reduced = self._recorder.group is not None
        if (self._step > 0 or not collective) and self._recorder.pending_count():
            # Recorded after the last step(): a prediction forward with gradients on,
            # micro-batches whose optimizer step never came, or a step an exception cut
            # short.  No training step followed them, so they are not one (they were
            # flushed as an extra sampled step, merged into the training statistics).
            self._recorder.discard_pending()
            self._aggregate.record.note("forwards after the last step() are left out: no optimizer step followed them")
        if not collective and reduced:
            self._aggregate.record.note("closed on an exception: the last steps' statistics were not reduced")
        elif self._last_flushed < self._step - 1 or self._recorder.pending_count() or self._ratios.ready or reduced:
            self._flush(max(self._step - 1, 0), sampled=False, raise_errors=False)

    def report(self) -> Report:
        """The full report: final once the scope is closed, else the run so far
        (what ``close()`` would return now, without closing)."""
        if self._report is not None:
            return self._report
        self._read_pending_now()
        return final_report(self)

    def training_summary(self) -> dict[str, Any]:
        """The run-level numbers: norms, clip advice, loss scale, update ratios."""
        return self._training.summary(
            steps=self._step,
            every=self.every,
            tier=self.tier,
            sampled_steps=self._aggregate.record.steps + self._aggregate.excluded_flushes,
            scaler_seen=self._norms.scaler_seen,
            update_ratio=self._rates.summary(),
            first_nonfinite=self.first_nonfinite,
        )

    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> Scope:
        """Call ``step(optimizer, scaler)`` from an optimizer pre-step hook, so the
        training loop needs no change.  The hook is removed on close.  In this mode
        the loss is seen only if you pass it to ``observe_loss``.
        """
        self._check_open()
        observed = {"by_scaler": False}

        def pre_hook(opt: Any, args: Any, kwargs: Any) -> None:
            if not observed["by_scaler"]:
                self.step(opt, scaler=scaler)

        self._optimizer_handles.append(optimizer.register_step_pre_hook(pre_hook))
        if scaler is not None and callable(getattr(scaler, "step", None)):
            # A GradScaler that finds inf/NaN gradients skips optimizer.step(), and its
            # pre-step hook with it: the step was seen only at the next iteration, its
            # forward merged with that one's.  Its own step() always runs: observe there.
            original = scaler.step

            def scaler_step(opt: Any, *args: Any, **kwargs: Any) -> Any:
                if opt is optimizer:
                    self.step(opt, scaler=scaler)
                    observed["by_scaler"] = True
                try:
                    return original(opt, *args, **kwargs)
                finally:
                    observed["by_scaler"] = False

            scaler.step = scaler_step
            self._optimizer_handles.append(_Restore(scaler, "step"))
        self._ratios.hook_post(optimizer)
        return self

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Remember this step's (unscaled) loss; checked for NaN/Inf at the flush.

        Losses observed within one optimizer step are summed: with gradient
        accumulation, pass each micro-batch's loss divided by the number of
        micro-batches (what Lightning's ``on_before_backward`` sees) and the sum
        is the step's mean loss.
        """
        self._norms.observe_loss(loss)

    def observe_gradients(self) -> None:
        """Measure the gradient norms now, for the coming ``step()`` (device work, no sync).

        For trainers that clip gradients between backward and the point where
        ``step()`` can be called (the Hugging Face Trainer): call it at the end of
        backward, so spikes and AutoClip see the norms the model really produced.
        Set ``clip_max_norm`` to the trainer's max norm to also get the post-clip
        norms (``clip_grad_norm_``'s factor min(1, max_norm / (norm + 1e-6))) in the
        training summary.  A later call in the same step replaces the earlier one
        (with gradient accumulation the last micro-batch's is the step's).
        """
        self._norms.observe_gradients()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside (evaluation, generation) are not recorded."""
        self._paused = True
        self._recorder.stop()
        if not self._closed:
            self._read_pending_now()
        self._check.sentinel.enabled = False
        try:
            yield
        finally:
            self._paused = False
            self._check.sentinel.enabled = True
            if not self._closed and self._step % self.every == 0:  # the coming step is sampled
                self._recorder.start()

    def validation(
        self,
        loss: Any,
        metrics: dict[str, Any] | None = None,
        *,
        patience: int | None = None,
        min_delta: float | None = None,
        reduce: bool | None = None,
    ) -> dict[str, Any]:
        """Record a held-out evaluation of the weights after the optimizer steps so far.

        gradscope tracks the best step, the train/validation gap and finds
        ``overfitting`` (see ``gradscope.watching.validation`` for the rule, its
        ``patience`` — default 5 evaluations — and relative ``min_delta`` —
        default 0.05).  Called once per evaluation, not per step: a tensor
        ``loss`` is read here (one host sync per evaluation).

        Under torch.distributed (a reduction group) the loss is averaged over the
        ranks (one all-reduce), so that every rank judges the same number and a
        ``stop_on`` stops them all at the same evaluation: each rank passing its
        own shard's loss stopped one rank alone, and the others waited in their
        next collective.  Every rank must then call ``validation`` together;
        ``reduce=False`` when only one rank evaluates (its decision is its own).

        Raises:
            GradscopeError: ``stop_on`` includes "overfitting" and this evaluation
                completes the overfitting finding.
        """
        self._check_open()
        self._read_pending_now()  # the training losses of a flush still in flight belong before it
        group = self._recorder.group
        if group is not None and reduce is not False:
            loss = mean_over_group(
                group, float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
            )
        evaluation, new = self._regularisation.add_validation(self._step, loss, metrics, patience, min_delta)
        if self._writer is not None:
            self._writer.write_validation(evaluation.step, evaluation.loss, evaluation.gap)
        if new is not None and "overfitting" in self._regularisation.stop_on:
            # Announced now, at the evaluation's step, not by the flush at close (one
            # step earlier in its header than in its message); partial: the other
            # training findings are not cleared by this one observation.
            self._announcer.alert(evaluation.step, {"training": [new]}, partial=("training",))
            self._regularisation.stopped_at = self._step
            raise GradscopeError(f"{new.message}; stopping (stop_on includes 'overfitting')", new.to_dict())
        return evaluation.to_dict()

    def mark_forward(self) -> None:
        """Start a new forward (resets call-site numbering), for frameworks that call
        submodules without calling the watched model itself."""
        self._check.sentinel.begin_forward()
        if self._recorder.active:
            self._recorder.start()

    def _mark_nonfinite(self, located: dict[str, Any]) -> None:
        """Mark a located non-finite value in the history; the run's first is drawn at
        the next flush whatever the heatmap cadence (gradscope.dashboards.heatmaps).

        The step opens a non-finite episode (``gradscope.watching.divergence``): the
        aggregate, the norm history, the learning-rate rules, the regularisation
        watch and the alerts of the other rules leave it out, and every later step
        until a sampled step is finite again (called before the flush of that step
        merges or alerts anything)."""
        step = int(located["step"])
        if self._layer_history.mark_nonfinite(step, located.get("layer"), located.get("role") or ""):
            self._heatmap_due = True
        self._spans.mark(step)

    def _check_open(self) -> None:
        if self._closed:
            raise GradscopeError("this gradscope.watch scope is closed; create a new one with gradscope.watch(model)")

    # -- the step ---------------------------------------------------------------
    def step(
        self, optimizer: Any = None, scaler: Any = None, loss: Any = None, *, unscaled: bool | None = None
    ) -> None:
        """Observe one optimizer step.  Call after backward, before ``optimizer.step()``.

        ``unscaled`` says whether ``scaler.unscale_`` already ran on ``.grad`` this
        step; None reads it from the scaler's state for ``optimizer``.

        Raises:
            GradscopeError: with ``raise_on`` containing "nonfinite", at the step
                that went non-finite (sampled or not; one step late on an
                accelerator); ``error.record`` says where.
        """
        self._check_open()
        late, self._late_error = self._late_error, None
        if self._recorder.group is None:  # under a group only at points every rank reaches (the next flush)
            late = self._read_pending(wait=False) or late
        if loss is not None:
            self.observe_loss(loss)
        if optimizer is not None:
            self._ratios.hook_post(optimizer)
            self._regularisation.observe_optimizer(optimizer)
        self._ratios.resolve()
        step = self._step
        sampled = step % self.every == 0
        scaler = active_scaler(scaler)
        if unscaled is None:
            unscaled = grads_already_unscaled(scaler, optimizer) if scaler is not None else True
        scaled = scaler is not None and not unscaled
        self._norms.observe(step, scaler, scaled, sampled, optimizer)
        if self._norms.scopes.notes:  # said when an optimizer's parameters are matched
            for note in self._norms.scopes.notes:
                if is_writer():
                    logger.warning("gradscope: %s", note)
                self._aggregate.record.note(note)
            self._norms.scopes.notes.clear()
        error, input_flags = self._check_step(step, sampled)
        if sampled:
            error = self._sampled_step(step, optimizer, scaled, input_flags) or error
        elif "gradient-spike" in self.raise_on and error is None:
            # Stopping on a spike must stop at the spike's step, before its update:
            # the training numbers of every step are flushed (the norms, loss and
            # scale only: nothing is recorded on this step) instead of at the next
            # sampled step, up to every - 1 updates later.  Opt-in through raise_on.
            error = self._flush(step, sampled=False, raise_errors=True)
        if not sampled and optimizer is not None and self._owed:
            self._owed_snapshot(step, optimizer)
        if self._norms.modules_changed():
            # A module registered anywhere since the last step (torch's registration
            # hooks set a flag: nothing is walked per step): the selection is looked at
            # again, so that a module added mid-run is hooked from the next forward on.
            self._recorder.reselect()
        self._step += 1
        self._regularisation.set_step(self._step)
        if self._step % self.every == 0 and not self._paused:
            self._recorder.start()
        else:
            self._recorder.stop()
        error = late or error  # a late flush's error belongs to an earlier step
        if error is not None:
            raise error

    def _check_step(self, step: int, sampled: bool) -> tuple[GradscopeError | None, list[Any]]:
        """Non-finite values on unsampled steps (gradscope.watching.nonfinite): earlier
        steps whose flag has landed, then this step's (read at once on the CPU).
        A sampled step hands over the sentinel's input flags to its flush instead."""
        error: GradscopeError | None = None
        bad = self._check.poll(wait=sampled)
        if bad is not None:
            error = self._bad_step(bad)
        input_flags: list[Any] = []
        step_loss, (names, squares, total) = self._norms.take_step_check()
        if sampled:
            input_flags = self._check.discard()
        else:
            if self._norms.scaler_seen:  # the scaler skips overflowing steps: expected, not checked
                squares = total = None
            self._check.record(step, step_loss, names, squares, total)
            bad = self._check.poll()
            if bad is not None:
                error = self._bad_step(bad) or error
        return error, input_flags

    def _bad_step(self, flags: StepFlags) -> GradscopeError | None:
        """A step whose own flag was non-finite: alert and stop here, or under
        torch.distributed keep the record for the next flush, which stops every
        rank together (``gradscope.watching.agreement``)."""
        if self._agreement is not None:
            self._episodes.hold(flags)
            return None
        earlier = self._read_pending(wait=True)  # the earlier flush's episode first, in step order
        return earlier or self._episodes.bad_step(flags, self._announcer.alert)

    def _sampled_step(self, step: int, optimizer: Any, scaled: bool, input_flags: list[Any]) -> GradscopeError | None:
        """Parameter statistics (at the diagnosis cadence), the update-ratio
        snapshot and the flush of a sampled step."""
        earlier = self._read_pending(wait=True)  # in step order, before this step's learning-rate snapshot
        full = step - self._last_diagnosed >= DIAGNOSE_EVERY_STEPS
        if full:
            self._recorder.capture_parameters()
        self._sample_scaled = scaled
        self._owed, self._owed_asked = set(), set()
        if optimizer is not None:
            types = {layer.name: layer.type for layer in self._recorder.record.layers}
            weights = self._ratios.layer_weights(registered=True)
            held = self._rates.observe_optimizer(step, optimizer, weights, types)
            if held:
                # Layers this optimizer does not update: another one may (see _owed_snapshot).
                self._owed = set(weights) - held
                self._owed_asked = {id(base_optimizer(optimizer))}
        self._ratios.take_snapshot(step)
        return earlier or self._flush(step, sampled=True, full=full, raise_errors=True, input_flags=input_flags)

    def _owed_snapshot(self, step: int, optimizer: Any) -> None:
        """An unsampled step of another optimizer than the sampled step's: the update-ratio
        snapshot of the owed layers it updates, so that each optimizer's layers get a
        sample per sampled step whichever optimizer's step the cadence lands on (with a
        GAN's D and G alternating and an even ``every``, G's layers never had one).
        Each optimizer is asked once per sampled step: a single-optimizer run pays a
        set lookup."""
        key = id(base_optimizer(optimizer))
        if key in self._owed_asked:
            return
        self._owed_asked.add(key)
        types = {layer.name: layer.type for layer in self._recorder.record.layers}
        weights = {n: w for n, w in self._ratios.layer_weights(registered=True).items() if n in self._owed}
        held = self._rates.observe_optimizer(step, optimizer, weights, types)
        if held:
            self._owed -= held
            self._ratios.take_snapshot(step, only=held)

    # -- flush ------------------------------------------------------------------
    def _flush(
        self, step: int, *, sampled: bool, raise_errors: bool, full: bool = False, input_flags: list[Any] | None = None
    ) -> GradscopeError | None:
        """Move this flush's numbers to the host and run the rules (``gradscope.watching.flush``);
        with ``read_late``, only launch it (read by ``_read_pending``), except the last
        one, at close (a full flush's weight measurement is launched with it)."""
        earlier = self._read_pending(wait=True)  # one flush in flight at a time: its host buffers are reused
        pending = launch(self, step, sampled=sampled, raise_errors=raise_errors, full=full, input_flags=input_flags)
        if self.read_late and not self._closed:
            pending.late = True
            self._pending_flush = pending
            return earlier
        return complete(self, pending) or earlier

    def _read_pending(self, wait: bool, collective: bool = True) -> GradscopeError | None:
        """The host side of the flush launched last (``read_late``), if any: when its
        copy has landed, or, with ``wait``, at once.  ``collective=False`` (closing
        on an exception) drops it under a group: its reduction may never complete."""
        pending = self._pending_flush
        if pending is None or not (wait or pending.ready()):
            return None
        self._pending_flush = None
        if not collective and self._recorder.group is not None:
            self._aggregate.record.note(
                f"closed on an exception: the flush of step {pending.step} (read late) was not reduced"
            )
            return None
        error = complete(self, pending)
        return error if pending.raise_errors else None

    def _read_pending_now(self) -> None:
        """``report()``, ``paused()``, ``validation()``: read the flush in flight (without a group:
        under one, other ranks may not be here); its error is raised by the next ``step()``."""
        if self._recorder.group is None:
            self._late_error = self._late_error or self._read_pending(wait=True)

    def _diagnose(self, record: Record, model: Any = None) -> list[Finding]:
        """The layer diagnosis of a full flush; ``model``: the model as the
        diagnosis may read it (``model_snapshot.HostModel``), default the model."""
        if not self.diagnose or self._diagnose_failed:
            return []
        try:
            from gradscope.diagnose import diagnose_record
        except ImportError:
            self._diagnose_failed = True
            self._aggregate.record.note("gradscope.diagnose.diagnose_record is unavailable: only training rules ran")
            return []
        findings, _ = diagnose_record(
            record, formats=self.formats, model=model if model is not None else self.model, during_training=True
        )
        return with_run_clip(list(findings), self._training.clip(), None)


class _Restore:
    """A removable handle for an instance attribute gradscope set: removing it brings
    back the class's own (``scaler.step`` wrapped by ``Scope.attach``)."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


def _first_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")
