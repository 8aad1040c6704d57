"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[GradscopeTrainerCallback(every=50)])``.

A thin adapter over ``gradscope.watch``:

* ``on_train_begin`` creates the Scope on the model the Trainer trains;
* ``on_pre_optimizer_step`` (transformers >= 4.45) calls ``scope.step(optimizer)``
  just before ``optimizer.step()``.  The Trainer calls it *after* its own
  gradient clipping (``max_grad_norm``, default 1.0), so the gradients and the
  global norm gradscope sees are the clipped ones; set ``max_grad_norm=0`` (or
  read the Trainer's logged ``grad_norm``) to see the raw norm.  Older
  transformers have no such event: ``on_step_end`` is used instead, after the
  optimizer step, where ``.grad`` still holds the step's gradients unless the
  optimizer zeroed them (the update ratio is then not measured).
* evaluation runs between steps: the forward hooks are paused from
  ``on_step_end`` to the next ``on_step_begin``, so evaluation forwards are
  not recorded;
* ``on_evaluate`` feeds the evaluation's ``eval_loss`` (and its other metrics)
  to ``scope.validation``: gradscope tracks the best step and finds ``overfitting``;
* ``on_train_end`` closes the Scope; the full report is in ``callback.report``.
* when training raises (gradscope's own NaN stop included), the Scope is closed
  too (hooks removed, report built, TensorBoard written) before the exception
  reaches you: the Trainer has no event for it, so the callback wraps the
  ``train`` method of the Trainer it was given to (found from ``on_init_end``;
  a callback added later with ``trainer.add_callback`` is guarded from the
  next ``train()`` call on, and always on its own NaN stop).

The Trainer hides NaN/inf losses from its logs by default
(``logging_nan_inf_filter=True``); gradscope does not.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gradscope.integrations.huggingface needs transformers: pip install 'gradscope[transformers]'"
    ) from exc

from gradscope.integrations.guard import close_on_exception, close_quietly, find_owner
from gradscope.report import Report
from gradscope.watching import Scope, watch

HAS_PRE_OPTIMIZER_STEP = hasattr(TrainerCallback, "on_pre_optimizer_step")


class GradscopeTrainerCallback(TrainerCallback):
    """Watch a Hugging Face Trainer run.  Keyword arguments go to ``gradscope.watch``."""

    def __init__(self, **watch_kwargs: Any) -> None:
        """``watch_kwargs``: the keyword arguments of ``gradscope.watch`` (every,
        log_dir, formats, include, exclude, on_finding, raise_on)."""
        self.kwargs = watch_kwargs
        self.scope: Scope | None = None
        self.report: Report | None = None
        self._pause: Any = None
        self.event = "on_pre_optimizer_step" if HAS_PRE_OPTIMIZER_STEP else "on_step_end"

    def _guard(self) -> None:
        owner = find_owner(self)
        if owner is not None:
            close_on_exception(owner, self, self.close)

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._guard()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._guard()
        if model is None:
            return
        self.close()  # a previous train() that raised without the guard (add_callback)
        self.report = None
        self.scope = watch(model, **self.kwargs)

    def close(self) -> Report | None:
        """Close the Scope (hooks off, report built, TensorBoard written); safe to call twice."""
        if self._pause is not None:
            pause, self._pause = self._pause, None
            pause.__exit__(None, None, None)
        if self.scope is not None and not self.scope.closed:
            self.report = self.scope.close()
        return self.report

    def _step(self, optimizer: Any) -> None:
        if self.scope is not None and not self.scope.closed:
            try:
                self.scope.step(optimizer)
            except BaseException as exc:  # gradscope's own stop (raise_on): close before it propagates
                close_quietly(self.close, during=exc)
                raise

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._pause is not None:
            pause, self._pause = self._pause, None
            pause.__exit__(None, None, None)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step(kwargs.get("optimizer"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not HAS_PRE_OPTIMIZER_STEP:
            self._step(kwargs.get("optimizer"))
        if self.scope is not None and not self.scope.closed and self._pause is None:
            self._pause = self.scope.paused()
            self._pause.__enter__()

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if self.scope is None or self.scope.closed or not metrics:
            return
        from gradscope.watching.validation import validation_metrics

        found = validation_metrics(metrics, "eval_loss")
        if found is not None:
            self.scope.validation(found[0], metrics=found[1])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()
