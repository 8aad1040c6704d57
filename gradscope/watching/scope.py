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
each hooked output: one ``aminmax`` per hooked tensor), read at once on the CPU,
so training stops at the step that went non-finite, before ``optimizer.step()``;
on an accelerator it is read once its copy has landed (the next ``step()`` or
``close()``), without stalling the queue.  With ``tier="light"`` a NaN made in
backward only (finite loss and outputs) waits for the next sampled step.

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
import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradscope.distributed import is_writer
from gradscope.errors import GradscopeError
from gradscope.formats import get_format
from gradscope.learning_rate import LearningRateMonitor
from gradscope.placement import ParameterRef, local_gradients
from gradscope.record import Record
from gradscope.recorder import Recorder
from gradscope.report import Finding, Report, Severity
from gradscope.stats import Stats, sample_stride
from gradscope.training import (
    SpikeSummary,
    clip_advice,
    nonfinite_finding,
    skipped_steps_finding,
    spike_finding,
)
from gradscope.watching.aggregate import RunningRecord
from gradscope.watching.alerts import Alert, AlertTracker, run_summary
from gradscope.watching.nonfinite import (
    LayerInfo,
    StepCheck,
    StepFlags,
    first_nonfinite,
    locate_gradient,
    locate_step,
    nonfinite_kinds,
)
from gradscope.watching.norms import NormHistogram, SpikeDetector
from gradscope.watching.regularisation import RegularisationWatch, check_stop_on
from gradscope.watching.scaling import active_scaler, divide_stats, grads_already_unscaled, scale_tensor

logger = logging.getLogger("gradscope")

RAISE_CODES = ("nonfinite", "gradient-spike", "update-ratio", "fp16-overflow", "learning-rate-too-high")
_NORM, _LOSS, _SCALE = 0, 1, 2
WATCH_SAMPLE = 4096
# The layer diagnosis (depth, init, precision, units) of a flush costs a few
# milliseconds of Python; with every=1 it would run each step.  Its findings
# change over hundreds of steps, so it runs at most once per this many steps,
# and the statistics of weights and weight gradients, which only it reads, are
# taken on those steps only (the per-parameter gradient norms, exact, are taken
# every step).  Non-finite values, spikes and update ratios are still checked
# at every flush.
DIAGNOSE_EVERY_STEPS = 10
# "full": every hooked layer on sampled steps, gradient norms every step.
# "light": only layers that own parameters (Linear, Conv, Embedding, norms,
# attention), and gradient norms on sampled steps only; for models whose steps
# are short next to their size (README "Cost": an MLP of 8 x 1024 at batch 256).
TIERS = ("full", "light")


@dataclass
class FlushResult:
    """What one flush saw (kept in the Scope's bounded ring of recent flushes)."""

    step: int
    record: Record  # this flush's statistics (unscaled), one optimizer step
    global_norms: list[tuple[int, float]]  # (step, norm) of every step since the previous flush
    losses: list[tuple[int, float]]
    loss_scale: float | None
    update_ratios: dict[int, dict[str, float]]  # sampled step -> layer -> ‖Δw‖/‖w‖ (resolved since last flush)
    param_grad_norms: dict[str, float]  # parameter name -> gradient norm at this step
    clip: dict[str, Any] | None
    findings: list[Finding] = field(default_factory=list)
    alerts: list[Finding] = field(default_factory=list)


