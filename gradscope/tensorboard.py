"""TensorBoard dashboards for audits and watched runs.

The layout answers, in order: is training going wrong, which layer, when, how
bad (``gradscope.dashboards.charts`` says why each chart is there and why the
series are runs).  TensorBoard colours a chart's lines by *run*, so the series
of one chart are written to different runs (sub-directories of the log
directory), created at start in colour order.

=======================  ==============================================================
run                      what it holds
=======================  ==============================================================
``.`` (the log dir)      the custom-scalars layout, text, heatmap images, histograms
``training``             the loss, the global gradient norm, the GradScaler's scale
``validation``           the validation loss (tag ``gradscope 1 training/loss``)
``clip AutoClip p10``    log10 of the AutoClip threshold (p10 of all past norms), as
                         ``gradscope 1 training/grad_norm_log10``
``clip median``          the same for the median alternative
``worst 1`` … ``5``      per-layer charts: the 5 worst layers by the chart's own measure,
                         as ``<chart tag>/<layer>``; a slot keeps its layer while it stays
                         among the worst (``gradscope.dashboards.selection``)
``median``               per-layer charts: ``<chart tag>/median of all`` over every layer
``reference``            ``<chart tag>/reference line``: headroom 0, update ratio log10 -3
=======================  ==============================================================

====================================================  ============================================
tag (``<fmt>``: each requested format, e.g. ``fp16``)  value
====================================================  ============================================
``gradscope 1 training/loss``                          the loss, every step it was given
``gradscope 1 training/grad_norm_log10``               log10 of the global gradient norm, every step
``gradscope 1 training/train_validation_gap``          validation loss − mean training loss since
                                                       the previous evaluation
``gradscope 1 training/loss_scale_log2``               log2 of the GradScaler scale, at each flush
``gradscope 1 training/skipped_steps``                 steps skipped by the GradScaler so far
``gradscope 2 gradients/dloss_dh_rms_log10/<layer>``   log10 RMS of ∂ℓ/∂h, the gradient wrt the
                                                       layer's output
``gradscope 2 gradients/weight_grad_norm_log10/<l>``   log10 2-norm of the layer's weight gradient
``gradscope 3 activations/std_log10/<layer>``          log10 std of the layer's output
``gradscope 4 <fmt> range/headroom_binades/<layer>``   binades between the largest |activation| or
                                                       |∂ℓ/∂h| and the format's max (below 0: over)
``gradscope 4 <fmt> range/overflow_frac/<layer>``      fraction of activation and ∂ℓ/∂h values
                                                       above the format's top binade (they become inf)
``gradscope 4 <fmt> range/underflow_frac/<layer>``     fraction of ∂ℓ/∂h values below the format's
                                                       smallest subnormal (they flush to zero)
``gradscope 5 updates/update_ratio_log10/<layer>``     log10 ‖Δw‖/‖w‖ of the layer's weight (watch)
``gradscope 6 weights/norm_log10/<param>``             log10 2-norm of each weight
``gradscope 6 weights/decay_share/<param>``            ηλ‖θ‖ / (ηλ‖θ‖ + η‖g‖): the decay's share
``gradscope 6 weights/near_zero_frac/<param>``         fraction of weights with 0 < |w| < 1% of RMS
``gradscope 0 heatmaps/dloss_dh_rms_log10``            image (watch): layer × step heatmap of log10
                                                       ∂ℓ/∂h RMS, NaN/inf cells in red
``gradscope 0 heatmaps/activation_rms_log10``          image (watch): the same for the activations
``gradscope 7 exponents/activation/<layer>``           histogram of floor(log2|x|) of the output
``gradscope 7 exponents/gradient/<layer>``             histogram of floor(log2|∂ℓ/∂h|)
``gradscope/alerts``                                   text: the alerts of each step, one entry per step
``gradscope/findings``                                 text: the full report (Markdown)
``gradscope/depth_profile``                            image (audits): activation std and ∂ℓ/∂h RMS
                                                       per layer (needs matplotlib, the ``plot`` extra)
====================================================  ============================================

A log10 of exactly 0 (a dead layer) is written as log10 of float32's smallest
subnormal, about -44.85.  Non-finite values and values beyond ±1e18 are not
written as points (TensorBoard's WebGL charts fail on them): a line stops at its
last plottable point, and the heatmaps mark the NaN/inf cell in red.
Histograms are built from the exponent counts the statistics already computed
on the device (``add_histogram_raw``): no tensor is copied to the host and NaNs
cannot break them.  The heatmaps are drawn by a background thread
(``gradscope.dashboards.heatmaps``) at a bounded cadence, at the first bad step
and at close.  The custom-scalars layout is written once, when the writer is
created: ``add_custom_scalars`` may be called only once per writer.  Only rank 0
writes when torch.distributed is initialised.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradscope.dashboards import charts as ch
from gradscope.dashboards.charts import LOG10_FLOOR, layout
from gradscope.stats import EXPONENT_OFFSET, HIST, HIST_BINS, Stats

if TYPE_CHECKING:
    from gradscope.record import LayerRecord, Record
    from gradscope.report import Finding, Report
    from gradscope.watching.flush_result import FlushResult
    from gradscope.watching.history import RunHistory

PREFIX = "gradscope"
CHART_LIMIT = 1e18  # larger scalars break TensorBoard's WebGL charts (see DashboardWriter._scalar)

__all__ = ["DashboardWriter", "exponent_histogram", "launch_dashboard", "layer_values", "layout", "write_audit"]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def log10(value: float) -> float:
    """log10 for the charts: 0 at the float32 floor (see the module docstring); NaN,
    inf and negative values stay non-finite (TensorBoard marks them)."""
    if math.isnan(value) or value < 0:
        return math.nan
    if math.isinf(value):
        return math.inf
    return LOG10_FLOOR if value == 0 else max(LOG10_FLOOR, math.log10(value))


def _parameter_norm(layer: LayerRecord, norms: dict[str, float] | None) -> float | None:
    """The exact gradient norm of a layer's main weight, when watch measured it."""
    if not norms or not layer.weight_name or layer.call != 1:
        return None
    qualified = layer.weight_name if layer.module == "model" else f"{layer.module}.{layer.weight_name}"
    return norms.get(qualified)


