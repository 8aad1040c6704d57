"""Field defects where the fix was wrong: zero biases blamed while one badly scaled layer went
unnamed, a recurrent fix that re-advised the state it had produced, and "add normalisation" for an
all-BatchNorm network whose BatchNorms saw 2 values per channel."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradscope.auditing import audit
from gradscope.diagnose import thresholds as th
from gradscope.diagnose.depth import BATCHNORM_MIN_VALUES, _depth_fix, values_per_channel
from gradscope.diagnose.init import _rectified_m2
from gradscope.diagnose.layers import Context
from gradscope.diagnose.recurrent import truncation_window
from gradscope.report import Report, Severity
from tests.diagnose_models import kaiming, mlp, one_thread  # noqa: F401  (one_thread: an autouse fixture)

TIME_CODES = {"exploding-through-time", "vanishing-through-time"}
DEPTH_CODES = {"vanishing-gradient", "exploding-gradient"}


def _poor_init(report: Report) -> list:
    return [f for f in report.findings if f.code == "poor-init"]


# -- 1. poor-init: the badly scaled layer, never zero biases ----------------------------------


def conv_stack(seed: int = 0, scale: float = 0.1, bias: bool = True) -> nn.Sequential:
    """The field's plain stack: 8 Kaiming convs (32 channels, zero biases), conv '6' at ``scale``x."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    cin = 3
    for _ in range(8):
        layers += [nn.Conv2d(cin, 32, 3, padding=1, bias=bias), nn.ReLU()]
        cin = 32
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)]
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    with torch.no_grad():
        model[6].weight.mul_(scale)
    return model


def _audit_stack(model: nn.Module) -> Report:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    return audit(model, inputs=x, loss=lambda out: nn.functional.cross_entropy(out, y))


def test_the_one_misscaled_conv_is_named_and_its_fix_cures_the_finding() -> None:
    model = conv_stack()
    findings = _poor_init(_audit_stack(model))
    assert len(findings) == 1
    finding = findings[0]
    # Field: the old rule named ['14'] (a correct Kaiming conv) and blamed its zero bias.
    assert finding.layers == ["6"]
    assert finding.evidence["cause"] == "weights"
    # He et al. 2015: gain = n_in·Var[w]·1/2 with n_in = 32·3·3 = 288 and std 0.1·sqrt(2/288):
    # 288 · 0.01 · 2/288 / 2 = 0.01 (the drawn std, not the ideal one: within 5%).
    assert finding.evidence["worst_predicted_gain"] == pytest.approx(0.01, rel=0.05)
    assert finding.evidence["worst_recommended_std"] == pytest.approx(math.sqrt(2 / 288), rel=1e-9)
    assert finding.evidence["measured_gain_end_to_end"] < th.INIT_STACK_LOW
    assert "biases" not in finding.message
    assert 'kaiming_normal_(model[6].weight, nonlinearity="relu")' in finding.fix.code
    assert "model[14]" not in finding.fix.code
    exec(finding.fix.code, {"model": model, "nn": nn})
    assert _poor_init(_audit_stack(model)) == []


def test_biases_are_blamed_only_when_nonzero_and_beyond_noise() -> None:
    """Old code: at 0.1x and 0.12x it blamed the zero bias of '14' (its measured gain 0.485
    against a predicted 1.01: the per-layer spread of a 32-channel conv, not a bias)."""
    for scale in (0.1, 0.12):
        findings = _poor_init(_audit_stack(conv_stack(0, scale)))
        assert [(f.layers, f.evidence["cause"]) for f in findings] == [(["6"], "weights")]
    # Biases that do move the signal still are blamed: a ReLU MLP with Kaiming weights and
    # every bias at -0.5; for a pre-activation of std s ~ 1 the rectified normal keeps
    # E[relu(N(-0.5, 1))^2] = 1.25·Φ(-0.5) - 0.5·φ(0.5) = 0.210 of s² against 1/2 without
    # the bias (0.42x per layer, more as the signal shrinks).
    model = mlp(5, init=kaiming, d_in=64, width=64)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.fill_(-0.5)
    finding = _poor_init(audit(model, input_shape=(64, 64)))
    assert finding and finding[0].evidence["cause"] == "biases"
    assert finding[0].evidence["worst_measured_gain"] < 0.5 * finding[0].evidence["worst_predicted_gain"]
    assert "nn.init.zeros_(model[2].bias)" in finding[0].fix.code


