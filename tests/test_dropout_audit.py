"""The audit's ``dropout`` rule: rates outside [0, 0.9), dropout feeding a normalisation or being the
output, and the 1/(1−p) rescale that pushes fp16 activations past 65504 (the mT5 failure)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope


def dropout_findings(model: nn.Module, **kwargs) -> list:
    report = gradscope.audit(model, input_shape=(32, 8), loss="mean", **kwargs)
    return [f for f in report.findings if f.code == "dropout"]


@pytest.mark.parametrize("p,severity", [(0.9, "warning"), (0.95, "warning"), (1.0, "error")])
def test_rates_at_or_above_point_nine(p: float, severity: str) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 2))
    (finding,) = dropout_findings(model)
    assert finding.layers == ["2"] and finding.severity == severity and finding.evidence["p"] == p


def test_lecture_placement_is_clean() -> None:
    # h' = dropout(σ(W1 x + b1)); o = W2 h' + b2: the lecture's placement, p = 0.5
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    assert dropout_findings(model) == []


def test_dropout_feeding_batchnorm_and_dropout_as_output() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.BatchNorm1d(16), nn.Linear(16, 2), nn.Dropout(0.1))
    found = {tuple(f.layers): f for f in dropout_findings(model)}
    assert set(found) == {("1", "2"), ("4",)}
    assert found[("1", "2")].severity == "warning" and "variance shift" in found[("1", "2")].message
    assert found[("4",)].evidence["position"] == "output"
    # LayerNorm normalises each example by its own statistics, at inference too (post-LN Transformers
    # put dropout right before the residual add and its LayerNorm): not reported
    layer_norm = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.LayerNorm(16), nn.Linear(16, 2))
    assert dropout_findings(layer_norm) == []


class NearFp16Max(nn.Module):
    """A projection whose outputs sit at 6.27e4 (HF's debugging guide), then Dropout(p=0.1)."""

    def __init__(self, value: float = 6.27e4) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(8, 2)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.fc(x)))


def test_the_mt5_failure_is_named() -> None:
    (finding,) = dropout_findings(NearFp16Max())
    assert finding.severity == "error" and finding.layers == ["drop"]
    assert "mT5" in finding.message
    assert finding.evidence["input_absmax"] == pytest.approx(6.27e4)
    assert finding.evidence["rescaled_absmax"] == pytest.approx(6.27e4 / 0.9)
    assert finding.evidence["format_max"] == 65504
    # at inference there is no rescale; and 5.8e4 / 0.9 = 6.44e4 still fits fp16
    assert dropout_findings(NearFp16Max(), mode="eval") == []
    assert dropout_findings(NearFp16Max(5.8e4)) == []
