"""Inline SVG charts for the HTML report: the depth profile and the training curves.

Plain SVG markup, no script and no external resource: the charts are styled by
the report's own CSS (``gs-s-<series>`` classes carry the colours, so light and
dark themes and print follow the page), every point carries a ``<title>`` that
the browser shows as a tooltip, and every string that came from the model is
escaped.  Coordinates are rounded to 0.1 px so that the output is deterministic
and diffable (the golden file).

Log axes show decades (``1e-6``, ``1``, ``1e3``); a value that is not finite is
drawn on the top edge and a zero on the bottom edge of a log axis, each with its
own marker, so that neither disappears from the chart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

from gradscope.render import _format as F

FONT = 11  # px; the label sizes below are budgeted for it
LAYER_PITCH = 18  # px per layer on the depth profile: one rotated label each
LABEL_CHARS = 28  # layer names longer than this are cut in the middle (the full name is in the tooltip)
PLOT_HEIGHT = 240


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _n(x: float) -> str:
    """A coordinate, rounded to 0.1 px (deterministic text for the golden file)."""
    text = f"{x:.1f}"
    return text[:-2] if text.endswith(".0") else text


@dataclass
class Series:
    """One line of a chart: a CSS key, the legend label, one value (or None) per x position."""

    key: str
    label: str
    values: Sequence[float | None]
    marker: str = "circle"  # circle | square | diamond: shapes differ so colour is not the only cue
    tooltips: Sequence[str] = field(default_factory=list)


def decade_label(k: int) -> str:
    """``1e-6``, ``0.1``, ``1``, ``10``, ``1e3``: the console's notation for powers of ten."""
    return {-1: "0.1", 0: "1", 1: "10"}.get(k, f"1e{k}")


