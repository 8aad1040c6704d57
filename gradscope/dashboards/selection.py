"""Which layers a per-layer chart names: the worst few by the chart's own measure.

A chart keeps the series it named while they stay among the worst (a line that
appears and disappears at every flush cannot be read); a newcomer displaces the
least bad named series only when it is worse by the chart's margin.  The chart
never names more than ``limit`` series.
"""

from __future__ import annotations

import math

from gradscope.dashboards.charts import Chart, finite_median


def _rounded(score: float) -> float:
    return round(score, 9) if math.isfinite(score) else score


class WorstSeries:
    """The named series of one chart (see the module docstring)."""

    def __init__(self, chart: Chart, limit: int) -> None:
        self.chart = chart
        self.limit = limit
        self.named: list[str] = []

    def choose(self, values: dict[str, float]) -> tuple[list[str], float]:
        """The series to write this flush (named ones that have a value) and the median
        of all values.  ``values`` is in forward order: ties keep the earlier layer."""
        median = finite_median(list(values.values()))
        score = {name: self.chart.badness(v, median) for name, v in values.items()}
        order = {name: i for i, name in enumerate(values)}
        # Scores equal to 1e-9 are ties (two layers equally far from the median differ
        # in the last bits of a float): the earlier layer keeps its slot.
        ranked = sorted(values, key=lambda name: (-_rounded(score[name]), order[name]))[: self.limit]
        for name in ranked:
            if name in self.named:
                continue
            if len(self.named) < self.limit:
                self.named.append(name)
                continue
            weakest = min(self.named, key=lambda n: score.get(n, -math.inf))
            if score[name] > score.get(weakest, -math.inf) + self.chart.margin:
                self.named[self.named.index(weakest)] = name
        return [name for name in self.named if name in values], median
