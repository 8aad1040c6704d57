"""Verdicts under a GradScaler (fp16/bf16 autocast on the CPU, torch.amp.GradScaler("cpu")).

Two classes of false verdict (field trial):

* findings fed by steps the scaler skipped: its calibration (a scale that starts too
  high skips log2(initial / needed) steps in a row) or a single early skip made an
  ``fp16-overflow`` warning, and the zero update ratio of skipped steps (optimizer.step()
  did not run) made ``update-ratio`` "no gradient" / "barely learn";
* "no gradient" concluded from a non-finite gradient norm (an overflowed gradient, or a
  finite still-scaled one whose norm overflows fp32).

Each also has a true positive that must still fire: a scaler that keeps skipping after
calibration, and a weight truly cut from the graph.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import gradscope
from gradscope.learning_rate import LearningRateMonitor
from gradscope.report import Finding, Report
from gradscope.training import SKIPPED_STEPS_MIN, ScalerSteps, skipped_steps_finding

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Branchy(nn.Module):
    """The field trial's MLP, plus (``cut``) a branch whose output reaches the loss
    only through ``.detach()``: its weight never gets a gradient."""

    def __init__(self, cut: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        self.side = nn.Linear(16, 1) if cut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.side is not None:
            out = out + 0.1 * self.side(x).detach()
        return out


def run(
    dtype: str,
    init_scale: float,
    steps: int,
    *,
    every: int = 1,
    cut: bool = False,
    overflow: Any = None,
) -> tuple[Report, list[Finding], torch.amp.GradScaler]:
    """Train under watch with autocast and a GradScaler; ``overflow(step)`` True makes that
    step's scaled loss inf (the scaler skips it).  Returns the report, the alerts, the scaler."""
    torch.manual_seed(0)
    model = Branchy(cut)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    x = torch.randn(steps, 32, 16)
    y = x[..., :1] * 2
    alerts: list[Finding] = []
    with gradscope.watch(model, every=every, log_dir=None, raise_on=(), on_finding=alerts.append) as scope:
        for i in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=DTYPES[dtype]):
                loss = nn.functional.mse_loss(model(x[i]).float(), y[i])
            scaled = scaler.scale(loss)
            if overflow is not None and overflow(i):
                scaled = scaled * float("inf")  # the scaled gradients overflow: the scaler skips the step
            scaled.backward()
            scope.step(opt, scaler=scaler, loss=loss)
            scaler.step(opt)
            scaler.update()
    return scope.report(), alerts, scaler


def codes(findings: list[Finding]) -> set[str]:
    return {f.code for f in findings}


# -- class 1: calibration skips are no finding -------------------------------------------------


@pytest.mark.slow
def test_one_calibration_skip_at_the_default_scale_is_healthy() -> None:
    """The default 2^16 overflows once (step 7) while the early gradients grow: the
    scaler's normal calibration, not an fp16 problem (was: "skipped 1 of 8 steps",
    then a final WARNING "1 of 99 steps", healthy False)."""
    report, alerts, _ = run("fp16", 2.0**16, 120)
    training = report.analysis["training"]
    assert training["skipped_steps"] == 1  # the precondition: one skip, early
    assert "fp16-overflow" not in codes(alerts)
    assert "fp16-overflow" not in report.codes()
    assert report.summary()["healthy"] is True


@pytest.mark.parametrize("every", [1, 4])
def test_a_calibration_streak_is_no_sample_of_the_update_ratio(every: int) -> None:
    """init_scale 1e12: the first 25 steps are skipped while the scale falls; their update
    ratio is 0 because optimizer.step() did not run (was: "get no gradient … argmax,
    .detach()", then "barely learn" in the final report, and "skipped 25 of 40")."""
    report, alerts, _ = run("fp16", 1e12, 40, every=every)
    assert report.analysis["training"]["skipped_steps"] == 25
    assert not alerts
    assert "update-ratio" not in report.codes()
    assert "fp16-overflow" not in report.codes()  # 25 calibration skips, none after
    assert report.summary()["healthy"] is True


def test_every_step_skipped_is_the_scalers_finding_not_no_gradient() -> None:
    """init_scale 1e30: no step runs.  The update-ratio rule says nothing (no update was
    ever made, and an overflowed gradient is a gradient); the skipped-steps finding says
    that the model did not train."""
    report, _, _ = run("fp16", 1e30, 40)
    assert "update-ratio" not in report.codes()
    (finding,) = [f for f in report.findings if f.code == "fp16-overflow"]
    assert finding.evidence["every_step_skipped"] is True
    assert finding.evidence["skipped_steps"] == 39  # the last step's outcome shows only at a next step
    assert "skipped every step" in finding.message and "did not train" in finding.message
    assert "init_scale=65536" in finding.fix.code
    assert report.summary()["healthy"] is False


