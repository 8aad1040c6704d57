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
NONFINITE  exact count of NaN and ±inf elements
NANSEEN    number of merged tensors that held a NaN (read from MIN/MAX, which
           propagate NaN); NaN and inf are not counted apart because each
           extra boolean reduction costs more than all the moments together
HSAMPLES   elements behind the histogram and moments: COUNT, or the size of
           the strided sample when ``tensor_stats(x, sample=k)`` was asked for one
XSAMPLES   elements behind MIN and MAX: COUNT (the default: extremes are
           exact), or the sample's size when ``exact_extremes=False``
HIST       256 counts by binade: ``b == 0`` holds exact zeros,
           ``1 <= b <= 254`` holds values with ``floor(log2|x|) == b - 150``
           (binades -149 … 104, so fp32 subnormals get their own binades;
           float64 values below 2^-149 join bin 1), ``b == 255`` holds
           non-finite values and finite values ``>= 2^105``.
=========  ===================================================================

How the binade is read: the sampled elements are copied to float64 (the power
sums need that copy anyway), where every fp32/fp16/bf16/fp8 value, subnormals
included, is a normal number; two integer ops on the float64 bits then give
``floor(log2|x|)`` exactly, without ``frexp`` (ten times slower on CPU).
Values above 2^105 ≈ 4e31 share the top bin; no fp16/fp8 question needs more,
and bf16 only overflows beyond fp32's own range.

