"""Per-tensor statistics against a float64 numpy reference.

Tolerances and why:

* counts, zero/NaN/inf counts, min, max, absmax and the exponent histogram are
  exact (integers, or float32 values that float64 holds exactly).
* moments come from power sums accumulated in float64 (the tolerances below
  are those of float32 accumulation, which they meet with room to spare).
  The mean is compared relative to the spread of the data (``|mean| + std``),
  because a mean near zero has no meaningful relative error; std and rms are
  compared relative to themselves at 2e-6.
* merging is float64 arithmetic (Chan et al. 1979): tested at 1e-9 relative
  with part moments computed exactly by numpy.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from gradscope.formats import FORMAT_NAMES, get_format
from gradscope.stats import (
    COUNT,
    HIST,
    HSAMPLES,
    M2,
    MAX,
    MCOUNT,
    MEAN,
    MIN,
    NANSEEN,
    NONFINITE,
    SIZE,
    TOP_EXPONENT,
    Stats,
    finalize,
    merge_many,
    merge_stats,
    raw_stats,
    reduce_sample,
    reduce_samples,
    take_sample,
    tensor_stats,
)

MEAN_TOL = 1e-6  # relative to |mean| + std, float32 accumulation
SPREAD_TOL = 2e-6  # relative, std and rms


def stats_of(x: torch.Tensor) -> Stats:
    return Stats(tensor_stats(x).to("cpu", torch.float64))


def ref_binades(values: np.ndarray) -> Counter:
    """{floor(log2|x|): count} over finite non-zero values, via frexp (exact).

    ``frexp`` gives x = m * 2^e with 0.5 <= |m| < 1, so floor(log2|x|) = e - 1
    with no rounding at binade edges.  Values >= 2^105 share the top bin.
    """
    a = values.astype(np.float64).ravel()
    a = np.abs(a[np.isfinite(a) & (a != 0)])
    _, e = np.frexp(a)
    binade = e - 1
    # Cross-check with the definition the brief names, in float64.
    assert np.array_equal(binade, np.floor(np.log2(a)).astype(binade.dtype))
    binade = np.minimum(binade, TOP_EXPONENT)
    return Counter({int(k): int(v) for k, v in zip(*np.unique(binade, return_counts=True), strict=True)})


def check_against_numpy(s: Stats, values: np.ndarray, moments: bool = True) -> None:
    """Every statistic of ``s`` against numpy on the same (float32-exact) values.

    ``moments=False``: the data are finite but their float32 power sums
    overflow (|x| near fp32's max), which makes the moments unavailable, as
    documented in stats.py.
    """
    a = values.astype(np.float64).ravel()
    finite = np.isfinite(a)
    assert s.count == a.size
    assert s.nonfinite_count == int((~finite).sum())
    assert s.has_nan == bool(np.isnan(a).any())
    assert s.has_inf == bool(np.isinf(a).any()) or (s.has_nan and math.isnan(s.min))
    assert s.zero_count == int((a == 0).sum())
    assert s.binade_counts() == dict(ref_binades(a))
    if a.size == 0:
        return
    if finite.all():
        assert s.min == a.min() and s.max == a.max()
        assert s.absmax == np.abs(a).max()
        assert s.moments_valid == moments
        if not moments:
            return
        ref_mean, ref_std = a.mean(), a.std()
        ref_rms = math.sqrt(np.mean(a * a))
        assert abs(s.mean - ref_mean) <= MEAN_TOL * (abs(ref_mean) + ref_std)
        assert s.std == pytest.approx(ref_std, rel=SPREAD_TOL, abs=1e-300)
        assert s.rms == pytest.approx(ref_rms, rel=SPREAD_TOL)
    else:
        assert not s.moments_valid
        assert math.isnan(s.mean) and math.isnan(s.std) and math.isnan(s.rms)


@pytest.mark.parametrize("n", [1, 7, 4096, 4097, 100_003])
@pytest.mark.parametrize("scale", [1e-15, 1e-3, 1.0, 1e4, 1e15])
def test_random_data_matches_numpy(n: int, scale: float) -> None:
    torch.manual_seed(n)
    x = (torch.randn(n) + 0.5) * scale
    check_against_numpy(stats_of(x), x.numpy())


def test_long_tensor_keeps_float32_precision() -> None:
    """5e6 elements: the sum of squares is reduced in chunks; a single float32
    vector_norm over the whole tensor was off by ~5e-4 in std at this length."""
    torch.manual_seed(1)
    x = torch.randn(5_000_000) * 3 + 1
    check_against_numpy(stats_of(x), x.numpy())


def test_mean_much_larger_than_std() -> None:
    """1000 + N(0, 1e-2): shifted sums keep the variance (naive E[x^2]-E[x]^2
    in float32 would lose every digit: 1e6 vs a variance of 1e-4)."""
    torch.manual_seed(2)
    x = 1000 + torch.randn(100_000) * 1e-2
    s, a = stats_of(x), x.numpy().astype(np.float64)
    assert s.std == pytest.approx(a.std(), rel=1e-3)
    assert s.mean == pytest.approx(a.mean(), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(dtype: torch.dtype) -> None:
    """1e5 fp16/bf16 values: their sum in fp16 would be off by far more than
    1e-6 (fp16's eps is 1e-3); accumulated in fp32 the mean matches float64."""
    torch.manual_seed(3)
    x = (torch.randn(100_000) + 3).to(dtype)
    a = x.float().numpy().astype(np.float64)
    s = stats_of(x)
    assert s.mean == pytest.approx(a.mean(), rel=1e-6)
    assert s.std == pytest.approx(a.std(), rel=1e-5)
    check_against_numpy(s, a)


def test_half_precision_subnormals_get_their_binades() -> None:
    tiny = torch.tensor([2.0**-24, 3 * 2.0**-24, 2.0**-15, 2.0**-14, 65504.0, 0.0], dtype=torch.float16)
    s = stats_of(tiny)
    assert s.binade_counts() == {-24: 1, -23: 1, -15: 1, -14: 1, 15: 1}
    assert s.zero_count == 1


def test_histogram_at_subnormals_and_binade_edges() -> None:
    """fp32 subnormals and values exactly at / just below powers of two."""
    values = [1e-40, 2.0**-149, 2.0**-127, 2.0**-126, 1e-45, 0.0, -0.0]
    for k in (-126, -24, -14, -1, 0, 1, 15, 16, 104):
        edge = np.float32(2.0**k)
        values += [edge, -edge, np.nextafter(edge, np.float32(0)), np.nextafter(edge, np.float32(np.inf))]
    values += [2.0**105, 3e38, -np.finfo(np.float32).max]
    a = np.array(values, dtype=np.float32)
    s = stats_of(torch.from_numpy(a))
    # Values up to fp32's max keep their moments: the power sums are taken on
    # x * 2^-floor(log2 absmax), so no square overflows float32.
    check_against_numpy(s, a)
    small = a[np.abs(a) <= 2.0**17]
    check_against_numpy(stats_of(torch.from_numpy(small)), small)
    # Spot checks of the closed form: 2^-149 is binade -149, 1e-40 is binade -133
    # (2^-133 = 9.2e-41 <= 1e-40 < 2^-132), 2^k exactly opens binade k.
    counts = s.binade_counts()
    assert counts[-149] >= 2 and counts[-133] == 1 and counts[0] >= 2
    assert counts[TOP_EXPONENT] == 3  # 2^105, 3e38 and -max share the top bin


@pytest.mark.parametrize("scale", [1e-38, 1e-30, 1e-25, 1e-20, 1e18, 1e30, 1e37])
def test_moments_survive_tiny_and_huge_scales(scale: float) -> None:
    """Vanishing gradients of 1e-25 would square to 1e-50, below float32's
    range, and report std 0; the power-of-two scaling keeps them exact."""
    torch.manual_seed(0)
    x = torch.randn(20_000) * scale
    ref = x.double()
    exact = Stats(tensor_stats(x))
    assert exact.moments_valid
    assert exact.std == pytest.approx(ref.std(unbiased=False).item(), rel=1e-6)
    assert exact.rms == pytest.approx(ref.pow(2).mean().sqrt().item(), rel=1e-6)
    # Sampled tier: moments of ~5000 elements; the std of a Gaussian sample's
    # std is about 1/sqrt(2m) relative, so 5 sigma is 0.05.
    sampled = Stats(tensor_stats(x, 5000))
    assert sampled.moments_valid and sampled.sampled
    assert sampled.std == pytest.approx(ref.std(unbiased=False).item(), rel=5 / math.sqrt(2 * 5000))


def test_nan_inf_zeros_make_moments_unavailable() -> None:
    torch.manual_seed(4)
    x = torch.randn(1000)
    x[::10] = 0.0
    x[3] = float("nan")
    x[5] = float("inf")
    x[7] = -float("inf")
    x[9] = 1e-42  # a subnormal
    s = stats_of(x)
    check_against_numpy(s, x.numpy())
    assert s.nonfinite_count == 3
    assert math.isnan(s.min) and math.isnan(s.max)  # NaN-propagating, like torch.aminmax
    inf_only = stats_of(torch.tensor([1.0, -float("inf"), 2.0]))
    assert not inf_only.moments_valid and inf_only.absmax == math.inf and inf_only.min == -math.inf
    assert inf_only.has_inf and not inf_only.has_nan and inf_only.nonfinite_count == 1
    d = s.to_dict()
    assert d["nonfinite_frac"] == pytest.approx(3 / 1000) and d["zero_frac"] == pytest.approx(100 / 1000)
    json.dumps(d, allow_nan=False)  # NaN/inf become strings


def test_empty_and_zero_dim() -> None:
    empty = stats_of(torch.empty(0, 5))
    assert empty.count == 0 and not empty.moments_valid and empty.zero_count == 0
    assert empty.absmax == 0.0 and empty.binade_counts() == {}
    assert all(v == 0 for k, v in empty.format_fractions("fp16").items() if k.endswith("_frac"))
    json.dumps(empty.to_dict(), allow_nan=False)
    scalar = stats_of(torch.tensor(-2.5))
    got = (scalar.count, scalar.mean, scalar.std, scalar.min, scalar.max, scalar.absmax)
    assert got == (1, -2.5, 0.0, -2.5, -2.5, 2.5)
    assert scalar.binade_counts() == {1: 1}


def test_non_contiguous_tensors() -> None:
    torch.manual_seed(5)
    base = torch.randn(300, 200)
    for view in (base.t(), base[:, ::3], base[::2, 1::2], torch.randn(1, 200).expand(300, 200)):
        assert not view.is_contiguous()
        v = tensor_stats(view)
        assert torch.equal(v, tensor_stats(view.contiguous()))
        check_against_numpy(Stats(v), view.numpy())


def test_float64_input_keeps_its_range_and_precision() -> None:
    """float64 tensors are read in float64: 1e300 stays finite (top bin) and
    1e-300 stays non-zero (lowest bin, with every value below 2^-149); the
    squares of values beyond ~1e154 overflow float64, which makes the moments
    unavailable (documented), while min/max stay exact."""
    x = torch.tensor([1.0, 1e-300, 1e300, 0.1], dtype=torch.float64)
    s = stats_of(x)
    assert s.zero_count == 0 and s.nonfinite_count == 0 and not s.has_inf and not s.moments_valid
    assert s.min == 1e-300 and s.max == 1e300
    assert s.binade_counts() == {-149: 1, 0: 1, -4: 1, TOP_EXPONENT: 1}
    torch.manual_seed(6)
    y = torch.randn(1000, dtype=torch.float64) * 1e-3 + 1e-1
    got = stats_of(y)
    check_against_numpy(got, y.numpy())
    # float64 accumulation of float64 values: far tighter than float32's 1e-6.
    assert got.std == pytest.approx(y.numpy().std(), rel=1e-9)


def test_format_limits_come_from_finfo() -> None:
    """Closed-form limits of each format (IEEE 754-2008 binary16; bfloat16;
    OCP fp8 e4m3fn/e5m2) and that get_format reads them from torch.finfo."""
    expected = {  # name: (dtype, max, normal exponent, subnormal exponent, max exponent)
        "fp16": (torch.float16, 65504.0, -14, -24, 15),
        "bf16": (torch.bfloat16, (2 - 2**-7) * 2.0**127, -126, -133, 127),
        "fp8_e4m3": (torch.float8_e4m3fn, 448.0, -6, -9, 8),
        "fp8_e5m2": (torch.float8_e5m2, 57344.0, -14, -16, 15),
    }
    assert set(expected) == set(FORMAT_NAMES)
    for name, (dtype, mx, normal, sub, top) in expected.items():
        fmt = get_format(name)
        info = torch.finfo(dtype)
        assert fmt.max == mx == float(info.max)
        assert fmt.smallest_normal == float(info.smallest_normal) == 2.0**normal
        assert fmt.smallest_subnormal == 2.0**sub
        assert (fmt.normal_exponent, fmt.subnormal_exponent, fmt.max_exponent) == (normal, sub, top)


def _log_uniform(n: int, lo: int, hi: int, seed: int) -> np.ndarray:
    """float32 values whose binades spread uniformly over [lo, hi], random signs,
    plus the exact powers of two at every binade edge and some zeros."""
    g = torch.Generator().manual_seed(seed)
    exps = torch.rand(n, generator=g, dtype=torch.float64) * (hi + 1 - lo) + lo
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    values = (signs * torch.exp2(exps)).float().numpy()
    edges = np.array([2.0**k for k in range(lo, hi + 1)], dtype=np.float32)
    return np.concatenate([values, edges, -edges, np.zeros(50, dtype=np.float32)])


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_format_fractions_against_numpy_and_casting(name: str) -> None:
    """Fractions from the histogram vs exact thresholds and vs the real cast.

    Thresholds at powers of two are exact in the histogram.  The cast rounds to
    nearest, so within the boundary binade the histogram cannot tell: values in
    the top binade above ``max`` may overflow, values in the binade just below
    the smallest subnormal may round up.  The cast count must therefore lie
    between the histogram bound without and with the boundary binade.
    """
    fmt = get_format(name)
    dtype = getattr(torch, fmt.dtype_name)
    hi = min(fmt.max_exponent + 3, TOP_EXPONENT - 1)  # bf16 overflows only past fp32's histogram
    a = _log_uniform(20_000, fmt.subnormal_exponent - 4, hi, seed=7)
    if name != "bf16":
        # The largest float32 below 2^(E+1): in the top binade E, above max, overflows.
        top = np.nextafter(np.float32(2.0 ** (fmt.max_exponent + 1)), np.float32(0))
        a = np.concatenate([a, np.array([top, -top], dtype=np.float32)])
    x = torch.from_numpy(a)
    s = stats_of(x)
    n = a.size
    frac = s.format_fractions(name)
    mag = np.abs(a.astype(np.float64))
    nz = mag > 0
    over_exact = int((mag >= 2.0 ** (fmt.max_exponent + 1)).sum())
    sub_exact = int((nz & (mag < fmt.smallest_normal)).sum())
    under_exact = int((nz & (mag < fmt.smallest_subnormal)).sum())
    assert frac[f"{name}_overflow_frac"] * n == pytest.approx(over_exact, abs=1e-6)
    assert frac[f"{name}_subnormal_frac"] * n == pytest.approx(sub_exact, abs=1e-6)
    assert frac[f"{name}_underflow_frac"] * n == pytest.approx(under_exact, abs=1e-6)
    assert sub_exact > under_exact > 0

    cast = x.to(dtype).float()
    if name == "fp8_e4m3":
        # e4m3fn has no inf; torch 2.13 saturates finite overflow to +-448 (no NaN).
        assert not torch.isinf(cast).any() and not torch.isnan(cast).any()
        overflowed = int(((cast.abs() == fmt.max) & (x.abs() > fmt.max)).sum())
    else:
        overflowed = int(torch.isinf(cast).sum())
    top_binade = s.count_exponents(fmt.max_exponent, fmt.max_exponent)
    assert over_exact <= overflowed <= over_exact + top_binade
    flushed = int(((cast == 0) & (x != 0)).sum())
    edge_binade = s.count_exponents(fmt.subnormal_exponent - 1, fmt.subnormal_exponent - 1)
    assert under_exact - edge_binade <= flushed <= under_exact
    if name != "bf16":
        assert over_exact > 0 and overflowed > over_exact  # the top binade really is ambiguous
    headroom = frac[f"{name}_headroom_binades"]
    assert headroom == pytest.approx(math.log2(fmt.max / mag.max()), rel=1e-12)


# -- merging ------------------------------------------------------------------


def _exact_part(values: np.ndarray) -> torch.Tensor:
    """tensor_stats of a part with its mean and M2 replaced by numpy's float64
    values, so that the merge arithmetic alone is under test."""
    v = tensor_stats(torch.from_numpy(values)).clone()
    a = values.astype(np.float64)
    v[MEAN] = a.mean() if a.size else 0.0
    v[M2] = ((a - a.mean()) ** 2).sum() if a.size else 0.0
    return v


def test_merge_is_exact_chan() -> None:
    torch.manual_seed(8)
    whole = (torch.randn(10_001) * 5 + 2).numpy()
    parts = np.split(whole, [1, 300, 4000, 9000])
    merged = Stats(merge_many([_exact_part(p) for p in parts]))
    a = whole.astype(np.float64)
    assert merged.count == a.size
    assert merged.mean == pytest.approx(a.mean(), rel=1e-9)
    assert merged.var == pytest.approx(a.var(), rel=1e-9)


def test_merge_of_split_tensor_equals_whole() -> None:
    """Counts, histogram, min and max exact; moments within float32
    accumulation (each part's float32 sums round differently from the whole's)."""
    torch.manual_seed(9)
    x = torch.randn(50_000) * 2 - 1
    x[::97] = 0.0
    x[5] = 1e-41
    whole = tensor_stats(x)
    chunks = list(torch.split(x, [1, 999, 20_000, 29_000]))
    merged = merge_many([tensor_stats(c) for c in chunks])
    exact = [COUNT, MCOUNT, MIN, MAX, NONFINITE, NANSEEN, HSAMPLES]
    assert torch.equal(merged[exact], whole[exact])
    assert torch.equal(merged[HIST:], whole[HIST:])
    a, b = Stats(merged), Stats(whole)
    assert abs(a.mean - b.mean) <= 2 * MEAN_TOL * b.std
    assert a.var == pytest.approx(b.var, rel=2 * SPREAD_TOL)
    check_against_numpy(a, x.numpy())


def test_merge_associative_and_empty_side() -> None:
    torch.manual_seed(10)
    a, b, c = (tensor_stats(torch.randn(n) * (i + 1) + i) for i, n in enumerate((10, 2000, 333)))
    left, right = merge_stats(merge_stats(a, b), c), merge_stats(a, merge_stats(b, c))
    assert torch.equal(left[HIST:], right[HIST:]) and torch.equal(left[:2], right[:2])
    assert torch.allclose(left[:HIST], right[:HIST], rtol=1e-12, atol=0)
    empty = tensor_stats(torch.empty(0))
    assert torch.equal(merge_stats(empty, a), a)
    assert torch.equal(merge_stats(a, empty), a)
    both_empty = Stats(merge_stats(empty, empty))
    assert both_empty.count == 0 and not both_empty.moments_valid
    assert Stats.merged([Stats(a), Stats(b), Stats(c)]).count == 2343


def test_merge_on_stacked_vectors() -> None:
    torch.manual_seed(11)
    rows_a = [tensor_stats(torch.randn(n)) for n in (5, 50, 500)]
    rows_b = [tensor_stats(torch.randn(n) + 3) for n in (7, 0, 70)]
    stacked = merge_stats(torch.stack(rows_a), torch.stack(rows_b))
    assert stacked.shape == (3, SIZE)
    for i in range(3):
        assert torch.equal(stacked[i], merge_stats(rows_a[i], rows_b[i]))


def test_merge_keeps_nan_in_min_max() -> None:
    """A NaN in one part makes the whole's min/max NaN (torch.aminmax); the merge
    must agree (it used fmin/fmax, which dropped the NaN)."""
    x = torch.tensor([1.0, 2.0, float("nan"), -4.0, 5.0])
    whole = Stats(tensor_stats(x))
    # x[2:] starts with its NaN: the non-finite count once counted all 3 elements.
    merged = Stats(merge_stats(tensor_stats(x[:2]), tensor_stats(x[2:])))
    assert math.isnan(whole.min) and math.isnan(merged.min) and math.isnan(merged.max)
    assert merged.nonfinite_count == whole.nonfinite_count == 1 and merged.has_nan
    assert merged.binade_counts() == whole.binade_counts()


def test_stats_round_trip_through_json() -> None:
    torch.manual_seed(12)
    x = torch.randn(1000)
    x[0] = float("inf")
    s = stats_of(x)
    back = Stats.from_dict(json.loads(json.dumps(s.to_dict(), allow_nan=False)))
    assert torch.equal(back.vector[HIST:], s.vector[HIST:])
    assert torch.equal(back.vector[:HIST].nan_to_num(), s.vector[:HIST].nan_to_num())
    assert back.count == s.count and back.nonfinite_count == 1 and back.has_inf and back.max == math.inf


def test_sampled_histogram_keeps_exact_counts_and_moments() -> None:
    """``sample=k`` reads a strided sample of about k elements of a large
    tensor for everything but count, min and max: fractions are estimates
    within a binomial error sqrt(p(1-p)/k) (5 sigma here), the mean within
    5 std/sqrt(k), the std within 6/sqrt(2k) relative (zeros raise the
    kurtosis above a Gaussian's); count, min and max stay exact and one NaN is
    never missed."""
    torch.manual_seed(13)
    x = torch.randn(1_000_000) * 100
    x[::7] = 0.0
    k = 16_384
    full, sampled = stats_of(x), Stats(tensor_stats(x, sample=k))
    m = sampled.hist_samples
    assert sampled.sampled and 0.9 * k <= m <= 2 * k
    assert sampled.count == full.count and sampled.min == full.min and sampled.max == full.max
    assert sampled.mean == pytest.approx(full.mean, abs=5 * full.std / math.sqrt(m))
    assert sampled.std == pytest.approx(full.std, rel=6 / math.sqrt(2 * m))
    for p_full, p_sampled in [
        (full.zero_frac, sampled.zero_frac),
        (full.format_fractions("fp16")["fp16_overflow_frac"], sampled.format_fractions("fp16")["fp16_overflow_frac"]),
        (
            full.format_fractions("fp8_e4m3")["fp8_e4m3_subnormal_frac"],
            sampled.format_fractions("fp8_e4m3")["fp8_e4m3_subnormal_frac"],
        ),
    ]:
        assert abs(p_sampled - p_full) <= 5 * math.sqrt(p_full * (1 - p_full) / k) + 1e-12
    x[123_457] = float("nan")  # not on the sampling stride
    with_nan = Stats(tensor_stats(x, sample=k))
    assert with_nan.has_nan and with_nan.nonfinite_count >= 1 and not with_nan.moments_valid


def test_sampled_extremes_are_flagged_and_bounded() -> None:
    """``exact_extremes=False``: min/max come from the sample, so they lie inside
    the true range and XSAMPLES says how many elements stand behind them."""
    torch.manual_seed(21)
    x = torch.randn(200_000)
    x[1] = 1e6  # off the stride: the sample starts at element 0
    exact = Stats(tensor_stats(x, sample=4096))
    sampled = Stats(tensor_stats(x, sample=4096, exact_extremes=False))
    assert exact.extremes_exact and exact.max == 1e6 and exact.extreme_samples == exact.count
    assert not sampled.extremes_exact and sampled.extreme_samples == sampled.hist_samples < sampled.count
    assert exact.min <= sampled.min and sampled.max < 1e6
    back = Stats.from_dict(json.loads(json.dumps(sampled.to_dict(), allow_nan=False)))
    assert back.extreme_samples == sampled.extreme_samples and not back.extremes_exact
    # Merging adds the elements behind the extremes, like the counts.
    both = Stats(merge_stats(exact.vector, sampled.vector))
    assert both.extreme_samples == exact.count + sampled.extreme_samples and not both.extremes_exact


def test_take_then_reduce_equals_raw_stats_and_never_aliases_the_input() -> None:
    """The hook half copies what it needs: changing the tensor afterwards (an
    in-place op, an optimizer step) cannot change the statistics."""
    torch.manual_seed(22)
    for x in (torch.randn(50_000), torch.randn(3000, dtype=torch.float64), torch.randn(64, 300)[:, ::3]):
        want = finalize([raw_stats(x, 4096)])
        taken = take_sample(x, 4096)
        x.mul_(1000.0)
        got = finalize([reduce_sample(taken)])
        assert torch.equal(got, want)


def test_samples_reduced_together_equal_each_reduced_alone_bit_for_bit() -> None:
    """A watched flush reduces all its samples at once (grouped by device, dtype
    and length); each tensor's statistics must be the bits the audit gets for it
    alone, in the order given, whatever else shares its group."""
    torch.manual_seed(23)
    tensors = [
        torch.randn(256, 1024),
        torch.randn(256, 1024) * 1e-20,  # same length as the first: one group
        torch.tensor([1.0, float("nan"), float("inf"), 0.0] * 300),
        torch.randn(2560),
        torch.randn(64, 300)[:, ::3],  # non-contiguous, copied whole
        torch.randn(50_000, dtype=torch.float64),
        torch.empty(0),
        torch.randn(7),
        torch.randn(256, 1024) * 3e5,  # back to the first group, after others
    ]
    taken = [take_sample(x, 4096) for x in tensors]
    together = reduce_samples(taken)
    assert len(together) == len(taken)
    for x, t, got in zip(tensors, taken, together, strict=True):
        alone = reduce_sample(t)
        assert got.numel == x.numel()
        for field in ("s1", "s2", "hist"):
            # the same bits (NaN where the sample holds one: the NaN/inf tensor)
            torch.testing.assert_close(getattr(got, field), getattr(alone, field), rtol=0, atol=0, equal_nan=True)
        # and the numbers themselves: float64 power sums and per-binade counts of the sample
        values = t.values
        assert float(got.s1) == pytest.approx(float(values.sum()), rel=1e-12, abs=1e-300, nan_ok=True)
        assert float(got.s2) == pytest.approx(float((values * values).sum()), rel=1e-12, abs=1e-300, nan_ok=True)
        assert int(got.hist.sum()) == values.numel()
    torch.testing.assert_close(
        finalize(together), finalize([reduce_sample(t) for t in taken]), rtol=0, atol=0, equal_nan=True
    )


def test_a_flush_reduces_its_samples_in_one_pass_per_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """The histogram ops of a recorder's flush grow with the kinds of sample
    (device, dtype, length), not with the number of recorded tensors."""
    import gradscope.stats as stats_module
    from gradscope.recorder import Recorder

    calls: list[int] = []
    real = stats_module._bincount
    monkeypatch.setattr(stats_module, "_bincount", lambda values, bins: calls.append(bins) or real(values, bins))
    layers: list[torch.nn.Module] = []
    for _ in range(6):
        layers += [torch.nn.Linear(128, 128), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    with Recorder(model, sample=1024) as rec:
        rec.start()
        model(torch.randn(64, 128)).square().mean().backward()
        rec.flush()
        recorded = sum(1 for layer in rec.record.layers for role in ("activation", "gradient") if layer.get(role))
    assert recorded == 24  # 12 modules, activation and ∂ℓ/∂h each
    # the 24 samples (and the model input's) have one length: one bincount per REDUCE_ROWS of them
    assert len(calls) <= -(-25 // stats_module.REDUCE_ROWS), calls


def test_reducing_many_samples_allocates_a_few_rows_not_all_of_them() -> None:
    """An audit's pending samples (up to 8 MiB) are reduced REDUCE_ROWS at a time:
    the largest temporary is one such block (its float64 stack or int64 exponents),
    never the stack of all of them."""
    from torch.profiler import ProfilerActivity, profile

    import gradscope.stats as stats_module

    taken = [take_sample(torch.randn(64, 1024), 4096) for _ in range(128)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        reduced = reduce_samples(taken)
    largest = max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    rows = taken[0].values.numel()
    assert len(reduced) == 128
    assert largest <= stats_module.REDUCE_ROWS * rows * 8  # one block of rows, float64 or int64
    assert largest < 128 * rows * 8 // 4  # far from all 128 at once


def test_nonfinite_count_is_apart_from_large_finite_values() -> None:
    """float64 exponents keep NaN/inf (exponent 2047) apart from finite values
    above 2^105 that share the documented top bin."""
    x = torch.tensor([1.0, 2.0**110, 3e38, float("inf"), float("nan"), 5.0])
    s = stats_of(x)
    assert s.nonfinite_count == 2 and s.binade_counts()[TOP_EXPONENT] == 2
