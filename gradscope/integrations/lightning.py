"""Lightning: ``trainer = Trainer(callbacks=[GradscopeCallback(every=50)])``.

The callback is a thin adapter over ``gradscope.watch``:

* ``on_fit_start`` creates the Scope on the LightningModule (hooks attached),
  writing TensorBoard dashboards to ``<trainer.log_dir>/gradscope`` (the
  logger's version directory, or ``default_root_dir`` without a logger) unless
  ``log_dir`` is given (``log_dir=None``: none);
* ``on_before_backward`` remembers the (unscaled) loss of the micro-batch;
* ``on_before_optimizer_step`` calls ``scope.step(optimizer, scaler, loss)``.
  Lightning calls it after the optimizer closure ran every forward/backward of
  the step (so after gradient accumulation) and after AMP's ``unscale_``, and
  before gradient clipping (``Precision._after_closure`` calls this hook, then
  ``_clip_gradients``): gradscope sees the gradients the clipping sees, those
  of the optimizer's parameters, as Lightning clips them.  With the Trainer's
  ``gradient_clip_val`` the report's ``analysis.training.clipping`` says so:
  by norm, the max norm, how many steps it clipped and the last post-clip norm
  (``clip_grad_norm_``'s factor, as for the Hugging Face callback); by value,
  the max value.  A LightningModule that overrides ``configure_gradient_clipping``
  clips as it likes: gradscope reports the Trainer's setting.
* the first NaN/inf stops training at the step that produced it, at any
  ``every``: ``scope.step`` raises ``gradscope.GradscopeError`` from
  ``on_before_optimizer_step``, before the optimizer applies the bad
  gradients; Lightning then calls ``on_exception`` (the Scope is closed, the
  report kept) and ``trainer.fit`` re-raises it.  Raising, rather than
  ``trainer.should_stop``, because Lightning would still run that optimizer
  step and end the fit normally.
* validation and sanity-check forwards are not recorded (``scope.paused()``);
* at the end of each validation run (not the sanity check) the logged
  ``monitor`` metric (default ``"val_loss"``, as ``EarlyStopping``'s) and the
  other logged numbers go to ``scope.validation``: gradscope tracks the best
  step and finds ``overfitting``;
* ``on_fit_end`` / ``on_exception`` close the Scope and print the run summary
  (on the ``gradscope`` logger); the full report is then in ``callback.report``
  (and in TensorBoard).
"""

from __future__ import annotations

import os
from typing import Any

from gradscope.errors import GradscopeError

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - exercised only without the extra
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment]
    except ImportError as exc:
        raise ImportError(
            "gradscope.integrations.lightning needs Lightning: pip install 'gradscope[lightning]'"
        ) from exc

from gradscope.integrations.guard import close_quietly
from gradscope.report import Report
from gradscope.watching import Scope, watch


def _scaler_of(trainer: Any) -> Any:
    """The GradScaler of Lightning's AMP precision plugin, if any."""
    for owner in (getattr(trainer, "strategy", None), trainer):
        plugin = getattr(owner, "precision_plugin", None)
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None:
            return scaler
    return None


def _trainer_log_dir(trainer: Any) -> str | None:
    """``<trainer.log_dir>/gradscope``, or None without TensorBoard installed."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return None
    root = getattr(trainer, "log_dir", None) or getattr(trainer, "default_root_dir", None)
    return os.path.join(str(root), "gradscope") if root else None


def _report_clipping(scope: Scope, trainer: Any) -> None:
    """The Trainer's gradient clipping (``gradient_clip_val``, ``gradient_clip_algorithm``
    "norm" by default, as Lightning's), for the training summary's ``clipping``."""
    value = getattr(trainer, "gradient_clip_val", None)
    if not value:
        return
    algorithm = getattr(trainer, "gradient_clip_algorithm", None) or "norm"
    if str(getattr(algorithm, "value", algorithm)).lower() == "value":  # GradClipAlgorithmType.VALUE
        scope.clip_max_value = float(value)
    else:
        scope.clip_max_norm = float(value)


class GradscopeCallback(Callback):
    """Watch a Lightning run with gradscope.  Keyword arguments go to ``gradscope.watch``."""

    def __init__(self, monitor: str = "val_loss", **watch_kwargs: Any) -> None:
        """``monitor``: the logged validation loss fed to ``scope.validation``.
        ``watch_kwargs``: the keyword arguments of ``gradscope.watch`` (every,
        log_dir, formats, include, exclude, on_finding, raise_on, stop_on)."""
        super().__init__()
        self.monitor = monitor
        self.kwargs = watch_kwargs
        self.scope: Scope | None = None
        self.report: Report | None = None
        self._pause: Any = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.scope is not None and not self.scope.closed:
            raise GradscopeError("this GradscopeCallback is already watching a run; use one callback per fit")
        self.report = None
        kwargs = dict(self.kwargs)
        if "log_dir" not in kwargs:
            kwargs["log_dir"] = _trainer_log_dir(trainer)
        self.scope = watch(pl_module, **kwargs)
        _report_clipping(self.scope, trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.scope is not None:
            self.scope.mark_forward()  # training_step may call submodules, not pl_module itself

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self.scope is not None:
            self.scope.observe_loss(loss)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.scope is not None:
            # Lightning's AMP plugin has already called scaler.unscale_(optimizer) here.
            self.scope.step(optimizer, scaler=_scaler_of(trainer), unscaled=True)

    def _pause_start(self) -> None:
        if self.scope is not None and self._pause is None:
            self._pause = self.scope.paused()
            self._pause.__enter__()

    def _pause_end(self) -> None:
        if self._pause is not None:
            pause, self._pause = self._pause, None
            pause.__exit__(None, None, None)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._pause_start()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._pause_end()
        if self.scope is None or self.scope.closed or getattr(trainer, "sanity_checking", False):
            return
        from gradscope.watching.validation import validation_metrics

        metrics = validation_metrics(getattr(trainer, "callback_metrics", {}) or {}, self.monitor)
        if metrics is not None:
            self.scope.validation(metrics[0], metrics=metrics[1])

    def _close(self, raise_pending: bool = True, collective: bool = True) -> None:
        self._pause_end()
        if self.scope is not None and not self.scope.closed:
            try:
                self.scope.close(collective=collective, raise_pending=raise_pending)
            finally:
                self.report = self.scope.report()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning re-raises ``exception`` after this: a failing close must not replace
        # it; and no collective (another rank may never reach it).
        close_quietly(lambda: self._close(raise_pending=False, collective=False), during=exception)
