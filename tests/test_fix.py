"""gradscope.fix.apply_init: Kaiming, Xavier, auto (what the diagnosis recommends) and LSUV."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from diagnose_models import ResNet, kaiming, mlp, normal, one_thread, xavier  # noqa: F401 (one_thread: autouse fixture)
from torch import nn

from gradscope.auditing import audit
from gradscope.errors import InputError
from gradscope.fix import apply_init

DEPTH_CODES = {"vanishing-gradient", "exploding-gradient", "vanishing-activations", "exploding-activations"}


def _linear_output_stds(model: nn.Sequential, x: torch.Tensor) -> list[float]:
    stds = []
    with torch.no_grad():
        for module in model:
            x = module(x)
            if isinstance(module, nn.Linear):
                stds.append(float(x.std()))
    return stds


def test_lsuv_gives_unit_output_std_in_every_layer_and_a_healthy_reaudit(
    assert_no_hooks: Callable[[nn.Module], None],
) -> None:
    model = mlp(30, init=normal(0.01))
    batch = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))
    before = audit(model, inputs=batch)
    assert "vanishing-gradient" in before.codes()
    changes = apply_init(model, "lsuv", inputs=batch)
    assert_no_hooks(model)
    assert [c["layer"] for c in changes] == [str(i) for i in range(0, 59, 2)]
    assert all(c["scheme"] == "lsuv" and c["tries"] <= 10 for c in changes)
    stds = _linear_output_stds(model, batch)
    assert len(stds) == 30
    assert all(0.9 <= s <= 1.1 for s in stds), stds
    after = audit(model, inputs=batch)
    assert not DEPTH_CODES & after.codes()


def test_lsuv_generalises_to_a_fresh_batch() -> None:
    model = mlp(30, init=normal(0.01))
    apply_init(model, "lsuv", input_shape=(128, 64), seed=3)
    stds = _linear_output_stds(model, torch.randn(128, 64, generator=torch.Generator().manual_seed(9)))
    assert all(0.8 <= s <= 1.25 for s in stds), stds


def test_auto_fixes_xavier_relu_stack_with_kaiming_and_leaves_the_head_xavier() -> None:
    model = mlp(30, init=xavier)
    assert "vanishing-gradient" in audit(model, input_shape=(64, 64)).codes()
    changes = apply_init(model, "auto", input_shape=(64, 64))
    by_layer = {c["layer"]: c for c in changes}
    # Every hidden Linear (followed by ReLU) moves to Kaiming: std sqrt(2/fan_in).
    assert set(by_layer) == {str(i) for i in range(0, 57, 2)}
    for name, change in by_layer.items():
        fan_in = model[int(name)].in_features
        assert change["scheme"] == "kaiming"
        assert change["new_std"] == pytest.approx(math.sqrt(2 / fan_in), rel=0.1)
        assert change["old_std"] == pytest.approx(math.sqrt(2 / (fan_in + 128)), rel=0.1)
    assert "58" not in by_layer  # the head: Xavier already is the recommendation
    after = audit(model, input_shape=(64, 64))
    assert not DEPTH_CODES & after.codes()
    assert "poor-init" not in after.codes()


def test_auto_leaves_normalised_layers_and_healthy_models_alone() -> None:
    model = mlp(30, init=kaiming)
    assert apply_init(model, "auto", input_shape=(64, 64)) == []
    # PyTorch's default init in a 3-layer MLP is off Kaiming's std, but harmless: no change.
    assert apply_init(mlp(3), "auto", input_shape=(64, 64)) == []
    resnet = ResNet()
    changed = {c["layer"] for c in apply_init(resnet, "auto", input_shape=(16, 3, 16, 16))}
    assert not any("conv" in name or name == "stem" for name in changed)  # followed by BatchNorm


def test_explicit_schemes_and_layer_selection() -> None:
    model = mlp(3, init=normal(1.0))
    changes = apply_init(model, "xavier", layers=["2"])
    assert [c["layer"] for c in changes] == ["2"]
    assert changes[0]["new_std"] == pytest.approx(math.sqrt(2 / 256), rel=0.1)
    assert float(model[0].weight.detach().std()) == pytest.approx(1.0, rel=0.1)  # untouched
    changes = apply_init(model, "kaiming")
    assert [c["layer"] for c in changes] == ["0", "2", "4"]
    assert float(model[2].bias.detach().abs().max()) == 0.0


def test_apply_init_restores_modes_and_rng(assert_no_hooks: Callable[[nn.Module], None]) -> None:
    model = ResNet()
    model.eval()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    running = model.bn.running_mean.clone()
    apply_init(model, "lsuv", input_shape=(8, 3, 16, 16))
    assert not model.training and not any(m.training for m in model.modules())
    assert torch.equal(model.bn.running_mean, running)
    assert torch.equal(torch.rand(3), expected)
    assert_no_hooks(model)


def test_unknown_scheme_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unknown init scheme"):
        apply_init(mlp(2), "he")


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_lsuv_removes_its_hooks_when_the_forward_raises(assert_no_hooks: Callable[[nn.Module], None]) -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), _Boom(), nn.Linear(16, 4))
    with pytest.raises(InputError, match="RuntimeError: boom"):
        apply_init(model, "lsuv", input_shape=(8, 16))
    assert_no_hooks(model)
    assert model.training
