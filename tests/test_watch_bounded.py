"""Watch never kills or bloats a run: every bounded structure stays consistent
with whatever else indexes it (issue 10: a spike history capped at 20 steps that
another map still indexed raised ``KeyError`` at the 21st spike), and memory
between ``step()`` calls does not grow with the number of micro-batches or of
``no_grad`` forwards."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import watch_memory_scenarios as scenarios
from torch import nn

import gradscope.watching  # noqa: F401  (first: gradscope.training imports from it)
from gradscope import recorder as recorder_module
from gradscope.training import SpikeSummary
from gradscope.watching import Scope
from gradscope.watching.norms import Spike

SPIKE_EVERY = 30  # a multiple of EVERY: every spike lands on a sampled step (the crashing path)
EVERY = 10
STEPS = 10_000


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


@pytest.mark.slow
def test_ten_thousand_steps_with_hundreds_of_spikes_end_without_error() -> None:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    alerts: list[str] = []
    try:
        with Scope(model, every=EVERY, on_finding=lambda f: alerts.append(f.code)) as scope:
            for step in range(STEPS):
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.mse_loss(model(x), y)
                # A spike: the gradient 1000x its usual size (the loss is scaled, not the
                # weights, and SGD's lr is small, so the run stays finite).
                scaled = loss * 1000.0 if step % SPIKE_EVERY == 0 and step > 0 else loss
                scaled.backward()
                scope.step(opt, loss=loss)
                opt.step()
    finally:
        torch.set_num_threads(old)
    report = scope.report()
    training = report.analysis["training"]
    expected = (STEPS - 1) // SPIKE_EVERY
    # the first spikes come before the detector has SPIKE_MIN_HISTORY norms: allow a few misses
    assert expected - 2 <= training["spikes"] <= expected
    assert training["spikes"] > 300
    assert training["first_nonfinite"] is None
    assert "nonfinite" not in alerts
    assert all(math.isfinite(n) for n in (training["global_grad_norm_last"], training["global_grad_norm_max"]))
    assert len(training["spike_steps"]) == SpikeSummary.MAX_STEPS  # the first 20, not all 330
    spike = next(f for f in report.findings if f.code == "gradient-spike")
    # the worst spike keeps its per-parameter norms however late it came
    assert spike.evidence["largest_parameter_norms"]
    assert spike.evidence["step"] == spike.evidence["worst_step"]
    assert len(scope._spikes.parameter_norms) <= SpikeSummary.MAX_STEPS + 1
    json.dumps(report.to_dict(), allow_nan=False)  # strict JSON: NaN-free
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _spike(step: int, ratio: float) -> Spike:
    return Spike(step=step, norm=ratio, median=1.0, ratio=ratio, z=10.0)


def test_spike_summary_stays_bounded_and_answers_for_every_spike() -> None:
    summary = SpikeSummary()
    for step in range(1000):
        spike = _spike(step, ratio=5.0 + (step % 97))  # the worst moves around
        summary.add(spike)
        top = summary.add_parameter_norms(step, {f"p{i}": float(i + step) for i in range(9)})
        assert list(top) == ["p8", "p7", "p6", "p5", "p4"]  # returned whatever the map kept
        assert len(summary.parameter_norms) <= SpikeSummary.MAX_STEPS + 1
        assert len(summary.steps) <= SpikeSummary.MAX_STEPS
        assert summary.worst is not None and summary.worst.step in summary.parameter_norms
    assert summary.count == 1000
    assert sorted(summary.parameter_norms)[: SpikeSummary.MAX_STEPS] == list(range(SpikeSummary.MAX_STEPS))


# -- memory between step() calls -----------------------------------------------------
MEMORY_LIMIT_MIB = 20.0


def _scenario(name: str) -> dict:
    """Run one scenario of ``watch_memory_scenarios.py`` in a fresh process."""
    script = Path(__file__).with_name("watch_memory_scenarios.py")
    done = subprocess.run([sys.executable, str(script), name], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name}: RSS growth over {scenarios.MICRO_BATCHES} calls: {result['growth_mib']:.1f} MiB")
    return result


def _matches_truth(result: dict) -> None:
    """Every call was merged exactly (Chan et al.), none dropped or counted twice."""
    assert result["count"] == result["truth_count"]
    assert result["mean"] == pytest.approx(result["truth_mean"], rel=1e-9, abs=1e-12)
    assert result["std"] == pytest.approx(result["truth_std"], rel=1e-9)
    assert result["max"] == pytest.approx(result["truth_max"], rel=1e-6)


@pytest.mark.slow
def test_memory_bounded_over_1500_accumulation_micro_batches() -> None:
    result = _scenario("accumulation")
    assert result["growth_mib"] < MEMORY_LIMIT_MIB
    assert result["pending_at_step"] <= recorder_module.PENDING_ENTRIES + 2 * len(result["layers"]) + 1
    _matches_truth(result)
    assert result["truth_count"] == (scenarios.WARMUP + scenarios.MICRO_BATCHES) * scenarios.ROWS * scenarios.WIDTH


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_memory_bounded_over_1500_no_grad_forwards_which_are_not_counted(mode: str) -> None:
    result = _scenario(mode)
    assert result["growth_mib"] < MEMORY_LIMIT_MIB
    # only the step's training forward counts, and no extra call site appeared
    _matches_truth(result)
    assert result["count"] == scenarios.ROWS * scenarios.WIDTH == result["input_count"]
    assert result["layers"] == [str(i) for i in range(2 * scenarios.DEPTH)]


@pytest.mark.slow
def test_record_no_grad_counts_evaluation_forwards_exactly_and_bounded() -> None:
    result = _scenario("no_grad_recorded")
    assert result["growth_mib"] < MEMORY_LIMIT_MIB
    _matches_truth(result)
    # the step's training forward and every evaluation forward
    assert result["count"] == (1 + scenarios.WARMUP + scenarios.MICRO_BATCHES) * scenarios.ROWS * scenarios.WIDTH


def test_reentrant_checkpoint_segments_still_count_without_record_no_grad() -> None:
    """A reentrant checkpoint runs its segment under no_grad inside a training
    forward: that forward is training, and its activations count."""
    from torch.utils.checkpoint import checkpoint

    width, rows = 16, 4

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(width, width), nn.Tanh())
            self.head = nn.Linear(width, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(checkpoint(self.inner, x, use_reentrant=True))

    torch.manual_seed(0)
    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(rows, width, requires_grad=True)
    with Scope(model, every=1, raise_on=(), diagnose=False) as scope:
        model(x).sum().backward()
        with torch.no_grad():
            model(x)  # an evaluation forward: not counted
        scope.step(opt)
    record = scope.report().record
    assert record.layer("inner.0").activation.count == rows * width
    assert record.layer("inner.0").gradient is not None
    assert record.layer("head").activation.count == rows


def test_submodules_called_without_the_root_keep_their_call_sites_over_micro_batches() -> None:
    """A loop that calls the model's parts directly (no root forward to mark a new
    pass) must not add a call site per micro-batch: a backward ends the pass."""
    torch.manual_seed(0)
    encoder, head = nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.Linear(8, 1)
    model = nn.ModuleDict({"encoder": encoder, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    micro_batches, rows = 40, 3
    with Scope(model, every=1, raise_on=(), diagnose=False) as scope:
        for _ in range(3):
            for _ in range(micro_batches):
                x = torch.randn(rows, 6)
                h = encoder(x)
                head(encoder[1](h)).sum().backward()  # encoder.1 called twice in one pass: a second site
            scope.step(opt)
            opt.step()
            opt.zero_grad()
    record = scope.report().record
    assert [layer.name for layer in record.layers] == ["encoder.0", "encoder.1", "encoder.1#2", "head"]
    assert record.layer("encoder.0").activation.count == 3 * micro_batches * rows * 8
    assert record.layer("encoder.1#2").gradient.count == 3 * micro_batches * rows * 8