def _stats_norm(stats: Stats) -> float:
    """The 2-norm of the tensor behind ``stats``: sqrt(n) x RMS (non-finite when it was)."""
    if not stats.moments_valid:
        return math.inf if stats.has_inf and not stats.has_nan else math.nan
    return math.sqrt(stats.count) * stats.rms


def layer_values(
    record: Record, formats: tuple[str, ...], param_grad_norms: dict[str, float] | None = None
) -> dict[str, dict[str, float]]:
    """Per-layer chart values of one record: tag -> layer -> value, layers in forward
    order (skipping what was not measured).

    ``param_grad_norms`` (parameter name -> exact gradient norm, from watch)
    gives the weight-gradient norm of every layer, also on flushes that carry
    no weight-gradient statistics; without it the norm comes from the statistics.
    """
    out: dict[str, dict[str, float]] = {}

    def put(tag: str, layer: str, value: float) -> None:
        out.setdefault(tag, {})[layer] = value

    for layer in sorted(record.layers, key=lambda item: item.index):
        name = layer.name
        act, grad, wgrad = layer.activation, layer.gradient, layer.weight_grad
        if act is not None and act.count:
            put(ch.ACT_STD, name, log10(act.std) if act.moments_valid else math.nan)
        if grad is not None and grad.count:
            put(ch.GRAD_RMS, name, log10(grad.rms) if grad.moments_valid else math.nan)
        exact = _parameter_norm(layer, param_grad_norms)
        if exact is not None:
            put(ch.WEIGHT_GRAD, name, log10(exact))
        elif wgrad is not None and wgrad.count:
            put(ch.WEIGHT_GRAD, name, log10(_stats_norm(wgrad)))
        both = [s for s in (act, grad) if s is not None and s.count]
        if not both:
            continue
        merged = both[0] if len(both) == 1 else Stats.merged(both)
        for fmt in formats:
            fractions = merged.format_fractions(fmt)
            put(ch.overflow_tag(fmt), name, fractions[f"{fmt}_overflow_frac"])
            if grad is not None and grad.count:
                put(ch.underflow_tag(fmt), name, grad.format_fractions(fmt)[f"{fmt}_underflow_frac"])
            headroom = fractions[f"{fmt}_headroom_binades"]
            if not math.isnan(headroom) and headroom != math.inf:  # +inf: all zeros, nothing to overflow
                put(ch.headroom_tag(fmt), name, headroom)
    return out


