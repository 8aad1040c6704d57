"""The training demo: a too-high learning rate spikes, then goes NaN; gradscope stops
it with the first non-finite record and a clip threshold; clipped, the rerun is finite."""

from __future__ import annotations

import math
import time

import pytest
import torch

from gradscope.training_demo import make_problem, run_training_demo, warmup_sgd


def unwatched_norms(steps: int) -> list[float]:
    """The demo's global gradient norms, recomputed without gradscope."""
    model, x, y = make_problem()
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        # float64: a norm above float32's 1.8e19 limit for a sum of squares over finite
        # gradients is a norm, not NaN/Inf (gradscope.watching.overflow); NaN/inf elements make it so
        grads = [p.grad for p in model.parameters()]
        norms.append(math.sqrt(sum(float(g.double().square().sum()) for g in grads)))

    warmup_sgd(model, x, y, steps, record)
    return norms


def test_training_demo_spikes_stops_at_first_nan_and_clipping_fixes_it(tmp_path) -> None:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    lines: list[str] = []
    start = time.perf_counter()
    try:
        first, second = run_training_demo(str(tmp_path / "tb"), write=lines.append)
    finally:
        torch.set_num_threads(old)
    elapsed = time.perf_counter() - start
    assert elapsed < 30  # ~5 s alone on this machine; generous for a loaded CI runner

    # The failing run: a spike alert first, then it stops at the first non-finite value.
    codes = [f.code for _, f in first.alerts]
    assert "gradient-spike" in codes and "nonfinite" in codes
    assert codes.index("gradient-spike") < codes.index("nonfinite")
    spike_step = next(step for step, f in first.alerts if f.code == "gradient-spike")
    assert first.stopped is not None
    record = first.stopped.record
    assert record["step"] > spike_step
    assert record["layer"] is not None and record["role"] in ("activation", "gradient", "weight_grad", "weight")
    assert record["origin"] in ("produced", "received")
    assert first.steps == record["step"]  # stopped at that step, before its optimizer.step
    assert all(math.isfinite(v) for v in first.losses[:spike_step])

    # The recommended threshold is AutoClip's p10 of the finite norms seen before the failure.
    norms = sorted(n for n in unwatched_norms(first.steps + 1) if math.isfinite(n))
    clip = first.report.analysis["training"]["clip"]
    assert clip["norms_seen"] == len(norms)
    p10 = norms[math.ceil(0.1 * len(norms)) - 1]
    assert clip["threshold"] == pytest.approx(p10, rel=clip["relative_error"])
    assert clip["threshold"] <= clip["median_threshold"]
    assert any(f"{clip['threshold']:.3g}" in line for line in lines)

    # The clipped rerun stays finite for all its steps.
    assert second.stopped is None and second.finite and second.steps == 150
    assert not any(f.code == "nonfinite" for f in second.report.findings)

    # The dashboard was written.
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert any("first non-finite record" in line for line in lines)
