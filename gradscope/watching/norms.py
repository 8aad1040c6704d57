"""The history of global gradient norms: bounded, yet exact enough for clipping advice.

Two views of the same stream of per-step global norms:

* ``NormHistogram``: every finite positive norm ever seen, in a fixed log-binned
  histogram (16 bins per octave over 2^-64 … 2^64).  Its memory never grows, and
  a percentile read from it is the geometric centre of the bin that holds the
  true order statistic, so it is within a factor 2^(1/32) (≈ 2.2 % relative
  error) of the exact percentile of *all* past norms, over any run length.
  That is what AutoClip needs: Seetharaman et al. 2020 ("AutoClip: Adaptive
  Gradient Clipping for Source Separation Networks") clip the global norm at
  the 10th percentile of all past gradient norms.
* ``SpikeDetector``: the last ``window`` norms, to say whether a new norm is
  far above its *recent* history.
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
from collections import deque
from dataclasses import dataclass

BINS_PER_OCTAVE = 16
LOW_EXPONENT = -64  # norms below 2^-64 share the first bin
HIGH_EXPONENT = 64  # norms above 2^64 share the last bin
N_BINS = (HIGH_EXPONENT - LOW_EXPONENT) * BINS_PER_OCTAVE
# A percentile is reported as the geometric centre of a bin 2^(1/16) wide, so its
# relative error is at most 2^(1/32) - 1.
PERCENTILE_RELATIVE_ERROR = 2 ** (1 / (2 * BINS_PER_OCTAVE)) - 1

# AutoClip's percentile (Seetharaman et al. 2020, Sec. 3: p = 10 worked best).
AUTOCLIP_PERCENTILE = 10.0


class NormHistogram:
    """A log-binned histogram of positive finite norms, with percentiles.

    Example:
        >>> h = NormHistogram()
        >>> for v in [1.0, 2.0, 4.0, 8.0]:
        ...     h.add(v)
        >>> round(h.percentile(50), 2), h.count
        (2.04, 4)
    """

    def __init__(self) -> None:
        self.counts = [0] * N_BINS
        self.count = 0
        self.zeros = 0  # exact zero norms (no gradient): not part of the percentiles
        self.nonfinite = 0

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            self.nonfinite += 1
            return
        if value <= 0.0:
            self.zeros += 1
            return
        self.counts[_bin(value)] += 1
        self.count += 1

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (nearest-rank) of the finite positive norms, or None."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q / 100.0 * self.count))
        cumulative = list(itertools.accumulate(self.counts))
        return _centre(min(bisect.bisect_left(cumulative, rank), N_BINS - 1))


def _bin(value: float) -> int:
    index = math.floor((math.log2(value) - LOW_EXPONENT) * BINS_PER_OCTAVE)
    return min(max(index, 0), N_BINS - 1)


def _centre(index: int) -> float:
    return 2.0 ** (LOW_EXPONENT + (index + 0.5) / BINS_PER_OCTAVE)


# Spike rule.  Gradient norms of a healthy run wander by a factor of a few around a
# slowly moving level, roughly log-normally (AutoClip paper, Fig. 1), so the rule
# works on log norms with robust statistics:
#  * z = (ln g - median) / (1.4826 MAD) > 6: 1.4826 MAD estimates the standard
#    deviation of a normal sample (Rousseeuw & Croux 1993); a 6-sigma excursion
#    has one-sided probability ~1e-9, i.e. ~1e-3 false alarms over a million steps;
#  * and g > 4 x the recent median: in a very steady run the MAD is tiny and a 20 %
#    bump would pass the z test; a jump below 4x is not what clipping is for (the
#    AutoClip threshold is typically below the median already).
SPIKE_Z = 6.0
SPIKE_RATIO = 4.0
SPIKE_WINDOW = 64  # recent history, in optimizer steps
SPIKE_MIN_HISTORY = 16  # too few points give no robust spread


@dataclass(frozen=True)
class Spike:
    step: int
    norm: float
    median: float  # of the recent window
    ratio: float  # norm / median
    z: float
    # With several optimizers: the one that stepped (its norm, compared with its own history).
    optimizer: str | None = None


class SpikeDetector:
    """Flags a norm far above the last ``window`` norms (see SPIKE_Z, SPIKE_RATIO)."""

    def __init__(self, window: int = SPIKE_WINDOW, min_history: int = SPIKE_MIN_HISTORY) -> None:
        self._recent: deque[float] = deque(maxlen=window)  # natural logs of finite positive norms
        self.min_history = min_history

    def observe(self, step: int, norm: float) -> Spike | None:
        """Test ``norm`` against the recent history, then add it to the history."""
        if not math.isfinite(norm) or norm <= 0.0:
            return None
        log_norm = math.log(norm)
        spike = None
        if len(self._recent) >= self.min_history:
            med = statistics.median(self._recent)
            mad = statistics.median(abs(v - med) for v in self._recent)
            sigma = max(1.4826 * mad, 1e-12)
            z = (log_norm - med) / sigma
            ratio = math.exp(log_norm - med)
            if z > SPIKE_Z and ratio > SPIKE_RATIO:
                spike = Spike(step=step, norm=norm, median=math.exp(med), ratio=ratio, z=z)
        self._recent.append(log_norm)
        return spike