def exponent_histogram(stats: Stats) -> dict[str, Any] | None:
    """Arguments of ``add_histogram_raw`` for floor(log2|x|) of the finite non-zero
    values, one bucket per binade (bucket e covers [e, e+1))."""
    # One tolist() instead of Stats.binade_counts' 255 scalar reads (this runs per
    # layer per flush); same rule for the top bin's non-finite values.
    raw = stats.vector[HIST + 1 : HIST + HIST_BINS].tolist()
    raw[-1] -= stats._hist_nonfinite()
    counts = {b + 1 - EXPONENT_OFFSET: round(c) for b, c in enumerate(raw) if c > 0.5}
    if not counts:
        return None
    lo, hi = min(counts), max(counts)
    exponents = list(range(lo, hi + 1))
    bucket_counts = [float(counts.get(e, 0)) for e in exponents]
    num = sum(bucket_counts)
    return {
        "min": float(lo),
        "max": float(hi + 1),
        "num": num,
        "sum": float(sum(e * c for e, c in zip(exponents, bucket_counts, strict=True))),
        "sum_squares": float(sum(e * e * c for e, c in zip(exponents, bucket_counts, strict=True))),
        "bucket_limits": [float(e + 1) for e in exponents],
        "bucket_counts": bucket_counts,
    }


def _is_rank_zero() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _markdown(report: Report) -> str:
    try:
        from gradscope.render import render

        return render(report, "markdown")
    except (ImportError, AttributeError):
        pass
    lines = ["# gradscope findings", ""]
    if not report.findings:
        lines.append("No findings: healthy.")
    for f in report.findings:
        layers = f", {', '.join(f.layers)}" if f.layers else ""
        lines.append(
            f"- **{f.severity.value if hasattr(f.severity, 'value') else f.severity}** `{f.code}`{layers}: {f.message}"
        )
        if f.fix is not None:
            lines.append(f"  - fix: {f.fix.summary}")
    return "\n".join(lines)


def alert_markdown(step: int, finding: Finding) -> str:
    layers = f" ({', '.join(finding.layers)})" if finding.layers else ""
    severity = getattr(finding.severity, "value", finding.severity)
    text = f"**step {step} · {severity} · `{finding.code}`**{layers}: {finding.message}"
    if finding.fix is not None:
        text += f"\n\nfix: {finding.fix.summary}"
    return text


def _handed_to_caller(args: Any) -> bool:
    """An exception of TensorBoard's event-writer thread that TensorBoard also raises in the writing thread.

    ``tensorboard.summary.writer.event_file_writer._AsyncWriterThread.run`` stores the
    exception (``self.exception``) and re-raises it; the next ``write``/``flush`` of the
    thread that writes raises that same object (``_check_worker_status``).  Printing it
    from the worker too is a duplicate traceback (a full disk gave 38 lines of stderr
    before gradscope's one-line error).
    """
    thread = args.thread
    return type(thread).__name__ == "_AsyncWriterThread" and getattr(thread, "exception", None) is args.exc_value


@contextlib.contextmanager
def writer_thread_errors_to_caller() -> Iterator[None]:
    """While open, ``threading.excepthook`` drops what ``_handed_to_caller`` covers; everything else
    (any other thread's exception) reaches the hook that was installed before.  Restored on exit."""
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if not _handed_to_caller(args):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        if threading.excepthook is hook:  # someone else's hook installed meanwhile stays
            threading.excepthook = previous


