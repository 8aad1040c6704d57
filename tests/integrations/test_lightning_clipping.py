"""The Lightning callback reports the Trainer's gradient clipping (``gradient_clip_val``,
``gradient_clip_algorithm``), measured before Lightning clips, through a real
``lightning.Trainer`` with a real spike."""

from __future__ import annotations

import math

import pytest
import torch
from lightning_tiny import BATCH, Tiny, loader, trainer

from gradscope.integrations.lightning import GradscopeCallback

STEPS = 24
SPIKE_AT = 20  # after SPIKE_MIN_HISTORY (16) steps of history
MAX_NORM = 0.5


class Spiking(Tiny):
    """Its loss times 100 at one batch; records the gradient norm before and after Lightning clips."""

    def __init__(self) -> None:
        super().__init__()
        self.before: list[float] = []
        self.after: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 100 if batch_idx == SPIKE_AT else loss

    def _norm(self) -> float:
        return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in self.parameters() if p.grad is not None))

    def on_before_optimizer_step(self, optimizer) -> None:
        self.before.append(self._norm())  # Lightning clips after this hook (Precision._after_closure)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # The closure (backward, the hook above, clipping) runs inside optimizer.step:
        # read the clipped gradients in a post-step hook of the optimizer (the next zero_grad comes later).
        handle = optimizer.optimizer.register_step_post_hook(lambda *_: self.after.append(self._norm()))
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            handle.remove()


def _fit(tmp_path, **extra):
    torch.manual_seed(0)
    model = Spiking()
    callback = GradscopeCallback(every=4, log_dir=None, raise_on=())
    trainer(tmp_path, callback, STEPS, **extra).fit(model, loader(BATCH * STEPS))
    assert callback.report is not None
    return model, callback.report


def test_lightning_clip_by_norm_is_reported_with_both_sides(tmp_path) -> None:
    model, report = _fit(tmp_path, gradient_clip_val=MAX_NORM)
    training = report.analysis["training"]
    before, after = model.before, model.after
    assert len(before) == len(after) == STEPS
    # Lightning clipped: the applied norms stop at MAX_NORM (clip_grad_norm_'s 1e-6)
    assert max(after) == pytest.approx(MAX_NORM, rel=1e-5)
    clipping = training["clipping"]
    assert clipping is not None
    assert clipping["algorithm"] == "norm"
    assert clipping["max_norm"] == MAX_NORM
    assert clipping["clipped_steps"] == sum(n > MAX_NORM for n in before)
    assert clipping["clipped_steps"] >= 1
    assert clipping["global_grad_norm_post_clip_last"] == pytest.approx(after[-1], rel=1e-5)
    # gradscope's norms are those before clipping, and the spike is the unclipped one
    assert training["global_grad_norm_last"] == pytest.approx(before[-1], rel=1e-5)
    assert training["global_grad_norm_max"] == pytest.approx(max(before), rel=1e-5)
    assert training["spike_steps"] == [SPIKE_AT]
    spike = next(f for f in report.findings if f.code == "gradient-spike")
    assert spike.evidence["global_norm"] == pytest.approx(before[SPIKE_AT], rel=1e-5)
    # the clip norms were pinned at no ceiling gradscope had to guess: the trainer said so
    assert training["clipped_before_step"] is None


def test_lightning_clip_by_value_is_reported(tmp_path) -> None:
    model, report = _fit(tmp_path, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    clipping = report.analysis["training"]["clipping"]
    assert clipping is not None
    assert clipping["algorithm"] == "value"
    assert clipping["max_value"] == 0.01
    assert clipping["max_norm"] is None
    assert max(model.after) < max(model.before)  # Lightning did clip
