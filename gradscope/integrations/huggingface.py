"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[GradscopeTrainerCallback(every=50)])``.

A thin adapter over ``gradscope.watch``:

* ``on_train_begin`` creates the Scope on the model the Trainer trains, writing
  TensorBoard dashboards to ``<the Trainer's TensorBoard directory>/gradscope``
  unless ``log_dir`` is given (``log_dir=None``: none).  The Trainer's directory
  is ``$TENSORBOARD_LOGGING_DIR``, else ``args.logging_dir`` (transformers < 5),
  else ``<output_dir>/runs``, so ``tensorboard --logdir <output_dir>/runs``
  shows the Trainer's curves and gradscope's side by side.
* Gradient norms are measured *before* the Trainer clips them.  The Trainer
  clips (``max_grad_norm``, default 1.0) right after the last micro-batch's
  backward and only then calls ``on_pre_optimizer_step``, so with clipping on
  every callback event sees clipped gradients, and spikes and AutoClip would
  only ever see norms of at most ``max_grad_norm``.  A post-accumulate-grad
  hook on each parameter queues one callback at the end of every backward
  (``Scope.observe_gradients``: the per-parameter norms, device work, no sync),
  so the norms gradscope reports are the raw ones; the training summary adds
  the post-clip side (``analysis["training"]["clipping"]``: ``max_norm``,
  ``clipped_steps``, the last post-clip norm).  With gradient accumulation each
  micro-batch's backward measures again and the last one counts (a norm pass
  per micro-batch).  Under fp16 AMP (a GradScaler in the optimizer) the
  gradients are still scaled at the end of backward, so the post-clip
  gradients are measured instead.
* ``on_pre_optimizer_step`` (transformers >= 4.45) calls ``scope.step(optimizer)``
  just before ``optimizer.step()``.  Older transformers have no such event:
  ``on_step_end`` is used instead, after the optimizer step.
* The first NaN/inf stops training at the step that produced it, at any
  ``every``: ``trainer.train()`` raises ``gradscope.GradscopeError`` (naming
  the step, layer and role) from ``on_pre_optimizer_step``, before
  ``optimizer.step()`` applies the bad gradients.  Raising, rather than
  ``control.should_training_stop``, because the Trainer would still run that
  optimizer step and then return normally, with NaN weights and a run that
  looks finished.  The Scope is closed first: ``callback.report`` holds the
  report and the run summary has been printed.
* evaluation runs between steps: the forward hooks are paused from
  ``on_step_end`` to the next ``on_step_begin``, so evaluation forwards are
  not recorded;
* the training loss: the callback wraps the Trainer's ``training_step`` (found
  as for ``train`` below) and hands each micro-batch's returned loss to
  ``scope.observe_loss`` (the loss curve, the NaN-loss check, the
  train/validation gap of ``overfitting``);
* ``on_evaluate`` feeds the evaluation's ``eval_loss`` (and its other metrics)
  to ``scope.validation``: gradscope tracks the best step and finds ``overfitting``;
* ``on_train_end`` closes the Scope, prints the run summary (on the
  ``gradscope`` logger) and keeps the full report in ``callback.report``.
* when training raises (gradscope's own NaN stop included), the Scope is closed
  too (hooks removed, report built, TensorBoard written; no collective, so a
  failing distributed job fails as fast as without gradscope) before the
  exception reaches you: the Trainer has no event for it, so the callback wraps
  the ``train`` method of the Trainer it was given to (found from ``on_init_end``;
  a callback added later with ``trainer.add_callback`` is guarded from the
  next ``train()`` call on, and always on its own NaN stop).

The Trainer hides NaN/inf losses from its logs by default
(``logging_nan_inf_filter=True``); gradscope does not.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gradscope.integrations.huggingface needs transformers: pip install 'gradscope[transformers]'"
    ) from exc

import torch

from gradscope.errors import GradscopeError
from gradscope.integrations.guard import close_on_exception, close_quietly, find_owner, observe_results
from gradscope.report import Report
from gradscope.watching import Scope, watch

HAS_PRE_OPTIMIZER_STEP = hasattr(TrainerCallback, "on_pre_optimizer_step")
DASHBOARD_SUBDIR = "gradscope"


