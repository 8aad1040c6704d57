"""A piecewise-linear layer fed by the output recorded just before takes its exact
extremes from that output's (gradscope.extremes_through): the same numbers as
reading the output whole, one pass less, and never when code between the two
layers changed the tensor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradscope.extremes_through import extremes_through
from gradscope.recorder import Recorder

LAYERS = {
    "relu": lambda: nn.ReLU(),
    "relu-inplace": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(),
    "hardtanh": lambda: nn.Hardtanh(-2.0, 3.0),
    "leaky": lambda: nn.LeakyReLU(0.1),
    "leaky-inplace": lambda: nn.LeakyReLU(0.2, inplace=True),
    "identity": lambda: nn.Identity(),
}
INPUTS = {
    "finite": None,
    "nan": math.nan,
    "+inf": math.inf,
    "-inf": -math.inf,
}


class _Pair(nn.Module):
    def __init__(self, act: nn.Module, poison: float | None, between: float | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 48)
        self.act = act
        self.poison = poison
        self.between = between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.poison is not None:
            with torch.no_grad():
                self.fc.bias[3] = self.poison  # the next forward's fc output holds it in every row
        if self.between is not None:
            h.mul_(self.between)  # unhooked code that changes fc's output in place
        return self.act(h)


def _record(model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list[torch.Tensor]]:
    """Recorded extremes per (layer, role), the exact ones of the act layer's output,
    and how many whole-tensor extreme reads the hooks made."""
    outputs: list[torch.Tensor] = []
    model.act.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
    reads: list[int] = []
    real = torch.aminmax

    def counted(t: torch.Tensor, *args: object, **kwargs: object) -> object:
        reads.append(t.numel())
        return real(t, *args, **kwargs)

    with Recorder(model, sample=64) as rec:
        model(x)  # the poison (if any) lands in the bias now
        outputs.clear()
        rec.start()
        monkeypatch.setattr(torch, "aminmax", counted)
        model(x)
        monkeypatch.undo()
        record = rec.finish()
    act = record.layer("act").activation
    assert act is not None
    return {"min": act.min, "max": act.max, "reads": len([n for n in reads if n == 16 * 48])}, outputs


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("poison", sorted(INPUTS))
def test_derived_extremes_equal_the_exact_ones(layer: str, poison: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = _Pair(LAYERS[layer](), INPUTS[poison])
    got, outputs = _record(model, torch.randn(16, 32), monkeypatch)
    lo, hi = torch.aminmax(outputs[0])
    assert _same(got["min"], float(lo)) and _same(got["max"], float(hi)), (got, float(lo), float(hi))
    assert got["reads"] == 1  # fc's output read whole; the act layer's extremes came from it


@pytest.mark.parametrize("layer", ["relu", "relu-inplace", "leaky"])
def test_code_between_the_layers_is_seen(layer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = _Pair(LAYERS[layer](), None, between=-1e30)  # flips signs and scales: fc's extremes no longer apply
    got, outputs = _record(model, torch.randn(16, 32), monkeypatch)
    lo, hi = torch.aminmax(outputs[0])
    assert got["min"] == float(lo) and got["max"] == float(hi)
    assert got["reads"] == 2  # the version counter said the input changed: read whole


def test_only_piecewise_linear_non_decreasing_torch_layers() -> None:
    class MyReLU(nn.ReLU):
        pass

    for module in (nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.SiLU(), nn.LeakyReLU(-0.5), MyReLU(), nn.Dropout()):
        assert extremes_through(module) is None, module
    for module in (nn.ReLU(), nn.ReLU6(), nn.Hardtanh(), nn.LeakyReLU(0.0), nn.Identity()):
        assert extremes_through(module) is not None, module