def _squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared 2-norms, stacked as one float32 vector on the first tensor's device;
    accumulated in float32 for fp16/bf16 (an fp16 norm would overflow at 65504
    although every element is finite).

    On the CPU a BLAS dot per tensor: 1.6x faster than ``_foreach_norm`` (which
    loops over ``vector_norm`` there) and more accurate (2e-6 vs 1e-5 relative at
    1M elements, 1e-4 vs 7e-4 at 16M, measured against float64).  On CUDA one
    fused ``_foreach_norm`` launch beats a launch per tensor.  Either way the
    squares overflow float32 for norms above ~1.8e19, as ``clip_grad_norm_``'s do.
    """
    device = tensors[0].device
    if all(t.dtype == torch.float32 and t.device == device for t in tensors):
        if device.type == "cpu":
            return torch.stack([torch.dot(flat, flat) for flat in (t.reshape(-1) for t in tensors)])
        return torch.stack(torch._foreach_norm(list(tensors))).square()
    squares = []
    for t in tensors:
        norm = torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None)
        squares.append(norm.float().square().to(device))
    return torch.stack(squares)


# Elements per weight behind the update ratio: ‖Δw‖/‖w‖ over a sample of m
# elements spread over the weight is within ~1/sqrt(2m) relative (2.2% at 1024)
# of the whole weight's; the healthy band it is judged against spans decades.
UPDATE_RATIO_SAMPLE = 1024


_UPDATE_RATIO_BLOCK = 64  # contiguous elements per block: 4 cache lines of fp32


def _weight_sample(weight: torch.Tensor) -> torch.Tensor:
    """A view of a sample of ``weight`` that follows in-place updates.

    UPDATE_RATIO_SAMPLE elements in blocks of 64 contiguous ones, the blocks a
    prime number of elements apart (so they start at varied columns): reading
    a weight that has left the caches then costs 64 cache-line misses rather
    than 1024 for single strided elements.
    """
    n = weight.numel()
    if not weight.is_contiguous() or n <= 2 * UPDATE_RATIO_SAMPLE:
        return weight
    blocks = UPDATE_RATIO_SAMPLE // _UPDATE_RATIO_BLOCK
    # A prime >= (n - block) // blocks, capped so that the last block still fits.
    step = min(sample_stride(n - _UPDATE_RATIO_BLOCK, blocks), (n - _UPDATE_RATIO_BLOCK) // (blocks - 1))
    flat = weight.view(-1)
    return flat.as_strided((blocks, _UPDATE_RATIO_BLOCK), (step, 1), flat.storage_offset())


def stats_norm(stats: Stats | None) -> float:
    """The 2-norm of the tensor behind ``stats`` (sqrt(M2 + n mean^2))."""
    if stats is None:
        return math.nan
    if not stats.moments_valid:
        return math.inf if stats.has_inf and not stats.has_nan else math.nan
    return math.sqrt(stats.count) * stats.rms


class Scope:
    """A watched training run.  Create it with ``gradscope.watch`` (same arguments).

    Hooks are attached on construction and removed by ``close()`` (or leaving the
    ``with`` block).  Beyond ``watch``'s arguments: ``ring`` is how many recent
    flushes ``scope.recent`` keeps (each a ``FlushResult``); ``diagnose=False``
    runs only the training rules (no ``gradscope.diagnose`` per flush).
    ``raise_on`` takes codes among RAISE_CODES; ``tier`` one of TIERS.
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
        if int(every) < 1:
            raise GradscopeError(f"every must be a positive number of steps, not {every!r}")
        if tier not in TIERS:
            raise GradscopeError(f"tier: unknown tier {tier!r}; choose among {', '.join(TIERS)}")
        for name in formats:
            get_format(name)  # raises on an unknown format name
        unknown = [code for code in raise_on if code not in RAISE_CODES]
        if unknown:
            raise GradscopeError(f"raise_on: unknown code {unknown[0]!r}; choose among {', '.join(RAISE_CODES)}")
        stop_on = check_stop_on(stop_on)
        self.model = model
        self.every = int(every)
        self.tier = tier
        self.formats = tuple(formats)
        self.on_finding = on_finding
        self.raise_on = tuple(raise_on)
        self.diagnose = diagnose
        self.log_dir = log_dir
        self.recent: deque[FlushResult] = deque(maxlen=ring)
        self._report: Report | None = None
        self.first_nonfinite: dict[str, Any] | None = None

        # Parameters are looked up by name at each step (never kept: FSDP swaps and
        # frees parameter storage), from the recorder's table, built after sharding.
        self._param_refs: list[ParameterRef] | None = None
        self._step = 0
        self._last_flushed = -1
        self._buf: torch.Tensor | None = None
        self._loss_given = [False] * self.every
        self._scale_given = [False] * self.every
        self._norm_given = [False] * self.every
        self._pending_loss: torch.Tensor | None = None
        self._param_norms: tuple[list[str], torch.Tensor] | None = None
        self._scaler_seen = False
        self._sample_scaled = False  # weight gradients of the sampled step still scaled
        self._snapshot: tuple[int, list[str], list[torch.Tensor], list[torch.Tensor]] | None = None
        self._ratios_ready: list[tuple[int, list[str], torch.Tensor]] = []
        self._weight_dtypes: dict[str, str] = {}  # layer -> dtype of its weight
        self._optimizer_handles: list[Any] = []
        self._hooked: set[int] = set()
        self._paused = False
        self._closed = False
        self._raised = False
        self._hooks_checked = False
        self._step_loss: torch.Tensor | None = None
        # Gradient clipping done by a trainer between backward and step(): the norms
        # measured before it (observe_gradients) and its max_norm, for the summary.
        self._pre_clip: tuple[list[str], list[str], torch.Tensor | None, torch.Tensor | None] | None = None
        self.clip_max_norm: float | None = None
        self._clipped_steps = 0
        self._post_clip_last: float | None = None
        self._step_squares: tuple[list[str], torch.Tensor | None, torch.Tensor | None] = ([], None, None)

        self._history = NormHistogram()
        self._detector = SpikeDetector()
        self._spikes = SpikeSummary()
        self._rates = LearningRateMonitor()  # update-ratio and learning-rate-too-high (gradscope.learning_rate)
        self._tracker = AlertTracker()
        self._aggregate = RunningRecord()
        self._last_scale: float | None = None
        self._skipped = 0
        self._scale_history: deque[tuple[int, float]] = deque(maxlen=64)
        self._loss_last: float | None = None
        self._global_last: float | None = None
        self._global_max: float = 0.0
        self._flushes = 0
        self._diagnose_failed = False
        self._last_diagnosed = -DIAGNOSE_EVERY_STEPS

        self._writer = None
        if log_dir is not None:
            from gradscope.tensorboard import DashboardWriter

            self._writer = DashboardWriter.for_rank_zero(log_dir, formats=self.formats)
        # Moments and histograms of tensors above 2 x WATCH_SAMPLE elements come from
        # a strided sample (errors in gradscope.stats); counts stay exact, and so do
        # the extremes of activations and ∂ℓ/∂h.  Weights and weight gradients are
        # sampled whole: the exact per-step gradient norms see every NaN/inf there.
        self._recorder = Recorder(
            model,
            include=include,
            exclude=exclude,
            parametrised_only=tier == "light",
            sample=WATCH_SAMPLE,
            exact_parameter_extremes=False,
            sequence_modules=sequence_modules,
            record_no_grad=record_no_grad,
            process_group=process_group,
        )
        self._check = StepCheck()  # the per-step non-finite check (gradscope.watching.nonfinite)
        self._recorder.sentinel = self._check.sentinel
        first = next(iter(model.parameters()), None)
        self._check.prepare(first.device if first is not None else torch.device("cpu"))
        self._episode: Finding | None = None  # the nonfinite finding of the current non-finite episode
        self._pending_error: GradscopeError | None = None
        self._recorder.attach()
        self._recorder.start()  # step 0 is sampled
        # Weight decay, weights over time, eval-mode mistakes, validation (gradscope.watching.regularisation).
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._regularisation = RegularisationWatch(model, trainable, tuple(stop_on))

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
        try:
            bad = self._check.poll(wait=True)  # steps whose flag was still in flight
            if bad is not None:
                self._pending_error = self._bad_step(bad)
            self._resolve_update_ratio()
            reduced = self._recorder.group is not None
            # With a reduction group the recorder's flush is a collective: every rank flushes.
            if not collective and reduced:
                self._aggregate.record.note("closed on an exception: the last steps' statistics were not reduced")
            elif self._last_flushed < self._step - 1 or self._recorder.pending_count() or self._ratios_ready or reduced:
                self._flush(max(self._step - 1, 0), sampled=False, raise_errors=False)
        finally:
            self._recorder.close()
            self._regularisation.close()
            handles, self._optimizer_handles = self._optimizer_handles, []
            for handle in handles:
                handle.remove()
            self._snapshot = None
            self._buf = None
        self._report = self._final_report()
        if self._writer is not None:
            try:
                self._writer.write_report(self._report, step=max(self._step - 1, 0))
            finally:
                self._writer.close()
        self._print_summary(self._report)
        error, self._pending_error = self._pending_error, None
        if error is not None and raise_pending:
            raise error
        return self._report

    def _print_summary(self, report: Report) -> None:
        """The run summary, on the gradscope logger (WARNING: shown without logging configured;
        silence it with ``logging.getLogger("gradscope").setLevel(logging.ERROR)``)."""
        if not is_writer():
            return  # one voice per job: rank 0 prints
        dashboards = self._writer.logdir if self._writer is not None else None
        text = run_summary(report.analysis.get("training", {}), report.findings, self._tracker.counts, dashboards)
        logger.warning("%s", text)

    def report(self) -> Report:
        """The full report: final once the scope is closed, else the run so far
        (what ``close()`` would return now, without closing)."""
        if self._report is not None:
            return self._report
        return self._final_report()

    def attach(self, optimizer: torch.optim.Optimizer, scaler: Any = None) -> Scope:
        """Call ``step(optimizer, scaler)`` from an optimizer pre-step hook, so the
        training loop needs no change.  The hook is removed on close.  In this mode
        the loss is seen only if you pass it to ``observe_loss``.
        """
        self._check_open()

        def pre_hook(opt: Any, args: Any, kwargs: Any) -> None:
            self.step(opt, scaler=scaler)

        self._optimizer_handles.append(optimizer.register_step_pre_hook(pre_hook))
        self._hook_post(optimizer)
        return self

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Remember this step's (unscaled) loss; checked for NaN/Inf at the flush.

        Losses observed within one optimizer step are summed: with gradient
        accumulation, pass each micro-batch's loss divided by the number of
        micro-batches (what Lightning's ``on_before_backward`` sees) and the sum
        is the step's mean loss.
        """
        value = loss.detach().float().sum() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self._pending_loss = value if self._pending_loss is None else self._pending_loss + value.to(self._pending_loss)

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
        measured = self._gradient_squares()
        if measured[2] is not None:
            self._pre_clip = measured

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside (evaluation, generation) are not recorded."""
        self._paused = True
        self._recorder.stop()
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
    ) -> dict[str, Any]:
        """Record a held-out evaluation of the weights after the optimizer steps so far.

        gradscope tracks the best step, the train/validation gap and finds
        ``overfitting`` (see ``gradscope.watching.validation`` for the rule, its
        ``patience`` — default 5 evaluations — and relative ``min_delta`` —
        default 0.05).  Called once per evaluation, not per step: a tensor
        ``loss`` is read here (one host sync per evaluation).

        Raises:
            GradscopeError: ``stop_on`` includes "overfitting" and this evaluation
                completes the overfitting finding.
        """
        self._check_open()
        evaluation, new = self._regularisation.add_validation(self._step, loss, metrics, patience, min_delta)
        if self._writer is not None:
            self._writer.write_validation(evaluation.step, evaluation.loss, evaluation.gap)
        if new is not None and "overfitting" in self._regularisation.stop_on:
            self._regularisation.stopped_at = self._step
            raise GradscopeError(f"{new.message}; stopping (stop_on includes 'overfitting')", new.to_dict())
        return evaluation.to_dict()

    def mark_forward(self) -> None:
        """Start a new forward (resets call-site numbering), for frameworks that call
        submodules without calling the watched model itself."""
        self._check.sentinel.begin_forward()
        if self._recorder.active:
            self._recorder.start()

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
        if loss is not None:
            self.observe_loss(loss)
        if optimizer is not None:
            self._hook_post(optimizer)
            self._regularisation.observe_optimizer(optimizer)
        self._resolve_update_ratio()
        step = self._step
        sampled = step % self.every == 0
        scaler = active_scaler(scaler)
        if unscaled is None:
            unscaled = grads_already_unscaled(scaler, optimizer) if scaler is not None else True
        scaled = scaler is not None and not unscaled
        self._observe_norms(step, scaler, scaled, sampled)
        error: GradscopeError | None = None
        # Non-finite values on unsampled steps (gradscope.watching.nonfinite): earlier
        # steps whose flag has landed, then this step's (read at once on the CPU).
        bad = self._check.poll(wait=sampled)
        if bad is not None:
            error = self._bad_step(bad)
        input_flags: list[Any] = []
        if sampled:
            input_flags = self._check.discard()
        else:
            names, squares, total = self._step_squares
            if self._scaler_seen:  # the scaler skips overflowing steps: expected, not checked
                squares = total = None
            self._check.record(step, self._step_loss, names, squares, total)
            bad = self._check.poll()
            if bad is not None:
                error = self._bad_step(bad) or error
        self._step_loss, self._step_squares = None, ([], None, None)
        if sampled:
            full = step - self._last_diagnosed >= DIAGNOSE_EVERY_STEPS
            if full:
                self._recorder.capture_parameters()
            self._sample_scaled = scaled
            if optimizer is not None:
                types = {layer.name: layer.type for layer in self._recorder.record.layers}
                self._rates.observe_optimizer(step, optimizer, self._layer_weights(registered=True), types)
            self._take_snapshot(step)
            error = self._flush(step, sampled=True, full=full, raise_errors=True, input_flags=input_flags) or error
        self._step += 1
        self._regularisation.set_step(self._step)
        if self._step % self.every == 0 and not self._paused:
            self._recorder.start()
        else:
            self._recorder.stop()
        if error is not None:
            raise error

    def _buffer(self, device: torch.device) -> torch.Tensor:
        if self._buf is None or self._buf.device != device:
            self._buf = torch.full((3, self.every), math.nan, dtype=torch.float32, device=device)
        return self._buf

    def _trainable(self) -> list[ParameterRef]:
        """The trainable parameters, by name (the table is built after any sharding)."""
        if self._param_refs is None:
            owner = self._recorder.owner
            refs = []
            for ref in self._recorder.parameter_table():
                local = ref.resolve(owner)
                if local is not None and local.requires_grad:
                    refs.append(ref)
            self._param_refs = refs
        return self._param_refs

    def _observe_norms(self, step: int, scaler: Any, scaled: bool, sampled: bool) -> None:
        """Device-only work of every step: global norm, loss, scale into the ring.

        The ring holds squared norms of this rank's part (shards whole, replicas
        on one rank only), which the flush sums over the reduction group before
        the square root: √(Σ over ranks of local Σg²), as clip_grad_norm_ does for DTensors.
        """
        slot = step % self.every
        measure = sampled or self.tier == "full"
        self._norm_given[slot] = measure
        pre_clip, self._pre_clip = self._pre_clip, None
        names: list[str] = []
        present: list[str] = []
        squares: torch.Tensor | None = None
        mask: torch.Tensor | None = None
        if measure:
            # measured before the trainer clipped (observe_gradients), else now
            names, present, squares, mask = pre_clip if pre_clip is not None else self._gradient_squares()
        device = squares.device if squares is not None else self._default_device()
        presence: torch.Tensor | None = None
        if squares is not None:
            total = squares.sum()
            stacked = squares  # per-parameter squared norms: sampled steps only
            if sampled and mask is not None:
                # The shared layout: 0 where this rank holds none of a parameter;
                # whether it holds a gradient travels alongside.
                stacked = torch.zeros(len(names), dtype=squares.dtype, device=device)
                stacked[mask] = squares
                presence = mask.to(squares.dtype)
        else:
            stacked = torch.zeros(len(names), device=device)
            presence = torch.zeros(len(names), device=device) if self._recorder.group is not None else None
            total = torch.zeros((), device=device)
        buf = self._buffer(device)
        scale = scale_tensor(scaler) if scaler is not None else None
        if scale is not None:
            scale = scale.to(device=device, dtype=torch.float32)
            self._scaler_seen = True
            if scaled:
                total = total / (scale * scale)  # squared norms
                stacked = stacked / (scale * scale)
            buf[_SCALE, slot] = scale
        self._scale_given[slot] = scale is not None
        if measure:
            buf[_NORM, slot] = total
        if self._pending_loss is not None:
            buf[_LOSS, slot] = self._pending_loss.to(device)
        self._loss_given[slot] = self._pending_loss is not None
        self._step_loss = self._pending_loss
        self._step_squares = (present, squares, total if squares is not None else None)
        self._pending_loss = None
        if sampled:
            self._param_norms = (names, stacked if presence is None else torch.cat([stacked, presence]))

    def _gradient_squares(
        self,
    ) -> tuple[list[str], list[str], torch.Tensor | None, torch.Tensor | None]:
        """This rank's gradients now: the layout of the names (every trainable
        parameter with a reduction group, else those with a gradient), the names
        with a gradient, their squared norms (device, no sync) and, with a
        reduction group, which of the layout they are (a device mask)."""
        refs = self._trainable()
        grads_by_name = local_gradients(refs, self._recorder.owner)
        present = [name for name, grad in grads_by_name if grad is not None]
        grads = [grad for _, grad in grads_by_name if grad is not None]
        reduced = self._recorder.group is not None
        names = [ref.name for ref in refs] if reduced else present  # the same layout on every rank
        if not grads:
            return names, present, None, None
        squares = _squared_norms(grads)
        mask = None
        if reduced:
            mask = torch.tensor([grad is not None for _, grad in grads_by_name], device=squares.device)
        return names, present, squares, mask

    def _local_parameters(self) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """(name, this rank's part of the value, its gradient) of each trainable
        parameter, looked up now and not kept (for the non-finite search)."""
        out = []
        for ref in self._trainable():
            local = ref.resolve(True)
            if local is not None:
                out.append((ref.name, local.value, local.grad))
        return out

    def _default_device(self) -> torch.device:
        for ref in self._trainable():
            local = ref.resolve(True)
            if local is not None:
                return local.value.device
        return torch.device("cpu")

    # -- update ratio -----------------------------------------------------------
    def _layer_weights(self, registered: bool = False) -> dict[str, torch.Tensor]:
        """Each recorded layer's main weight (first call site only), by layer name,
        looked up now and not kept (FSDP may swap the parameter object between
        steps): this rank's part of it (a view that follows in-place updates),
        or with ``registered`` the parameter object the optimizer holds (an
        FSDP1 unit's FlatParameter)."""
        weights: dict[str, torch.Tensor] = {}
        for layer in self._recorder.record.layers:
            ref = self._recorder.weight_ref(layer.name) if layer.call == 1 else None
            if ref is None:
                continue
            if registered:
                param = ref.registered()
                if param is not None:
                    weights[layer.name] = param
                continue
            local = ref.resolve(True)
            if local is not None:
                weights[layer.name] = local.value
        if not registered:
            self._weight_dtypes = {name: str(w.dtype).removeprefix("torch.") for name, w in weights.items()}
        return weights

    def _take_snapshot(self, step: int) -> None:
        """Keep the weights as they are before ``optimizer.step()``.

        Only a prime-strided sample of each weight (at most ~2 x UPDATE_RATIO_SAMPLE
        elements) is copied: ‖Δw‖/‖w‖ over the same sampled elements estimates
        the ratio within ~1/sqrt(2k) relative, while a full copy of every
        weight each sampled step cost a quarter of an MLP's step time.
        """
        weights = self._layer_weights()
        if not weights:
            return
        names = list(weights)
        views = [_weight_sample(weights[n].detach()) for n in names]
        self._snapshot = (step, names, views, [v.clone() for v in views])

    def _hook_post(self, optimizer: Any) -> None:
        """Resolve the update ratio right after ``optimizer.step()`` (frees the
        snapshot at once).  Wrappers such as accelerate's ``AcceleratedOptimizer``
        do not run hooks of their own: the wrapped optimizer's are used.  Without
        any, the ratio is resolved at the next ``step()`` call."""
        if id(optimizer) in self._hooked:
            return
        self._hooked.add(id(optimizer))

        def post_hook(opt: Any, args: Any, kwargs: Any) -> None:
            self._resolve_update_ratio()

        for target in (optimizer, getattr(optimizer, "optimizer", None)):
            if target is None or not hasattr(target, "_optimizer_step_post_hooks"):
                continue
            self._optimizer_handles.append(target.register_step_post_hook(post_hook))
            return

    def _resolve_update_ratio(self) -> None:
        """‖w_after − w_before‖ / ‖w_before‖ per layer, on the device; frees the snapshot."""
        if self._snapshot is None:
            return
        step, names, params, before = self._snapshot
        self._snapshot = None
        with torch.no_grad():
            device = params[0].device
            diffs: Sequence[torch.Tensor]
            if all(p.device == device and p.dtype == torch.float32 for p in params):
                diffs = torch._foreach_sub(params, before)  # one call for every layer
            else:
                diffs = [p - b for p, b in zip(params, before, strict=True)]
            # Squared norms of Δw and w, summed over the ranks' parts at the flush.
            ratio = torch.cat([_squared_norms(diffs), _squared_norms(before)])
        self._ratios_ready.append((step, names, ratio))

    # -- flush ------------------------------------------------------------------
    def _layer_record(self, extra: torch.Tensor | None = None) -> tuple[Record, torch.Tensor | None]:
        """This flush's per-layer statistics, as a Record of its own, and ``extra``
        reduced in the same collective (see Recorder.flush)."""
        recorder = self._recorder
        for layer in recorder.record.layers:
            layer.stats = {}
            layer.time = {}
        recorder.record.input = None
        host_extra = recorder.flush(extra)
        layers = [
            dataclasses.replace(layer, stats=dict(layer.stats)) for layer in recorder.record.layers if layer.stats
        ]
        return Record(layers=layers, input=recorder.record.input, steps=1, reduction=dict(recorder.record.reduction)), (
            host_extra
        )

    def _pack(self) -> tuple[torch.Tensor | None, list[str], list[tuple[int, list[str]]]]:
        """The ring, parameter norms and update ratios in one device vector, to
        travel with the statistics (one transfer; one reduction under torch.distributed)."""
        pieces: list[torch.Tensor] = []
        if self._buf is not None:
            pieces.append(self._buf.reshape(-1))
        names: list[str] = []
        if self._param_norms is not None:
            names, norms = self._param_norms
            pieces.append(norms.reshape(-1).float())
        ratios = self._ratios_ready
        pieces.extend(r.float() for _, _, r in ratios)
        self._ratios_ready = []
        self._param_norms = None
        if not pieces:
            return None, [], []
        device = pieces[0].device
        packed = torch.cat([p.to(device) for p in pieces])
        if self._buf is not None:
            self._buf.fill_(math.nan)
        return packed, names, [(step, layer_names) for step, layer_names, _ in ratios]

    def _unpack(
        self, host: torch.Tensor | None, names: list[str], ratio_layout: list[tuple[int, list[str]]]
    ) -> tuple[torch.Tensor | None, list[str], torch.Tensor | None, list[tuple[int, list[str], Any]]]:
        """Squared norms (summed over ranks) to norms; losses and scales summed over
        ranks to their mean (the ranks' mean loss is the global batch's)."""
        if host is None:
            return None, [], None, []
        ranks = self._recorder.group.size if self._recorder.group is not None else 1
        offset = 0
        ring = None
        if self._buf is not None:
            ring = host[: 3 * self.every].reshape(3, self.every).clone()
            ring[_NORM] = ring[_NORM].sqrt()
            ring[_LOSS] = ring[_LOSS] / ranks
            ring[_SCALE] = ring[_SCALE] / ranks
            offset = 3 * self.every
        param_norms = None
        if names:
            if self._recorder.group is not None:
                squares = host[offset : offset + len(names)]
                present = host[offset + len(names) : offset + 2 * len(names)] > 0
                kept = [name for name, here in zip(names, present.tolist(), strict=True) if here]
                param_norms = squares[present].sqrt()
                offset += 2 * len(names)
                names = kept
            else:
                param_norms = host[offset : offset + len(names)].sqrt()
                offset += len(names)
        out_ratios = []
        for step, layer_names in ratio_layout:
            k = len(layer_names)
            diff, before = host[offset : offset + k], host[offset + k : offset + 2 * k]
            out_ratios.append((step, layer_names, (diff / before).sqrt()))
            offset += 2 * k
        return ring, names, param_norms, out_ratios

    def _flush(
        self, step: int, *, sampled: bool, raise_errors: bool, full: bool = False, input_flags: list[Any] | None = None
    ) -> GradscopeError | None:
        """Move this flush's numbers to the host and run the training rules; a
        ``full`` flush also carries parameter statistics and runs the diagnosis."""
        packed, packed_names, ratio_layout = self._pack()
        record, host = self._layer_record(packed)
        ring, names, param_norms, ratios = self._unpack(host, packed_names, ratio_layout)
        if sampled and not full and self._in_trouble(record, ring, step):
            # Parameter statistics are skipped on most steps, but a NaN/Inf search
            # needs them: the weights are still those of this forward (step() runs
            # before optimizer.step()), so take them now.
            self._add_parameter_stats(record)
        if sampled and not self._hooks_checked:
            self._check_hooks_fired(names)
        steps = list(range(self._last_flushed + 1, step + 1))
        self._last_flushed = step
        self._flushes += 1

        global_norms: list[tuple[int, float]] = []
        losses: list[tuple[int, float]] = []
        scale_now: float | None = None
        first_bad_norm: int | None = None
        first_bad_loss: int | None = None
        spike = None
        for t in steps:
            slot = t % self.every
            if ring is None:
                break
            if self._scale_given[slot]:
                scale = float(ring[_SCALE, slot])
                if self._last_scale is not None and scale < self._last_scale:
                    self._skipped += 1  # GradScaler halves the scale when it skips a step
                self._last_scale = scale_now = scale
            if self._loss_given[slot]:
                loss = float(ring[_LOSS, slot])
                losses.append((t, loss))
                self._loss_last = loss
                if not math.isfinite(loss) and first_bad_loss is None:
                    first_bad_loss = t
            if not self._norm_given[slot]:
                continue  # tier "light": gradient norms on sampled steps only
            norm = float(ring[_NORM, slot])
            global_norms.append((t, norm))
            if self.clip_max_norm and math.isfinite(norm):
                # torch.nn.utils.clip_grads_with_norm_: factor max_norm / (norm + 1e-6), at most 1
                self._post_clip_last = norm * min(1.0, self.clip_max_norm / (norm + 1e-6))
                self._clipped_steps += norm > self.clip_max_norm
            if not math.isfinite(norm) and first_bad_norm is None:
                first_bad_norm = t
            self._history.add(norm)
            if math.isfinite(norm):
                self._global_last = norm
                self._global_max = max(self._global_max, norm)
            found = self._detector.observe(t, norm)
            if found is not None:
                self._spikes.add(found)
                spike = found
        if scale_now is not None:
            self._scale_history.append((step, scale_now))
            record = self._unscale(record, scale_now)
        if self._scaler_seen and sampled and global_norms and not math.isfinite(global_norms[-1][1]):
            # The GradScaler skips this step (its scaled gradients overflowed): its
            # gradient statistics are not the ones training uses, so leave them out.
            for layer in record.layers:
                layer.stats.pop("gradient", None)
                layer.stats.pop("weight_grad", None)
            self._aggregate.record.note("steps skipped by the GradScaler are left out of the gradient statistics")

        clip = clip_advice(self._history)
        findings: list[Finding] = []
        param_grad_norms = dict(zip(names, param_norms.tolist(), strict=True)) if param_norms is not None else {}
        located = self._locate_nonfinite(
            record, step, sampled, first_bad_norm, first_bad_loss, losses, param_grad_norms, input_flags
        )
        nonfinite: list[Finding] = []
        if located is not None:
            nonfinite.append(self._nonfinite_episode(located, clip))
        training: list[Finding] = []
        if spike is not None:
            training.append(spike_finding(spike, self._spikes, clip))

        update_ratios: dict[int, dict[str, float]] = {}
        for ratio_step, layer_names, values in ratios:
            for name, value in zip(layer_names, values.tolist(), strict=True):
                update_ratios.setdefault(ratio_step, {})[name] = value
        training.extend(self._rates.observe(step, update_ratios, global_norms, losses))
        if self._scaler_seen:
            skipped = skipped_steps_finding(self._skipped, self._last_flushed + 1, self._last_scale)
            if skipped is not None:
                training.append(skipped)
        sources: dict[str, list[Finding]] = {"training": training}
        if sampled or located is not None:
            sources["nonfinite"] = nonfinite  # a sampled step is searched whole: absence clears
        if sampled and full and record.layers:
            self._last_diagnosed = step
            diagnosed = self._diagnose(record)
            if located is not None:
                # The watch's own record of this step says where it started; the
                # diagnosis reads the same statistics with less context.
                diagnosed = [f for f in diagnosed if f.code != "nonfinite"]
            sources["diagnosis"] = diagnosed
        if not nonfinite and sampled:
            self._episode = None
        findings = [f for group in sources.values() for f in group]

        if spike is not None and spike.step == step and param_grad_norms:
            top = self._spikes.add_parameter_norms(step, param_grad_norms)
            for finding in findings:
                if finding.code == "gradient-spike":
                    finding.evidence["largest_parameter_norms"] = top
        regularisation = self._regularisation.flush(
            step, full=sampled and full, param_grad_norms=param_grad_norms, losses=losses, writer=self._writer
        )
        sources["training"].extend(regularisation)  # cached between measurements: evaluated every flush
        findings.extend(regularisation)
        alerts = self._alert(step, sources)
        self._aggregate.merge(record)
        result = FlushResult(
            step=step,
            record=record,
            global_norms=global_norms,
            losses=losses,
            loss_scale=scale_now,
            update_ratios=update_ratios,
            param_grad_norms=param_grad_norms,
            clip=clip,
            findings=findings,
            alerts=[alert.finding for alert in alerts if alert.kind != "cleared"],
        )
        last = self.recent[-1] if self.recent else None
        if not steps and not record.layers and last is not None:
            # Only the update ratio of the last sampled step arrived (at close).
            last.update_ratios.update(update_ratios)
        else:
            self.recent.append(result)
        if self._writer is not None:
            self._writer.write_flush(result, skipped_steps=self._skipped if self._scaler_seen else None)
        if not raise_errors or self._raised:
            return None
        if located is not None and "nonfinite" in self.raise_on:
            return self._nonfinite_error()
        for alert in alerts:
            finding = alert.finding
            if (
                alert.kind in ("appeared", "escalated")
                and finding.code in self.raise_on
                and finding.code != "nonfinite"
            ):
                self._raised = True
                return GradscopeError(
                    f"{finding.message}; stopping (raise_on includes {finding.code!r})", finding.to_dict()
                )
        return None

    def _check_hooks_fired(self, grad_names: list[str]) -> None:
        """Warn once when a sampled step trained the model (gradients arrived) yet
        no hook of the recorder fired: a model compiled with ``torch.compile``
        and run before ``watch`` attached keeps running the graph it traced
        without the hooks."""
        self._hooks_checked = True
        if self._recorder.record.layers or not grad_names or not self._recorder._selected:
            return
        message = (
            "no layer was recorded although gradients arrived: if the model was compiled with torch.compile "
            "and run before gradscope.watch attached, its compiled graph has no hooks; attach watch before "
            "the first compiled call (compile after gradscope.watch)"
        )
        self._aggregate.record.note(message)
        if is_writer():
            logger.warning("gradscope: %s", message)

    # -- non-finite values --------------------------------------------------------
    def _nonfinite_episode(self, located: dict[str, Any], clip: dict[str, Any] | None) -> Finding:
        """The nonfinite finding for a step that saw NaN/inf: the first such step of
        the run names it, and it stays the same finding (one alert) while later
        steps stay non-finite, until a sampled step is finite again."""
        if self.first_nonfinite is None:
            self.first_nonfinite = located
        if self._episode is None:
            self._episode = nonfinite_finding(located, clip)
        return self._episode

    def _nonfinite_error(self) -> GradscopeError | None:
        if self._raised or "nonfinite" not in self.raise_on or self._episode is None:
            return None
        self._raised = True
        record = self._episode.evidence
        return GradscopeError(self._episode.message + "; stopping (raise_on includes 'nonfinite')", record=dict(record))

    def _layer_infos(self) -> list[LayerInfo]:
        return [
            LayerInfo(layer.name, layer.module, layer.type, layer.index, layer.output_dtype)
            for layer in sorted(self._recorder.record.layers, key=lambda layer: layer.index)
        ]

    def _bad_step(self, flags: StepFlags) -> GradscopeError | None:
        """An unsampled step whose check flag was non-finite: find where, alert, and
        return the error to raise (None for a false alarm or when not raising)."""
        if self._episode is not None:
            # Already reported, and the run goes on (raise_on): no search per step, but
            # the finding's life story follows it (the same finding: no new alert).
            self._alert(flags.step, {"nonfinite": [self._episode]})
            return None
        located = locate_step(
            flags, self._layer_infos(), self._local_parameters(), include_gradients=not self._scaler_seen
        )
        if located is None:
            return None
        if not flags.same_step:
            located["read"] = "one step late (accelerator): optimizer.step() of this step already ran"
        finding = self._nonfinite_episode(located, clip_advice(self._history))
        self._alert(flags.step, {"nonfinite": [finding]})
        return self._nonfinite_error()

    def _alert(self, step: int, sources: dict[str, list[Finding]]) -> list[Alert]:
        """Feed one observation to the tracker and announce its alerts (one TensorBoard
        text entry for all of them)."""
        alerts = self._tracker.observe(step, sources)
        if not alerts:
            return alerts
        details = "scope.report()"
        if self._writer is not None:
            details += f"; TensorBoard {self._writer.logdir}, Text tab"
            self._writer.write_alerts(step, [alert.markdown() for alert in alerts])
        for alert in alerts:
            self._announce(alert, details)
        return alerts

    def _in_trouble(self, record: Record, ring: torch.Tensor | None, step: int) -> bool:
        """Whether this sampled step saw a non-finite tensor or gradient norm."""
        if ring is not None and not math.isfinite(float(ring[_NORM, step % self.every])):
            return True
        return any(
            stats is not None and stats.nonfinite_count > 0
            for layer in record.layers
            for stats in (layer.activation, layer.gradient)
        )

    def _add_parameter_stats(self, record: Record) -> None:
        # Local to this rank (no collective): under DDP only some ranks may be in trouble.
        extra = self._recorder.parameter_stats()
        for layer in record.layers:
            layer.stats.update(extra.get(layer.name, {}))

    def _unscale(self, record: Record, scale: float) -> Record:
        for layer in record.layers:
            if "gradient" in layer.stats:
                layer.stats["gradient"] = divide_stats(layer.stats["gradient"], scale)
            if "weight_grad" in layer.stats and self._sample_scaled:
                layer.stats["weight_grad"] = divide_stats(layer.stats["weight_grad"], scale)
        return record

    def _locate_nonfinite(
        self,
        record: Record,
        step: int,
        sampled: bool,
        bad_norm: int | None,
        bad_loss: int | None,
        losses: list[tuple[int, float]],
        param_grad_norms: dict[str, float],
        input_flags: list[Any] | None = None,
    ) -> dict[str, Any] | None:
        """The first NaN/Inf of a sampled step, searched in its record (the steps in
        between are searched by their per-step check, ``gradscope.watching.nonfinite``)."""
        if not sampled:
            return None
        loss_at_step = dict(losses).get(step)
        loss_finite = None if loss_at_step is None else math.isfinite(loss_at_step)
        weight_dtypes = self._weight_dtypes
        located = first_nonfinite(
            record,
            step,
            loss_finite=loss_finite,
            include_gradients=not self._scaler_seen,
            weight_dtypes=weight_dtypes,
            input_finite=_inputs_finite(input_flags),
        )
        if located is None and bad_norm == step and not self._scaler_seen:
            # Parameter statistics are sampled, their norms exact: a non-finite norm is
            # a NaN/inf element the sample missed, or a sum of squares that overflowed
            # float32 -- non-finite either way, as clip_grad_norm_ would see it.
            bad = [name for name, value in param_grad_norms.items() if not math.isfinite(value)]
            params = self._local_parameters()
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

            located = locate_gradient(
                step,
                bad,
                self._layer_infos(),
                dtypes={name: str(value.dtype).removeprefix("torch.") for name, value, _ in params},
                elements=elements,
                forward_finite=forward_finite,
                gradient_bad=gradient_bad,
            )
        return located

    def _diagnose(self, record: Record) -> list[Finding]:
        if not self.diagnose or self._diagnose_failed:
            return []
        try:
            from gradscope.diagnose import diagnose_record
        except ImportError:
            self._diagnose_failed = True
            self._aggregate.record.note("gradscope.diagnose.diagnose_record is unavailable: only training rules ran")
            return []
        findings, _ = diagnose_record(record, formats=self.formats, model=self.model, during_training=True)
        return list(findings)

    def _announce(self, alert: Alert, details: str) -> None:
        """Log one alert (always: ``on_finding`` is called in addition), and pass
        findings that appear, escalate or move to ``on_finding``."""
        # Loud by default: without a handler configured, logging's last-resort
        # handler prints warnings and errors to stderr.
        severity = Severity(alert.finding.severity)
        level = logging.ERROR if severity is Severity.ERROR and alert.kind != "cleared" else logging.WARNING
        if is_writer():  # one voice per job: rank 0 prints
            logger.log(level, "%s", alert.line(details))
        if self.on_finding is not None and alert.kind != "cleared":
            self.on_finding(alert.finding)  # on every rank: each saw the same reduced numbers

    # -- the final report -------------------------------------------------------
    def training_summary(self) -> dict[str, Any]:
        """The run-level numbers: norms, clip advice, loss scale, update ratios."""
        clip = clip_advice(self._history)
        return {
            "steps": self._step,
            "every": self.every,
            "tier": self.tier,
            "flushes": self._flushes,
            "sampled_steps": self._aggregate.record.steps,
            "global_grad_norm_last": self._global_last,
            "global_grad_norm_max": self._global_max,
            "nonfinite_norm_steps": self._history.nonfinite,
            "clip": clip,
            "spikes": self._spikes.count,
            "spike_steps": list(self._spikes.steps),
            "loss_last": self._loss_last,
            "loss_scale": self._last_scale,
            "loss_scale_history": [list(x) for x in self._scale_history],
            "skipped_steps": self._skipped if self._scaler_seen else None,
            "update_ratio": self._rates.summary(),
            "first_nonfinite": self.first_nonfinite,
            "clipping": None
            if not self.clip_max_norm
            else {
                "norms": "measured before the trainer's gradient clipping",
                "max_norm": self.clip_max_norm,
                "clipped_steps": self._clipped_steps,
                "global_grad_norm_post_clip_last": self._post_clip_last,
            },
        }

    def _reduction_summary(self) -> dict[str, Any] | str:
        summary = self._recorder.reduction_summary()
        if isinstance(summary, dict):
            summary = dict(summary)
            summary["global_grad_norm"] = "global: √(Σ over ranks of local Σg²), replicated parameters once"
            summary["loss"] = "global: the mean of the ranks' losses"
        return summary

    def _final_report(self) -> Report:
        record = self._aggregate.materialize()
        record.reduction = dict(self._recorder.record.reduction)
        ran = {layer.module for layer in self._recorder.record.layers}
        selected = self._recorder._selected  # the modules the recorder hooked
        record.not_executed = [name or "model" for name, _ in selected if (name or "model") not in ran]
        for note in self._recorder.record.notes:
            record.note(note)
        findings: list[Finding] = []
        diagnosed: list[Finding] = []
        analysis: dict[str, Any] = {}
        if self.diagnose and not self._diagnose_failed and record.layers:
            try:
                from gradscope.diagnose import diagnose_record

                diag, analysis = diagnose_record(record, formats=self.formats, model=self.model, during_training=True)
                diagnosed.extend(diag)
                analysis = dict(analysis)
            except ImportError:
                record.note("gradscope.diagnose.diagnose_record is unavailable: only training rules ran")
        clip = clip_advice(self._history)
        if self.first_nonfinite is not None:
            # The watch's own record of the first non-finite step wins over the
            # diagnosis of the whole-run statistics, which mixes every step
            # before and after it (and so cannot tell who produced it).
            findings.append(nonfinite_finding(self.first_nonfinite, clip))
            diagnosed = [f for f in diagnosed if f.code != "nonfinite"]
        if self._spikes.worst is not None:
            findings.append(spike_finding(self._spikes.worst, self._spikes, clip))
        findings.extend(self._rates.final_findings())
        if self._scaler_seen:
            skipped = skipped_steps_finding(self._skipped, self._step, self._last_scale)
            if skipped is not None:
                findings.append(skipped)
        findings.extend(self._regularisation.final_findings())
        findings = _dedupe(findings + diagnosed)
        findings = self._tracker.annotate(findings)
        order = {layer.name: layer.index for layer in record.layers}
        findings.sort(key=lambda f: (-Severity(f.severity).rank, order.get(f.layers[0], -1) if f.layers else -1))
        analysis["training"] = self.training_summary()
        analysis["regularisation"] = self._regularisation.summary()
        parameters = sum(p.numel() for p in self.model.parameters())
        return Report(
            record=record,
            model={
                "source": type(self.model).__name__,
                "format": "module",
                "type": type(self.model).__name__,
                "parameters": parameters,
            },
            run={
                "mode": "watch",
                "steps": self._step,
                "every": self.every,
                "tier": self.tier,
                "formats": list(self.formats),
                "gradients": "unscaled (divided by the GradScaler scale)" if self._scaler_seen else "as computed",
                "gradient_accumulation": "statistics per optimizer step, micro-batches merged",
                "reduction": self._reduction_summary(),
            },
            findings=findings,
            analysis=analysis,
        )


