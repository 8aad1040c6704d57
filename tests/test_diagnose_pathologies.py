"""No misses: each pathology produces the right finding code, layer and fix."""

from __future__ import annotations

import math

import pytest
import torch
from diagnose_models import Log, Sqrt, kaiming, mlp, normal, one_thread, xavier  # noqa: F401 (one_thread: autouse fixture)
from torch import nn

from gradscope.auditing import audit
from gradscope.formats import get_format
from gradscope.report import Report, Severity

LOUD = (Severity.ERROR, Severity.WARNING)


def _loud_codes(report: Report) -> set[str]:
    return {f.code for f in report.findings if Severity(f.severity) in LOUD}


def _finding(report: Report, code: str):
    found = [f for f in report.findings if f.code == code]
    assert found, f"no {code} finding among {[f.code for f in report.findings]}"
    return found[0]


def test_every_warning_and_error_has_a_fix_with_code() -> None:
    report = audit(mlp(10, init=normal(1.0)), input_shape=(64, 64))
    loud = [f for f in report.findings if Severity(f.severity) in LOUD]
    assert loud
    for f in loud:
        assert f.fix is not None and f.fix.summary and f.fix.code, f.code


def test_deep_sigmoid_with_small_weights_vanishes_and_suggests_relu() -> None:
    report = audit(mlp(10, act=nn.Sigmoid, init=normal(0.01)), input_shape=(64, 64))
    finding = _finding(report, "vanishing-gradient")
    assert finding.severity is Severity.ERROR
    # Theory: per layer, ∂ℓ/∂h's RMS is multiplied by sqrt(n·Var[w])·sigmoid'(~0) = sqrt(128·1e-4)·0.25 ≈ 0.028.
    per_layer = finding.evidence["per_layer_gain"]
    assert 0.02 / 1.5 < per_layer < 0.028 * 1.5
    assert "nn.ReLU" in finding.fix.code
    assert "exploding-gradient" not in report.codes()


def test_xavier_30_layer_relu_mlp_vanishes() -> None:
    report = audit(mlp(30, init=xavier), input_shape=(64, 64))
    finding = _finding(report, "vanishing-gradient")
    # He et al. 2015: Xavier under ReLU halves the variance per layer, so the
    # RMS of ∂ℓ/∂h shrinks by about sqrt(1/2) per layer (0.5..0.85 tolerated).
    assert 0.5 < finding.evidence["per_layer_gain"] < 0.85
    assert finding.evidence["ratio"] < 1e-3
    assert _finding(report, "poor-init").severity is Severity.WARNING
    assert "kaiming_normal_" in finding.fix.code or "apply_init" in finding.fix.code
    assert not {"exploding-gradient", "exploding-activations"} & report.codes()


def test_deep_relu_with_unit_weights_explodes_and_overflows_fp16() -> None:
    report = audit(mlp(10, init=normal(1.0)), input_shape=(64, 64))
    codes = _loud_codes(report)
    assert {"exploding-gradient", "exploding-activations", "fp16-overflow"} <= codes
    assert "vanishing-gradient" not in codes
    explode = _finding(report, "exploding-gradient")
    # Theory: per layer the variance grows by n·Var[w]/2 = 64, the RMS by 8.
    assert 8 / 2 < explode.evidence["per_layer_gain"] < 8 * 2
    assert "clip_grad_norm_" in explode.fix.code


def test_large_activations_with_healthy_gradients_give_fp16_overflow_only() -> None:
    model = mlp(3, init=kaiming, d_in=32)
    report = audit(model, inputs=torch.randn(64, 32) * 2e5)
    # Besides the overflow, only the input's scale is named (its logits are 2e5x too large),
    # never the weights (tests/test_verdicts_field2.py).
    assert _loud_codes(report) == {"fp16-overflow", "poor-init"}
    assert _finding(report, "poor-init").evidence["cause"] == "input-scale"
    finding = _finding(report, "fp16-overflow")
    assert finding.severity is Severity.ERROR
    assert finding.layers[0] == "0"
    assert finding.evidence["absmax"] > get_format("fp16").max
    assert "bf16" in finding.fix.summary and "fp32" in finding.fix.summary


def test_weight_gradients_that_flush_in_fp16_give_underflow_and_a_loss_scale() -> None:
    model = mlp(3, init=kaiming, d_in=32)
    # A loss scaled by 1e-15 puts the gradients near 1e-17: far below fp16's 2^-24 ≈ 6e-8,
    # and still below it after GradScaler's default 2^16.
    report = audit(model, input_shape=(64, 32), loss=lambda out: out.pow(2).mean() * 1e-15)
    assert _loud_codes(report) == {"fp16-underflow"}
    finding = _finding(report, "fp16-underflow")
    assert finding.severity is Severity.WARNING
    assert finding.evidence["worst_flushed_frac"] > 0.9
    k = finding.evidence["recommended_loss_scale_exponent"]
    scale = report.analysis["loss_scale"]
    assert scale["exponent"] == k
    # Largest k without overflow, minus one binade: absmax·2^(k+1) <= 65504 < absmax·2^(k+2).
    absmax = scale["gradient_absmax"]
    assert absmax * 2.0 ** (k + 1) <= 65504 < absmax * 2.0 ** (k + 2)
    assert k > 16 and scale["default_flushed_frac"] > 0.5  # GradScaler's default start is not enough
    assert scale["flushed_frac"] < 0.05
    assert f"init_scale=2.0**{k}" in finding.fix.code
    # Which weight gradients: those of all three Linear layers flush.
    assert {"0", "2", "4"} <= set(finding.layers)