class DashboardWriter:
    """gradscope's runs, tags and layout in one log directory.  Create it with
    ``for_rank_zero`` so other ranks get a writer that writes nothing."""

    def __init__(self, logdir: str | Path, formats: tuple[str, ...] = ("fp16",), enabled: bool = True) -> None:
        from gradscope.dashboards.heatmaps import HeatmapWorker
        from gradscope.dashboards.runs import RunWriters
        from gradscope.dashboards.selection import WorstSeries

        self.formats = tuple(formats)
        self.logdir = str(logdir)
        self._writer = None
        self._runs = RunWriters(self.logdir)
        self._charts = {chart.tag: chart for chart in ch.charts(self.formats)}
        self._named = {
            tag: WorstSeries(chart, ch.WORST_SERIES) for tag, chart in self._charts.items() if chart.per_series
        }
        self.heatmaps = HeatmapWorker(
            self._write_image, {"gradient": ch.HEATMAP_GRADIENT, "activation": ch.HEATMAP_ACTIVATION}
        )
        self._quiet = contextlib.ExitStack()
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._quiet.enter_context(writer_thread_errors_to_caller())  # until close()
            try:
                self._writer = SummaryWriter(log_dir=self.logdir)
                self._writer.add_custom_scalars(layout(self.formats))  # once per writer
                self._runs.open(ch.RUN_ORDER)  # in colour order (gradscope.dashboards.charts)
            except BaseException:
                # a full disk can fail the first write: stop the threads started so far and
                # restore the hook; the original error is the one to report
                with contextlib.suppress(Exception):
                    self.close()
                raise

    @classmethod
    def for_rank_zero(cls, logdir: str | Path, formats: tuple[str, ...] = ("fp16",)) -> DashboardWriter:
        return cls(logdir, formats=formats, enabled=_is_rank_zero())

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    @property
    def runs(self) -> list[str]:
        """The runs opened so far besides the log directory itself."""
        return self._runs.names

    # -- scalars ------------------------------------------------------------------
    def _scalar(self, run: str, tag: str, value: float, step: int) -> None:
        # Non-finite points are left out: TensorBoard's WebGL charts (Time Series) fail
        # on them with console errors, and on values whose square overflows float32
        # (|x| > ~1.8e19, seen with a diverged loss of 1.5e35).  The heatmaps draw
        # non-finite cells red and the alerts name them.
        if math.isfinite(value) and abs(value) <= CHART_LIMIT:
            self._runs.scalar(run, tag, value, step)

    def _series(self, tag: str, values: dict[str, float], step: int) -> None:
        """One per-layer (or per-parameter) chart at one step: its worst series, each
        in its slot run, the median of all, and its reference line."""
        chart = self._charts.get(tag)
        if not values or chart is None or not chart.per_series:
            return
        pick = self._named[tag]
        named, median = pick.choose(values)
        for name in named:
            slot = pick.named.index(name)
            self._scalar(ch.SLOT_RUNS[slot], chart.series_tag(name), values[name], step)
        if len(values) > 1 and math.isfinite(median):
            self._scalar(ch.MEDIAN_RUN, chart.series_tag(ch.MEDIAN_SERIES), median, step)
        if chart.reference is not None:
            self._scalar(ch.REFERENCE_RUN, chart.series_tag(ch.REFERENCE_SERIES), chart.reference, step)

    def write_record(
        self,
        record: Record,
        step: int,
        update_ratios: dict[str, float] | None = None,
        param_grad_norms: dict[str, float] | None = None,
    ) -> None:
        """Per-layer scalars and exponent histograms of one record."""
        w = self._writer
        if w is None:
            return
        for tag, values in layer_values(record, self.formats, param_grad_norms).items():
            self._series(tag, values, step)
        for layer in record.layers:
            for role in ("activation", "gradient"):
                stats = layer.stats.get(role)
                hist = exponent_histogram(stats) if stats is not None else None
                if hist is not None:
                    w.add_histogram_raw(f"{ch.EXPONENTS}/{role}/{layer.name}", global_step=step, **hist)
        if update_ratios:
            self._series(ch.UPDATE_RATIO, {name: log10(r) for name, r in update_ratios.items() if r is not None}, step)

    def write_flush(
        self,
        result: FlushResult,
        skipped_steps: int | None = None,
        history: RunHistory | None = None,
        first_bad: bool = False,
    ) -> None:
        """Everything one watch flush saw; with ``history``, a heatmap when one is due
        (``first_bad``: this flush is the run's first bad one, drawn whatever the cadence)."""
        if self._writer is None:
            return
        if result.record.layers:
            self.write_record(result.record, result.step, param_grad_norms=result.param_grad_norms)
        for ratio_step, ratios in sorted(result.update_ratios.items()):
            self._series(ch.UPDATE_RATIO, {name: log10(r) for name, r in ratios.items() if r is not None}, ratio_step)
        for step, norm in result.global_norms:
            self._scalar(ch.TRAINING_RUN, ch.GRAD_NORM, log10(norm), step)
        for step, loss in result.losses:
            self._scalar(ch.TRAINING_RUN, ch.LOSS, loss, step)
        if result.clip is not None and _finite(result.clip.get("threshold")):
            self._scalar(ch.CLIP_RUN, ch.GRAD_NORM, log10(result.clip["threshold"]), result.step)
            if _finite(result.clip.get("median_threshold")):
                self._scalar(ch.CLIP_MEDIAN_RUN, ch.GRAD_NORM, log10(result.clip["median_threshold"]), result.step)
        if result.loss_scale is not None and result.loss_scale > 0:
            self._scalar(ch.TRAINING_RUN, ch.LOSS_SCALE, math.log2(result.loss_scale), result.step)
        if skipped_steps is not None:
            self._scalar(ch.TRAINING_RUN, ch.SKIPPED, skipped_steps, result.step)
        if history is not None:
            self.request_heatmaps(history, result.step, force=first_bad)

    def request_heatmaps(self, history: RunHistory, step: int, force: bool = False) -> bool:
        """Hand the history to the heatmap thread when a drawing is due (never waits)."""
        if self._writer is None or not self.heatmaps.due(force):
            return False
        return self.heatmaps.request(history.to_dict(), step, force=force)

    def write_validation(self, step: int, loss: float, gap: float | None) -> None:
        """One ``scope.validation`` evaluation: its loss and the train/validation gap."""
        if self._writer is None:
            return
        if _finite(loss):
            self._scalar(ch.VALIDATION_RUN, ch.LOSS, loss, step)
        if gap is not None:
            self._scalar(ch.TRAINING_RUN, ch.GAP, gap, step)  # non-finite ones are left out there

    def write_weights(self, step: int, tracks: dict[str, Any]) -> None:
        """Weight norms, decay shares and near-zero fractions (``gradscope.watching.weights``)."""
        if self._writer is None:
            return
        norms: dict[str, float] = {}
        shares: dict[str, float] = {}
        near: dict[str, float] = {}
        for name, track in tracks.items():
            if track.trajectory and _finite(track.trajectory[-1][1]):
                norms[name] = log10(track.trajectory[-1][1])
            if _finite(track.decay_share):
                shares[name] = track.decay_share
            if _finite(track.near_zero_frac):
                near[name] = track.near_zero_frac
        self._series(ch.WEIGHT_NORM, norms, step)
        self._series(ch.DECAY_SHARE, shares, step)
        self._series(ch.NEAR_ZERO, near, step)

    # -- text and images ------------------------------------------------------------
    def write_alert(self, step: int, finding: Finding) -> None:
        if self._writer is not None:
            self._writer.add_text(f"{PREFIX}/alerts", alert_markdown(step, finding), step)

    def write_alerts(self, step: int, entries: list[str]) -> None:
        """Every alert of one step as ONE text entry: the Text plugin shows one entry
        per (tag, step), so a second ``add_text`` at the same step would hide the first."""
        if self._writer is not None and entries:
            self._writer.add_text(f"{PREFIX}/alerts", f"**step {step}**\n\n" + "\n".join(entries), step)

    def _write_image(self, tag: str, png: bytes, width: int, height: int, step: int) -> None:
        """An encoded PNG as an image summary (called from the heatmap thread; the
        event writer's queue is thread-safe)."""
        writer = self._writer
        if writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def write_report(self, report: Report, step: int = 0) -> None:
        """The findings as Markdown text; for a watched run the final heatmaps (its
        ``run["history"]``), for an audit the depth profile."""
        w = self._writer
        if w is None:
            return
        w.add_text(f"{PREFIX}/findings", _markdown(report), step)
        history = report.run.get("history") if isinstance(report.run, dict) else None
        if history and history.get("steps"):
            self.heatmaps.request(history, step, force=True)
            return
        figure = depth_figure(report.record)
        if figure is not None:
            w.add_figure(f"{PREFIX}/depth_profile", figure, step)

    def close(self) -> None:
        """Draw the pending heatmap, join its thread, close every run's events file.

        Each step runs even when an earlier one failed (a full disk fails the first
        flush), so every writer thread is stopped while its exceptions are still
        left to the caller; the error propagates (later ones chained to it)."""
        with contextlib.ExitStack() as steps:  # run in reverse order of registration
            steps.callback(self._quiet.close)
            steps.callback(self._close_writer)
            steps.callback(self._runs.close)
            steps.callback(self.heatmaps.close)

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.flush()
            finally:
                writer.close()