Sampling (``sample=k``, used by ``watch`` and, for very large tensors, by
the audit): the count, minimum and maximum are taken over every element, so a
single NaN, an inf, or an overflow past a format's maximum is never missed
(``watch`` reads the extremes of weights and weight gradients from the sample
too, ``exact_extremes=False``: it checks every gradient element for NaN/inf
through the exact gradient norms it computes each step).  Everything else (moments, zero and non-finite counts, the
exponent histogram) is read from a strided sample of about k elements when
the tensor has more than 2k; the stride is a prime, so that it visits every
row and column.  Sampling errors (1 sigma, m sampled elements): a fraction p
±sqrt(p(1-p)/m) (<= 0.008 for m = 4096, watch's sample), the mean ±std/sqrt(m), the std
±sqrt((kurtosis-1)/(4m)) relative (1.1% for a Gaussian at m = 4096).
Why: the histogram (a scalar bincount, ~1 ns per element on CPU) and the
float64 power sums cost more per element than the forward pass of an
element-wise layer; a fixed-size sample bounds them.

Moments come from power sums accumulated in float64: no square of an fp32
value under- or overflows there, so 1e-25 gradients and 1e30 activations keep
their std, and M2 = S2 - S1^2/m loses only ~1e-16 * mean^2/var relative,
nothing for any |mean|/std an fp32 tensor can hold meaningfully.  float64
tensors keep their values (squares beyond ~1e154 overflow: moments
unavailable).  (On MPS, which has no float64, float32.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from gradscope.formats import FORMAT_NAMES, get_format
from gradscope.jsonsafe import json_float, json_safe

if TYPE_CHECKING:
    import torch

COUNT, MCOUNT, MEAN, M2, MIN, MAX, NONFINITE, NANSEEN, HSAMPLES, XSAMPLES = range(10)
HIST = 10
HIST_BINS = 256
SIZE = HIST + HIST_BINS

# Binade e = floor(log2|x|) of a finite non-zero value sits in histogram bin e + 150.
EXPONENT_OFFSET = 150
MIN_EXPONENT = -149  # fp32's smallest subnormal is 2^-149
TOP_EXPONENT = 105  # bin 255: finite values >= 2^105 (and the non-finite ones)


def _stats_dtype(device: torch.device) -> torch.dtype:
    import torch

    # MPS has no float64; counts stay exact there up to 2^24 elements per tensor.
    return torch.float32 if device.type == "mps" else torch.float64


def sample_stride(n: int, sample: int) -> int:
    """The stride of the strided sample: the smallest prime >= n // sample.

    A prime stride visits every row and column of a tensor whose sizes it does
    not divide; a power-of-two stride over an NCHW activation of width 32
    would sample column 0 only, next to the zero padding.

    Cached per (n, sample), except inside ``torch.compile``, where Dynamo traces
    through a cache wrapper with a warning to the user and folds the search into
    a constant anyway.
    """
    import torch

    if torch.compiler.is_compiling():
        return _prime_at_least(max(2, n // sample))
    return _cached_stride(n, sample)


@cache
def _cached_stride(n: int, sample: int) -> int:
    return _prime_at_least(max(2, n // sample))


def _prime_at_least(candidate: int) -> int:
    while any(candidate % d == 0 for d in range(2, math.isqrt(candidate) + 1)):
        candidate += 1
    return candidate


# The hot path histograms the biased exponent field of the float64 value
# (11 bits: 0 for zeros, 2047 for NaN/inf, 1023 + floor(log2|x|) otherwise);
# ``finalize`` folds those 2048 bins into the documented 256.  Reading the
# exponent of the float64 copy that the power sums need anyway costs two
# integer ops, and every fp32/fp16/bf16/fp8 value, subnormals included, is a
# normal float64 number, so no scaling trick is needed.
F64_EXPONENT_BIAS = 1023
F64_BINS = 2048
F64_NONFINITE_BIN = F64_BINS - 1
# Devices without float64 (MPS) histogram fp32 bits of |x| * 2^23 (see reduce_sample).
_FP32_SUBNORMAL_LIFT = float(2**23)


class RawStats(NamedTuple):
    """One tensor's statistics before ``finalize``: device scalars and a
    histogram, not yet combined into a statistics vector (``finalize`` does that
    for a whole stack at once).

    ``numel`` is known on the host; ``s1``/``s2`` are the power sums of the
    sampled elements (every element without sampling); ``hist`` counts them
    per exponent (F64_BINS bins, or HIST_BINS on devices without float64).
    """

    numel: int
    extreme_count: int  # elements behind lo/hi: numel, or the sample's size
    lo: torch.Tensor
    hi: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    hist: torch.Tensor


class Sample(NamedTuple):
    """What a hook must take while the tensor exists: its extremes and a copy of
    its (sampled) elements; ``reduce_sample`` turns it into RawStats later.

    Why split: inside a hook, right after a large matmul has flushed the caches,
    each small eager op costs 10-30 µs on a CPU instead of 2-5; the sums and the
    histogram of the copy run later, back to back, when the caller flushes.
    """

    numel: int
    extreme_count: int
    lo: torch.Tensor
    hi: torch.Tensor
    values: torch.Tensor  # a contiguous float64 copy (float32 without float64)


def _bincount(values: torch.Tensor, bins: int) -> torch.Tensor:
    import torch

    if values.device.type == "cpu":
        return torch.bincount(values, minlength=bins)
    # CUDA's bincount reads the maximum back to the host to size its output;
    # index_add_ into a fixed-size buffer has no such sync.
    hist = torch.zeros(bins, dtype=torch.int64, device=values.device)
    ones = torch.ones(1, dtype=torch.int64, device=values.device).expand(values.numel())
    return hist.index_add_(0, values.long(), ones)


# Elements per chunk when a dtype aminmax cannot read (fp8) is widened to fp32
# for its extremes: the temporary stays 4 MiB whatever the tensor's size.
EXTREMES_CHUNK = 1 << 20


def _native(dtype: torch.dtype) -> bool:
    """Whether aminmax reads ``dtype`` directly (fp8 and integer-like floats not)."""
    import torch

    return dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class _NativeDtypes:
    """``dtype in _NATIVE_DTYPES``: the dtypes aminmax reads directly (a lazy set:
    importing this module must not import torch, so the CLI's --help stays fast)."""

    def __contains__(self, dtype: object) -> bool:
        return _native(dtype)  # type: ignore[arg-type]


_NATIVE_DTYPES = _NativeDtypes()


def dense_view(x: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of ``x``'s elements in memory order when they fill their memory
    without gaps (contiguous, channels_last, transposed), else None.  A view: no copy."""
    if x.is_contiguous():
        return x.view(-1)
    # Order the dimensions by decreasing stride: a dense layout is then contiguous.
    order = sorted(range(x.dim()), key=lambda d: (x.stride(d), x.size(d)), reverse=True)
    permuted = x.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


def strided_sample(x: torch.Tensor, dense: torch.Tensor | None, sample: int) -> torch.Tensor:
    """About ``sample`` elements of ``x`` a prime stride apart (in memory order when
    dense), read in place: a view when dense, else a gather of those elements only."""

    n = x.numel()
    stride = sample_stride(n, sample)
    if dense is not None:
        return dense.as_strided(((n + stride - 1) // stride,), (stride,), dense.storage_offset())
    # Gaps between elements (a slice of a larger tensor): the storage offsets of
    # the sampled logical indices, gathered from a view of the storage span.
    offsets, span = _sample_offsets(tuple(x.shape), tuple(x.stride()), stride, x.device)
    return x.as_strided((span,), (1,), x.storage_offset()).index_select(0, offsets)


@lru_cache(maxsize=64)
def _sample_offsets(
    shape: tuple[int, ...], strides: tuple[int, ...], stride: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Storage offsets of logical elements 0, stride, 2*stride, ... of a strided
    tensor (on ``device``) and the span of storage they reach, computed on the
    host once per layout (no read-back from the device)."""
    import torch

    index = torch.arange(0, math.prod(shape), stride, dtype=torch.int64)
    offsets = torch.zeros_like(index)
    for size, step in zip(reversed(shape), reversed(strides), strict=True):
        offsets += (index % size) * step
        index = index // size
    span = int(offsets.max()) + 1 if offsets.numel() else 1
    return offsets.to(device), span


def _chunked_extremes(x: torch.Tensor, dense: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of a tensor aminmax cannot read (fp8), widened to fp32 a chunk
    of EXTREMES_CHUNK elements at a time (never the whole tensor at once)."""
    import torch

    if dense is not None:
        chunks = list(dense.reshape(-1).split(EXTREMES_CHUNK))  # a view: dense memory
    elif x.dim() == 0:
        chunks = [x.reshape(1)]
    else:  # gaps in memory: slices along the first dimension
        rows = max(1, EXTREMES_CHUNK // max(1, x[0].numel()))
        chunks = list(x.split(rows))
    pairs = [torch.stack(torch.aminmax(chunk.float())) for chunk in chunks]
    both = torch.stack(pairs) if len(pairs) > 1 else pairs[0].unsqueeze(0)
    return both[:, 0].amin(), both[:, 1].amax()


def take_sample(
    x: torch.Tensor,
    sample: int | None = None,
    exact_extremes: bool = True,
    extremes: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Sample:
    """The part of ``raw_stats`` that needs ``x``: queued device ops, no sync.

    Over every element: the count (host-known), min and max (NaN-propagating,
    so NaN/inf presence and the absolute maximum are exact).  The sample (every
    element when ``sample`` is None or the tensor has at most ``2 * sample``
    elements) is copied to float64; ``x`` itself is not kept.
    ``exact_extremes=False`` reads min and max from the sample too (one pass
    over the whole tensor less).  ``extremes``: the exact (min, max) of ``x``,
    known without reading it (``gradscope.extremes_through``).

    Memory: with a sample, what is allocated is O(sample), whatever the layout
    and dtype: a non-contiguous tensor (channels_last, transposed, sliced) is
    read in place, never copied whole, and fp8 extremes are read a chunk at a
    time (issue 14: a channels_last CNN's hooks copied 10 MB where 0.44 MB do).
    """
    import torch

    # Every op below reads a detached tensor, so none is recorded by autograd
    # (cheaper, inside a hook, than entering a no_grad context).
    # Inside a hook every Python attribute and eager op is slow (the model's
    # kernels have just evicted the caches), so this path avoids all it can: no
    # reshape of a contiguous tensor, no torch.device object.
    flat = x.detach()
    if type(flat) is not torch.Tensor and hasattr(flat, "to_local") and hasattr(flat, "placements"):
        # A DTensor (tensor parallel, FSDP2): statistics of this rank's local part,
        # which the flush merges across ranks; DTensor ops such as bincount have no
        # sharding rule.
        flat = flat.to_local()
    n = flat.numel()
    contiguous = flat.is_contiguous()
    if sample is None or n <= 2 * sample:
        # Every element is copied anyway; in logical order, so that the float64
        # sums equal those of ``x.contiguous()`` bit for bit.
        dense = flat.view(-1) if contiguous else None
        part = dense if dense is not None else flat.reshape(-1)
    else:
        # as_strided reads a contiguous tensor's memory directly: no view op first.
        # Any other layout gathers the same logical elements (those of
        # ``x.contiguous()``, as the audit's chunked path reads them), never a copy.
        dense = flat if contiguous else None
        part = strided_sample(flat, dense, sample)
    wide_dtype = torch.float32 if flat.is_mps else torch.float64  # see _stats_dtype
    # One (strided) read into a contiguous copy; copy=True: a float64 input
    # must not be aliased (the caller's tensor is never kept).
    values = part.to(wide_dtype, copy=True)
    if n == 0:
        zero = torch.zeros((), dtype=wide_dtype, device=flat.device)
        return Sample(0, 0, zero, zero, values)
    if extremes is not None:
        lo, hi = extremes
    elif not exact_extremes:
        lo, hi = torch.aminmax(values)
    elif _native(flat.dtype):
        lo, hi = torch.aminmax(flat)  # strided reads: no copy of a non-contiguous tensor
    else:
        lo, hi = _chunked_extremes(flat, dense)
    return Sample(n, n if exact_extremes or extremes is not None else values.numel(), lo, hi, values)


def reduce_sample(taken: Sample) -> RawStats:
    """Power sums and exponent histogram of a taken sample (device ops, no sync)."""
    return reduce_samples([taken])[0]


# Samples reduced in one pass (reduce_samples): few ops per flush, bounded temporaries.
REDUCE_ROWS = 16


def reduce_samples(taken: Sequence[Sample]) -> list[RawStats]:
    """``reduce_sample`` of each, in order, with the ops shared: the samples of
    one device, dtype and length are stacked and reduced together, REDUCE_ROWS
    at a time (one stack, two sums, three integer ops and one ``bincount`` per
    block instead of six ops per sample; a flush of the MLP's 35 samples went
    from 210 ops to ~40, each op costing 10-20 µs of dispatch on a CPU).

    The reduction of a row does not depend on the group it is in (each row is
    one contiguous inner reduction of its own length), so a tensor's statistics
    are the same bits whether it was reduced alone (the audit) or with others
    (a watched step); ``tests/test_stats.py`` checks it.
    """
    import torch

    out: list[RawStats | None] = [None] * len(taken)
    groups: dict[tuple[Any, Any, int], list[int]] = {}
    for i, t in enumerate(taken):
        groups.setdefault((t.values.device, t.values.dtype, t.values.numel()), []).append(i)
    for (device, dtype, _length), members in groups.items():
        # At most REDUCE_ROWS samples per pass: the temporaries stay O(REDUCE_ROWS
        # samples) (two of 512 KiB at watch's 4,096-element samples) however many
        # wait, as an audit's memory bound requires.
        for start in range(0, len(members), REDUCE_ROWS):
            indices = members[start : start + REDUCE_ROWS]
            rows = [taken[i].values for i in indices]  # 1-D copies (take_sample)
            stacked = rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)
            s1 = stacked.sum(dim=1)
            s2 = (stacked * stacked).sum(dim=1)
            k = len(indices)
            if dtype == torch.float64:
                # The exponent field of a float64: its 11 bits above the 52 of mantissa,
                # once abs() has cleared the sign bit (3x cheaper than masking on CPU);
                # shifted in place in abs()'s own output (one temporary, not three).
                exponent, bins = stacked.abs().view(torch.int64).bitwise_right_shift_(52), F64_BINS
            else:
                # Devices without float64 (MPS): the fp32 bits of |x| * 2^23; the
                # power-of-two scale is exact and lifts fp32's subnormals into the
                # normal range, so one shift yields every binade.  Power sums in fp32.
                exponent = (stacked * _FP32_SUBNORMAL_LIFT).view(torch.int32).bitwise_right_shift_(23)
                exponent, bins = exponent.bitwise_and_(0xFF), HIST_BINS
            if k > 1:
                # each row's bins apart: row r counts into bins [r * bins, (r + 1) * bins)
                exponent.add_(_row_offsets(k, bins, device))
            hist = _bincount(exponent.reshape(-1), k * bins).view(k, bins)
            for i, row_s1, row_s2, row_hist in zip(indices, s1.unbind(0), s2.unbind(0), hist.unbind(0), strict=True):
                t = taken[i]
                out[i] = RawStats(t.numel, t.extreme_count, t.lo, t.hi, row_s1, row_s2, row_hist)
    return [raw for raw in out if raw is not None]


def _row_offsets(rows: int, bins: int, device: Any) -> torch.Tensor:
    """(rows, 1) int64 column r * bins, made on the device once per shape
    (``device_constants.on_device``: no host-to-device copy per flush)."""
    import torch

    from gradscope.device_constants import on_device

    return on_device(tuple(r * bins for r in range(rows)), device, torch.int64).view(rows, 1)


def raw_stats(x: torch.Tensor, sample: int | None = None, exact_extremes: bool = True) -> RawStats:
    """``take_sample`` and ``reduce_sample`` at once: device ops only, ``x`` not kept.

    The power sums are accumulated in float64 (no square of an fp32 value
    under- or overflows there, and M2 = S2 - S1^2/m keeps ~1e-16 * mean^2/var
    relative error); the histogram counts the sample by binade.
    """
    return reduce_sample(take_sample(x, sample, exact_extremes))


@cache
def _fold_index(device: torch.device) -> torch.Tensor:
    """Target bin (0..255, the documented layout) of each float64 exponent bin."""
    import torch

    binade = torch.arange(F64_BINS, device=device) - F64_EXPONENT_BIAS
    target = (binade + EXPONENT_OFFSET).clamp(1, HIST_BINS - 1)  # float64-only tiny values join binade -149
    target[0] = 0  # zeros
    return target


def _fold_histogram(hist: torch.Tensor) -> torch.Tensor:
    """(T, F64_BINS) exponent counts to (T, HIST_BINS) in the documented layout."""
    import torch

    if hist.shape[-1] == HIST_BINS:
        return hist
    out = torch.zeros(hist.shape[0], HIST_BINS, dtype=hist.dtype, device=hist.device)
    return out.index_add_(1, _fold_index(hist.device), hist)


def finalize(raws: Sequence[RawStats]) -> torch.Tensor:
    """Raw statistics of tensors on one device to a (len(raws), SIZE) stack of
    statistics vectors, vectorised (the recorder calls it once per flush).

    Moments of a sampled tensor are the sample's, with M2 scaled to the whole
    count so that ``M2 / COUNT`` is the sample variance.
    """
    import torch

    from gradscope.device_constants import on_device

    device = raws[0].lo.device
    dtype = _stats_dtype(device)
    # Host-known counts, made on the device once per layout: a tensor built from
    # them each flush is a host-to-device copy from pageable memory every flush.
    counts = on_device(tuple(c for r in raws for c in (r.numel, r.extreme_count)), device, dtype).view(-1, 2)
    n, xcount = counts[:, 0], counts[:, 1]
    lo = torch.stack([r.lo for r in raws]).to(dtype)
    hi = torch.stack([r.hi for r in raws]).to(dtype)
    s1 = torch.stack([r.s1 for r in raws]).to(dtype)
    s2 = torch.stack([r.s2 for r in raws]).to(dtype)
    wide = torch.stack([r.hist for r in raws])
    hist = _fold_histogram(wide).to(dtype)
    m = hist.sum(dim=-1)  # every sampled element falls in exactly one bin
    any_nonfinite = ~(torch.isfinite(lo) & torch.isfinite(hi))
    safe_m = torch.where(m > 0, m, torch.ones_like(m))
    # The sample's non-finite count scaled to the tensor; at least 1 when the
    # exact min/max saw one, and 0 when they saw none.
    if wide.shape[-1] == F64_BINS:
        sampled_nonfinite = wide[:, F64_NONFINITE_BIN].to(dtype)
    else:  # fp32 layout: non-finite values share the top bin with values >= 2^105
        sampled_nonfinite = hist[:, HIST_BINS - 1]
    nonfinite = torch.where(
        any_nonfinite, torch.clamp_min((sampled_nonfinite * n / safe_m).round(), 1.0), torch.zeros_like(n)
    )
    mean = s1 / safe_m
    m2 = (s2 - s1 * mean).clamp_min(0.0) * (n / safe_m)
    valid = torch.isfinite(m2) & torch.isfinite(mean) & ~any_nonfinite & (n > 0)
    zero = torch.zeros_like(n)
    head = torch.stack(
        [
            n,
            torch.where(valid, n, zero),
            torch.where(valid, mean, zero),
            torch.where(valid, m2, zero),
            lo,
            hi,
            nonfinite,
            torch.isnan(hi).to(dtype),
            m,
            xcount,
        ],
        dim=-1,
    )
    return torch.cat([head, hist], dim=-1)


def tensor_stats(x: torch.Tensor, sample: int | None = None, exact_extremes: bool = True) -> torch.Tensor:
    """Statistics of ``x`` as a vector of SIZE elements on ``x``'s device.

    No value is read back to the host: everything, including the choice of
    whether the moments are valid, is device arithmetic.  ``x`` is not kept.
    ``sample``: moments and histogram from a strided sample of about
    ``sample`` elements of a larger tensor; None reads every element.
    ``exact_extremes=False``: min and max from that sample as well.

    Example:
        >>> import torch
        >>> s = Stats(tensor_stats(torch.tensor([0.0, 1.0, -3.0, float("nan")])))
        >>> s.count, s.zero_count, s.nonfinite_count, s.has_nan, s.moments_valid
        (4, 1, 1, True, False)
    """
    return finalize([raw_stats(x, sample, exact_extremes)])[0]


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
    # NaN-propagating like torch.aminmax in tensor_stats, so that merging the
    # parts of a tensor gives the same min/max as the whole (fmin/fmax dropped
    # a side's NaN: whole min NaN, merged min finite).
    lo = torch.minimum(a[..., MIN], b[..., MIN])
    hi = torch.maximum(a[..., MAX], b[..., MAX])
    out[..., MIN] = torch.where(a_empty, b[..., MIN], torch.where(b_empty, a[..., MIN], lo))
    out[..., MAX] = torch.where(a_empty, b[..., MAX], torch.where(b_empty, a[..., MAX], hi))
    return out


def merge_many(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Merge a non-empty sequence of statistics vectors (a new tensor).

    As a tree of stacked pairwise merges: k vectors cost ceil(log2 k) calls of
    ``merge_stats`` (about 15 ops each) instead of k - 1; each pair still merges
    with Chan's exact formula, so only the rounding order differs.
    """
    import torch

    rows = torch.stack(list(vectors))
    while len(rows) > 1:
        half = len(rows) // 2
        merged = merge_stats(rows[:half], rows[half : 2 * half])
        rows = torch.cat([merged, rows[2 * half :]]) if len(rows) % 2 else merged
    return rows[0]


@dataclass(frozen=True)
class Stats:
    """Host-side view of one statistics vector, with the derived quantities."""

    vector: Any  # a CPU float64 torch.Tensor of SIZE elements

    def __post_init__(self) -> None:
        # One conversion to Python floats: every accessor below reads this list,
        # since indexing a tensor element by element costs microseconds each.
        object.__setattr__(self, "_values", self.vector.tolist())

    @classmethod
    def merged(cls, vectors: Iterable[Stats]) -> Stats:
        items = [v.vector for v in vectors]
        return cls(merge_many(items))

    def merge(self, other: Stats) -> Stats:
        return Stats(merge_stats(self.vector, other.vector))

    def _get(self, index: int) -> float:
        return self._values[index]  # type: ignore[attr-defined,no-any-return]

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
    def nonfinite_count(self) -> int:
        """Exact number of NaN and ±inf elements."""
        return int(self._get(NONFINITE))

    @property
    def has_nan(self) -> bool:
        return self._get(NANSEEN) > 0

    @property
    def has_inf(self) -> bool:
        """An inf was seen (min/max are ±inf; a NaN, which hides the extremes, may hide one too)."""
        return math.isinf(self.min) or math.isinf(self.max) or (self.nonfinite_count > 0 and not self.has_nan)

    @property
    def sampled(self) -> bool:
        """True when the histogram was taken on a sample (fractions are estimates)."""
        return self._get(HSAMPLES) < self._get(COUNT)

    @property
    def hist_samples(self) -> int:
        return int(self._get(HSAMPLES))

    @property
    def extreme_samples(self) -> int:
        """Elements behind min/max (and absmax): ``count`` when they are exact."""
        return int(self._get(XSAMPLES))

    @property
    def extremes_exact(self) -> bool:
        return self._get(XSAMPLES) >= self._get(COUNT)

    def _hist_nonfinite(self) -> float:
        """Non-finite values inside the histogram's (possibly sampled) top bin."""
        if not self.sampled:
            return float(self.nonfinite_count)
        top = self._get(HIST + HIST_BINS - 1)
        return min(top, self.nonfinite_count * self._get(HSAMPLES) / max(self._get(COUNT), 1.0))

    @property
    def zero_frac(self) -> float:
        return self.hist_frac(self._get(HIST))

    @property
    def zero_count(self) -> int:
        """Exact zeros (estimated from the sample when the histogram was sampled)."""
        return round(self.zero_frac * self.count)

    @property
    def nonfinite_frac(self) -> float:
        return self.nonfinite_count / self.count if self.count else 0.0

    def hist_frac(self, k: float) -> float:
        """A histogram count as a fraction of the elements the histogram saw."""
        total = self._get(HSAMPLES)
        return k / total if total else 0.0

    def binade_counts(self) -> dict[int, int]:
        """{floor(log2|x|): count} over finite non-zero histogrammed values; 105 means ">= 2^105"."""
        counts: dict[int, int] = {}
        for b in range(1, HIST_BINS):
            c = self._get(HIST + b)
            if b == HIST_BINS - 1:
                c -= self._hist_nonfinite()
            if c > 0.5:
                counts[b - EXPONENT_OFFSET] = round(c)
        return counts

    def count_exponents(self, lo: int | None = None, hi: int | None = None) -> int:
        """Histogrammed finite non-zero values whose binade e satisfies lo <= e <= hi."""
        lo_b = 1 if lo is None else max(1, lo + EXPONENT_OFFSET)
        hi_b = HIST_BINS - 1 if hi is None else min(HIST_BINS - 1, hi + EXPONENT_OFFSET)
        if lo_b > hi_b:
            return 0
        total = float(sum(self._values[HIST + lo_b : HIST + hi_b + 1]))  # type: ignore[attr-defined]
        if hi_b == HIST_BINS - 1:
            total -= self._hist_nonfinite()
        return max(0, round(total))

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
        elif math.isinf(absmax):
            headroom = -math.inf  # already overflowed (log2(max / inf) raised ValueError)
        else:
            headroom = math.log2(fmt.max / absmax)
        return {
            f"{name}_overflow_frac": self.hist_frac(over),
            f"{name}_subnormal_frac": self.hist_frac(sub),
            f"{name}_underflow_frac": self.hist_frac(under),
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
            "zero_frac": self.zero_frac,
            "nonfinite_frac": self.nonfinite_frac,
            "nonfinite_count": self.nonfinite_count,
            "has_nan": self.has_nan,
            "zero_count": self.zero_count,
            "hist_samples": self.hist_samples,
            "extreme_samples": self.extreme_samples,
            "moment_count": int(self._get(MCOUNT)),
            "m2": self._get(M2),
        }
        for name in FORMAT_NAMES:
            out.update(self.format_fractions(name))
        # The raw histogram, sparse: [binade, count] for finite non-zero values
        # below 2^105, plus the two special bins, so that from_dict round-trips.
        raw = self._values[HIST : HIST + HIST_BINS]  # type: ignore[attr-defined]
        out["exponent_hist"] = [[b - EXPONENT_OFFSET, int(raw[b])] for b in range(1, HIST_BINS - 1) if raw[b] > 0]
        out["zero_hist"] = int(raw[0])
        out["top_hist"] = int(raw[HIST_BINS - 1])  # non-finite values and values >= 2^105
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
        v[NONFINITE] = data["nonfinite_count"]
        v[NANSEEN] = 1.0 if data["has_nan"] else 0.0
        v[HSAMPLES] = data.get("hist_samples", data["count"])
        v[XSAMPLES] = data.get("extreme_samples", data["count"])
        v[HIST] = data["zero_hist"]
        for e, c in data["exponent_hist"]:
            v[HIST + e + EXPONENT_OFFSET] += c
        v[HIST + HIST_BINS - 1] = data["top_hist"]
        return cls(v)


def stats_from_vectors(vectors: Any) -> list[Stats]:
    """Split a (k, SIZE) host tensor into Stats."""
    return [Stats(row) for row in vectors]