def test_underflow_that_gradscaler_default_rescues_is_only_info() -> None:
    model = mlp(3, init=kaiming, d_in=32)
    # Gradients near 1e-11: flushed unscaled, fine at 2^16 (6.6e-7 > 2^-24).
    report = audit(model, input_shape=(64, 32), loss=lambda out: out.pow(2).mean() * 1e-9)
    finding = _finding(report, "fp16-underflow")
    assert finding.severity is Severity.INFO
    assert report.analysis["loss_scale"]["default_flushed_frac"] < 0.5
    assert _loud_codes(report) == set()


def test_bf16_and_fp8_are_checked_only_when_asked() -> None:
    model = mlp(3, init=kaiming, d_in=32)
    x = torch.randn(64, 32) * 1e3  # beyond fp8 e4m3's 448, well within fp16's 65504
    assert not any(c.startswith("fp8") for c in audit(model, inputs=x).codes())
    report = audit(model, inputs=x, formats=("fp16", "fp8_e4m3"))
    assert "fp8-e4m3-overflow" in report.codes()
    assert "fp16-overflow" not in report.codes()


def test_nan_produced_by_a_custom_layer_names_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), Log(), nn.Linear(64, 10))
    report = audit(model, input_shape=(64, 32))
    finding = _finding(report, "nonfinite")
    assert finding.severity is Severity.ERROR
    assert finding.layers == ["3"]
    assert finding.evidence["produced"] is True
    assert finding.evidence["pass"] == "forward"
    # Exactly one nonfinite finding: layer 4 only received it.
    assert [f.code for f in report.findings].count("nonfinite") == 1


def test_nan_in_the_input_is_received_not_produced() -> None:
    model = mlp(3, init=kaiming, d_in=32)
    x = torch.randn(64, 32)
    x[3, 5] = float("nan")
    finding = _finding(audit(model, inputs=x), "nonfinite")
    assert finding.layers == ["0"]
    assert finding.evidence["produced"] is False


def test_nan_produced_in_the_backward_names_the_layer_next_to_the_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), Sqrt(), nn.Linear(64, 10))
    report = audit(model, input_shape=(64, 32))
    finding = _finding(report, "nonfinite")
    assert finding.evidence["pass"] == "backward"
    # ∂ℓ/∂h of Sqrt's output (layer 2) is finite; Sqrt's backward turns it into NaN at the zeros.
    assert finding.layers == ["1"]
    assert finding.evidence["produced_by"] == "2"
    assert finding.evidence["produced"] is True


def test_relus_behind_large_negative_biases_are_dead() -> None:
    model = mlp(3, init=kaiming, d_in=32, width=64)
    with torch.no_grad():
        model[0].bias.fill_(-20.0)
    report = audit(model, input_shape=(64, 32))
    finding = _finding(report, "dead-units")
    # ReLU 1 is dead; ReLU 3 then only sees layer 2's zero bias and is dead too.
    assert finding.layers == ["1", "3"]
    assert finding.evidence["zero_frac"] > 0.999
    assert "nn.init.zeros_(model[0].bias)" in finding.fix.code


def test_tanh_after_std5_weights_saturates() -> None:
    model = mlp(3, act=nn.Tanh, init=normal(5.0), d_in=64, width=64)
    report = audit(model, input_shape=(64, 64))
    finding = _finding(report, "saturated-units")
    assert finding.layers[0] == "1"
    # Pre-activations have std 5·sqrt(64) = 40: P(|tanh| < 0.9) = P(|y| < 1.47) ≈ 0.03,
    # so the lower bound from E[y^2] must report most units saturated.
    assert finding.evidence["saturated_frac_lower_bound"] > 0.75
    assert "xavier_normal_(model[0].weight)" in finding.fix.code
    assert not math.isnan(finding.evidence["activation_std"])


class FusedMLP(nn.Module):
    """A module using its own parameters directly (a fused MoE expert): its activation child runs after them."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(32, 64) * 0.1)
        self.act = nn.SiLU()
        self.w2 = nn.Parameter(torch.randn(64, 32) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x @ self.w1) @ self.w2


@pytest.mark.parametrize("where", ["linear", "fused"])
def test_a_non_finite_weight_is_named_as_the_weight_not_as_arithmetic(where: str) -> None:
    """An audit of a corrupted checkpoint: a NaN weight was reported as ''2' produces it
    (its input was finite)' with 'guard its arithmetic (clamp before log/sqrt/exp)',
    and an inf fused expert weight was blamed on the SiLU after it."""
    torch.manual_seed(0)
    if where == "linear":
        model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
        with torch.no_grad():
            model[2].weight[3, 5] = float("nan")
        bad, owner = "2.weight", "2"
    else:
        model = nn.Sequential(nn.Linear(32, 32), FusedMLP(), nn.Linear(32, 10))
        with torch.no_grad():
            model[1].w1[0, 0] = float("inf")
        bad, owner = "1.w1", "1"
    report = audit(model, input_shape=(8, 32))
    (finding,) = [f for f in report.findings if f.code == "nonfinite"]
    assert finding.layers == [owner] and finding.evidence["parameters"] == [bad]
    assert "before any computation" in finding.message and "clamp" not in finding.fix.summary
    if where == "linear":  # read back from JSON (no model): the recorded weight's statistics say it
        from gradscope.diagnose import diagnose_record

        again, _ = diagnose_record(Report.from_dict(report.to_dict()).record)
        (from_json,) = [f for f in again if f.code == "nonfinite"]
        assert from_json.layers == ["2"] and from_json.evidence["parameters"] == ["2.weight"]
