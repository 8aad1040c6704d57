"""Gradients clipped before ``scope.step()`` are noticed and said, not taken as the model's norms.

Field trial: the plain loop ``backward -> clip_grad_norm_(1.0) -> scope.step ->
optimizer.step`` (the README said only "before optimizer.step()") showed
gradscope clipped norms: a 1000x batch (true norm 615) gave no spike and
AutoClip's threshold was a percentile of clipped norms, with no word about it.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import gradscope
from gradscope.watching.clip_ceiling import CEILING_STEPS, CLIP_EPS, ClipCeiling


def _clipped_norm(true_norm: float, max_norm: float) -> float:
    """What clip_grad_norm_ leaves: the norm times min(1, max_norm / (norm + 1e-6))."""
    g = torch.full((100,), true_norm / 10.0)  # a vector of norm true_norm
    torch.nn.utils.clip_grad_norm_([_with_grad(g)], max_norm)
    return float(_last.grad.norm())


_last = nn.Parameter(torch.zeros(100))


def _with_grad(g: torch.Tensor) -> nn.Parameter:
    _last.grad = g.clone()
    return _last


@pytest.mark.parametrize("max_norm", [0.01, 1.0, 50.0])
def test_clipped_norms_meet_one_ceiling_and_natural_ones_do_not(max_norm: float) -> None:
    ceiling = ClipCeiling()
    below = [max_norm * f for f in (0.3, 0.5, 0.9)]
    above = [max_norm * f for f in (1.01, 3.0, 1000.0)]
    for norm in below:
        assert not ceiling.observe(_clipped_norm(norm, max_norm))
    said = [ceiling.observe(_clipped_norm(norm, max_norm)) for norm in above]
    assert said == [False] * (CEILING_STEPS - 1) + [True]  # once, at the third clipped step
    # clip_grad_norm_ leaves max_norm·n/(n + 1e-6): max_norm within 1e-6/max_norm relative.
    expected = pytest.approx(max_norm, rel=CLIP_EPS / max_norm + 1e-6)
    assert ceiling.summary() == {"ceiling": expected, "steps_at_ceiling": 3, "steps": 6}
    assert not ceiling.observe(_clipped_norm(7.0 * max_norm, max_norm))  # said once only

    natural = ClipCeiling()
    generator = torch.Generator().manual_seed(0)
    for norm in (torch.rand(500, generator=generator, dtype=torch.float64) * max_norm).tolist():
        natural.observe(norm)
    assert not natural.clipped


def _run(clip_before_step: bool, observe_first: bool) -> tuple[gradscope.Report, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, every=5) as scope:
        for step in range(30):
            x, y = torch.randn(16, 8), torch.randn(16, 1) * (1000.0 if step == 20 else 3.0)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if observe_first:
                scope.observe_gradients()
                scope.clip_max_norm = 1.0
            if clip_before_step:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scope.step(opt, loss=loss)
            opt.step()
    report = scope.report()
    return report, report.analysis["training"]["spikes"]


def test_a_loop_that_clips_before_step_is_told_so_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gradscope"):
        report, spikes = _run(clip_before_step=True, observe_first=False)
    said = [r.getMessage() for r in caplog.records if "clipped before scope.step()" in r.getMessage()]
    assert len(said) == 1 and "stop at 1 on" in said[0]
    found = report.analysis["training"]["clipped_before_step"]
    assert found["ceiling"] == pytest.approx(1.0, rel=1e-5) and found["steps_at_ceiling"] >= CEILING_STEPS
    assert any("observe_gradients" in note for note in report.record.notes)
    assert spikes == 0  # what it warns about: the 1000x batch is invisible in clipped norms


def test_observing_before_clipping_sees_the_spike_and_no_ceiling() -> None:
    report, spikes = _run(clip_before_step=True, observe_first=True)
    assert report.analysis["training"]["clipped_before_step"] is None
    assert spikes >= 1 and 20 in report.analysis["training"]["spike_steps"]
    assert report.analysis["training"]["clipping"]["clipped_steps"] > 0


def test_an_unclipped_run_has_no_ceiling() -> None:
    report, _ = _run(clip_before_step=False, observe_first=False)
    assert report.analysis["training"]["clipped_before_step"] is None
    assert not any("observe_gradients" in note for note in report.record.notes)


@pytest.mark.parametrize("with_loss", [True, False])
def test_repeated_gradients_are_no_ceiling(with_loss: bool) -> None:
    """The same batch with no learning gives the same norm each step (the overhead
    benchmark at lr 0 was told its gradients were clipped): with the losses equal too,
    or without losses and no step below, nothing is said."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    with gradscope.watch(model, every=2) as scope:
        for _ in range(12):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            scope.step(opt, loss=loss if with_loss else None)
            opt.step()
    assert scope.report().analysis["training"]["clipped_before_step"] is None


def test_without_losses_a_ceiling_needs_a_step_below_it() -> None:
    ceiling = ClipCeiling()
    for _ in range(5):
        ceiling.observe(2.0)
    assert not ceiling.clipped  # five equal norms and nothing else: repeated gradients
    ceiling.observe(1.3)
    assert ceiling.clipped  # varying norms, capped at 2.0: clipping
    same_loss = ClipCeiling()
    for _ in range(5):
        same_loss.observe(2.0, loss=0.75)
    assert not same_loss.clipped
    moving = ClipCeiling()
    for i in range(3):
        moving.observe(2.0, loss=0.75 - 0.01 * i)
    assert moving.clipped
