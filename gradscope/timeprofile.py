"""Gradient magnitude along a sequence's time axis: one small vector per call.

Backprop through time multiplies one Jacobian per step, ``∂ℓ/∂h_t =
∂ℓ/∂h_T · Π_{s=t+1..T} ∂h_s/∂h_{s-1}`` (Bengio et al. 1994; Pascanu et al.
2013, eq. 3-5), so the RMS of the gradient at step ``t`` changes geometrically
with the distance to the loss when the recurrence explodes or vanishes.

On the device, per recorded tensor: the sum of squares of each time step
(``vector_norm`` over every other axis, no full-size temporary), folded into
at most ``TIME_BINS`` bins of consecutive steps.  The vector has a fixed size
whatever the sequence length; the element count of each bin is known from the
shape on the host, so nothing is read back until the recorder's flush.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where tensors are handled: a report read from JSON needs none
    import torch

# Enough bins to fit a growth rate along time (a least-squares slope over up to
# 64 points), few enough that the vector stays smaller than one statistics row.
TIME_BINS = 64

_BIN_INDEX_MAX = 64
_BIN_INDEX: dict[tuple[int, str], torch.Tensor] = {}  # (steps, device) -> bin of each step


def _bin_index(steps: int, device: torch.device) -> torch.Tensor:
    """Bin of each time step: ``t * bins // steps`` (consecutive steps, nearly equal bins)."""
    import torch

    key = (steps, str(device))
    index = _BIN_INDEX.get(key)
    if index is None:
        if len(_BIN_INDEX) >= _BIN_INDEX_MAX:  # variable-length batches: keep the cache bounded
            _BIN_INDEX.clear()
        bins = min(steps, TIME_BINS)
        index = _BIN_INDEX[key] = (torch.arange(steps, device=device) * bins) // steps
    return index


def bins_for(steps: int) -> int:
    return min(steps, TIME_BINS)


def time_sums(tensor: torch.Tensor, time_dim: int) -> torch.Tensor:
    """Per-bin sums of squares of ``tensor`` along ``time_dim``, as a float32 vector
    of TIME_BINS entries (bins past ``min(steps, TIME_BINS)`` stay 0).  Device work only."""
    import torch

    steps = int(tensor.shape[time_dim])
    dims = [d for d in range(tensor.dim()) if d != time_dim]
    with torch.no_grad():
        if dims:
            # Accumulated in float32 at least (fp16/bf16 squares overflow); a float64
            # gradient keeps float64 (vector_norm refuses a narrowing dtype) until the bins.
            wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
            per_step = torch.linalg.vector_norm(tensor.detach(), dim=dims, dtype=wide).square().float()
        else:
            per_step = tensor.detach().float().square()
        out = torch.zeros(TIME_BINS, dtype=torch.float32, device=tensor.device)
        return out.index_add_(0, _bin_index(steps, tensor.device), per_step)


# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom 1..30
# (standard tables, e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2); beyond 30 the normal's 1.96.
_T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def student_t_975(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom (>= 1)."""
    return _T_975[dof - 1] if dof <= len(_T_975) else 1.96


@dataclass
class TimeProfile:
    """Host side: how the RMS of one role's gradient varies along time, merged over calls."""

    steps: int  # sequence length of the calls merged here
    time_dim: int
    sumsq: list[float]  # per bin
    counts: list[float]  # elements per bin
    calls: int = 1
    other_lengths: int = 0  # calls with another sequence length, left out

    @classmethod
    def from_sums(cls, sums: torch.Tensor, shape: list[int], time_dim: int) -> TimeProfile:
        steps = int(shape[time_dim])
        bins = bins_for(steps)
        per_step = math.prod(shape) // steps if steps else 0
        counts = [0.0] * bins
        for t in range(steps):
            counts[t * bins // steps] += per_step
        return cls(steps=steps, time_dim=time_dim, sumsq=[float(v) for v in sums[:bins]], counts=counts)

    def merge(self, other: TimeProfile) -> TimeProfile:
        """Sum profiles of the same length; a call of another length is counted, not mixed in."""
        if other.steps != self.steps:
            return TimeProfile(
                self.steps, self.time_dim, self.sumsq, self.counts, self.calls, self.other_lengths + other.calls
            )
        return TimeProfile(
            self.steps,
            self.time_dim,
            [a + b for a, b in zip(self.sumsq, other.sumsq, strict=True)],
            [a + b for a, b in zip(self.counts, other.counts, strict=True)],
            self.calls + other.calls,
            self.other_lengths + other.other_lengths,
        )

    def centers(self) -> list[float]:
        """Mean time step of each bin."""
        bins = len(self.sumsq)
        totals = [0.0] * bins
        sizes = [0] * bins
        for t in range(self.steps):
            b = t * bins // self.steps
            totals[b] += t
            sizes[b] += 1
        return [totals[b] / sizes[b] if sizes[b] else math.nan for b in range(bins)]

    def rms(self) -> list[float]:
        return [
            math.sqrt(s / c) if c > 0 and math.isfinite(s) else math.nan
            for s, c in zip(self.sumsq, self.counts, strict=True)
        ]

    def _log_fit(self) -> tuple[float, float, int] | None:
        """(slope, standard error of the slope, bins used) of the least-squares line through
        ``log RMS`` against the step, over the usable bins; None with fewer than 3
        of them or a single step.  The error is from the residuals with n - 2 degrees
        of freedom (any regression text, e.g. Draper & Smith 1998, Sec. 1.4)."""
        points = [
            (t, math.log(r))
            for t, r in zip(self.centers(), self.rms(), strict=True)
            if math.isfinite(r) and r > 0 and math.isfinite(t)
        ]
        n = len(points)
        if n < 3:
            return None
        mean_t = sum(t for t, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        var_t = sum((t - mean_t) ** 2 for t, _ in points)
        if var_t == 0:
            return None
        slope = sum((t - mean_t) * (y - mean_y) for t, y in points) / var_t
        intercept = mean_y - slope * mean_t
        residual = sum((y - intercept - slope * t) ** 2 for t, y in points)
        return slope, math.sqrt(residual / (n - 2) / var_t), n

    def backward_factor(self) -> float | None:
        """The factor by which the gradient's RMS grows per step going back in time:
        ``exp(-slope)`` of a least-squares line through ``log RMS`` against the step.

        > 1: earlier steps get larger gradients than later ones (exploding through
        time); < 1: smaller (vanishing).  None with fewer than 3 usable bins.
        """
        fit = self._log_fit()
        return math.exp(-fit[0]) if fit is not None else None

    def backward_factor_bounds(self) -> tuple[float, float] | None:
        """The 95% confidence interval of ``backward_factor`` (low, high): the slope's
        standard error times Student's t for n - 2 degrees of freedom.  A few noisy
        bins give a wide interval, a clean geometric trend a narrow one.  None as for
        the factor."""
        fit = self._log_fit()
        if fit is None:
            return None
        slope, error, n = fit
        half = student_t_975(n - 2) * error
        return math.exp(-slope - half), math.exp(-slope + half)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "time_dim": self.time_dim,
            "sumsq": list(self.sumsq),
            "counts": list(self.counts),
            "calls": self.calls,
            "other_lengths": self.other_lengths,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TimeProfile:
        return cls(
            steps=int(data["steps"]),
            time_dim=int(data.get("time_dim", 0)),
            sumsq=[float(v) for v in data["sumsq"]],
            counts=[float(v) for v in data["counts"]],
            calls=int(data.get("calls", 1)),
            other_lengths=int(data.get("other_lengths", 0)),
        )
