"""What ``watch`` measures about regularisation, in one object the Scope calls.

* ``train-mode-inference`` (``eval_mode``): a no-grad forward with Dropout or
  BatchNorm in training mode, from a forward pre-hook on the root module;
* ``weight-decay`` (``gradscope.optimizer_audit``): every optimizer given to
  ``scope.step`` (or ``attach``), read at the diagnosis cadence with the
  groups' *current* learning rates.  A run may step several (a GAN's generator
  and discriminator, each given to ``scope.step`` in turn): each is audited at
  every measurement, so one's findings never clear another's (remembering only
  the last one given made the audit follow whichever optimizer the cadence
  happened to land on);
* weights over time and ``l1-not-sparse`` (``weights``), at the diagnosis cadence;
* held-out results and ``overfitting`` (``validation``), from ``scope.validation``.

The Scope calls ``flush`` at each flush (``full`` on the diagnosis cadence) and
collects ``final_findings``/``summary`` for its report.  Findings measured on full
flushes are repeated on the flushes in between (cached, not re-measured), so the
alert tracker sees them as persisting rather than clearing and re-alerting.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from gradscope.distributed import ReductionGroup
from gradscope.placement import ParameterRef
from gradscope.report import Finding
from gradscope.watching.eval_mode import EvalModeGuard
from gradscope.watching.validation import Evaluation, ValidationTracker, overfitting_finding
from gradscope.watching.weights import WeightLaunch, WeightWatch

STOP_CODES = ("overfitting",)


def dropout_rates(model: nn.Module) -> list[tuple[str, float]]:
    return [
        (name or "model", float(m.p))
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd)
    ]


def _summaries(optimizers: list[Any], model: nn.Module, summary: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The first optimizer's summary (the one the report has always shown), with every
    optimizer's under ``"optimizers"`` when the run steps more than one."""
    first = summary(optimizers[0], model)
    if len(optimizers) > 1:
        every = [first] + [summary(opt, model) for opt in optimizers[1:]]
        first = {**first, "optimizers": every}
    return first


