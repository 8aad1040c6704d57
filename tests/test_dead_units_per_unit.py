"""Dead ReLU units judged per unit (gradscope.liveness), not by the whole tensor's zero fraction.

Each pathological case is counted by hand (a hook taking amax over every axis but
the unit axis) and must be named with that count, its measured cause and a fix
that cures when executed; healthy torch / transformers / MONAI models with ReLU
must show no dead-units finding.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import pytest
import torch
from diagnose_models import kaiming, mlp, one_thread  # noqa: F401 (one_thread: autouse fixture)
from torch import nn

from gradscope.auditing import audit
from gradscope.record import Record
from gradscope.report import Report

if TYPE_CHECKING:
    from gradscope.liveness import UnitLiveness

# gradscope.liveness is imported inside the tests that use it, so that every test
# fails on its own assertion (not on the import) against the code before it.


def _dead_by_hand(model: nn.Module, name: str, x: torch.Tensor, axis: int) -> tuple[int, int]:
    got: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: got.__setitem__("o", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    out = got["o"]
    others = [d for d in range(out.dim()) if d != axis]
    return int((out.amax(dim=others) <= 0).sum()), out.shape[axis]


def _finding(report: Report, code: str = "dead-units") -> object:
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, [f.code for f in report.findings]
    return found[0]


def _cures(report: Report, model: nn.Module, **audit_kwargs: object) -> None:
    """Execute the dead-units snippet on the model, then re-audit: no dead-units left."""
    finding = _finding(report)
    assert finding.fix is not None
    exec(finding.fix.code, {"nn": nn, "torch": torch, "model": model})
    assert "dead-units" not in audit(model, **audit_kwargs).codes()


# -- the unit axis -------------------------------------------------------------------


def test_unit_axis_rule() -> None:
    from gradscope.liveness import CHANNELS_FIRST, FEATURES_LAST, unit_axis

    assert unit_axis(2, None) == 1 and unit_axis(2, CHANNELS_FIRST) == 1  # (N, C)
    assert unit_axis(4, CHANNELS_FIRST) == 1 and unit_axis(4, None) == 1  # (N, C, H, W)
    assert unit_axis(3, FEATURES_LAST) == 2  # transformers' (N, L, C)
    assert unit_axis(1, None) == 0


@pytest.mark.parametrize(
    ("build", "x", "site", "axis"),
    [
        # Linear (N, C): 40 of 64 units behind a bias of -30
        (lambda: nn.Sequential(nn.Linear(16, 64), nn.ReLU()), torch.randn(32, 16), "1", 1),
        # Conv (N, C, H, W): channels on dim 1, not the last (W) axis
        (lambda: nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()), torch.randn(4, 3, 8, 8), "1", 1),
        # Linear on (N, L, C): features on the last axis, not dim 1 (L)
        (lambda: nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.0), nn.ReLU()), torch.randn(4, 8, 16), "2", 2),
    ],
)
def test_per_unit_counts_match_a_hand_count(build: object, x: torch.Tensor, site: str, axis: int) -> None:
    torch.manual_seed(0)
    model = build()  # type: ignore[operator]
    with torch.no_grad():
        model[0].bias[:40] = -30.0
    dead, units = _dead_by_hand(model, site, x, axis)
    assert (dead, units) == (40, 64)
    record = audit(model, inputs=x).record
    liveness = record.layer(site).units
    assert liveness is not None and liveness.axis == axis
    assert (liveness.dead, liveness.units) == (40, 64)
    assert liveness.dead_indices() == list(range(40))
    shape = record.layer(site).output_shape or []
    assert liveness.positions == math.prod(s for d, s in enumerate(shape) if d != axis)


def test_liveness_merges_over_batches_and_round_trips_json() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
    with torch.no_grad():
        model[0].bias[:10] = -30.0
    report = audit(model, input_shape=(16, 8), batches=3)
    liveness = report.record.layer("1").units
    assert liveness is not None and liveness.positions == 3 * 16 and liveness.dead == 10
    back = Record.from_dict(json.loads(json.dumps(report.record.to_dict())))
    again = back.layer("1").units
    assert again is not None and again.dead_indices() == list(range(10)) and again.positions == 48
    # the merge is an OR of "fired": a unit that fired in either part is alive
    from gradscope.liveness import UnitLiveness

    other = UnitLiveness(1, torch.zeros(32, dtype=torch.bool), 16)
    other.fired[:5] = True
    assert again.merge(other).dead == 5 and again.merge(other).positions == 64


# -- the field cases ---------------------------------------------------------------


def test_mlp_with_221_of_256_dead_units_is_named_with_its_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        model[2].bias[:220] = -50.0
    x = torch.randn(64, 64)
    dead, units = _dead_by_hand(model, "3", x, 1)
    assert (dead, units) == (221, 256)  # 220 by the bias, one more by chance
    report = audit(model, inputs=x)
    finding = _finding(report)
    assert finding.layers == ["3"] and finding.severity == "warning"
    assert "221 of 256 units of '3'" in finding.message
    assert finding.evidence["dead_units"] == 221 and finding.evidence["zero_frac"] < 0.95  # the old rule missed it
    cause = finding.evidence["cause"]
    assert cause["kind"] == "bias" and cause["producer"] == "2"
    assert cause["dead_shift_median"] == -50.0 and cause["shift_in_stds"] < -50
    # the layer whose weights are at default init is not blamed: its bias is the cause
    assert "poor-init" not in report.codes()
    assert "nn.init.zeros_(model[2].bias)" in finding.fix.code
    _cures(report, model, inputs=x)


def _monai_unet() -> nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(
        spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
        num_res_units=1, act="relu", norm="batch",
    )  # fmt: skip


UNET_RELU = "model.1.submodule.0.conv.unit0.adn.A"
UNET_BN = "model.1.submodule.0.conv.unit0.adn.N"


def test_monai_unet_with_12_of_16_dead_channels_is_named_with_its_batchnorm_beta() -> None:
    pytest.importorskip("monai")
    model = _monai_unet()
    with torch.no_grad():
        model.get_submodule(UNET_BN).bias[:12] = -10.0
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    assert _dead_by_hand(model, UNET_RELU, x, 1) == (12, 16)
    report = audit(model, inputs=x)
    finding = _finding(report)
    assert finding.layers == [UNET_RELU]
    assert f"12 of 16 units of '{UNET_RELU}'" in finding.message
    assert finding.evidence["zero_frac"] < 0.95  # 0.876: the whole-tensor rule called it healthy
    cause = finding.evidence["cause"]
    assert cause["kind"] == "batchnorm-beta" and cause["producer"] == UNET_BN
    assert cause["shift_in_stds"] == pytest.approx(-10.0)  # beta -10 over gamma 1
    _cures(report, model, inputs=x)


def test_hf_resnet_with_a_dead_stage_is_an_error_at_the_right_relu() -> None:
    pytest.importorskip("transformers")
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
    model = ResNetForImageClassification(config)
    block = "resnet.encoder.stages.1.layers.0.layer.0"
    with torch.no_grad():
        model.get_submodule(f"{block}.normalization").bias.fill_(-10.0)
    report = audit(model, input_shape=(4, 3, 32, 32))
    finding = _finding(report)
    assert finding.severity == "error" and finding.layers[0] == f"{block}.activation"
    assert finding.evidence["dead_units"] == finding.evidence["units"] == 8
    assert finding.evidence["cause"]["kind"] == "batchnorm-beta"
    # the ReLU after it dies of it (no input signal): no second, wrong fix for that one
    assert finding.evidence["per_layer"]["resnet.encoder.stages.1.layers.0.layer.1.activation"]["cause"] == "upstream"
    assert "LeakyReLU" not in finding.fix.code
    _cures(report, model, input_shape=(4, 3, 32, 32))


def test_dead_units_without_a_shift_get_leaky_relu_that_cures() -> None:
    # All-negative weights on positive inputs: no bias involved, the weights kill the units.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight[:24].copy_(-model[0].weight[:24].abs())
        model[0].bias.zero_()
    x = torch.rand(64, 16)
    dead, _ = _dead_by_hand(model, "1", x, 1)
    assert dead >= 24
    report = audit(model, inputs=x)
    finding = _finding(report)
    assert finding.evidence["dead_units"] == dead and finding.evidence["cause"]["kind"] == "unknown"
    assert "model.set_submodule('1', nn.LeakyReLU(0.01))" in finding.fix.code
    _cures(report, model, inputs=x)


# -- healthy models: no unit flagged -----------------------------------------------


def _relu_liveness(report: Report) -> list[UnitLiveness]:
    """The per-unit liveness of every ReLU seen on enough outputs per unit to be judged."""
    found = [layer.units for layer in report.record.layers if layer.type == "ReLU"]
    assert found and all(u is not None for u in found)
    from gradscope.diagnose.thresholds import DEAD_UNITS_MIN_POSITIONS

    judged = [u for u in found if u is not None and u.positions >= DEAD_UNITS_MIN_POSITIONS]
    assert judged
    return judged


def test_healthy_kaiming_mlp_has_no_dead_unit() -> None:
    torch.manual_seed(0)
    report = audit(mlp(4, init=kaiming), input_shape=(64, 64))
    liveness = _relu_liveness(report)
    # The first ReLU sees independent inputs: P(a unit is <= 0 on all 64) = 2^-64.  Deeper
    # ones see correlated samples and may lose a unit or two (test below), far from the limit.
    assert liveness[0].dead == 0 and all(u.dead <= 0.05 * u.units for u in liveness)
    assert "dead-units" not in report.codes()


def test_healthy_deep_kaiming_mlp_is_not_flagged_for_correlated_samples() -> None:
    # Deep ReLU layers see correlated samples: 30-40% of units stay off for the batch, never over half.
    torch.manual_seed(0)
    report = audit(mlp(30, init=kaiming), input_shape=(64, 64))
    fractions = [u.dead / u.units for u in _relu_liveness(report)]
    assert max(fractions) > 0.2 and max(fractions) < 0.5
    assert "dead-units" not in report.codes()


@pytest.mark.slow
def test_healthy_real_relu_models_have_no_dead_units() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("monai")
    from transformers import BertConfig, BertForSequenceClassification, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    resnet = ResNetForImageClassification(
        ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
    )
    # BatchNorm centres every channel over the batch before each ReLU: no channel can be off for all of it
    report = audit(resnet, input_shape=(4, 3, 32, 32))
    assert all(u.dead == 0 for u in _relu_liveness(report)) and "dead-units" not in report.codes()
    unet = _monai_unet()
    report = audit(unet, input_shape=(2, 1, 32, 32))
    assert all(u.dead == 0 for u in _relu_liveness(report)) and "dead-units" not in report.codes()
    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_act="relu",
            num_labels=3,
        )  # fmt: skip
    )
    report = audit(bert, input_shape=(2, 16), input_dtype=torch.int64, vocab=100)
    liveness = _relu_liveness(report)
    assert all(u.axis == 2 and u.units == 64 for u in liveness)  # (N, L, C): the features, not L = 16
    assert all(u.dead <= 2 for u in liveness) and "dead-units" not in report.codes()


def test_watch_counts_dead_units_on_sampled_steps_and_does_not_reset_trained_biases() -> None:
    import gradscope

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        model[0].bias[:100] = -30.0
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scope = gradscope.watch(model, every=2, raise_on=(), on_finding=lambda f: None)
    for _ in range(4):
        x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        scope.step()
        opt.step()
    report = scope.close()
    liveness = report.record.layer("1").units
    assert liveness is not None and liveness.dead == 100 and liveness.units == 128
    finding = _finding(report)
    assert "100 of 128 units of '1'" in finding.message and finding.evidence["cause"]["kind"] == "bias"
    # the bias is being trained: the advice lets negative inputs pass instead of re-initialising it
    assert "zeros_" not in finding.fix.code and "LeakyReLU" in finding.fix.code
