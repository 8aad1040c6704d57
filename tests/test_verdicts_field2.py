"""Field verdicts, second round: an init finding whose fix cures nothing (a squeeze-excitation
gate measured as a variance gain), and ratios measured from a near-zero input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradscope.auditing import audit
from gradscope.diagnose import thresholds as th
from gradscope.init_cure import band_distance, cures
from gradscope.report import Report
from tests.diagnose_models import one_thread  # noqa: F401  (an autouse fixture)


def _poor_init(report: Report) -> list:
    return [f for f in report.findings if f.code == "poor-init"]


# -- 1. a poor-init finding is issued only when its fix cures the measurement -------------


def test_cure_means_half_way_back_to_the_band_in_decades() -> None:
    # 1e4 is 2 decades above the band's top (1e2): half-way is 1e3 or nearer.
    assert band_distance(1e4) == pytest.approx(2.0, abs=1e-12)
    assert band_distance(1e-4) == pytest.approx(2.0, abs=1e-12)
    assert band_distance(1.0) == 0.0
    assert cures(1e4, 1.0) and cures(1e4, 1e3) and cures(1e-4, 1e-3)
    assert not cures(1e4, 2e3) and not cures(1e4, 1e4) and not cures(1e4, None)


def _regnet(**config: object) -> nn.Module:
    from transformers import RegNetConfig, RegNetForImageClassification

    torch.manual_seed(0)
    return RegNetForImageClassification(RegNetConfig(depths=[1, 1, 1, 1], **config)).eval()


REGNETS = {
    # The field's model: the default widths (128-1088 channels, SE layers), one block per stage.
    "default_widths": {},
    "small": {"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "groups_width": 8},
}


@pytest.mark.slow
@pytest.mark.parametrize("config", list(REGNETS))
def test_regnet_se_gate_gets_no_poor_init_in_eval_mode(config: str) -> None:
    """In eval mode, RegNet's BatchNorms at their initial running statistics are identities, the
    pooled input of each squeeze-excitation block is small, and its sigmoid puts out at least
    sigmoid(0)^2 = 1/4 of second moment whatever the conv weights: the measured "gain" of the SE
    pair (field: 646) is the input's smallness.  The old rule named an SE conv; its advised
    Kaiming re-init changed the measurement by less than 1%."""
    model = _regnet(**REGNETS[config])
    report = audit(model, input_shape=(2, 3, 64, 64), mode="eval")
    assert _poor_init(report) == []
    checked = report.analysis["init_fix_check"]["findings"]
    assert checked, "the SE pair's measured gain is out of band: its fix was tried"
    for entry in checked:
        assert all(".attention." in name for name in entry["layers"])
        assert entry["measured_gain"] > th.INIT_STACK_HIGH
        assert entry["after_fix"] == pytest.approx(entry["measured_gain"], rel=0.05)
        assert entry["cures"] is False
    assert not any(r["flag"] for r in report.analysis["init"])


@pytest.mark.slow
def test_regnet_with_a_bad_head_is_still_caught_and_its_fix_cures_it() -> None:
    """Train mode (BatchNorm on batch statistics): the pooled features are O(1), so a head at
    100x its init puts out logits of std ~30 (poor-init through the logit rule), and the fix
    that the audit keeps cures it."""
    model = _regnet(**REGNETS["small"], num_labels=10).train()
    with torch.no_grad():
        model.classifier[1].weight.mul_(100.0)
    findings = _poor_init(audit(model, input_shape=(2, 3, 64, 64)))
    assert [f.layers for f in findings] == [["classifier.1"]]
    exec(findings[0].fix.code, {"model": model, "nn": nn})
    assert _poor_init(audit(model, input_shape=(2, 3, 64, 64))) == []


def _stack(scale: float) -> nn.Sequential:
    """A Kaiming ReLU stack of 6 layers, the third at ``scale``x, into a linear head."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(6):
        linear = nn.Linear(64, 64)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        if i == 2:
            with torch.no_grad():
                linear.weight.mul_(scale)
        layers += [linear, nn.ReLU()]
    layers.append(nn.Linear(64, 10))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("scale", [0.05, 20.0])
def test_a_real_misscaled_layer_is_kept_after_its_fix_is_tried(scale: float) -> None:
    model = _stack(scale)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    report = audit(model, inputs=x)
    findings = _poor_init(report)
    assert len(findings) == 1 and "4" in findings[0].layers
    entry = report.analysis["init_fix_check"]["findings"][0]
    # He et al. 2015: the re-initialised layer's gain is ≈ 1, so the stack comes back in band.
    assert entry["cures"] is True
    assert th.INIT_STACK_LOW <= entry["after_fix"] <= th.INIT_STACK_HIGH
    assert findings[0].evidence["measured_gain_after_fix"] == entry["after_fix"]
    before = copy.deepcopy(model.state_dict())
    exec(findings[0].fix.code, {"model": model, "nn": nn})
    assert _poor_init(audit(model, inputs=x)) == []
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_other_se_architectures_stay_free_of_poor_init(mode: str) -> None:
    from monai.networks.nets import SEResNet50

    torch.manual_seed(0)
    monai_se = SEResNet50(spatial_dims=2, in_channels=3, num_classes=10, layers=(1, 1, 1, 1))
    assert _poor_init(audit(monai_se, input_shape=(2, 3, 32, 32), mode=mode)) == []
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(0)
    effnet = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0", num_classes=10, image_size=32)
    assert _poor_init(audit(effnet, input_shape=(2, 3, 32, 32), mode=mode)) == []


def test_check_fixes_off_keeps_the_weight_rule() -> None:
    """``check_fixes=False`` is the unchecked rule: the finding comes from the weights alone."""
    model = _stack(0.05)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    report = audit(model, inputs=x, check_fixes=False)
    assert len(_poor_init(report)) == 1
    assert "init_fix_check" not in report.analysis
    assert math.isfinite(_poor_init(report)[0].evidence["measured_gain_end_to_end"])
