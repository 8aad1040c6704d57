"""The fixes are pasteable: executing a finding's snippet on the model cures the finding."""

from __future__ import annotations

import pytest
import torch
from diagnose_models import Log, kaiming, mlp, normal, one_thread, xavier  # noqa: F401 (one_thread: autouse fixture)
from torch import nn

from gradscope.auditing import audit
from gradscope.report import Report, Severity

DEPTH_CODES = {"vanishing-gradient", "exploding-gradient", "vanishing-activations", "exploding-activations"}


def _run_fix(report: Report, code: str, model: nn.Module) -> None:
    finding = next(f for f in report.findings if f.code == code)
    assert finding.fix is not None and finding.fix.code
    exec(finding.fix.code, {"nn": nn, "torch": torch, "model": model})


def _loud(report: Report) -> set[str]:
    return {f.code for f in report.findings if Severity(f.severity) in (Severity.ERROR, Severity.WARNING)}


def _pathologies() -> list[tuple[str, Report]]:
    torch.manual_seed(0)
    dead = mlp(3, init=kaiming, d_in=32)
    with torch.no_grad():
        dead[0].bias.fill_(-20.0)
    return [
        ("sigmoid", audit(mlp(10, act=nn.Sigmoid, init=normal(0.01)), input_shape=(64, 64))),
        ("xavier", audit(mlp(30, init=xavier), input_shape=(64, 64))),
        ("exploding", audit(mlp(10, init=normal(1.0)), input_shape=(64, 64))),
        ("overflow", audit(mlp(3, init=kaiming, d_in=32), inputs=torch.randn(64, 32) * 2e5)),
        ("nan", audit(nn.Sequential(nn.Linear(32, 64), Log(), nn.Linear(64, 10)), input_shape=(64, 32))),
        ("dead", audit(dead, input_shape=(64, 32))),
        ("saturated", audit(mlp(3, act=nn.Tanh, init=normal(5.0)), input_shape=(64, 64))),
    ]


def test_every_warning_and_error_of_every_pathology_has_a_snippet() -> None:
    for name, report in _pathologies():
        loud = [f for f in report.findings if Severity(f.severity) in (Severity.ERROR, Severity.WARNING)]
        assert loud, name
        for f in loud:
            assert f.fix is not None and f.fix.summary and f.fix.code.strip(), (name, f.code)
            compile(f.fix.code, f"<fix for {f.code}>", "exec")  # valid Python


def test_per_layer_init_snippet_cures_an_exploding_stack() -> None:
    model = mlp(5, init=normal(1.0))
    report = audit(model, input_shape=(64, 64))
    assert {"exploding-gradient", "poor-init"} <= _loud(report)
    _run_fix(report, "poor-init", model)
    assert not (DEPTH_CODES | {"poor-init"}) & _loud(audit(model, input_shape=(64, 64)))


def test_vanishing_fix_cures_the_xavier_relu_stack() -> None:
    model = mlp(30, init=xavier)
    report = audit(model, input_shape=(64, 64))
    _run_fix(report, "vanishing-gradient", model)
    assert not DEPTH_CODES & _loud(audit(model, input_shape=(64, 64)))


def test_sigmoid_fix_swaps_the_activation_and_cures_vanishing() -> None:
    model = mlp(10, act=nn.Sigmoid, init=normal(0.01))
    report = audit(model, input_shape=(64, 64))
    _run_fix(report, "vanishing-gradient", model)
    assert not any(isinstance(m, nn.Sigmoid) for m in model.modules())
    assert not DEPTH_CODES & _loud(audit(model, input_shape=(64, 64)))


@pytest.mark.parametrize("code", ["dead-units", "saturated-units"])
def test_unit_fixes_cure_their_finding(code: str) -> None:
    if code == "dead-units":
        model = mlp(3, init=kaiming, d_in=32)
        with torch.no_grad():
            model[0].bias.fill_(-20.0)
        shape = (64, 32)
    else:
        model = mlp(3, act=nn.Tanh, init=normal(5.0))
        shape = (64, 64)
    report = audit(model, input_shape=shape)
    _run_fix(report, code, model)
    assert code not in audit(model, input_shape=shape).codes()