def trainer_log_dir(args: Any) -> str | None:
    """Where the Trainer's own TensorBoard events go (see the module docstring), or
    None when TensorBoard is not installed."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return None
    root = os.environ.get("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
    if not root:
        root = os.path.join(args.output_dir, "runs")
    return os.path.join(os.path.expanduser(str(root)), DASHBOARD_SUBDIR)


class _PreClipNorms:
    """Per-parameter post-accumulate-grad hooks that queue ``scope.observe_gradients``
    once per backward, at its end (when every ``.grad`` is complete)."""

    def __init__(self, scope: Scope, model: torch.nn.Module) -> None:
        self.scope = scope
        self._queued = False
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in model.parameters() if p.requires_grad]

    def _hook(self, param: torch.Tensor) -> None:
        if self._queued:
            return
        self._queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._at_end_of_backward)

    def _at_end_of_backward(self) -> None:
        self._queued = False
        if not self.scope.closed:
            self.scope.observe_gradients()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class GradscopeTrainerCallback(TrainerCallback):
    """Watch a Hugging Face Trainer run.  Keyword arguments go to ``gradscope.watch``."""

    def __init__(self, **watch_kwargs: Any) -> None:
        """``watch_kwargs``: the keyword arguments of ``gradscope.watch`` (every,
        log_dir, formats, include, exclude, on_finding, raise_on, tier)."""
        self.kwargs = watch_kwargs
        self.scope: Scope | None = None
        self.report: Report | None = None
        self.pre_clip: bool = False  # whether norms are measured before the Trainer's clipping
        self._pause: Any = None
        self._norms: _PreClipNorms | None = None
        self.event = "on_pre_optimizer_step" if HAS_PRE_OPTIMIZER_STEP else "on_step_end"

    def _guard(self) -> None:
        owner = find_owner(self)
        if owner is not None:
            close_on_exception(owner, self, self._close_on_exception)
            observe_results(owner, "training_step", self, self._observe_loss)

    def _observe_loss(self, loss: Any) -> None:
        """Each micro-batch's loss as ``Trainer.training_step`` returns it (already
        divided for gradient accumulation: their sum is the step's loss, as the
        Trainer logs it); no callback event carries the loss of a step."""
        if self.scope is not None and not self.scope.closed and isinstance(loss, torch.Tensor):
            self.scope.observe_loss(loss)

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._guard()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._guard()
        if model is None:
            return
        self._close_on_exception()  # a previous train() that raised without the guard (add_callback)
        self.report = None
        kwargs_for_watch = dict(self.kwargs)
        if "log_dir" not in kwargs_for_watch:
            kwargs_for_watch["log_dir"] = trainer_log_dir(args)
        self.scope = watch(model, **kwargs_for_watch)
        max_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        scaled = getattr(kwargs.get("optimizer"), "scaler", None) is not None
        if max_norm > 0 and not scaled and HAS_PRE_OPTIMIZER_STEP:
            self.scope.clip_max_norm = max_norm
            self._norms = _PreClipNorms(self.scope, model)
            self.pre_clip = True

    def close(self, *, collective: bool = True, raise_pending: bool = True) -> Report | None:
        """Close the Scope (hooks off, report built, TensorBoard written, run
        summary printed); safe to call twice."""
        if self._pause is not None:
            pause, self._pause = self._pause, None
            pause.__exit__(None, None, None)
        if self._norms is not None:
            self._norms.remove()
            self._norms = None
        if self.scope is not None and not self.scope.closed:
            try:
                self.report = self.scope.close(collective=collective, raise_pending=raise_pending)
            finally:
                self.report = self.scope.report()
        return self.report

    def _close_on_exception(self) -> None:
        # An exception is on its way: no collective (another rank may never reach
        # it) and a pending non-finite error is only recorded.
        self.close(collective=False, raise_pending=False)

    def _step(self, optimizer: Any, control: Any) -> None:
        if self.scope is None or self.scope.closed:
            return
        try:
            self.scope.step(optimizer)
        except BaseException as exc:
            if isinstance(exc, GradscopeError):
                # gradscope's own stop (raise_on), before optimizer.step(): the error
                # ends trainer.train() once the report and the summary exist.
                control.should_training_stop = True
            close_quietly(self._close_on_exception, during=exc)
            raise

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._pause is not None:
            pause, self._pause = self._pause, None
            pause.__exit__(None, None, None)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step(kwargs.get("optimizer"), control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not HAS_PRE_OPTIMIZER_STEP:
            self._step(kwargs.get("optimizer"), control)
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
