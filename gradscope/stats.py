"""Per-tensor statistics: one small fixed-size vector per tensor, computed on the
tensor's own device with no host synchronisation, mergeable exactly.

Layout of the statistics vector (float64; float32 on devices without float64):

=========  ===================================================================
index      meaning
=========  ===================================================================
COUNT      number of elements
MCOUNT     elements behind the moments (COUNT, or 0 when the tensor held a
           non-finite value or its power sums overflowed: moments unavailable)
MEAN       mean of the elements
M2         sum of squared deviations from the mean (Welford/Chan's M2)
MIN, MAX   smallest and largest element (NaN-propagating, as torch.aminmax)
NAN, INF   counts of NaN and of ±inf
HIST       256 counts indexed by the biased exponent ``b`` of ``|x| * 2^23``
           in float32: ``b == 0`` holds exact zeros, ``1 <= b <= 254`` holds
           values with ``floor(log2|x|) == b - 150`` (binades -149 … 104, so
           fp32 subnormals get their own binades), ``b == 255`` holds
           non-finite values and finite values ``>= 2^105``.
=========  ===================================================================

Why scale by 2^23 before reading the exponent field: multiplying by a power of
two is exact, and it lifts fp32's subnormals (down to 2^-149) into the normal
range, so one integer shift yields the binade of every element, subnormals
included, without ``frexp`` (ten times slower on CPU).  The price is that
values above 2^105 ≈ 4e31 share the top bin; no fp16/fp8 question needs more,
and bf16 only overflows beyond fp32's own range.

Moments come from shifted power sums (shift = the tensor's first element), so
the variance keeps its precision when |mean| >> std; sums accumulate in
float32 or wider whatever the input dtype (fp16/bf16 are upcast first).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradscope.formats import FORMAT_NAMES, get_format
from gradscope.jsonsafe import json_float, json_safe

if TYPE_CHECKING:
    import torch

COUNT, MCOUNT, MEAN, M2, MIN, MAX, NAN, INF = range(8)
HIST = 8
HIST_BINS = 256
SIZE = HIST + HIST_BINS

# Binade e = floor(log2|x|) of a finite non-zero value sits in histogram bin e + 150.
EXPONENT_OFFSET = 150
MIN_EXPONENT = -149  # fp32's smallest subnormal is 2^-149
TOP_EXPONENT = 105  # bin 255: finite values >= 2^105 (and the non-finite ones)
_SCALE = float(2**23)


def _stats_dtype(device: torch.device) -> torch.dtype:
    import torch

    # MPS has no float64; counts stay exact there up to 2^24 elements per tensor.
    return torch.float32 if device.type == "mps" else torch.float64


def _exponent_histogram(biased: torch.Tensor) -> torch.Tensor:
    import torch

    flat = biased.reshape(-1)
    if flat.device.type == "cpu":
        return torch.bincount(flat, minlength=HIST_BINS)
    # CUDA's bincount reads the maximum back to the host to size its output;
    # index_add_ into a fixed-size buffer has no such sync.
    hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=flat.device)
    ones = torch.ones(1, dtype=torch.int64, device=flat.device).expand(flat.numel())
    return hist.index_add_(0, flat.long(), ones)


def tensor_stats(x: torch.Tensor) -> torch.Tensor:
    """Statistics of ``x`` as a vector of SIZE elements on ``x``'s device.

    No value is read back to the host: everything, including the choice of
    whether the moments are valid, is device arithmetic.  ``x`` is not kept.

    Example:
        >>> import torch
        >>> s = Stats(tensor_stats(torch.tensor([0.0, 1.0, -3.0, float("nan")])))
        >>> s.count, s.zero_count, s.nan_count, s.moments_valid
        (4, 1, 1, False)
    """
    import torch

    with torch.no_grad():
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.float()  # fp16/bf16 accumulate in fp32; float64 is narrowed (documented)
        dtype = _stats_dtype(x.device)
        n = x.numel()
        if n == 0:
            return torch.zeros(SIZE, dtype=dtype, device=x.device)
        flat = x.reshape(-1)

        scaled_bits = (flat * _SCALE).view(torch.int32)
        biased = (scaled_bits >> 23) & 0xFF
        hist = _exponent_histogram(biased)

        nan = torch.isnan(flat).sum()
        inf = torch.isinf(flat).sum()
        lo, hi = torch.aminmax(flat)

        shift = flat[0]
        centred = flat - shift
        s1 = centred.sum(dtype=torch.float32).to(dtype)
        s2 = torch.linalg.vector_norm(centred).to(dtype).square()
        mean_c = s1 / n
        m2 = (s2 - s1 * mean_c).clamp_min(0.0)
        mean = shift.to(dtype) + mean_c
        valid = torch.isfinite(m2) & torch.isfinite(mean) & (nan + inf == 0)
        zero = torch.zeros((), dtype=dtype, device=x.device)
        head = torch.stack(
            [
                torch.full_like(zero, n),  # a fill kernel, not a host-to-device copy
                torch.where(valid, torch.full_like(zero, n), zero),
                torch.where(valid, mean, zero),
                torch.where(valid, m2, zero),
                lo.to(dtype),
                hi.to(dtype),
                nan.to(dtype),
                inf.to(dtype),
            ]
        )
        return torch.cat([head, hist.to(dtype)])


def merge_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two statistics vectors (or two stacks of them, along the last axis).

    Moments merge exactly with the parallel formula of Chan, Golub & LeVeque
    (1979): ``M2 = M2a + M2b + delta^2 * na * nb / n``.  Works on any device.
    """
    import torch

    out = a + b  # counts and histogram add
    na, nb = a[..., MCOUNT], b[..., MCOUNT]
    n = na + nb
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    delta = b[..., MEAN] - a[..., MEAN]
    out[..., MEAN] = torch.where(n > 0, a[..., MEAN] + delta * nb / safe_n, torch.zeros_like(n))
    out[..., M2] = a[..., M2] + b[..., M2] + delta * delta * na * nb / safe_n
    # An empty side (count 0) must not contribute its placeholder min/max of 0.
    a_empty, b_empty = a[..., COUNT] == 0, b[..., COUNT] == 0
    lo = torch.fmin(a[..., MIN], b[..., MIN])
    hi = torch.fmax(a[..., MAX], b[..., MAX])
    out[..., MIN] = torch.where(a_empty, b[..., MIN], torch.where(b_empty, a[..., MIN], lo))
    out[..., MAX] = torch.where(a_empty, b[..., MAX], torch.where(b_empty, a[..., MAX], hi))
    return out


