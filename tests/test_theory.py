"""The recorded numbers agree with the theory of signal propagation.

Forward (Glorot & Bengio 2010; He et al. 2015): for y = W x with i.i.d.
zero-mean weights, E[y_i^2] = fan_in * Var[w] * E[x_j^2].  ReLU halves the
second moment of a zero-mean symmetric input (E[relu(y)^2] = E[y^2] / 2).

Tolerances: with batch B = 512 and width n = 512, a layer's measured second
moment is an average over B*n = 262144 products; its gain is
tr(W Σ W^T) / tr(Σ) whose relative spread is about sqrt(2 / n^2) ≈ 0.3% per
layer (Frobenius norm of a 512x512 Gaussian matrix), and the batch adds
about sqrt(2 / (B n)) ≈ 0.3%.  Over 10 layers these compound to a few percent
at most, so 10% (no activation) and 15% (ReLU, whose output is no longer
isotropic) leave a wide margin while a wrong init (a factor 2 or 6 per layer)
fails at the first layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradscope.formats import get_format
from gradscope.record import Record
from gradscope.recorder import Recorder
from gradscope.stats import Stats, tensor_stats

WIDTH = 512
BATCH = 512


def square_stack(depth: int, init: Callable[[torch.Tensor], object] | None, act: type[nn.Module] | None) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(WIDTH, WIDTH)
        if init is not None:
            init(linear.weight)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if act is not None:
            layers.append(act())
    return nn.Sequential(*layers)


def record_forward(model: nn.Module, x: torch.Tensor) -> Record:
    with Recorder(model, types=[nn.Linear]) as rec, torch.no_grad():
        rec.start()
        model(x)
        return rec.finish()


def second_moments(record: Record) -> list[float]:
    """E[y^2] of each Linear output (rms^2: the quantity the recursions track)."""
    return [layer.activation.rms**2 for layer in record.layers]


def test_xavier_linear_stack_keeps_variance() -> None:
    torch.manual_seed(0)
    model = square_stack(10, nn.init.xavier_normal_, None)
    record = record_forward(model, torch.randn(BATCH, WIDTH))
    variances = [layer.activation.var for layer in record.layers]
    assert len(variances) == 10
    for i, v in enumerate(variances):
        assert v == pytest.approx(1.0, rel=0.10), (i, v)


NETWORKS = 4  # independent weight draws averaged in the ReLU tests (see relu_moments)


def relu_moments(init: Callable[[torch.Tensor], object], seed: int) -> tuple[list[float], list[float]]:
    """(per-layer factors m_l / m_{l-1} of the second moments averaged over
    NETWORKS independent networks, geometric-mean factor per layer of each network).

    Why average: the He et al. recursion holds in expectation over the
    weights.  One finite-width ReLU network wanders around it: the log of the
    squared activation norm has a variance that grows like depth / width
    (Hanin & Rolnick 2018), and a batch does not average it away because ReLU
    outputs share a common mean direction.  Measured at width 512, depth 10
    over 30 seeds: a single network's second moment deviates from the
    expectation by 25% on average at its worst layer (up to 65%); a single
    layer's factor by 14% (up to 20%).  Averaging 4 networks brings the worst
    per-layer factor to 7% (up to 9.7%, 6 trials), and the geometric mean of
    one network's 9 factors, (m_10 / m_1)^(1/9), has a spread of 2.4% (worst
    4.7%, 24 networks).  The tolerances below are about 4 such spreads.
    """
    torch.manual_seed(seed)
    moments, geometric = [], []
    for _ in range(NETWORKS):
        model = square_stack(10, init, nn.ReLU)
        m = second_moments(record_forward(model, torch.randn(BATCH, WIDTH)))
        moments.append(m)
        geometric.append((m[-1] / m[0]) ** (1 / 9))
    mean = [sum(col) / NETWORKS for col in zip(*moments, strict=True)]
    assert mean[0] == pytest.approx(moments[0][0], rel=0.05)  # layer 1 sees N(0, 1): little spread
    return [mean[i] / mean[i - 1] for i in range(1, 10)], geometric


def test_xavier_relu_halves_per_layer() -> None:
    """He et al. 2015, eq. 10: E[y_l^2] = n Var[w] E[y_{l-1}^2] / 2 = E[y_{l-1}^2] / 2
    for Xavier's n Var[w] = 1 on square layers."""
    factors, geometric = relu_moments(nn.init.xavier_normal_, seed=1)
    for i, f in enumerate(factors):
        assert f == pytest.approx(0.5, rel=0.15), (i, factors)
    for g in geometric:
        assert g == pytest.approx(0.5, rel=0.10), geometric


