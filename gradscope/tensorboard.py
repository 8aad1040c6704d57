"""TensorBoard dashboards for audits and watched runs.

Tags (stable; ``<layer>`` is the call-site name, e.g. ``features.0`` or ``relu#2``,
``<fmt>`` each requested format, e.g. ``fp16``):

==========================================  ==========================================
tag                                         value, one point per sampled step
==========================================  ==========================================
``gradscope/activation_std/<layer>``        std of the layer's output
``gradscope/grad_rms/<layer>``              RMS of ∂ℓ/∂h, the gradient wrt that output
``gradscope/weight_grad_norm/<layer>``      2-norm of the layer's weight gradient
``gradscope/update_ratio/<layer>``          ‖Δw‖/‖w‖ of the layer's weight (watch only)
``gradscope/<fmt>_overflow_frac/<layer>``   fraction of activation and ∂ℓ/∂h values above
                                            the format's top binade (they become inf)
``gradscope/<fmt>_underflow_frac/<layer>``  fraction of ∂ℓ/∂h values below the format's
                                            smallest subnormal (they flush to zero)
``gradscope/<fmt>_headroom/<layer>``        binades between the largest |activation| or
                                            |∂ℓ/∂h| and the format's max (negative: over)
``gradscope/global_grad_norm``              global gradient norm, every optimizer step
``gradscope/clip_threshold``                AutoClip threshold: p10 of all past norms
``gradscope/clip_threshold_median``         the median alternative
``gradscope/loss``                          the loss, every step it was given
``gradscope/loss_scale``                    GradScaler scale, at each flush
``gradscope/skipped_steps``                 steps skipped by the GradScaler so far
``gradscope/weight_norm/<param>``           2-norm of each weight (watch, diagnosis cadence)
``gradscope/decay_share/<param>``           ηλ‖θ‖ / (ηλ‖θ‖ + η‖g‖): the decay's share of the step
``gradscope/near_zero_frac/<param>``        fraction of weights with 0 < |w| < 1% of their RMS
``gradscope/validation_loss``               ``scope.validation`` loss, at each evaluation
``gradscope/train_validation_gap``          validation loss − mean training loss since the
                                            previous evaluation
``gradscope/exponents/activation/<layer>``  histogram of floor(log2|x|) of the output
``gradscope/exponents/gradient/<layer>``    histogram of floor(log2|∂ℓ/∂h|)
``gradscope/alerts``                        text: the alerts of each step, one entry per step
``gradscope/findings``                      text: the full report (Markdown)
``gradscope/depth_profile``                 image: activation std and ∂ℓ/∂h RMS per
                                            layer (needs matplotlib, the ``plot`` extra)
==========================================  ==========================================

Histograms are built from the exponent counts the statistics already computed
on the device (``add_histogram_raw``): no tensor is copied to the host and NaNs
cannot break them (zeros and non-finite values are not part of them).  The
custom-scalars layout (one "gradscope" category) is written once, when the
writer is created: ``add_custom_scalars`` may be called only once per writer.
Only rank 0 writes when torch.distributed is initialised.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradscope.stats import EXPONENT_OFFSET, HIST, HIST_BINS, Stats

if TYPE_CHECKING:
    from gradscope.record import LayerRecord, Record
    from gradscope.report import Finding, Report
    from gradscope.watching.flush_result import FlushResult

PREFIX = "gradscope"


def layout(formats: tuple[str, ...] = ("fp16",)) -> dict[str, Any]:
    """The custom-scalars layout: one "gradscope" dashboard."""
    charts: dict[str, list[Any]] = {
        "gradient flow across layers (∂ℓ/∂h RMS)": ["Multiline", [rf"^{PREFIX}/grad_rms/.*"]],
        "weight-gradient norms": ["Multiline", [rf"^{PREFIX}/weight_grad_norm/.*"]],
        "activation scale (std)": ["Multiline", [rf"^{PREFIX}/activation_std/.*"]],
    }
    for fmt in formats:
        charts[f"{fmt} headroom (binades)"] = ["Multiline", [rf"^{PREFIX}/{fmt}_headroom/.*"]]
        charts[f"{fmt} overflow and underflow fractions"] = [
            "Multiline",
            [rf"^{PREFIX}/{fmt}_overflow_frac/.*", rf"^{PREFIX}/{fmt}_underflow_frac/.*"],
        ]
    charts["update ratios ‖Δw‖/‖w‖"] = ["Multiline", [rf"^{PREFIX}/update_ratio/.*"]]
    charts["global gradient norm vs clip threshold"] = [
        "Multiline",
        [rf"^{PREFIX}/global_grad_norm$", rf"^{PREFIX}/clip_threshold$", rf"^{PREFIX}/clip_threshold_median$"],
    ]
    charts["train vs validation loss"] = ["Multiline", [rf"^{PREFIX}/loss$", rf"^{PREFIX}/validation_loss$"]]
    charts["train/validation gap"] = ["Multiline", [rf"^{PREFIX}/train_validation_gap$"]]
    charts["weight norms"] = ["Multiline", [rf"^{PREFIX}/weight_norm/.*"]]
    charts["weight decay's share of the update"] = ["Multiline", [rf"^{PREFIX}/decay_share/.*"]]
    return {PREFIX: charts}


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _parameter_norm(layer: LayerRecord, norms: dict[str, float] | None) -> float | None:
    """The exact gradient norm of a layer's main weight, when watch measured it."""
    if not norms or not layer.weight_name or layer.call != 1:
        return None
    qualified = layer.weight_name if layer.module == "model" else f"{layer.module}.{layer.weight_name}"
    return norms.get(qualified)


