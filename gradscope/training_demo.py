"""A watched training run that goes wrong, and the same run fixed.

A small ReLU MLP learns a linear map from synthetic data with SGD (momentum
0.9) and a linear learning-rate warmup to 0.3, about ten times what this
model tolerates.  Once the learning rate passes the stability limit the
gradient norm jumps far above its history (``gradient-spike`` alerts), the
weights blow up, and a few steps later the forward produces inf/NaN:
``gradscope.watch`` stops the run at that step with the first non-finite
record, and recommends a clip threshold from the norms seen before the
failure (AutoClip).  The rerun clips the global norm at that threshold and
stays finite for the whole run.

Run it with ``python demos/training_nan.py [LOGDIR]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradscope.errors import GradscopeError
from gradscope.report import Finding, Report
from gradscope.watching import watch

STEPS = 150
PEAK_LR = 0.3
WARMUP = 50
SEED = 0


@dataclass
class RunResult:
    """What one training run of the demo did."""

    steps: int  # optimizer steps completed
    losses: list[float]
    stopped: GradscopeError | None
    report: Report
    alerts: list[tuple[int, Finding]] = field(default_factory=list)

    @property
    def finite(self) -> bool:
        return self.stopped is None and all(math.isfinite(v) for v in self.losses)


def make_problem(
    seed: int = SEED, *, width: int = 64, hidden_layers: int = 1
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A ReLU MLP 16 -> width -> (``hidden_layers`` x width -> width) -> 1 and a synthetic
    regression problem (y = x @ w, 256 rows), deterministic."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(16, width), nn.ReLU()]
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    w = torch.randn(16, 1, generator=generator)
    x = torch.randn(256, 16, generator=generator)
    return model, x, x @ w


def warmup_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    before_step: Callable[[torch.optim.Optimizer, torch.Tensor], Any],
    *,
    peak_lr: float = PEAK_LR,
    warmup: int = WARMUP,
    clip: float | None = None,
) -> None:
    """SGD (momentum 0.9) on the MSE of ``model(x)`` against ``y``, the learning rate
    warmed up linearly to ``peak_lr`` over ``warmup`` steps; the global gradient norm
    clipped at ``clip``.  ``before_step(optimizer, loss)`` runs after each backward and
    before ``optimizer.step()``: where ``scope.step`` goes; when it raises, that step's
    update does not run."""
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr / warmup, momentum=0.9)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * min(1.0, (step + 1) / warmup)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        before_step(optimizer, loss)
        optimizer.step()


def train(
    *,
    clip: float | None = None,
    log_dir: str | None = None,
    steps: int = STEPS,
    every: int = 1,
    on_alert: Callable[[int, Finding], Any] | None = None,
) -> RunResult:
    """Train with the too-high learning rate, watched; clip the global norm at ``clip``."""
    model, x, y = make_problem()
    losses: list[float] = []  # one per completed step: scope.step raises before a bad step's loss is kept
    alerts: list[tuple[int, Finding]] = []
    stopped: GradscopeError | None = None

    def alert(finding: Finding) -> None:
        alerts.append((scope.steps, finding))
        if on_alert is not None:
            on_alert(scope.steps, finding)

    def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        scope.step(optimizer, loss=loss)
        losses.append(loss.item())

    scope = watch(model, every=every, log_dir=log_dir, on_finding=alert)
    try:
        with scope:
            warmup_sgd(model, x, y, steps, step, clip=clip)
    except GradscopeError as error:
        stopped = error
    return RunResult(steps=len(losses), losses=losses, stopped=stopped, report=scope.report(), alerts=alerts)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_training_demo(
    log_dir: str | None = None, *, write: Callable[[str], Any] = print
) -> tuple[RunResult, RunResult]:
    """Run the failing run, then the clipped rerun; narrate both through ``write``.

    Returns both results (the test checks them).
    """
    write(f"1. training with a learning rate warmed up to {PEAK_LR} (too high), gradscope.watch(every=1)")

    def show(step: int, finding: Finding) -> None:
        write(f"   ALERT step {step}: [{finding.severity.value}] {finding.code}: {finding.message}")

    first = train(log_dir=log_dir, on_alert=show)
    if first.stopped is not None:
        record = first.stopped.record
        write(f"   stopped at step {record.get('step')}: {first.stopped}")
        write("   first non-finite record: " + ", ".join(f"{k}={_fmt(v)}" for k, v in record.items() if v is not None))
    clip = first.report.analysis["training"]["clip"]
    if clip is None:
        raise GradscopeError("the demo run saw no finite gradient norm; nothing to recommend")
    write(
        f"   recommended clip threshold (AutoClip, p10 of {clip['norms_seen']} past norms): {clip['threshold']:.3g}"
        f"; median alternative: {clip['median_threshold']:.3g}"
    )
    if log_dir is not None:
        write(f"   dashboard written to {log_dir}: gradscope dashboard {log_dir}")
    write(f"2. the same run with torch.nn.utils.clip_grad_norm_(..., max_norm={clip['threshold']:.3g})")
    second = train(clip=clip["threshold"], every=10)
    verdict = "stays finite" if second.finite else "still fails"
    write(f"   {second.steps} steps, final loss {second.losses[-1]:.4g}: {verdict}")
    return first, second
