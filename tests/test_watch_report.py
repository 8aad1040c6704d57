"""The watch report: it renders the training analysis, gives no advice from one
sample or from diverged statistics, keeps evidence short, and says what a
watched run knows in its header."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from gradscope import advice
from gradscope.record import Record
from gradscope.render import render
from gradscope.report import Report
from gradscope.watching import Scope


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step % 7)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


@pytest.fixture(scope="module")
def diverged_report() -> Report:
    """60 steps at every=5: a 1000x loss spike at step 40, an inf loss at step 50."""
    logging.getLogger("gradscope").setLevel(logging.CRITICAL)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with Scope(model, every=5, raise_on=()) as scope:
            for step in range(60):
                x, y = batch(step)
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                if step == 40:
                    loss = loss * 1000.0
                if step == 50:
                    loss = loss * float("inf")
                loss.backward()
                scope.step(opt, loss=loss)
                opt.step()
    finally:
        logging.getLogger("gradscope").setLevel(logging.NOTSET)
    return scope.report()


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_the_training_analysis_is_rendered(diverged_report: Report, fmt: str) -> None:
    text = render(diverged_report, fmt)
    training = diverged_report.analysis["training"]
    clip = training["clip"]
    assert "Training run" in text
    assert f"gradient spikes: {training['spikes']} (steps 40" in text
    assert f"the 10th percentile of {clip['norms_seen']} global norms" in text and clip["norms_seen"] == 50
    assert "first non-finite: step 50, loss" in text
    assert "global gradient norm: last" in text


def test_no_advice_from_one_sample_or_diverged_statistics(diverged_report: Report) -> None:
    text = render(diverged_report, "table", width=100)
    assert "observed global gradient norm(s)" not in text  # the diagnosis' one-norm clip advice
    # the loss scale comes from the statistics before the first non-finite step (the record says so) ...
    loss_scale = text[text.index("Loss scale") :].split("\n\n")[0]
    assert "from the statistics before step 50" in loss_scale and "nan" not in loss_scale
    assert diverged_report.run["statistics"]["diverged_at"] == 50
    # ... and a saved report whose statistics do not say which steps they cover gets none
    old = Report.from_dict(diverged_report.to_dict())
    del old.run["statistics"]
    old_scale = render(old, "table", width=100)
    old_scale = old_scale[old_scale.index("Loss scale") :].split("\n\n")[0]
    assert "not advised" in old_scale and "step 50" in old_scale and "GradScaler(" not in old_scale
    # an audit of one batch: one norm, no threshold and no snippet
    one = advice.clip_threshold([3.0])
    audit = Report(record=Record(), model={"source": "m"}, run={"mode": "audit"}, findings=[], analysis={"clip": one})
    for fmt in ("table", "markdown"):
        audit_text = render(audit, fmt)
        assert "one global gradient norm observed (3)" in audit_text
        assert "clip_grad_norm_" not in audit_text


def test_evidence_is_a_short_table(diverged_report: Report) -> None:
    text = render(diverged_report, "table", width=100)
    findings = text[text.index("Errors (") :]
    assert "history=" not in findings and "{step=" not in findings
    for block in findings.split("  evidence:\n")[1:]:
        rows = block.split("\n  fix:")[0].split("\n  threshold:")[0].splitlines()
        assert 1 <= len(rows) <= 8  # at most EVIDENCE_ENTRIES rows, each one measurement
        assert all(row.startswith("    ") and len(row) <= 100 for row in rows)
    assert "seen             steps 50–59" in findings  # the finding's life story, one row


def test_the_header_says_what_a_watched_run_knows(diverged_report: Report) -> None:
    text = render(diverged_report, "table", width=100)
    header = text.split("\n\n")[0]
    assert "inputs —" not in header.replace("  ", " ") and "loss —" not in header.replace("  ", " ")
    assert "steps  60 optimizer steps · every 5 (12 sampled) · tier full" in header
    assert "loss   last nan (as given to scope.step)" in header
    assert "inputs the training batches" in header


def test_the_watch_record_of_the_first_nonfinite_step_is_the_reported_one(diverged_report: Report) -> None:
    nonfinite = [f for f in diverged_report.findings if f.code == "nonfinite"]
    assert len(nonfinite) == 1
    assert nonfinite[0].evidence["step"] == 50 and nonfinite[0].evidence["role"] == "loss"
    assert (
        nonfinite[0].message
        == "step 50: first non-finite loss, produced (by the loss function (every recorded activation was finite))"
    )
