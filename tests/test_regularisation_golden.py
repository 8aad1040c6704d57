"""The regularisation findings (weight-decay, l1-not-sparse, train-mode-inference, overfitting, dropout)
rendered to Markdown and the console, against golden files.  Every finding comes from gradscope's own
rules on deterministic inputs (no training): a planned optimizer, hand-set weights, fixed evaluations.

    GRADSCOPE_UPDATE_GOLDEN=1 python -m pytest tests/test_regularisation_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

import gradscope
from gradscope.optimizer_audit import optimizer_findings
from gradscope.record import Record
from gradscope.render import render
from gradscope.report import Report
from gradscope.watching.eval_mode import EvalModeGuard
from gradscope.watching.validation import ValidationTracker, overfitting_finding
from gradscope.watching.weights import WeightWatch

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("GRADSCOPE_UPDATE_GOLDEN") == "1"
CODES = {"weight-decay", "l1-not-sparse", "train-mode-inference", "overfitting", "dropout"}


class NearFp16Max(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(8, 2)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.fill_(6.27e4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.fc(x)))


def regularisation_report() -> Report:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Dropout(0.2), nn.Linear(8, 64), nn.Linear(64, 2))
    findings = []
    findings += optimizer_findings(torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01), model)
    findings += [
        f for f in optimizer_findings(torch.optim.SGD(model.parameters(), lr=1.5, weight_decay=1.0), model)
        if f.severity == "error"
    ]  # fmt: skip
    findings += [
        f for f in gradscope.audit(NearFp16Max(), input_shape=(4, 8), loss="mean").findings if f.code == "dropout"
    ]

    with torch.no_grad():  # half of the first weight piled up at 1e-5, never zero
        model[3].weight.fill_(0.5)
        model[3].weight.view(-1)[::2] = 1e-5
    weights = WeightWatch(model)
    weights.measure(40, {n: (0.1, 0.0, "none") for n, _ in model.named_parameters()}, {})
    findings.append(weights.l1_finding())

    guard = EvalModeGuard(model)
    guard.step = 7
    with torch.no_grad():
        model(torch.zeros(2, 4))
    guard.close()
    findings.append(guard.finding())

    tracker = ValidationTracker()
    for step, val in enumerate([1.0, 0.8, 0.7, 0.76, 0.8, 0.85, 0.9, 0.95], start=1):
        tracker.observe_train_losses([(10 * step - 1, 1.0 - 0.1 * step)])
        tracker.add(10 * step, val)
    findings.append(overfitting_finding(tracker, {"max_eta_lambda": 0.0, "groups": [{"weight_decay": 0.0}]}, []))
    return Report(record=Record(), model={"source": "regularisation", "format": "module"}, findings=findings)


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text + "\n", encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; run with GRADSCOPE_UPDATE_GOLDEN=1"
    assert text + "\n" == path.read_text(encoding="utf-8"), f"{name} differs from its golden file"


def test_every_regularisation_code_is_in_the_report() -> None:
    report = regularisation_report()
    assert report.codes() == CODES
    for finding in report.findings:
        assert finding.fix is not None and finding.fix.summary, finding.code


def test_regularisation_markdown_golden() -> None:
    _golden("regularisation_report.md", render(regularisation_report(), "markdown"))


def test_regularisation_console_golden() -> None:
    _golden("regularisation_report_100.txt", render(regularisation_report(), "table", width=100))


def test_regularisation_json_round_trip() -> None:
    report = regularisation_report()
    data = json.loads(json.dumps(report.to_dict()))
    assert {f["code"] for f in data["findings"]} == CODES
    assert render(Report.from_dict(data), "markdown") == render(report, "markdown")