def depth_figure(record: Record) -> Any:
    """A matplotlib Figure of activation std and ∂ℓ/∂h RMS per layer (log scale),
    or None without matplotlib or without data.  Sized and lettered to be read at
    TensorBoard's image size (12-pt labels, up to 40 layer names)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    layers = sorted(record.layers, key=lambda layer: layer.index)
    xs, act, grad = [], [], []
    for i, layer in enumerate(layers):
        a, g = layer.activation, layer.gradient
        xs.append(i)
        act.append(a.std if a is not None and a.moments_valid and a.std > 0 else math.nan)
        grad.append(g.rms if g is not None and g.moments_valid and g.rms > 0 else math.nan)
    if not any(math.isfinite(v) for v in act + grad):
        return None
    fig = Figure(figsize=(max(9.0, 0.3 * len(xs)), 5.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, act, marker="o", label="activation std")
    ax.plot(xs, grad, marker="s", label="∂ℓ/∂h RMS")
    ax.set_yscale("log")
    every = max(1, math.ceil(len(xs) / 40))
    ax.set_xticks(xs[::every])
    ax.set_xticklabels([layer.name for layer in layers][::every], rotation=90, fontsize=11)
    ax.tick_params(axis="y", labelsize=12)
    ax.set_xlabel("layer (forward order)", fontsize=12)
    ax.set_title("gradscope depth profile", fontsize=14)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=12)
    fig.tight_layout()
    return fig


def write_audit(report: Report, logdir: str | Path, formats: tuple[str, ...] | None = None) -> Path:
    """Write an audit report to ``logdir`` as TensorBoard events (used by
    ``gradscope audit --tensorboard DIR``): per-layer scalars and exponent
    histograms at step 0, the findings as Markdown, the depth profile image,
    and the gradscope custom-scalars layout.  Returns the directory."""
    if formats is None:
        formats = tuple(report.run.get("formats") or ("fp16",))
    writer = DashboardWriter.for_rank_zero(logdir, formats=tuple(formats))
    try:
        writer.write_record(report.record, step=0)
        writer.write_report(report, step=0)
    finally:
        writer.close()
    return Path(logdir)


def launch_dashboard(logdir: str | Path, port: int | None = None, host: str = "127.0.0.1") -> tuple[str, Any]:
    """Start TensorBoard on ``logdir`` in this process (a background server thread).

    Returns ``(url, server)``; the server stops when the process exits.  With
    ``port=None`` TensorBoard picks a free port from 6006 upward.
    """
    from tensorboard import program

    from gradscope.errors import InputError

    path = Path(logdir)
    if not path.is_dir():
        raise InputError(f"{logdir}: no such directory; pass the --log-dir/--tensorboard directory of a run")
    server = program.TensorBoard()
    argv = [None, "--logdir", str(path), "--host", host]
    if port is not None:
        argv += ["--port", str(port)]
    server.configure(argv=argv)
    url = server.launch()
    return url, server
