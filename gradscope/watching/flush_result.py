"""What one flush of a watched run saw (``scope.recent`` keeps the last few; the
TensorBoard writer draws them).  A module of its own so that readers of flushes
(``gradscope.tensorboard``) do not import the Scope that makes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gradscope.record import Record
from gradscope.report import Finding
from gradscope.stats import Stats


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


def stats_norm(stats: Stats | None) -> float:
    """The 2-norm of the tensor behind ``stats`` (sqrt(M2 + n mean^2))."""
    if stats is None:
        return math.nan
    if not stats.moments_valid:
        return math.inf if stats.has_inf and not stats.has_nan else math.nan
    return math.sqrt(stats.count) * stats.rms