def layer_scalars(
    record: Record, formats: tuple[str, ...], param_grad_norms: dict[str, float] | None = None
) -> dict[str, float]:
    """Per-layer scalar values of one record, by tag (skipping unmeasurable ones).

    ``param_grad_norms`` (parameter name -> exact gradient norm, from watch)
    gives the weight-gradient norm of every layer, also on flushes that carry
    no weight-gradient statistics; without it the norm comes from the statistics.
    """
    from gradscope.watching.flush_result import stats_norm

    out: dict[str, float] = {}
    for layer in record.layers:
        name = layer.name
        act, grad, wgrad = layer.activation, layer.gradient, layer.weight_grad
        if act is not None and act.count:
            out[f"{PREFIX}/activation_std/{name}"] = act.std if act.moments_valid else math.nan
        if grad is not None and grad.count:
            out[f"{PREFIX}/grad_rms/{name}"] = grad.rms if grad.moments_valid else math.nan
        exact = _parameter_norm(layer, param_grad_norms)
        if exact is not None:
            out[f"{PREFIX}/weight_grad_norm/{name}"] = exact
        elif wgrad is not None and wgrad.count:
            out[f"{PREFIX}/weight_grad_norm/{name}"] = stats_norm(wgrad)
        both = [s for s in (act, grad) if s is not None and s.count]
        if not both:
            continue
        merged = both[0] if len(both) == 1 else Stats.merged(both)
        for fmt in formats:
            fractions = merged.format_fractions(fmt)
            out[f"{PREFIX}/{fmt}_overflow_frac/{name}"] = fractions[f"{fmt}_overflow_frac"]
            if grad is not None and grad.count:
                out[f"{PREFIX}/{fmt}_underflow_frac/{name}"] = grad.format_fractions(fmt)[f"{fmt}_underflow_frac"]
            headroom = fractions[f"{fmt}_headroom_binades"]
            if math.isfinite(headroom):
                out[f"{PREFIX}/{fmt}_headroom/{name}"] = headroom
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