def _for_advice(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The decay of the whole run for the overfitting advice: every optimizer's groups
    (a run whose second optimizer decays is not told that none is set)."""
    if summary is None or "optimizers" not in summary:
        return summary
    every = summary["optimizers"]
    return {
        "groups": [g for s in every for g in s.get("groups", [])],
        "max_eta_lambda": max((s.get("max_eta_lambda") or 0.0 for s in every), default=0.0),
    }


def check_stop_on(stop_on: Any) -> tuple[str, ...]:
    """``stop_on`` as a tuple of known codes (checked before any hook is attached)."""
    codes = (stop_on,) if isinstance(stop_on, str) else tuple(stop_on)
    unknown = [code for code in codes if code not in STOP_CODES]
    if unknown:
        from gradscope.errors import GradscopeError

        raise GradscopeError(f"stop_on: unknown code {unknown[0]!r}; choose among {', '.join(STOP_CODES)}")
    return codes


class RegularisationWatch:
    """The regularisation signals of a watched run."""

    def __init__(
        self,
        model: nn.Module,
        parameters: Callable[[], Iterable[ParameterRef]] | None = None,
        stop_on: tuple[str, ...] = (),
        group: ReductionGroup | None = None,
    ) -> None:
        """``parameters``: the model's parameters by name, looked up at each measurement
        (the Recorder's table, built after any sharding); ``group``: the ranks whose
        parts of each weight are summed (``WeightWatch``)."""
        self.stop_on = tuple(stop_on)
        self._model = weakref.ref(model)
        self.guard = EvalModeGuard(model)
        self.weights = WeightWatch(parameters if parameters is not None else model, group)
        self.validation = ValidationTracker()
        # Every optimizer given to scope.step, weakly, in the order first seen.
        self._optimizers: list[weakref.ReferenceType[Any]] = []
        self._cached: list[Finding] = []
        self._optimizer_summary: dict[str, Any] | None = None
        self._overfitting: Finding | None = None
        self.stopped_at: int | None = None

    # -- inputs from the Scope -------------------------------------------------
    def observe_optimizer(self, optimizer: Any) -> None:
        """Remember (weakly) an optimizer the Scope is given; each one is read at the diagnosis cadence."""
        if optimizer is None:
            return
        from gradscope.optimizer_audit import base_optimizer

        base = base_optimizer(optimizer)
        if not hasattr(base, "param_groups"):
            return
        if any(ref() is base for ref in self._optimizers):
            return
        try:
            ref = weakref.ref(base)
        except TypeError:  # an optimizer without weakref support: not audited
            return
        self._optimizers = [r for r in self._optimizers if r() is not None] + [ref]

    def optimizers(self) -> list[Any]:
        """The optimizers seen so far that are still alive, in the order first seen."""
        return [opt for ref in self._optimizers if (opt := ref()) is not None]

    def set_step(self, step: int) -> None:
        """The Scope observed optimizer step ``step - 1`` and is now at ``step``."""
        self.guard.stepped(step - 1)
        self.guard.step = step

    def flush(
        self,
        step: int,
        *,
        full: bool,
        param_grad_norms: dict[str, float],
        losses: list[tuple[int, float]],
        writer: Any = None,
        weights: tuple[WeightLaunch, torch.Tensor] | None = None,
    ) -> list[Finding]:
        """This flush's regularisation findings (measured when ``full``, else the cached ones).

        ``weights``: the weights measurement launched with the flush (``launch_weights``)
        and its vector as the flush brought it to the host (summed over the group);
        None when there was no weight to measure."""
        self.validation.observe_train_losses(losses)
        if full:
            self._measure(step, param_grad_norms, weights)
            if writer is not None:
                writer.write_weights(step, self.weights.tracks)
        findings = list(self._cached)
        findings += self._mode_findings()
        if self._overfitting is not None:
            findings.append(self._overfitting)
        return findings

    def _mode_findings(self) -> list[Finding]:
        """Both directions of a forgotten mode switch (gradscope.watching.eval_mode)."""
        return [f for f in (self.guard.finding(), self.guard.eval_training_finding()) if f is not None]

    def launch_weights(self) -> WeightLaunch | None:
        """The device side of the weights measurement of a full flush, packed into
        the flush (so a flush read one flush late reads the weights of its own step)."""
        return self.weights.launch()

    def _measure(
        self, step: int, param_grad_norms: dict[str, float], weights: tuple[WeightLaunch, torch.Tensor] | None
    ) -> None:
        from gradscope.optimizer_audit import decay_of_parameters, optimizer_findings, optimizer_summary

        model = self._model()
        optimizers = self.optimizers() if model is not None else []
        cached: list[Finding] = []
        decays: dict[str, tuple[float, float, str]] | None = None
        if optimizers and model is not None:
            # Each optimizer holds its own parameters: their decays are merged, their
            # findings listed side by side (keyed by their first layer in the alerts).
            decays = {}
            for optimizer in optimizers:
                decays.update(decay_of_parameters(optimizer, model))
                cached.extend(optimizer_findings(optimizer, model))
            self._optimizer_summary = _summaries(optimizers, model, optimizer_summary)
        if weights is not None:
            self.weights.complete(step, weights[0], weights[1], decays, param_grad_norms)
        l1 = self.weights.l1_finding()
        if l1 is not None:
            cached.append(l1)
        self._cached = cached

    def add_validation(
        self,
        step: int,
        loss: Any,
        metrics: dict[str, Any] | None = None,
        patience: int | None = None,
        min_delta: float | None = None,
    ) -> tuple[Evaluation, Finding | None]:
        """Record an evaluation; returns it and the overfitting finding when it appears now."""
        evaluation = self.validation.add(step, loss, metrics, patience=patience, min_delta=min_delta)
        model = self._model()
        finding = overfitting_finding(
            self.validation,
            _for_advice(self._optimizer_summary_now()),
            dropout_rates(model) if model is not None else [],
        )
        new = finding is not None and self._overfitting is None
        if finding is not None:
            self._overfitting = finding
        return evaluation, finding if new else None

    def _optimizer_summary_now(self) -> dict[str, Any] | None:
        optimizers = self.optimizers()
        model = self._model()
        if not optimizers or model is None:
            return self._optimizer_summary
        from gradscope.optimizer_audit import optimizer_summary

        return _summaries(optimizers, model, optimizer_summary)

    # -- the report --------------------------------------------------------------
    def final_findings(self) -> list[Finding]:
        findings = list(self._cached) + self._mode_findings()
        if self._overfitting is not None:
            findings.append(self._overfitting)
        return findings

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "weights": self.weights.summary(),
            "train_mode_inference_forwards": self.guard.count,
            "eval_mode_training_steps": self.guard.eval_training,
        }
        if self._optimizer_summary is not None:
            out["optimizer"] = self._optimizer_summary
        if self.validation.evaluations:
            out["validation"] = self.validation.summary()
        if self.stopped_at is not None:
            out["stopped_at_step"] = self.stopped_at
        return out

    def close(self) -> None:
        self.guard.close()