def test_kaiming_relu_keeps_variance() -> None:
    """Kaiming normal (fan_in, relu): n Var[w] = 2 cancels ReLU's halving."""
    factors, geometric = relu_moments(lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"), seed=2)
    for i, f in enumerate(factors):
        assert f == pytest.approx(1.0, rel=0.15), (i, factors)
    for g in geometric:
        assert g == pytest.approx(1.0, rel=0.10), geometric


def test_default_linear_init_under_relu_loses_a_factor_six() -> None:
    """nn.Linear's default weight is U(±1/sqrt(fan_in)) (kaiming_uniform, a=√5):
    Var[w] = 1/(3 n); with ReLU halving, each layer keeps 1/6 of E[y^2]."""
    torch.manual_seed(3)
    model = square_stack(6, None, nn.ReLU)  # default weights; biases zeroed
    w = model[0].weight
    assert float(w.detach().var()) * WIDTH == pytest.approx(1 / 3, rel=0.02)
    m = second_moments(record_forward(model, torch.randn(BATCH, WIDTH)))
    ratios = [m[i] / m[i - 1] for i in range(1, 6)]
    for r in ratios:
        assert 0.12 <= r <= 0.22, ratios
    assert sum(ratios) / len(ratios) == pytest.approx(1 / 6, rel=0.10)


def test_sigmoid_backward_ratio_is_slope_times_weight_gain() -> None:
    """Backward through y_{l+1} = W σ(y_l): g_l = σ'(y_l) ⊙ (W^T g_{l+1}), so
    rms(g_l) / rms(g_{l+1}) ≈ slope(y_l) * rms(W) * sqrt(fan_out), with the
    slope measured here from the pre-activations, independently of gradscope.
    """
    torch.manual_seed(4)
    width, depth = 256, 6
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.xavier_normal_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Sigmoid()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(256, width)
    target = torch.randint(0, width, (256,))

    with Recorder(model, types=[nn.Linear]) as rec:
        rec.start()
        nn.functional.cross_entropy(model(x), target).backward()
        rec.capture_parameters()
        record = rec.finish()

    # Pre-activations, recomputed by hand.
    with torch.no_grad():
        pre, h = [], x
        for i in range(depth):
            y = model[2 * i](h)
            pre.append(y)
            h = torch.sigmoid(y)
    rms = [layer.gradient.rms for layer in record.layers]
    for i in range(depth - 1):
        s = torch.sigmoid(pre[i])
        slope = s * (1 - s)
        mean_slope = float(slope.mean())
        rms_slope = math.sqrt(float(slope.square().mean()))
        nxt = record.layers[i + 1]
        gain = nxt.weight.rms * math.sqrt(nxt.fan_out)
        measured = rms[i] / rms[i + 1]
        assert measured == pytest.approx(mean_slope * gain, rel=0.10), (i, measured, mean_slope * gain)
        assert measured == pytest.approx(rms_slope * gain, rel=0.05), i
        assert 0.19 < mean_slope <= 0.25  # σ' <= 1/4: the reason deep sigmoid stacks vanish
    # Vanishing: the first layer's gradient is at least 4^-(depth-1) * gain^(depth-1) smaller.
    assert rms[0] / rms[-1] < 0.25 ** (depth - 1) * 1.2 ** (depth - 1)


@pytest.mark.parametrize("scale", [2.0**-20, 2.0**12])
def test_fp16_fractions_match_casting(scale: float) -> None:
    """A real gradient and a real activation, scaled to straddle fp16's lower
    (2^-20) or upper (2^12) limit; the histogram's fractions bracket what
    casting to float16 actually does, within the one-binade resolution."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    x = torch.randn(512, 64)
    hidden = model[:3](x)
    hidden.retain_grad()
    nn.functional.cross_entropy(model[3:](hidden), torch.randint(0, 10, (512,))).backward()
    fmt = get_format("fp16")
    crossed = 0
    for tensor in (hidden.detach() * scale * 1e3, hidden.grad * scale * 1e3):
        s = Stats(tensor_stats(tensor))
        n = tensor.numel()
        frac = s.format_fractions("fp16")
        cast = tensor.half().float()
        inf = int(torch.isinf(cast).sum())
        flushed = int(((cast == 0) & (tensor != 0)).sum())
        over = round(frac["fp16_overflow_frac"] * n)
        under = round(frac["fp16_underflow_frac"] * n)
        top = s.count_exponents(fmt.max_exponent, fmt.max_exponent)
        edge = s.count_exponents(fmt.subnormal_exponent - 1, fmt.subnormal_exponent - 1)
        assert over <= inf <= over + top
        assert under - edge <= flushed <= under
        crossed += inf + flushed
    assert crossed > 0  # the scale really took values past a limit