def test_a_bias_free_stack_still_names_the_misscaled_conv() -> None:
    # Field: no finding at all (the old rule had nowhere to go once no layer had a bias).
    # The weights predict 288·(0.12·sqrt(2/288))²/2 = 0.0144 for '6', the stack just inside
    # the band; the signal measured across it is not.
    model = conv_stack(scale=0.12, bias=False)
    finding = _poor_init(_audit_stack(model))
    assert [f.layers for f in finding] == [["6"]]
    assert finding[0].evidence["worst_predicted_gain"] == pytest.approx(0.0144, rel=0.05)
    assert th.INIT_STACK_LOW <= finding[0].evidence["compounded_predicted_gain"]
    assert finding[0].evidence["measured_gain_end_to_end"] < th.INIT_STACK_LOW
    assert "bias" not in finding[0].fix.code
    exec(finding[0].fix.code, {"model": model, "nn": nn})
    assert _poor_init(_audit_stack(model)) == []


def test_rectified_normal_second_moment_matches_hand_computation() -> None:
    # E[max(y,0)^2], y ~ N(m, s^2): s²/2 at m = 0; (s² + m²)Φ(m/s) + m·s·φ(m/s) otherwise.
    assert _rectified_m2(0.0, 2.0) == pytest.approx(2.0, rel=1e-12)
    phi1, cdf1 = math.exp(-0.5) / math.sqrt(2 * math.pi), 0.8413447460685429
    assert _rectified_m2(1.0, 1.0) == pytest.approx(2 * cdf1 + phi1, rel=1e-12)
    assert _rectified_m2(-3.0, 1.0) == pytest.approx(10 * (1 - 0.9986501019683699) - 3 * 0.0044318484119380075)
    samples = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    assert _rectified_m2(0.5, 1.0) == pytest.approx(float(samples.clamp(min=0).square().mean()), rel=5e-3)