class DashboardWriter:
    """A SummaryWriter with gradscope's tags and layout.  Create it with
    ``for_rank_zero`` so other ranks get a writer that writes nothing."""

    def __init__(self, logdir: str | Path, formats: tuple[str, ...] = ("fp16",), enabled: bool = True) -> None:
        self.formats = tuple(formats)
        self.logdir = str(logdir)
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.logdir)
            self._writer.add_custom_scalars(layout(self.formats))  # once per writer

    @classmethod
    def for_rank_zero(cls, logdir: str | Path, formats: tuple[str, ...] = ("fp16",)) -> DashboardWriter:
        return cls(logdir, formats=formats, enabled=_is_rank_zero())

    @property
    def enabled(self) -> bool:
        return self._writer is not None

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
        for tag, value in layer_scalars(record, self.formats, param_grad_norms).items():
            w.add_scalar(tag, value, step)
        for layer in record.layers:
            for role in ("activation", "gradient"):
                stats = layer.stats.get(role)
                hist = exponent_histogram(stats) if stats is not None else None
                if hist is not None:
                    w.add_histogram_raw(f"{PREFIX}/exponents/{role}/{layer.name}", global_step=step, **hist)
        for name, ratio in (update_ratios or {}).items():
            if _finite(ratio):
                w.add_scalar(f"{PREFIX}/update_ratio/{name}", ratio, step)

    def write_flush(self, result: FlushResult, skipped_steps: int | None = None) -> None:
        """Everything one watch flush saw."""
        w = self._writer
        if w is None:
            return
        if result.record.layers:
            self.write_record(result.record, result.step, param_grad_norms=result.param_grad_norms)
        for ratio_step, ratios in result.update_ratios.items():
            for name, ratio in ratios.items():
                if _finite(ratio):
                    w.add_scalar(f"{PREFIX}/update_ratio/{name}", ratio, ratio_step)
        for step, norm in result.global_norms:
            w.add_scalar(f"{PREFIX}/global_grad_norm", norm, step)
        for step, loss in result.losses:
            w.add_scalar(f"{PREFIX}/loss", loss, step)
        if result.clip is not None:
            w.add_scalar(f"{PREFIX}/clip_threshold", result.clip["threshold"], result.step)
            if _finite(result.clip.get("median_threshold")):
                w.add_scalar(f"{PREFIX}/clip_threshold_median", result.clip["median_threshold"], result.step)
        if result.loss_scale is not None:
            w.add_scalar(f"{PREFIX}/loss_scale", result.loss_scale, result.step)
        if skipped_steps is not None:
            w.add_scalar(f"{PREFIX}/skipped_steps", skipped_steps, result.step)

    def write_validation(self, step: int, loss: float, gap: float | None) -> None:
        """One ``scope.validation`` evaluation: its loss and the train/validation gap."""
        if self._writer is None:
            return
        if _finite(loss):
            self._writer.add_scalar(f"{PREFIX}/validation_loss", loss, step)
        if _finite(gap):
            self._writer.add_scalar(f"{PREFIX}/train_validation_gap", gap, step)

    def write_weights(self, step: int, tracks: dict[str, Any]) -> None:
        """Weight norms, decay shares and near-zero fractions (``gradscope.watching.weights``)."""
        if self._writer is None:
            return
        for name, track in tracks.items():
            if track.trajectory and _finite(track.trajectory[-1][1]):
                self._writer.add_scalar(f"{PREFIX}/weight_norm/{name}", track.trajectory[-1][1], step)
            if _finite(track.decay_share):
                self._writer.add_scalar(f"{PREFIX}/decay_share/{name}", track.decay_share, step)
            if _finite(track.near_zero_frac):
                self._writer.add_scalar(f"{PREFIX}/near_zero_frac/{name}", track.near_zero_frac, step)

    def write_alert(self, step: int, finding: Finding) -> None:
        if self._writer is not None:
            self._writer.add_text(f"{PREFIX}/alerts", alert_markdown(step, finding), step)

    def write_alerts(self, step: int, entries: list[str]) -> None:
        """Every alert of one step as ONE text entry: the Text plugin shows one entry
        per (tag, step), so a second ``add_text`` at the same step would hide the first."""
        if self._writer is not None and entries:
            self._writer.add_text(f"{PREFIX}/alerts", f"**step {step}**\n\n" + "\n".join(entries), step)

    def write_report(self, report: Report, step: int = 0) -> None:
        """The findings as Markdown text and the depth profile as an image."""
        w = self._writer
        if w is None:
            return
        w.add_text(f"{PREFIX}/findings", _markdown(report), step)
        figure = depth_figure(report.record)
        if figure is not None:
            w.add_figure(f"{PREFIX}/depth_profile", figure, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def depth_figure(record: Record) -> Any:
    """A matplotlib Figure of activation std and ∂ℓ/∂h RMS per layer (log scale),
    or None without matplotlib or without data."""
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
    fig = Figure(figsize=(max(6.0, 0.35 * len(xs)), 4.0), dpi=80)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, act, marker="o", label="activation std")
    ax.plot(xs, grad, marker="s", label="∂ℓ/∂h RMS")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([layer.name for layer in layers], rotation=90, fontsize=7)
    ax.set_xlabel("layer (execution order)")
    ax.set_title("gradscope depth profile")
    ax.legend()
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
