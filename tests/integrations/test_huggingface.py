"""The Hugging Face callback, through the real ``transformers.Trainer`` on CPU
(a tiny custom module and an in-memory dataset: nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import BATCH, Rows, TinyRegressor, training_args, transformers
from tiny_regression import FailFrom, diverging_net
from torch import nn

from gradscope.integrations.huggingface import HAS_PRE_OPTIMIZER_STEP, GradscopeTrainerCallback

ACCUMULATE = 2
STEPS = 3


def test_trainer_callback_records_per_optimizer_step(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyRegressor()
    callback = GradscopeTrainerCallback(every=1)
    args = training_args(
        tmp_path,
        STEPS,
        gradient_accumulation_steps=ACCUMULATE,
        learning_rate=1e-2,
        max_grad_norm=0.0,  # no clipping: gradscope sees the raw gradients
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Rows(BATCH * ACCUMULATE * STEPS), callbacks=[callback]
    )
    trainer.train()
    assert callback.event == ("on_pre_optimizer_step" if HAS_PRE_OPTIMIZER_STEP else "on_step_end")
    report = callback.report
    assert report is not None and callback.scope.closed
    training = report.analysis["training"]
    assert training["steps"] == STEPS
    assert training["sampled_steps"] == STEPS
    # each optimizer step merged its micro-batches: ACCUMULATE x BATCH rows x 16 units
    assert report.record.layer("net.1").activation.count == STEPS * ACCUMULATE * BATCH * 16
    assert training["global_grad_norm_last"] > 0
    assert training["update_ratio"]["net.0"]["samples"] == STEPS
    assert 0 < training["update_ratio"]["net.0"]["last"] < 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class FailingRegressor(TinyRegressor):
    """Its input goes through ``FailFrom``: raises or turns NaN from the ``fail_at``-th forward on."""

    def __init__(self, mode: str, fail_at: int) -> None:
        super().__init__()
        self.fail = FailFrom(mode, fail_at)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return super().forward(self.fail(x), labels)


def _all_hooks_removed(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> bool:
    modules_clean = all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules()
    )
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    optimizer_clean = inner is None or (not inner._optimizer_step_pre_hooks and not inner._optimizer_step_post_hooks)
    return modules_clean and optimizer_clean


@pytest.mark.parametrize(("mode", "expected"), [("raise", RuntimeError), ("nan", "GradscopeError")])
def test_trainer_that_raises_leaves_no_hook_and_a_report(tmp_path, mode: str, expected) -> None:
    from gradscope.errors import GradscopeError

    expected = GradscopeError if expected == "GradscopeError" else expected
    torch.manual_seed(0)
    model = FailingRegressor(mode, fail_at=5)  # the 3rd optimizer step (2 micro-batches each)
    log_dir = tmp_path / "tb"
    callback = GradscopeTrainerCallback(every=1, log_dir=str(log_dir))
    args = training_args(tmp_path, 6, gradient_accumulation_steps=ACCUMULATE, learning_rate=1e-2, max_grad_norm=0.0)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Rows(BATCH * ACCUMULATE * 6), callbacks=[callback]
    )
    with pytest.raises(expected):
        trainer.train()
    assert callback.scope is not None and callback.scope.closed
    assert _all_hooks_removed(model, trainer.optimizer)
    report = callback.report
    assert report is not None
    training = report.analysis["training"]
    assert training["steps"] == (2 if mode == "raise" else 3)  # NaN: the 3rd step is observed, then stops
    if mode == "nan":
        assert training["first_nonfinite"]["step"] == 2
        assert any(f.code == "nonfinite" for f in report.findings)
    assert list(log_dir.glob("**/events.out.tfevents.*"))  # the TensorBoard run was written
    # later forwards are not recorded: nothing is attached any more
    model.fail.fail_at = 10**9
    model(torch.randn(2, 5))
    assert callback.scope._recorder.pending_count() == 0


class Spiky(TinyRegressor):
    """A regressor whose loss is scaled by ``factor`` at training forward ``at``."""

    def __init__(self, at: int, factor: float) -> None:
        super().__init__()
        self.at, self.factor, self.calls = at, factor, 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.training:
            self.calls += 1
        result = super().forward(x, labels)
        if self.training and self.calls == self.at + 1 and labels is not None:
            result["loss"] = result["loss"] * self.factor
        return result


class Diverging(TinyRegressor):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.net = diverging_net(at)


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 4, 10, 50])
def test_trainer_stops_at_the_first_nan_step_and_names_the_layer(tmp_path, every: int) -> None:
    from gradscope.errors import GradscopeError

    torch.manual_seed(0)
    model = Diverging(at=6)
    callback = GradscopeTrainerCallback(every=every)
    trainer = transformers.Trainer(
        model=model, args=training_args(tmp_path, 12), train_dataset=Rows(BATCH * 12), callbacks=[callback]
    )
    with pytest.raises(GradscopeError) as info:
        trainer.train()
    record = info.value.record
    where = (record["step"], record["layer"], record["role"], record["origin"])
    assert where == (6, "net.1", "activation", "produced")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # step 6's update never ran
    assert callback.report is not None and callback.scope.closed
    # the default log_dir: the Trainer's TensorBoard directory, <output_dir>/runs, + gradscope
    assert list((tmp_path / "runs" / "gradscope").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_trainer_spike_detection_sees_the_norms_before_clipping(tmp_path) -> None:
    """max_grad_norm=1.0 clips every step; a 1000x loss spike at step 30 is still
    seen as a spike, at the raw norm the Trainer itself logs as grad_norm."""
    torch.manual_seed(0)
    model = Spiky(at=30, factor=1000.0)
    logged: dict[int, float] = {}

    class Log(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "grad_norm" in logs:
                logged[state.global_step - 1] = float(logs["grad_norm"])

    callback = GradscopeTrainerCallback(every=5)
    args = training_args(tmp_path, 40, max_grad_norm=1.0, logging_strategy="steps", logging_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(BATCH * 40), callbacks=[callback, Log()])
    trainer.train()
    assert callback.pre_clip
    report = callback.report
    spike = next(f for f in report.findings if f.code == "gradient-spike")
    assert spike.evidence["step"] == 30
    assert spike.evidence["global_norm"] == pytest.approx(logged[30], rel=1e-4)  # HF's pre-clip grad_norm
    assert spike.evidence["global_norm"] > 10 * args.max_grad_norm
    clipping = report.analysis["training"]["clipping"]
    assert clipping["max_norm"] == 1.0 and clipping["clipped_steps"] >= 1
    assert clipping["global_grad_norm_post_clip_last"] <= 1.0 + 1e-6


def test_trainer_callback_sees_the_training_loss_the_trainer_logs(tmp_path) -> None:
    """No callback event carries a step's loss: the callback read none, so the
    dashboards had no loss curve and ``overfitting`` had no training loss."""
    torch.manual_seed(0)
    model = TinyRegressor()
    callback = GradscopeTrainerCallback(every=1, log_dir=None)
    args = training_args(
        tmp_path, STEPS, gradient_accumulation_steps=ACCUMULATE, logging_strategy="steps", logging_steps=1
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Rows(BATCH * ACCUMULATE * STEPS), callbacks=[callback]
    )
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == STEPS
    training = callback.report.analysis["training"]
    # the mean of the micro-batches' losses, as the Trainer logs it (rounded to 4 digits in its log)
    assert training["loss_last"] == pytest.approx(logged[-1], rel=1e-3, abs=1e-4)