def test_bf16_overflowed_scaled_norm_is_not_no_gradient() -> None:
    """bf16 under init_scale 1e20: nothing is skipped and the weights train, but the
    squared norms of the still-scaled gradients overflow fp32 (inf).  That is no missing
    gradient, and no skipped step whose statistics must be left out."""
    report, alerts, _ = run("bf16", 1e20, 40)
    assert report.analysis["training"]["skipped_steps"] == 0
    assert "update-ratio" not in codes(alerts) | report.codes()
    assert not any("skipped by the GradScaler" in note for note in report.record.notes)
    assert report.record.layer("body.0").gradient is not None  # ∂ℓ/∂h kept, unscaled
    assert report.summary()["healthy"] is True


# -- true positives that must still fire ---------------------------------------------------------


@pytest.mark.parametrize("every", [1, 5])
def test_a_scaler_that_keeps_skipping_after_calibration_is_an_fp16_overflow(every: int) -> None:
    """From step 10 on, every 4th step overflows whatever the scale: a quarter of the steps
    after calibration are skipped."""
    report, alerts, _ = run("fp16", 2.0**16, 80, every=every, overflow=lambda i: i >= 10 and i % 4 == 0)
    assert "fp16-overflow" in codes(alerts)
    (finding,) = [f for f in report.findings if f.code == "fp16-overflow"]
    evidence = finding.evidence
    assert evidence["steps"] == 80  # over all the run's steps
    assert evidence["skipped_after_calibration"] >= SKIPPED_STEPS_MIN
    assert evidence["skipped_steps"] == report.analysis["training"]["skipped_steps"]
    assert "update-ratio" not in report.codes()  # the skipped steps' zero ratios are not samples
    assert report.summary()["healthy"] is False


def test_a_weight_cut_from_the_graph_still_gets_no_gradient_under_a_scaler() -> None:
    """A calibration streak (init_scale 1e12) and then training: the detached branch, and
    only it, gets no gradient."""
    report, _, _ = run("fp16", 1e12, 60, cut=True)
    (finding,) = [f for f in report.findings if f.code == "update-ratio"]
    assert finding.evidence["no_gradient"] == ["side"]
    assert finding.evidence["too_small"] == [] and finding.evidence["too_large"] == []


# -- the rules' numbers ---------------------------------------------------------------------------


def scales(*values: float) -> ScalerSteps:
    steps = ScalerSteps()
    for step, value in enumerate(values):
        steps.observe(step, value)
    return steps


def test_scaler_steps_tells_calibration_from_later_skips() -> None:
    streak = scales(2.0**20, 2.0**19, 2.0**18, 2.0**18, 2.0**17, 2.0**17)
    assert (streak.skipped, streak.calibration, streak.after_calibration()) == (3, 2, 1)
    assert not streak.calibrating
    # Skips at a scale of 1 or below are no calibration: the gradients overflow unscaled.
    low = scales(2.0, 1.0, 0.5, 0.25)
    assert (low.skipped, low.calibration) == (3, 1)


def test_skipped_steps_finding_needs_the_minimum_and_the_rate() -> None:
    calibrated = scales(*[2.0**16 / 2**k for k in range(10)], *[64.0] * 90)  # 9 calibration skips, then clean
    assert skipped_steps_finding(9, 100, 64.0, calibrated) is None
    assert skipped_steps_finding(9, 100, 64.0, calibrated, final=True) is None
    few = scales(*[2.0**16] * 7, 2.0**15, *[2.0**15] * 30, 2.0**14, *[2.0**14] * 10)  # two early skips
    assert skipped_steps_finding(2, 50, 2.0**14, few) is None
    values, scale = [], 2.0**16
    for step in range(200):  # every 10th step skipped, none of it calibration
        values.append(scale)
        if step % 10 == 9:
            scale /= 2
    frequent = scales(*values)
    finding = skipped_steps_finding(frequent.skipped, 200, scale, frequent)
    assert finding is not None and finding.code == "fp16-overflow"
    assert finding.evidence["skipped_after_calibration"] == 19
    assert skipped_steps_finding(frequent.skipped, 200, scale) is None  # totals alone cannot tell calibration


def test_update_ratio_monitor_leaves_out_skipped_steps_and_reads_nonfinite_norms_as_gradients() -> None:
    monitor = LearningRateMonitor()
    for step in range(30):
        monitor.scaler.observe(step, 2.0 ** (40 - step))  # every step skipped
        if step:
            monitor._lrs[step - 1] = {name: (0.01, 0.01) for name in ("fc", "nan", "cut")}  # lr > 0: 0 is a sample
            monitor.observe_gradients({"fc": math.inf, "nan": math.nan, "cut": 0.0})
            monitor.observe(step, {step - 1: {"fc": 0.0, "nan": 0.0, "cut": 0.0}}, [(step, math.inf)], [(step, 1.0)])
    assert monitor.layers["fc"].samples == 0
    assert monitor.divergence.last_norm is None  # a skipped step's inf norm is no divergence
    finding = monitor.update_ratio_finding(final=True)
    assert finding is not None and finding.evidence["no_gradient"] == ["cut"]
    assert monitor.scaler.recent == set()  # forgotten once read: at most one flush's steps are kept
