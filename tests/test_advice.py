"""The formulas of gradscope.advice against closed forms and torch's own init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradscope import advice
from gradscope.stats import Stats, tensor_stats


def test_xavier_std_matches_torch_xavier_normal() -> None:
    w = torch.empty(300, 500)
    nn.init.xavier_normal_(w, generator=torch.Generator().manual_seed(0))
    assert advice.xavier_std(500, 300) == pytest.approx(math.sqrt(2 / 800))
    assert float(w.std()) == pytest.approx(advice.xavier_std(500, 300), rel=0.02)


def test_kaiming_std_matches_torch_kaiming_normal() -> None:
    w = torch.empty(400, 250)
    nn.init.kaiming_normal_(w, nonlinearity="relu", generator=torch.Generator().manual_seed(0))
    assert advice.kaiming_std(250) == pytest.approx(math.sqrt(2 / 250))
    assert float(w.std()) == pytest.approx(advice.kaiming_std(250), rel=0.02)
    slope = 0.2
    gain = advice.kaiming_gain("leaky_relu", slope)
    assert gain == pytest.approx(nn.init.calculate_gain("leaky_relu", slope))


def test_activation_factors() -> None:
    assert advice.activation_factor("relu") == 0.5
    assert advice.activation_factor("identity") == 1.0
    assert advice.activation_factor("leaky_relu", 0.1) == pytest.approx((1 + 0.01) / 2)
    assert advice.activation_factor("tanh") is None  # measured, not assumed
    # The ReLU factor is E[relu(y)^2] / E[y^2] for a symmetric y.
    y = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert float(torch.relu(y).pow(2).mean() / y.pow(2).mean()) == pytest.approx(0.5, rel=0.02)


@pytest.mark.parametrize(
    ("name", "expression"),
    [
        ("blocks.3.fc", "model.blocks[3].fc"),
        ("0", "model[0]"),
        ("encoder.layers.10.linear1", "model.encoder.layers[10].linear1"),
        ("model", "model"),
        ("odd-name.x", "model.get_submodule('odd-name.x')"),
    ],
)
def test_module_expression(name: str, expression: str) -> None:
    assert advice.module_expression(name) == expression


def test_init_code_is_pasteable_and_does_what_it_says() -> None:
    code = advice.init_code("blocks.1.fc", "kaiming", bias=True)
    assert code.splitlines()[0] == 'nn.init.kaiming_normal_(model.blocks[1].fc.weight, nonlinearity="relu")'
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module(), nn.Module()])
    model.blocks[1].fc = nn.Linear(512, 512)
    torch.manual_seed(0)
    exec(code, {"nn": nn, "model": model})
    assert float(model.blocks[1].fc.weight.detach().std()) == pytest.approx(math.sqrt(2 / 512), rel=0.02)
    assert float(model.blocks[1].fc.bias.detach().abs().max()) == 0.0
    assert "a=0.2" in advice.init_code("x", "kaiming", nonlinearity="leaky_relu", negative_slope=0.2)
    assert advice.init_code("x#2", "xavier") == "nn.init.xavier_normal_(model.x.weight)"
    with pytest.raises(ValueError):
        advice.init_code("x", "lsuv")


def test_loss_scale_is_the_largest_safe_power_of_two_minus_one_binade() -> None:
    g = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 1e-9
    stats = Stats(tensor_stats(g))
    result = advice.loss_scale_from_stats([stats], "fp16")
    assert result is not None
    k_max = math.floor(math.log2(65504 / float(g.abs().max())))
    assert result["max_exponent_no_overflow"] == k_max
    assert result["exponent"] == k_max - 1
    # Checked by actually casting: no overflow, and (almost) nothing flushes.
    scaled = (g * 2.0 ** result["exponent"]).half()
    assert torch.isfinite(scaled).all()
    flushed = float(((scaled == 0) & (g != 0)).float().mean())
    assert flushed == pytest.approx(result["flushed_frac"], abs=0.01)
    unscaled_flushed = float(((g.half() == 0) & (g != 0)).float().mean())
    assert unscaled_flushed == pytest.approx(result["unscaled_flushed_frac"], abs=0.02)
    assert result["default_exponent"] == 16 and not result["default_overflows"]
    assert result["code"] == f'scaler = torch.amp.GradScaler("cuda", init_scale=2.0**{result["exponent"]})'


def test_loss_scale_says_when_gradscaler_default_overflows() -> None:
    g = torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 10.0
    result = advice.loss_scale_from_stats([Stats(tensor_stats(g))], "fp16")
    assert result is not None and result["default_overflows"]
    assert result["exponent"] < 16
    assert not torch.isinf((g * 2.0 ** result["exponent"]).half()).any()
    assert advice.loss_scale_from_stats([Stats(tensor_stats(torch.zeros(10)))]) is None


def test_clip_threshold_autoclip_percentile_and_few_norms() -> None:
    norms = [float(n) for n in range(1, 101)]
    result = advice.clip_threshold(norms)
    assert result is not None
    # 10th percentile of 1..100 with linear interpolation: 1 + 0.1·99 = 10.9.
    assert result["threshold"] == pytest.approx(10.9)
    assert "AutoClip" in result["method"]
    few = advice.clip_threshold([2.0, 4.0, 100.0])
    assert few is not None and few["threshold"] == pytest.approx(8.0)  # 2 x median
    assert "max_norm=8" in few["code"]
    assert advice.clip_threshold([]) is None


def test_global_grad_norm_matches_torch() -> None:
    g1, g2 = torch.randn(30, 40), torch.randn(7)
    expected = float(torch.sqrt(g1.pow(2).sum() + g2.pow(2).sum()))
    got = advice.global_grad_norm([Stats(tensor_stats(g1)), Stats(tensor_stats(g2))])
    assert got == pytest.approx(expected, rel=1e-6)
