"""The depth and init analysis against closed-form theory, and the diagnosis contract."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diagnose_models import kaiming, mlp, one_thread, xavier  # noqa: F401 (one_thread: autouse fixture)
from torch import nn

from gradscope.auditing import audit
from gradscope.diagnose import diagnose, diagnose_record
from gradscope.errors import InputError
from gradscope.recorder import Recorder
from gradscope.report import Report, Severity

DEPTH_KEYS = {
    "name", "index", "type", "activation_std", "gradient_rms", "forward_gain", "backward_gain",
    "cum_forward_gain", "cum_backward_gain",
}  # fmt: skip
INIT_KEYS = {
    "name", "type", "fan_in", "fan_out", "weight_std", "activation_after", "predicted_gain", "measured_gain",
    "scheme", "recommended_std", "code",
}  # fmt: skip


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def test_analysis_has_the_contract_shape() -> None:
    report = audit(mlp(4, init=kaiming), input_shape=(64, 64))
    analysis = report.analysis
    assert set(analysis) >= {
        "depth",
        "first_unhealthy_forward",
        "first_unhealthy_backward",
        "init",
        "loss_scale",
        "clip",
    }
    assert [row["name"] for row in analysis["depth"]] == [layer.name for layer in report.layers]
    for row in analysis["depth"]:
        assert DEPTH_KEYS <= set(row)
    assert [row["name"] for row in analysis["init"]] == ["0", "2", "4", "6"]
    for row in analysis["init"]:
        assert INIT_KEYS <= set(row)
    json.dumps(report.to_dict(), allow_nan=False)  # JSON-safe


def test_kaiming_predicts_and_measures_gain_one_per_linear_relu_pair() -> None:
    report = audit(mlp(30, init=kaiming), input_shape=(128, 64))
    hidden = [row for row in report.analysis["init"] if row["activation_after"] == "relu"]
    assert len(hidden) == 29
    for row in hidden:
        # n_in·Var[w]·1/2 with Var[w] = 2/n_in: 1, up to the sampling error of Var[w].
        assert row["predicted_gain"] == pytest.approx(1.0, rel=0.1)
        assert row["scheme"] == "kaiming"
        assert row["recommended_std"] == pytest.approx(math.sqrt(2 / row["fan_in"]))
        assert not row["off_recommendation"]
    assert 0.8 < _geomean([row["measured_gain"] for row in hidden]) < 1.25


def test_default_init_predicts_a_sixth_per_layer_under_relu() -> None:
    report = audit(mlp(6), input_shape=(128, 64))
    hidden = [row for row in report.analysis["init"] if row["activation_after"] == "relu"]
    for row in hidden:
        # kaiming_uniform_(a=√5): Var[w] = 1/(3·fan_in), times ReLU's 1/2.
        assert row["predicted_gain"] == pytest.approx(1 / 6, rel=0.1)
    # The first pair sees N(0,1) inputs, where the small default bias barely adds.
    assert hidden[0]["measured_gain"] == pytest.approx(1 / 6, rel=0.2)


def test_xavier_predicts_n_in_gamma_on_a_linear_stack() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 32), nn.Linear(32, 32))
    for layer in model:
        xavier(layer)
    report = audit(model, input_shape=(128, 64), loss="mean")
    for row in report.analysis["init"]:
        n_in, n_out = row["fan_in"], row["fan_out"]
        assert row["activation_after"] == "identity"
        assert row["predicted_gain"] == pytest.approx(n_in * 2 / (n_in + n_out), rel=0.1)
        assert row["measured_gain"] == pytest.approx(row["predicted_gain"], rel=0.2)


def test_relu_forward_gain_matches_the_half_normal_variance() -> None:
    report = audit(mlp(8, init=kaiming), input_shape=(128, 64))
    relu_rows = [row for row in report.analysis["depth"] if row["type"] == "ReLU"]
    # Var[relu(y)] / Var[y] = 1/2 - 1/(2π) for y ~ N(0, s^2).
    expected = 0.5 - 1 / (2 * math.pi)
    assert _geomean([row["forward_gain"] for row in relu_rows]) == pytest.approx(expected, rel=0.1)


def test_cumulative_backward_gain_is_the_product_of_the_gains() -> None:
    report = audit(mlp(12, init=xavier), input_shape=(64, 64))
    rows = report.analysis["depth"]
    assert rows[-1]["cum_backward_gain"] == pytest.approx(1.0)
    for t in range(len(rows) - 1):
        product = math.prod(row["backward_gain"] for row in rows[t + 1 :])
        assert rows[t]["cum_backward_gain"] == pytest.approx(product, rel=1e-9)


def test_first_unhealthy_backward_is_where_the_product_leaves_the_band() -> None:
    report = audit(mlp(30, init=xavier), input_shape=(64, 64))
    name = report.analysis["first_unhealthy_backward"]
    rows = {row["name"]: row for row in report.analysis["depth"]}
    assert name is not None and rows[name]["type"] == "Linear"
    # Backward order: every parametrised layer closer to the loss is still within two decades.
    later = [r for r in report.analysis["depth"] if r["type"] == "Linear" and r["index"] > rows[name]["index"]]
    head = report.analysis["depth"][-1]
    width_factor = math.sqrt(128 / 10)  # the envelope allows the head's 10 vs 128 width
    for row in later[:-1]:
        assert row["gradient_rms"] / head["gradient_rms"] * width_factor >= 1e-2
    assert rows[name]["gradient_rms"] / head["gradient_rms"] < 1e-2


def test_diagnose_record_works_on_a_bare_record() -> None:
    model = mlp(30, init=xavier)
    with Recorder(model) as recorder:  # no inputs recorded, as in watch
        recorder.start()
        loss = nn.functional.cross_entropy(model(torch.randn(64, 64)), torch.randint(0, 10, (64,)))
        loss.backward()
        recorder.capture_parameters()
        record = recorder.finish()
    findings, analysis = diagnose_record(record)
    assert "vanishing-gradient" in {f.code for f in findings}
    assert analysis["init"] and all(row["measured_gain"] is not None for row in analysis["init"][1:])
    ranks = [Severity(f.severity).rank for f in findings]
    assert ranks == sorted(ranks, reverse=True)


def test_diagnosis_survives_a_json_round_trip() -> None:
    report = audit(
        mlp(10, act=nn.Sigmoid, init=lambda layer: nn.init.normal_(layer.weight, 0, 0.01)), input_shape=(64, 64)
    )
    again = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    diagnose(again)
    assert [(f.code, f.severity, f.layers) for f in again.findings] == [
        (f.code, f.severity, f.layers) for f in report.findings
    ]


def test_unknown_format_is_an_input_error() -> None:
    report = audit(mlp(2), input_shape=(8, 64), diagnose=False)
    with pytest.raises(InputError, match="unknown format"):
        diagnose_record(report.record, formats=("fp17",))