def _inputs_finite(flags: list[Any] | None) -> bool | None:
    """Whether every forward's first input was finite (a non-float input is), from the
    sentinel's flags of a sampled step; None when no forward was seen."""
    if not flags:
        return None
    pairs = [extremes for _, extremes in flags if extremes is not None]
    if not pairs:
        return True
    values = torch.stack([torch.stack([lo.float().cpu(), hi.float().cpu()]) for lo, hi in pairs])
    return bool(torch.isfinite(values).all())


def _dedupe(findings: list[Finding]) -> list[Finding]:
    """Keep the first finding of each (code, first layer): the diagnosis may also
    report a nonfinite finding for the same layer."""
    seen: set[tuple[str, str]] = set()
    out = []
    for finding in findings:
        key = (finding.code, finding.layers[0] if finding.layers else "")
        if key in seen:
            continue
        seen.add(key)
        out.append(finding)
    return out


def watch(
    model: nn.Module,
    *,
    every: int = 1,
    log_dir: str | None = None,
    formats: Sequence[str] = ("fp16",),
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    on_finding: Callable[[Finding], Any] | None = None,
    raise_on: Sequence[str] = ("nonfinite",),
    tier: str = "full",
    sequence_modules: Mapping[str, int] | None = None,
    stop_on: Sequence[str] = (),
    record_no_grad: bool = False,
    process_group: Any = None,
) -> Scope:
    """Watch a training run; returns a Scope (also a context manager).

    Args:
        model: the model being trained.  Its numbers are never changed.
        every: sample (record per-layer statistics and flush) every N optimizer
            steps; the global gradient norm, the loss and the loss scale are
            tracked every step regardless (the norm on sampled steps only
            with ``tier="light"``).
        log_dir: write TensorBoard dashboards there (rank 0 only).
        formats: low-precision formats to check ranges against.
        include, exclude: fnmatch patterns on module names (see ``Recorder``).
        on_finding: called with each finding (a ``Finding``) when it appears,
            escalates (warning to error) or changes layers, not when it clears.
            Every alert is also logged on the ``gradscope`` logger, one short
            line, whether or not ``on_finding`` is set (silence it with
            ``logging.getLogger("gradscope").setLevel(logging.CRITICAL)``).
        raise_on: finding codes that stop training with a ``GradscopeError``;
            by default the first non-finite value.
        tier: "full" (default), or "light": only layers that own parameters,
            and gradient norms (spikes, clip advice) on sampled steps only.
            Light costs about half as much where steps are short for the
            model's size (README "Cost"); it cannot see dead or saturated
            units of parameter-free activations, nor a spike between samples.
        sequence_modules: ``{"module name": time_dim}`` for modules whose output is
            a sequence (nn.RNN/LSTM/GRU are found by themselves): gradients are
            also measured along time on sampled steps.
        stop_on: finding codes of ``scope.validation`` that stop training with a
            ``GradscopeError`` when they appear: "overfitting" (early stopping).
        record_no_grad: also record forwards run under ``torch.no_grad()`` or
            ``torch.inference_mode()`` (an evaluation loop inside the watched
            run).  By default they are not counted into the training
            statistics (the segments of a reentrant activation checkpoint,
            run under no_grad inside a training forward, still are).
        process_group: under torch.distributed, the ranks whose statistics are
            reduced at each flush (a collective: every rank of it must call
            ``step``): None, the default group; a ProcessGroup; or "none",
            per-rank statistics and no collective (docs/distributed.md).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> with watch(model, every=2) as scope:
        ...     for _ in range(4):
        ...         opt.zero_grad()
        ...         loss = model(torch.randn(16, 4)).pow(2).mean()
        ...         loss.backward()
        ...         scope.step(opt, loss=loss)
        ...         opt.step()
        >>> scope.report().run["steps"], scope.report().analysis["training"]["sampled_steps"]
        (4, 2)
    """
    return Scope(
        model,
        every=every,
        log_dir=log_dir,
        formats=formats,
        include=include,
        exclude=exclude,
        on_finding=on_finding,
        raise_on=raise_on,
        tier=tier,
        sequence_modules=sequence_modules,
        stop_on=stop_on,
        record_no_grad=record_no_grad,
        process_group=process_group,
    )
