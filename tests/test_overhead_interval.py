"""The overhead benchmark's uncertainty: the bootstrap interval of the median
paired ratio that README "Cost" quotes next to each target."""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from overhead import median_interval  # noqa: E402


def test_the_interval_holds_the_median_and_narrows_with_more_rounds() -> None:
    draw = random.Random(5)
    few = [1.05 + draw.gauss(0, 0.06) for _ in range(11)]
    many = [1.05 + draw.gauss(0, 0.06) for _ in range(301)]
    low, high = median_interval(few)
    assert low <= statistics.median(few) <= high
    many_low, many_high = median_interval(many)
    assert many_low <= statistics.median(many) <= many_high
    # the median's standard error falls as 1/sqrt(rounds): 301 rounds pin it ~5x tighter than 11
    assert (many_high - many_low) < (high - low) / 2.5
    # a 90% interval from 301 rounds of N(1.05, 0.06) covers the true median 1.05
    assert many_low < 1.05 < many_high


def test_the_interval_is_reproducible_and_degenerate_for_constant_rounds() -> None:
    rounds = [1.10, 1.02, 1.07, 0.98, 1.20, 1.04, 1.06]
    assert median_interval(rounds) == median_interval(list(rounds))
    assert median_interval([1.03] * 9) == (1.03, 1.03)
