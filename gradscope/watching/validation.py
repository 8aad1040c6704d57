"""Held-out results, the best step, the train/validation gap and ``overfitting``.

``scope.validation(loss, metrics=...)`` records one evaluation at the current
step: *step N* means the weights after N optimizer steps, i.e. the checkpoint
saved right after the N-th ``optimizer.step()``.  The training loss of an
evaluation is the mean of the training losses the Scope observed since the
previous evaluation (they reach the host at flushes, so with ``every > 1`` the
last few steps join a little later).

``overfitting`` (the lecture's early stopping: "terminate training when
performance on validation set degrades"): the last ``patience`` evaluations
are all worse than the best one by more than ``min_delta`` (relative), while
the training loss went on falling (its mean over the last interval is below
its mean over the best evaluation's interval).  Defaults:

* ``PATIENCE = 5`` evaluations.  Prechelt (1998, "Early stopping — but when?")
  stops after the validation error rose in ``s`` successive strips and found
  larger ``s`` trades a little more training for fewer premature stops;
  Lightning's ``EarlyStopping`` defaults to 3.  Five consecutive evaluations
  above the best is rarely noise: for independent noise on a flat plateau
  each later evaluation is above the best with probability < 1, and the
  ``min_delta`` margin below removes the near-ties.
* ``MIN_DELTA = 0.05``: each of those evaluations exceeds the best by more than
  5 % of it: Prechelt's generalisation-loss criterion GL_α, "stop when the
  validation error is α % above its minimum so far", with his α = 5.  A run at
  its noise floor, whose validation loss wobbles by a percent or two while the
  training loss still creeps down, is not called overfitting.

Both are arguments of ``scope.validation``.  The best step is the evaluation
with the lowest loss (ties: the earliest).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from gradscope.numbers import apart, percent
from gradscope.report import Finding, Fix, Severity

PATIENCE = 5
MIN_DELTA = 0.05
MAX_EVALUATIONS = 10_000  # bounded memory: later evaluations update the best and the finding only


@dataclass
class Evaluation:
    step: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    train_sum: float = 0.0
    train_count: int = 0

    @property
    def train_loss(self) -> float | None:
        return self.train_sum / self.train_count if self.train_count else None

    @property
    def gap(self) -> float | None:
        train = self.train_loss
        return self.loss - train if train is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "loss": self.loss,
            "train_loss": self.train_loss,
            "gap": self.gap,
            "metrics": dict(self.metrics),
        }


def _float(value: Any) -> float:
    """A loss or metric as a float.  Evaluations are rare (once per validation pass),
    so reading a tensor here costs one host sync per evaluation, not per step."""
    if hasattr(value, "detach"):
        value = value.detach().float().mean().cpu()
    return float(value)


class ValidationTracker:
    """Evaluations of a run, their training-loss intervals, and the overfitting verdict."""

    def __init__(self) -> None:
        self.evaluations: list[Evaluation] = []
        self.dropped = 0
        self.patience = PATIENCE
        self.min_delta = MIN_DELTA
        # Training losses of steps after the last evaluation, as a sum: losses reach the host
        # in step order and before the next evaluation (of a later step), which takes them all.
        self._open_sum = 0.0
        self._open_count = 0

    def add(
        self,
        step: int,
        loss: Any,
        metrics: dict[str, Any] | None = None,
        patience: int | None = None,
        min_delta: float | None = None,
    ) -> Evaluation:
        if patience is not None:
            if int(patience) < 1:
                raise ValueError(f"patience must be at least 1 evaluation, not {patience!r}")
            self.patience = int(patience)
        if min_delta is not None:
            if not min_delta >= 0:
                raise ValueError(f"min_delta must be >= 0, not {min_delta!r}")
            self.min_delta = float(min_delta)
        numbers: dict[str, float] = {}
        for key, value in (metrics or {}).items():
            try:
                numbers[str(key)] = _float(value)
            except (TypeError, ValueError):
                continue  # strings and other non-numbers are not metrics gradscope can use
        evaluation = Evaluation(step=step, loss=_float(loss), metrics=numbers)
        if len(self.evaluations) >= MAX_EVALUATIONS:
            self.dropped += 1
            self.evaluations.pop(1)  # keep the first (the reference) and the recent ones
        self.evaluations.append(evaluation)
        self.claim_pending(evaluation)
        return evaluation

    def observe_train_losses(self, losses: list[tuple[int, float]]) -> None:
        """Training losses (optimizer step index t, loss) as they reach the host: the loss of
        step t belongs to the first evaluation made after t + 1 updates."""
        steps = [e.step for e in self.evaluations]
        for t, loss in losses:
            if not math.isfinite(loss):
                continue
            i = bisect.bisect_left(steps, t + 1)
            if i < len(self.evaluations):
                self.evaluations[i].train_sum += loss
                self.evaluations[i].train_count += 1
            else:
                self._open_sum += loss
                self._open_count += 1

    def claim_pending(self, evaluation: Evaluation) -> None:
        """The new evaluation (made after every step whose loss reached the host) takes the open sum."""
        evaluation.train_sum += self._open_sum
        evaluation.train_count += self._open_count
        self._open_sum, self._open_count = 0.0, 0

    @property
    def best(self) -> Evaluation | None:
        finite = [e for e in self.evaluations if math.isfinite(e.loss)]
        return min(finite, key=lambda e: e.loss) if finite else None

    def overfitting(self) -> tuple[Evaluation, list[Evaluation], bool | None] | None:
        """(best, the window after it, training still falling) when the rule fires, else None."""
        best = self.best
        if best is None:
            return None
        after = self.evaluations[self.evaluations.index(best) + 1 :]
        if len(after) < self.patience:
            return None
        window = after[-self.patience :]
        margin = self.min_delta * abs(best.loss)
        if not all(e.loss > best.loss + margin for e in window):
            return None
        train_best, train_last = best.train_loss, window[-1].train_loss
        falling = None if train_best is None or train_last is None else train_last < train_best
        if falling is False:
            return None  # both rising: the run is diverging, not overfitting
        return best, window, falling

    def summary(self) -> dict[str, Any]:
        best = self.best
        last = self.evaluations[-1] if self.evaluations else None
        return {
            "evaluations": len(self.evaluations) + self.dropped,
            "best_step": best.step if best else None,
            "best_loss": best.loss if best else None,
            "last_step": last.step if last else None,
            "last_loss": last.loss if last else None,
            "last_gap": last.gap if last else None,
            "gap_at_best": best.gap if best else None,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "history": [e.to_dict() for e in self.evaluations[-64:]],
        }


def validation_metrics(metrics: dict[str, Any], monitor: str) -> tuple[Any, dict[str, Any]] | None:
    """(the loss to track, the numeric metrics) from a framework's logged metrics: ``monitor``
    when present, else the only key that names a validation loss; None when there is none."""
    if monitor in metrics:
        return metrics[monitor], dict(metrics)
    candidates = [k for k in metrics if "loss" in k.lower() and any(v in k.lower() for v in ("val", "eval", "valid"))]
    if len(candidates) == 1:
        return metrics[candidates[0]], dict(metrics)
    return None


def overfitting_finding(
    tracker: ValidationTracker, decay: dict[str, Any] | None, dropout: list[tuple[str, float]]
) -> Finding | None:
    """The ``overfitting`` finding: the best step, the checkpoint to keep, the regulariser to strengthen."""
    found = tracker.overfitting()
    if found is None:
        return None
    best, window, falling = found
    last = window[-1]
    rise = (last.loss - best.loss) / abs(best.loss) if best.loss else math.inf
    shown = apart(best.loss, last.loss)
    max_eta_lambda = (decay or {}).get("max_eta_lambda") or 0.0
    max_wd = max((g["weight_decay"] for g in (decay or {}).get("groups", [])), default=0.0)
    max_p = max((p for _, p in dropout), default=0.0)
    if decay is not None and max_wd == 0:
        advice = "add weight decay (none is set): AdamW with weight_decay=0.01-0.1"
        code = "optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)"
    elif not dropout:
        advice = "add dropout after the hidden layers (none is present), p=0.1-0.5"
        code = "nn.Dropout(p=0.2)  # after each hidden activation"
    elif max_p < 0.5:
        advice = f"raise dropout (largest p is {max_p:g}) towards 0.5, or weight decay (λ={max_wd:g})"
        code = "for m in model.modules():\n    if isinstance(m, nn.Dropout):\n        m.p = 0.5"
    else:
        advice = (
            f"regularisation is already strong (weight decay {max_wd:g}, dropout p={max_p:g}): "
            "use more data or augmentation, or a smaller model"
        )
        code = ""
    checkpoint = (
        f"keep the checkpoint saved after step {best.step} (validation loss {best.loss:.4g}); "
        f"stop there next time (gradscope.watch(..., stop_on=('overfitting',)) stops at this alert)"
    )
    trend = (
        "while the training loss kept falling"
        if falling
        else "(no training loss was given: pass loss= to scope.step to confirm it falls)"
    )
    return Finding(
        code="overfitting",
        severity=Severity.WARNING,
        layers=[],
        message=(
            f"validation loss rose from its best {shown[0]} at step {best.step} to {shown[1]} at step "
            f"{last.step} (+{percent(rise, 3)}, {len(window)} evaluations in a row above the best) {trend}: overfitting"
        ),
        evidence={
            "best_step": best.step,
            "best_loss": best.loss,
            "last_step": last.step,
            "last_loss": last.loss,
            "train_loss_at_best": best.train_loss,
            "train_loss_last": last.train_loss,
            "gap_at_best": best.gap,
            "gap_last": last.gap,
            "patience": tracker.patience,
            "min_delta": tracker.min_delta,
            "weight_decay": max_wd if decay is not None else None,
            "eta_lambda": max_eta_lambda if decay is not None else None,
            "dropout": {name: p for name, p in dropout},
        },
        fix=Fix(f"{checkpoint}; to generalise better, {advice}", code),
    )