def _log10(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return math.log10(value)


def _marker(shape: str, x: float, y: float, css: str, tooltip: str, index: int | None) -> str:
    title = f"<title>{_e(tooltip)}</title>" if tooltip else ""
    attrs = f'class="{css}"' + (f' data-layer="{index}"' if index is not None else "")
    if shape == "square":
        return f'<rect {attrs} x="{_n(x - 3.5)}" y="{_n(y - 3.5)}" width="7" height="7">{title}</rect>'
    if shape == "diamond":
        points = f"{_n(x)},{_n(y - 4.5)} {_n(x + 4.5)},{_n(y)} {_n(x)},{_n(y + 4.5)} {_n(x - 4.5)},{_n(y)}"
        return f'<polygon {attrs} points="{points}">{title}</polygon>'
    if shape == "cross":  # a value that is not finite
        d = f"M{_n(x - 4)},{_n(y - 4)}L{_n(x + 4)},{_n(y + 4)}M{_n(x - 4)},{_n(y + 4)}L{_n(x + 4)},{_n(y - 4)}"
        return f'<path {attrs} d="{d}">{title}</path>'
    return f'<circle {attrs} cx="{_n(x)}" cy="{_n(y)}" r="3.5">{title}</circle>'


_SKIP = (-1.0, -1.0)  # a position without a value that the line passes over (not measured there)


def _polylines(points: list[tuple[float, float] | None], css: str) -> list[str]:
    """One polyline per run of measured points: None breaks the line, ``_SKIP`` does not."""
    out: list[str] = []
    run: list[tuple[float, float]] = []
    for point in [*points, None]:
        if point == _SKIP:
            continue
        if point is not None:
            run.append(point)
            continue
        if len(run) > 1:
            coords = " ".join(f"{_n(x)},{_n(y)}" for x, y in run)
            out.append(f'<polyline class="{css}" points="{coords}"/>')
        run = []
    return out


def _legend(series: Sequence[Series], x: float, y: float) -> list[str]:
    out = []
    for s in series:
        out.append(_marker(s.marker, x + 5, y - 4, f"gs-pt gs-s-{s.key}", "", None))
        out.append(f'<text class="gs-legend" x="{_n(x + 14)}" y="{_n(y)}">{_e(s.label)}</text>')
        x += 22 + 6.2 * len(s.label)
    return out


def _log_range(values: list[float], include: tuple[float, float] | None) -> tuple[int, int]:
    lo = min(values) if values else 0.0
    hi = max(values) if values else 0.0
    if include is not None:
        lo, hi = min(lo, include[0]), max(hi, include[1])
    lo_k, hi_k = math.floor(lo), math.ceil(hi)
    if hi_k == lo_k:
        hi_k += 1
    return lo_k, hi_k


def _decade_ticks(lo_k: int, hi_k: int) -> list[int]:
    stride = max(1, math.ceil((hi_k - lo_k) / 8))  # at most ~9 labels on the axis
    return [k for k in range(lo_k, hi_k + 1) if (k - lo_k) % stride == 0]


def depth_profile_svg(
    names: Sequence[str],
    series: Sequence[Series],
    *,
    flagged: dict[int, str],
    healthy: tuple[float, float] = F.HEALTHY_LOG10,
    caption: str,
) -> str:
    """Per-layer values of each series on a log axis, layers in forward order along x.

    Args:
        names: the layer names (x positions), forward order.
        series: each with one value per layer (None: not measured).
        flagged: layer index -> the flags shown for it; those columns are highlighted.
        healthy: log10 bounds of the healthy gradient range, drawn as a band.
        caption: the accessible name of the chart (``aria-label``).
    """
    count = len(names)
    logs = [v for s in series for x in s.values if (v := _log10(x)) is not None]
    lo_k, hi_k = _log_range(logs, healthy)
    right, top = 16, 38
    # Wide columns for a few layers, LAYER_PITCH (one rotated label each) for many: the chart then scrolls.
    pitch = max(LAYER_PITCH, min(120, 1000 // max(1, count)))
    longest = max((len(F.truncate_middle(n, LABEL_CHARS)) for n in names), default=1)
    label_px = longest * FONT * 0.56  # ~0.56 em per character of an 11 px sans-serif
    upright = label_px + 8 <= pitch  # the names fit side by side: no need to turn them
    bottom = 28 if upright else 20 + round(label_px * math.sin(math.radians(50)))  # room for the rotated names
    # the first rotated name reaches left of its column: keep it inside the chart (a scrolling box clips it)
    left = 52 if upright else max(52, round(label_px * math.cos(math.radians(50)) - pitch / 2 + 4))
    width = left + right + max(1, count) * pitch
    height = top + PLOT_HEIGHT + bottom

    def y_of(log_value: float) -> float:
        return top + (hi_k - log_value) / (hi_k - lo_k) * PLOT_HEIGHT

    def x_of(i: int) -> float:
        return left + (i + 0.5) * pitch

    out = [
        f'<svg class="gs-chart gs-depth" role="img" aria-label="{_e(caption)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" data-layers="{count}">'
    ]
    # flagged columns first, so that everything else is drawn over them
    for i, flags in sorted(flagged.items()):
        out.append(
            f'<rect class="gs-flagged" x="{_n(x_of(i) - pitch / 2)}" y="{top}" width="{pitch}" '
            f'height="{PLOT_HEIGHT}"><title>{_e(names[i])}: {_e(flags)}</title></rect>'
        )
    band_hi, band_lo = y_of(healthy[1]), y_of(healthy[0])
    out.append(
        f'<rect class="gs-band" x="{left}" y="{_n(band_hi)}" width="{width - left - right}" '
        f'height="{_n(band_lo - band_hi)}"><title>healthy gradient range [1e{healthy[0]:g}, 1e{healthy[1]:g}]'
        "</title></rect>"
    )
    for y in (band_hi, band_lo):
        out.append(f'<line class="gs-band-edge" x1="{left}" x2="{width - right}" y1="{_n(y)}" y2="{_n(y)}"/>')
    for k in _decade_ticks(lo_k, hi_k):
        y = y_of(k)
        out.append(f'<line class="gs-grid" x1="{left}" x2="{width - right}" y1="{_n(y)}" y2="{_n(y)}"/>')
        out.append(f'<text class="gs-tick" x="{left - 6}" y="{_n(y + 4)}" text-anchor="end">{decade_label(k)}</text>')
    out.append(f'<line class="gs-axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + PLOT_HEIGHT}"/>')
    out.append(
        f'<line class="gs-axis" x1="{left}" x2="{width - right}" y1="{top + PLOT_HEIGHT}" y2="{top + PLOT_HEIGHT}"/>'
    )
    for i, name in enumerate(names):
        x, y = x_of(i), top + PLOT_HEIGHT + 12
        css = "gs-name gs-name-flagged" if i in flagged else "gs-name"
        turn = 'text-anchor="middle"' if upright else f'text-anchor="end" transform="rotate(-50 {_n(x)} {_n(y)})"'
        out.append(
            f'<text class="{css}" x="{_n(x)}" y="{_n(y + (4 if upright else 0))}" {turn}><title>{_e(name)}</title>'
            f"{_e(F.truncate_middle(name, LABEL_CHARS))}</text>"
        )
    for s in series:
        points: list[tuple[float, float] | None] = []
        marks = []
        for i, value in enumerate(s.values):
            tip = s.tooltips[i] if i < len(s.tooltips) else ""
            log_value = _log10(value)
            if log_value is not None:
                points.append((x_of(i), y_of(log_value)))
                marks.append(_marker(s.marker, x_of(i), y_of(log_value), f"gs-pt gs-s-{s.key}", tip, i))
                continue
            if value is None:  # not measured at this layer (a layer without weights): the line passes over it
                points.append(_SKIP)
                continue
            points.append(None)  # a zero or a non-finite value breaks the line
            if math.isfinite(value):  # zero (or negative): the bottom edge
                marks.append(_marker(s.marker, x_of(i), top + PLOT_HEIGHT, f"gs-pt gs-zero gs-s-{s.key}", tip, i))
            else:
                marks.append(_marker("cross", x_of(i), top, f"gs-pt gs-nonfinite gs-s-{s.key}", tip, i))
        out.append(f'<g class="gs-series" data-series="{_e(s.key)}">')
        out += _polylines(points, f"gs-line gs-s-{s.key}")
        out += marks
        out.append("</g>")
    out += _legend(series, left, 16)
    out.append("</svg>")
    return "".join(out)


def _nice_step(span: float, target: int = 6) -> float:
    raw = span / target
    magnitude = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5, 10):
        if raw <= multiple * magnitude:
            return multiple * magnitude
    return 10 * magnitude


def _linear_ticks(lo: float, hi: float, *, integer: bool = False) -> list[float]:
    step = _nice_step(hi - lo)
    if integer:
        step = max(1.0, round(step))
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [k * step for k in range(first, last + 1)]


def tick_label(value: float, step: float, largest: float) -> str:
    """The label of a linear-axis tick: as many digits as the tick spacing ``step``
    needs (so neighbouring ticks read differently, whatever the range: 13.58,
    13.59 … or 13.581, 13.582 …), plain between 1e-3 and 1e5 in magnitude
    (``largest``: the largest tick magnitude), else scientific with a short
    exponent.  A label parses back to within half a spacing of its tick.

    Example:
        >>> [tick_label(t, 0.001, 13.585) for t in (13.58, 13.581)], tick_label(2e6, 1e6, 3e6)
        (['13.580', '13.581'], '2e6')
    """
    if abs(value) < step * 1e-6:
        return "0"
    step_exponent = math.floor(math.log10(step) + 1e-9)
    if 1e-3 <= largest < 1e5:
        return f"{value:.{max(0, -step_exponent)}f}"
    digits = max(0, math.floor(math.log10(abs(value)) + 1e-9) - step_exponent)  # decimals of the mantissa
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _linear_axis(lo: float, hi: float) -> list[tuple[float, str]]:
    """Nice ticks covering [lo, hi] with distinct labels (``tick_label``)."""
    ticks = _linear_ticks(lo, hi)
    step = _nice_step(hi - lo)
    largest = max(abs(t) for t in ticks)
    return [(t, tick_label(t, step, largest)) for t in ticks]


# A log axis needs a decade of data to show more than two labels: a curve that
# spans less than this ratio is drawn on a linear axis (a loss between 13.58 and
# 13.62 on a log axis from 10 to 100 is a flat line).
LOG_AXIS_MIN_RATIO = 10.0


@dataclass
class Mark:
    """A vertical event line on a curve chart (first non-finite step, a spike)."""

    step: float
    label: str
    css: str


def curve_svg(
    steps: Sequence[float],
    values: Sequence[float | None],
    *,
    key: str,
    label: str,
    caption: str,
    threshold: float | None = None,
    threshold_label: str = "",
    marks: Sequence[Mark] = (),
    width: int = 560,
) -> str:
    """One quantity over optimizer steps, on a log axis when every measured value is positive.

    Args:
        steps: the x positions (optimizer steps).
        values: one per step; None is a gap (not measured, or not finite).
        key: the CSS series key (its colour).
        label: the y quantity, shown above the plot.
        caption: the accessible name of the chart.
        threshold: a horizontal reference line (the AutoClip threshold), if any.
        threshold_label: its label.
        marks: vertical event lines.
        width: the chart's width in px.
    """
    measured = [v for v in values if v is not None and math.isfinite(v)]
    positive = bool(measured) and all(v > 0 for v in measured) and (threshold is None or threshold > 0)
    if positive:
        spread = measured + ([threshold] if threshold is not None and math.isfinite(threshold) else [])
        positive = max(spread) / min(spread) >= LOG_AXIS_MIN_RATIO
    left, right, top, bottom = 52, 16, 26, 34
    height = top + 160 + bottom
    plot_h = height - top - bottom
    xs = [float(s) for s in steps] + [m.step for m in marks]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    reference = [threshold] if threshold is not None and math.isfinite(threshold) else []
    if positive:
        lo_k, hi_k = _log_range([math.log10(v) for v in measured + reference], None)
        y_lo, y_hi = float(lo_k), float(hi_k)

        def transform(v: float) -> float:
            return math.log10(v)

        y_ticks = [(float(k), decade_label(k)) for k in _decade_ticks(lo_k, hi_k)]
    else:
        span = measured + reference or [0.0, 1.0]
        y_lo, y_hi = min(span), max(span)
        if y_hi == y_lo:
            y_lo, y_hi = y_lo - 1, y_hi + 1
        y_ticks = _linear_axis(y_lo, y_hi)
        y_lo, y_hi = min(y_lo, y_ticks[0][0]), max(y_hi, y_ticks[-1][0])

        def transform(v: float) -> float:
            return v

    def x_of(step: float) -> float:
        return left + (step - x_lo) / (x_hi - x_lo) * (width - left - right)

    def y_of(v: float) -> float:
        return top + (y_hi - v) / (y_hi - y_lo) * plot_h

    out = [
        f'<svg class="gs-chart gs-curve" role="img" aria-label="{_e(caption)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" data-points="{len(measured)}">',
        f'<text class="gs-legend" x="{left}" y="16">{_e(label)}{" (log axis)" if positive else ""}</text>',
    ]
    for t, text in y_ticks:
        y = y_of(t)
        out.append(f'<line class="gs-grid" x1="{left}" x2="{width - right}" y1="{_n(y)}" y2="{_n(y)}"/>')
        out.append(f'<text class="gs-tick" x="{left - 6}" y="{_n(y + 4)}" text-anchor="end">{_e(text)}</text>')
    for t in _linear_ticks(x_lo, x_hi, integer=True):
        x = x_of(t)
        out.append(f'<text class="gs-tick" x="{_n(x)}" y="{top + plot_h + 16}" text-anchor="middle">{int(t)}</text>')
    out.append(f'<text class="gs-tick" x="{width - right}" y="{height - 4}" text-anchor="end">optimizer step</text>')
    out.append(f'<line class="gs-axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}"/>')
    out.append(f'<line class="gs-axis" x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}"/>')
    for mark in marks:
        x = x_of(mark.step)
        out.append(
            f'<line class="gs-mark {_e(mark.css)}" x1="{_n(x)}" x2="{_n(x)}" y1="{top}" y2="{top + plot_h}">'
            f"<title>{_e(mark.label)}</title></line>"
        )
    if reference:
        y = y_of(transform(reference[0]))
        out.append(
            f'<line class="gs-threshold" x1="{left}" x2="{width - right}" y1="{_n(y)}" y2="{_n(y)}">'
            f"<title>{_e(threshold_label)}</title></line>"
        )
        out.append(
            f'<text class="gs-threshold-label" x="{width - right - 4}" y="{_n(y - 5)}" text-anchor="end">'
            f"{_e(threshold_label)}</text>"
        )
    points: list[tuple[float, float] | None] = []
    for step, value in zip(steps, values, strict=False):
        if value is None or not math.isfinite(value) or (positive and value <= 0):
            points.append(None)
        else:
            points.append((x_of(float(step)), y_of(transform(value))))
    out.append(f'<g class="gs-series" data-series="{_e(key)}">')
    out += _polylines(points, f"gs-line gs-s-{key}")
    if sum(p is not None for p in points) == 1:  # a single measurement is a dot, not an invisible line
        x, y = next(p for p in points if p is not None)
        out.append(f'<circle class="gs-pt gs-s-{key}" cx="{_n(x)}" cy="{_n(y)}" r="3"/>')
    out.append("</g></svg>")
    return "".join(out)


__all__ = ["Mark", "Series", "curve_svg", "decade_label", "depth_profile_svg"]
