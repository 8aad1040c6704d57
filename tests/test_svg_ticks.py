"""Axis labels of the HTML report's charts: pairwise distinct and readable for any
range (digits from the tick spacing), each parsing back to within half a spacing
of the tick it labels; a log axis labels decades and is used only when the data
span one."""

from __future__ import annotations

import math
import re

import pytest

from gradscope.render import svg

RANGES = [
    (13.58, 13.62),  # a loss that barely moves
    (13.5801, 13.5849),  # ... even less
    (0.0, 1.0),
    (-5.0, -4.99),  # negative and narrow
    (-1e6, 3e6),  # wide, crossing zero
    (1e-9, 3e-9),  # tiny
    (1e5, 1e5 + 4),  # large with a small spread
    (-0.003, 0.002),
    (2.0, 7e4),
]


@pytest.mark.parametrize(("lo", "hi"), RANGES)
def test_linear_tick_labels_are_distinct_and_parse_back(lo: float, hi: float) -> None:
    axis = svg._linear_axis(lo, hi)
    values = [t for t, _ in axis]
    labels = [text for _, text in axis]
    assert 3 <= len(axis) <= 12
    assert values[0] <= lo + (values[1] - values[0]) and values[-1] >= hi - (values[1] - values[0])
    assert len(set(labels)) == len(labels), labels
    spacing = values[1] - values[0]
    for value, text in axis:
        assert abs(float(text) - value) <= spacing / 2, (text, value)
        assert len(text) <= 10, text


def y_ticks(chart: str) -> list[tuple[float, str]]:
    """(y, label) of each y-axis tick of a chart (the x-axis ticks are centred below)."""
    return [
        (float(y), text)
        for y, text in re.findall(r'class="gs-tick" x="\d+" y="([\d.]+)" text-anchor="end">([^<]*)<', chart)
        if text != "optimizer step"
    ]


def curve(values: list[float]) -> str:
    return svg.curve_svg(list(range(len(values))), values, key="loss", label="loss", caption="loss")


@pytest.mark.parametrize(("lo", "hi"), RANGES)
def test_chart_labels_sit_at_their_values(lo: float, hi: float) -> None:
    values = [lo + (hi - lo) * i / 9 for i in range(10)]
    chart = curve(values)
    ticks = y_ticks(chart)
    labels = [text for _, text in ticks]
    assert len(set(labels)) == len(labels) >= 3, labels
    parsed = [float(text) for text in labels]
    assert parsed == sorted(parsed, reverse=True) or parsed == sorted(parsed)
    log_axis = "(log axis)" in chart
    assert log_axis == (lo > 0 and hi / lo >= svg.LOG_AXIS_MIN_RATIO)
    if log_axis:  # decades, evenly spaced on the page
        exponents = [math.log10(v) for v in parsed]
        assert all(e == round(e) for e in exponents)
        return
    # a linear axis: y is affine in the value; each label's value, read back from its y, is within half a spacing
    (y0, _), (y1, _) = ticks[0], ticks[-1]
    v0, v1 = parsed[0], parsed[-1]
    spacing = abs(parsed[1] - parsed[0])
    for (y, _), value in zip(ticks, parsed, strict=True):
        at_y = v0 + (y - y0) / (y1 - y0) * (v1 - v0)
        assert abs(at_y - value) <= spacing / 2 + abs(v1 - v0) * 0.1 / abs(y1 - y0)  # + 0.1 px of rounding


def test_a_narrow_positive_loss_is_readable() -> None:
    chart = curve([13.58 + 0.004 * i for i in range(11)])
    labels = [text for _, text in y_ticks(chart)]
    assert "(log axis)" not in chart
    assert labels == ["13.58", "13.59", "13.60", "13.61", "13.62"]


def test_a_wide_positive_range_labels_decades() -> None:
    chart = curve([0.02 * 3**i for i in range(8)])
    labels = [text for _, text in y_ticks(chart)]
    assert "(log axis)" in chart
    assert labels == ["1e-2", "0.1", "1", "10", "1e2"]