def merge_many(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Merge a non-empty sequence of statistics vectors."""
    result = vectors[0].clone()
    for v in vectors[1:]:
        result = merge_stats(result, v)
    return result


@dataclass(frozen=True)
class Stats:
    """Host-side view of one statistics vector, with the derived quantities."""

    vector: Any  # a CPU float64 torch.Tensor of SIZE elements

    @classmethod
    def merged(cls, vectors: Iterable[Stats]) -> Stats:
        items = [v.vector for v in vectors]
        return cls(merge_many(items))

    def merge(self, other: Stats) -> Stats:
        return Stats(merge_stats(self.vector, other.vector))

    def _get(self, index: int) -> float:
        return float(self.vector[index])

    @property
    def count(self) -> int:
        return int(self._get(COUNT))

    @property
    def moments_valid(self) -> bool:
        return self._get(MCOUNT) > 0

    @property
    def mean(self) -> float:
        return self._get(MEAN) if self.moments_valid else math.nan

    @property
    def var(self) -> float:
        n = self._get(MCOUNT)
        return self._get(M2) / n if n > 0 else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @property
    def rms(self) -> float:
        return math.sqrt(self.var + self.mean**2)

    @property
    def min(self) -> float:
        return self._get(MIN)

    @property
    def max(self) -> float:
        return self._get(MAX)

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    @property
    def nan_count(self) -> int:
        return int(self._get(NAN))

    @property
    def inf_count(self) -> int:
        return int(self._get(INF))

    @property
    def nonfinite_count(self) -> int:
        return self.nan_count + self.inf_count

    @property
    def zero_count(self) -> int:
        return int(self._get(HIST))

    def _frac(self, k: float) -> float:
        return k / self.count if self.count else 0.0

    def binade_counts(self) -> dict[int, int]:
        """{floor(log2|x|): count} over finite non-zero values; 105 means ">= 2^105"."""
        counts: dict[int, int] = {}
        for b in range(1, HIST_BINS):
            c = int(self.vector[HIST + b])
            if b == HIST_BINS - 1:
                c -= self.nonfinite_count
            if c > 0:
                counts[b - EXPONENT_OFFSET] = c
        return counts

    def count_exponents(self, lo: int | None = None, hi: int | None = None) -> int:
        """Finite non-zero values whose binade e satisfies lo <= e <= hi."""
        lo_b = 1 if lo is None else max(1, lo + EXPONENT_OFFSET)
        hi_b = HIST_BINS - 1 if hi is None else min(HIST_BINS - 1, hi + EXPONENT_OFFSET)
        if lo_b > hi_b:
            return 0
        total = int(self.vector[HIST + lo_b : HIST + hi_b + 1].sum())
        if hi_b == HIST_BINS - 1:
            total -= self.nonfinite_count
        return total

    @property
    def max_exponent(self) -> int | None:
        """The highest occupied binade of the finite non-zero values."""
        counts = self.binade_counts()
        return max(counts) if counts else None

    def format_fractions(self, name: str) -> dict[str, float]:
        """Range fractions against one low-precision format.

        ``overflow``: values in binades above the format's top binade; they
        certainly become inf (values in the top binade above ``max`` also do,
        which the binade resolution cannot see: ``absmax`` can).
        ``subnormal``: values below the smallest normal (precision is lost).
        ``underflow``: values below the smallest subnormal.  Those more than one
        binade below flush to zero; those in the binade just below mostly round
        up to the smallest subnormal, so the true flush-to-zero fraction lies
        between ``underflow`` and the same count minus that one binade.
        ``headroom_binades``: log2(max / absmax), how many doublings fit before
        overflow (negative once over).
        """
        fmt = get_format(name)
        over = self.count_exponents(lo=fmt.max_exponent + 1)
        sub = self.count_exponents(hi=fmt.normal_exponent - 1)
        under = self.count_exponents(hi=fmt.subnormal_exponent - 1)
        absmax = self.absmax
        if math.isnan(absmax) or absmax == 0:
            headroom = math.nan if math.isnan(absmax) else math.inf
        else:
            headroom = math.log2(fmt.max / absmax)
        return {
            f"{name}_overflow_frac": self._frac(over),
            f"{name}_subnormal_frac": self._frac(sub),
            f"{name}_underflow_frac": self._frac(under),
            f"{name}_headroom_binades": headroom,
        }

    def to_dict(self) -> dict[str, Any]:
        """The STATS object of JSON schema 1 (derived values plus what round-trips)."""
        out: dict[str, Any] = {
            "count": self.count,
            "mean": self.mean,
            "std": self.std,
            "rms": self.rms,
            "min": self.min,
            "max": self.max,
            "absmax": self.absmax,
            "zero_frac": self._frac(self.zero_count),
            "nonfinite_frac": self._frac(self.nonfinite_count),
            "nan_count": self.nan_count,
            "inf_count": self.inf_count,
            "zero_count": self.zero_count,
            "moment_count": int(self._get(MCOUNT)),
            "m2": self._get(M2),
        }
        for name in FORMAT_NAMES:
            out.update(self.format_fractions(name))
        out["exponent_hist"] = [[e, c] for e, c in sorted(self.binade_counts().items())]
        return json_safe(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stats:
        import torch

        v = torch.zeros(SIZE, dtype=torch.float64)
        v[COUNT] = data["count"]
        v[MCOUNT] = data["moment_count"]
        v[MEAN] = json_float(data["mean"]) if data["moment_count"] else 0.0
        v[M2] = data["m2"]
        v[MIN] = json_float(data["min"])
        v[MAX] = json_float(data["max"])
        v[NAN] = data["nan_count"]
        v[INF] = data["inf_count"]
        v[HIST] = data["zero_count"]
        for e, c in data["exponent_hist"]:
            v[HIST + e + EXPONENT_OFFSET] += c
        v[HIST + HIST_BINS - 1] += data["nan_count"] + data["inf_count"]
        return cls(v)


def stats_from_vectors(vectors: Any) -> list[Stats]:
    """Split a (k, SIZE) host tensor into Stats."""
    return [Stats(row) for row in vectors]
