"""Numbers in finding messages keep their significant figures: a meaningful
non-zero value never prints as 0 (an update ratio of 3e-7 under ``:.2f``) nor as
a wall of digits (a spike 1494440.5x its median)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
from torch import nn

import gradscope
from gradscope.learning_rate import FP32_HALF_ULP, LayerRatios, LearningRateMonitor
from gradscope.numbers import percent, significant
from gradscope.report import Finding
from gradscope.training import SpikeSummary, spike_finding
from gradscope.watching.norms import Spike
from gradscope.watching.validation import ValidationTracker, overfitting_finding

VALUES = [s * 10.0**e * m for e in range(-30, 31, 3) for m in (1.0, 3.3, 9.996) for s in (1, -1)]


@pytest.mark.parametrize("x", VALUES)
def test_significant_figures_keep_the_value(x: float) -> None:
    text = significant(x)
    assert text != "0" and len(text) <= 8
    assert float(text) == pytest.approx(x, rel=5e-3)  # 3 significant figures: half a unit of the last one


@pytest.mark.parametrize("fraction", [1e-7, 3e-4, 0.005, 0.123, 0.5, 0.9995, 1 - 1e-6])
def test_percent_is_never_rounded_to_zero_or_a_hundred(fraction: float) -> None:
    text = percent(fraction)
    assert text not in ("0%", "100%") and text.endswith("%")
    assert float(text[:-1]) / 100 == pytest.approx(fraction, rel=0.05, abs=0.05 * (1 - fraction))


def update_ratio(ratio: float) -> Finding:
    """The update-ratio finding of one layer that moved by ``ratio`` for 30 steps
    (too small or too large, by the value)."""
    monitor = LearningRateMonitor()
    monitor.layers["encoder.fc"] = layer = LayerRatios()
    for step in range(30):
        layer.add(step, ratio, 1e-3, None)
    finding = monitor.update_ratio_finding(final=True)
    assert finding is not None and finding.layers == ["encoder.fc"]
    return finding


def spike(ratio: float) -> Finding:
    return spike_finding(Spike(step=40, norm=ratio * 1.078, median=1.078, ratio=ratio, z=23.0), SpikeSummary(), None)


def dropout(keep: float) -> Finding:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(1 - keep), nn.Linear(16, 2))
    report = gradscope.audit(model, input_shape=(32, 8), loss="mean")
    (finding,) = [f for f in report.findings if f.code == "dropout"]
    return finding


def overfitting(rise: float) -> Finding:
    tracker = ValidationTracker()
    tracker.add(5, 1.0, min_delta=0.0)
    for step in range(6, 17):
        tracker.add(step, 1.0 + rise * (step - 5) / 11)
    finding = overfitting_finding(tracker, None, [])
    assert finding is not None
    return finding


# (message builder, the value it is given, the text the value must appear as)
CASES: list[tuple[Callable[[float], Finding], float, str]] = [
    (update_ratio, 3e-7, "at most 3e-7 of the weights' norm"),
    (update_ratio, 4.2e-6, "at most 4.2e-6 of the weights' norm"),
    (update_ratio, 0.37, "by 0.37 of the weights' norm"),
    (update_ratio, 2.3e3, "by 2300 of the weights' norm"),
    (spike, 1494440.5, "1.49e6x its recent median 1.08"),
    (spike, 12.34, "12.3x its recent median"),
    (dropout, 0.005, "keeps only 0.5% of the units"),
    (overfitting, 2e-5, "from its best 1 at step 5 to 1.00002 at step 16 (+0.002%, "),
    (overfitting, 0.357, "to 1.357 at step 16 (+35.7%, "),
]


@pytest.mark.parametrize(("build", "value", "expected"), CASES, ids=[f"{c[0].__name__}-{c[1]:g}" for c in CASES])
def test_messages_print_their_numbers_with_significant_figures(
    build: Callable[[float], Finding], value: float, expected: str
) -> None:
    message = build(value).message
    assert expected in message, message
    assert not re.search(r"(?<![\w.])0(?![\w.%])", message.replace("1e-3 is healthy", "")), message  # no bare 0
    assert not re.search(r"\d{6,}", message), message  # no wall of digits


def test_updates_that_round_away_say_how_small_they_are() -> None:
    # a ratio of exactly 0 with lr > 0: every update rounded away in the weights' precision
    message = update_ratio(0.0).message
    assert f"by less than {significant(FP32_HALF_ULP, 2)} of the weights' norm" in message
    assert "at most 0 " not in message and math.isclose(float(significant(FP32_HALF_ULP, 2)), 6e-8)
