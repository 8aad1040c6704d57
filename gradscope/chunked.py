"""A tensor's raw statistics with temporaries bounded by a chunk, not by the tensor.

``stats.raw_stats`` copies the whole (sampled) tensor to float64 and then
derives its absolute value and exponent field from that copy: three float64
temporaries of up to ``2 * sample`` elements, 48 MiB for the audit's 2M-element
tensors, plus a whole contiguous copy of a non-contiguous tensor (a
channels_last activation) and a whole float32 copy of an fp8 one.
``bounded_raw_stats`` reads the same elements in slices of ``CHUNK`` and adds
up their power sums and histograms, so its temporaries are O(CHUNK) whatever
the tensor: what the audit uses, so that its peak memory stays that of the
model's own forward+backward (``benchmarks/memory.py --audit``).

The numbers are those of ``raw_stats``: the same elements (the same strided
sample, in the tensor's logical order), the same extremes (exact ones over
every element) and the same histogram; only the float64 power sums are added
chunk by chunk instead of in one reduction, which can move the last bits of the
mean and M2 of a tensor of more than CHUNK sampled elements (relative error
~1e-16 x the number of chunks, far below any tolerance or threshold).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradscope.stats import _NATIVE_DTYPES, RawStats, Sample, raw_stats, reduce_sample, sample_stride

if TYPE_CHECKING:
    import torch

# 64K elements: a 512 KiB float64 slice, its 512 KiB |x| and exponent field,
# so ~1.5 MiB of temporaries at most; the per-slice cost (five small ops) is
# negligible next to the layer that produced a 64K-element tensor.
CHUNK = 1 << 16


def _is_dtensor(tensor: torch.Tensor) -> bool:
    import torch

    return type(tensor) is not torch.Tensor and hasattr(tensor, "to_local") and hasattr(tensor, "placements")


def _slices(flat: torch.Tensor, count: int, stride: int, chunk: int):  # noqa: ANN202 (a generator of tensors)
    """The elements at logical positions 0, stride, 2*stride, ... (``count`` of
    them), ``chunk`` at a time: views of a contiguous tensor, ``torch.take``
    (which follows strides, copying only what it returns) of any other."""
    import torch

    dense = flat.view(-1) if flat.is_contiguous() else None
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        if dense is not None:
            yield dense[start * stride : (stop - 1) * stride + 1 : stride]
        else:
            yield torch.take(flat, torch.arange(start, stop, device=flat.device) * stride)


def _extremes(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over every element, NaN-propagating (as ``torch.aminmax``),
    without a copy of the tensor: aminmax of a non-contiguous tensor makes a
    contiguous one first, amin and amax do not."""
    import torch

    if flat.is_contiguous():
        lo, hi = torch.aminmax(flat)
        return lo, hi
    return torch.amin(flat), torch.amax(flat)


def bounded_raw_stats(
    x: torch.Tensor, sample: int | None = None, exact_extremes: bool = True, chunk: int = CHUNK
) -> RawStats:
    """``stats.raw_stats(x, sample, exact_extremes)`` with O(chunk) temporaries.

    Example:
        >>> import torch
        >>> from gradscope.stats import finalize, raw_stats
        >>> x = torch.randn(300, 70).t()  # non-contiguous, 21,000 elements
        >>> a = finalize([bounded_raw_stats(x, sample=1000, chunk=512)])[0]
        >>> b = finalize([raw_stats(x, sample=1000)])[0]
        >>> bool(torch.allclose(a, b, rtol=1e-12, atol=0))
        True
    """
    import torch

    flat = x.detach()
    if _is_dtensor(flat):
        flat = flat.to_local()  # type: ignore[attr-defined]  # this rank's part, as stats.take_sample
    n = flat.numel()
    if n == 0:
        return raw_stats(flat, sample, exact_extremes)  # nothing to bound
    if flat.dtype not in _NATIVE_DTYPES and not flat.is_contiguous():
        # fp8 and others: torch.take and amin have no kernel for them; one copy in
        # the tensor's own (narrow) dtype, where stats.take_sample copied to float32.
        flat = flat.contiguous()
    wide = torch.float32 if flat.is_mps else torch.float64  # as stats._stats_dtype
    if sample is None or n <= 2 * sample:
        stride, count = 1, n
    else:
        stride = sample_stride(n, sample)
        count = (n + stride - 1) // stride
    zero = torch.zeros((), dtype=wide, device=flat.device)
    s1 = s2 = hist = lo = hi = None
    for part in _slices(flat, count, stride, chunk):
        values = part.to(wide, copy=True)
        raw = reduce_sample(Sample(values.numel(), values.numel(), zero, zero, values))
        if s1 is None or s2 is None or hist is None:
            s1, s2, hist = raw.s1, raw.s2, raw.hist
        else:
            s1, s2, hist = s1 + raw.s1, s2 + raw.s2, hist + raw.hist
        if not exact_extremes or flat.dtype not in _NATIVE_DTYPES:
            part_lo, part_hi = torch.aminmax(values)
            lo = part_lo if lo is None else torch.minimum(lo, part_lo)
            hi = part_hi if hi is None else torch.maximum(hi, part_hi)
        del values, raw
    if exact_extremes:
        if flat.dtype in _NATIVE_DTYPES:
            lo, hi = _extremes(flat)
        elif stride > 1:  # the slices above saw the sample only: every element, chunk by chunk
            lo = hi = None
            for part in _slices(flat, n, 1, chunk):
                part_lo, part_hi = torch.aminmax(part.to(wide))
                lo = part_lo if lo is None else torch.minimum(lo, part_lo)
                hi = part_hi if hi is None else torch.maximum(hi, part_hi)
    assert s1 is not None and s2 is not None and hist is not None and lo is not None and hi is not None
    return RawStats(n, n if exact_extremes else count, lo, hi, s1, s2, hist)