class _Block(nn.Module):
    """The field's no-BN residual block: relu(x + conv2(relu(conv1(x))))."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


class _NoBNResNet(nn.Module):
    def __init__(self, n: int = 8, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.blocks = nn.Sequential(*[_Block(c) for _ in range(n)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.relu(self.stem(x)))).flatten(1))


def test_one_residual_branch_conv_at_10x_without_batchnorm_is_named() -> None:
    """Field: loss 27.9 against 5.56 and no finding.  The branch conv's own predicted gain is
    n_in·Var[w]/2 = 144 · (10·sqrt(2/144))² / 2 = 100."""
    torch.manual_seed(0)
    model = _NoBNResNet()
    with torch.no_grad():
        model.blocks[3].conv2.weight.mul_(10)
    findings = _poor_init(audit(model, input_shape=(8, 3, 16, 16)))
    assert [f.layers for f in findings] == [["blocks.3.conv2"]]
    assert findings[0].evidence["worst_predicted_gain"] == pytest.approx(100, rel=0.1)
    assert findings[0].evidence["measured_gain_end_to_end"] > th.INIT_STACK_HIGH
    exec(findings[0].fix.code, {"model": model, "nn": nn})
    assert _poor_init(audit(model, input_shape=(8, 3, 16, 16))) == []


# -- 2. through time: a fix never re-advises what is in place ------------------------------------


class Seq(nn.Module):
    def __init__(self, kind: str, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _time_finding(model: nn.Module, steps: int):
    report = audit(model, input_shape=(4, steps, 8))
    found = [f for f in report.findings if f.code in TIME_CODES]
    return found[0] if found else None


def _live(code: str) -> list[str]:
    return [line.strip() for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_applying_the_exploding_fix_never_yields_the_same_advice(kind: str) -> None:
    torch.manual_seed(0)
    model = Seq(kind)
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(8)
    first = _time_finding(model, 50)
    assert first is not None and first.code == "exploding-through-time"
    assert any("orthogonal_" in line for line in _live(first.fix.code))
    exec(first.fix.code, {"model": model, "torch": torch, "nn": nn})
    after = _time_finding(model, 50)
    assert after is not None and after.code == "vanishing-through-time"  # tanh' < 1, the gates
    # Field: "give 'rnn' orthogonal recurrent weights (spectral radius 1)" once more.
    assert not any("orthogonal_" in line for line in _live(after.fix.code))
    assert "orthogonal recurrent weights (spectral radius 1)" not in after.fix.summary
    assert "recurrent weights orthogonally" not in after.fix.summary
    assert after.evidence["init_in_place"] is True
    assert after.evidence["spectral_radius_max"] == pytest.approx(1.0, abs=1e-5)


def test_an_orthogonal_rnn_that_still_vanishes_gets_a_gated_cell_and_a_truncation_window() -> None:
    torch.manual_seed(0)
    model = Seq("RNN")
    with torch.no_grad():
        nn.init.orthogonal_(model.rnn.weight_hh_l0)
    finding = _time_finding(model, 50)
    assert finding is not None and finding.code == "vanishing-through-time"
    assert finding.severity is Severity.WARNING
    assert "model.rnn = nn.LSTM(8, 32, num_layers=1, batch_first=True)" in _live(finding.fix.code)
    factor = finding.evidence["factor_per_step"]
    window = int(math.log(th.DEPTH_WARN_LOW) / math.log(factor))  # factor^k >= 1e-2
    assert f"truncate backprop through time to {window} steps" in finding.fix.summary
    assert "skip connections in time" in finding.fix.summary
    # The advice, applied, changes the state: a gated cell, whose next advice is its own init.
    exec(finding.fix.code, {"model": model, "nn": nn})
    assert isinstance(model.rnn, nn.LSTM)
    nxt = _time_finding(model, 50)
    assert nxt is None or nxt.fix.code != finding.fix.code


def test_an_lstm_with_every_advice_in_place_gets_only_what_remains() -> None:
    torch.manual_seed(0)
    model = Seq("LSTM")
    first = _time_finding(model, 400)
    assert first is not None and "fill_(1.0)" in first.fix.code  # orthogonal blocks and forget bias 1
    exec(first.fix.code, {"model": model, "torch": torch, "nn": nn})
    after = _time_finding(model, 400)
    assert after is not None and after.severity is Severity.INFO
    assert _live(after.fix.code) == []  # nothing left to set on the weights
    assert "forget-gate bias to 1" not in after.fix.summary
    assert "forget gate" in after.fix.summary
    assert after.evidence["forget_bias_mean"] == pytest.approx(1.0, abs=0.1)  # 1 + U(±1/√32) averaged


def test_an_lstm_already_orthogonal_is_only_told_the_forget_bias() -> None:
    torch.manual_seed(0)
    model = Seq("LSTM")
    with torch.no_grad():
        for gate in range(4):
            nn.init.orthogonal_(model.rnn.weight_hh_l0[gate * 32 : (gate + 1) * 32])
    finding = _time_finding(model, 400)
    assert finding is not None
    assert not any("orthogonal_" in line for line in _live(finding.fix.code))
    assert any("fill_(1.0)" in line for line in _live(finding.fix.code))


def test_truncation_window_by_hand() -> None:
    # 0.843^k >= 1e-2  <=>  k <= ln(0.01)/ln(0.843) = 26.9
    assert truncation_window(0.843, 50) == 26
    assert truncation_window(0.959, 400) == 110  # ln(0.01)/ln(0.959) = 110.0
    assert truncation_window(0.5, 5) == 4  # capped to the steps seen
    assert truncation_window(1.2, 50) is None


# -- 3. BatchNorms that see too few values per channel --------------------------------------------


def bn_net(seed: int = 1, depth: int = 8, c: int = 32) -> nn.Sequential:
    """Three stride-2 convs take an 8x8 image to 1x1, then ``depth`` 1x1 conv + BatchNorm + ReLU:
    at batch b every BatchNorm after the third sees b values per channel (EfficientNet's last
    stages at 32x32)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    cin = 3
    for _ in range(3):
        layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        cin = c
    for _ in range(depth):
        layers += [nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


@pytest.mark.parametrize(("batch", "code"), [(3, "exploding-gradient"), (2, "vanishing-gradient")])
def test_batchnorms_over_too_few_values_are_named_not_add_normalisation(batch: int, code: str) -> None:
    model = bn_net()
    report = audit(model, input_shape=(batch, 3, 8, 8))
    finding = next(f for f in report.findings if f.code == code)
    assert "add normalisation" not in finding.fix.summary
    # The 9 BatchNorms at 1x1 (the third conv's and the 8 after it), batch x 1 x 1 values each.
    named = [f"'{i}'" for i in (7, 10, 13)]
    assert all(n in finding.fix.summary for n in named)
    assert "9 BatchNorm layer(s)" in finding.fix.summary
    assert f"only {batch} value(s) per channel" in finding.fix.summary
    assert "larger batch" in finding.fix.summary and "GroupNorm" in finding.fix.summary
    # The snippet runs and swaps every BatchNorm for GroupNorm, which cures it.
    exec(finding.fix.code, {"model": model, "nn": nn})
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not {f.code for f in audit(model, input_shape=(batch, 3, 8, 8)).findings} & DEPTH_CODES
    # So does the other advice: a batch of 8 (every BatchNorm sees >= 4 values per channel).
    assert not set(audit(bn_net(), input_shape=(8, 3, 8, 8)).codes()) & DEPTH_CODES


def test_values_per_channel_from_the_recorded_shape() -> None:
    report = audit(bn_net(depth=1), input_shape=(3, 3, 8, 8))
    counts = {x.name: values_per_channel(x) for x in report.record.layers if x.type == "BatchNorm2d"}
    # 8x8 -> 4x4 -> 2x2 -> 1x1, times batch 3
    assert counts == {"1": 3 * 16, "4": 3 * 4, "7": 3, "10": 3}
    assert BATCHNORM_MIN_VALUES == 4  # E[1/chi2_k] = 1/(k-2) is finite only for k = n - 1 > 2


def test_generic_depth_advice_never_adds_normalisation_to_a_normalised_network() -> None:
    model = bn_net()
    report = audit(model, input_shape=(8, 3, 8, 8))
    ctx = Context(report.record, model=model)
    for exploding in (True, False):
        fix = _depth_fix(ctx, exploding=exploding)
        assert "add normalisation" not in fix.summary
        assert "normalisation layers" in fix.summary  # says why not


def test_starved_normalisations_are_a_training_mode_cause_only() -> None:
    """A BatchNorm in eval mode divides by its running variance, not by its input's, so
    eps plays no part (field sweep: MobileNetV2 audited in eval was told to reset gains
    that were already 1).  The same stack in training mode keeps the starved-norm fix."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        nn.init.normal_(conv.weight, std=1e-4)  # the BatchNorm's input variance far below eps = 1e-5
        layers += [conv, nn.BatchNorm2d(8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    x = torch.randn(8, 8, 4, 4) * 1e-3

    def fixes(mode: str) -> str:
        report = audit(model, inputs=x, mode=mode)
        return " ".join(f.fix.summary for f in report.findings if f.fix is not None)

    assert "below their eps" in fixes("train")
    assert "below their eps" not in fixes("eval")
