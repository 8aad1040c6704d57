"""The Lightning callback, through the real ``lightning.Trainer`` on CPU."""

from __future__ import annotations

import pytest
import torch
from lightning_tiny import BATCH, Tiny, loader, trainer
from tiny_regression import FailFrom, diverging_net

from gradscope.integrations.lightning import GradscopeCallback

ACCUMULATE = 2
STEPS = 4


def test_lightning_callback_records_per_optimizer_step(tmp_path) -> None:
    torch.manual_seed(0)
    model = Tiny()
    callback = GradscopeCallback(every=1, log_dir=str(tmp_path / "tb"))
    run = trainer(
        tmp_path,
        callback,
        STEPS,
        accumulate_grad_batches=ACCUMULATE,
        val_check_interval=2 * ACCUMULATE,  # a validation pass in the middle of training
        limit_val_batches=2,
    )
    run.fit(model, loader(BATCH * ACCUMULATE * STEPS), loader(2 * BATCH))
    report = callback.report
    assert report is not None and callback.scope.closed
    training = report.analysis["training"]
    assert training["steps"] == STEPS  # optimizer steps, not micro-batches
    assert training["sampled_steps"] == STEPS
    assert model.val_forwards > 0
    # every optimizer step merged its 2 micro-batches of 4 x 16 activations; validation
    # forwards were not recorded
    layer = report.record.layer("net.1")
    assert layer.activation.count == STEPS * ACCUMULATE * BATCH * 16
    assert [lr.name for lr in report.record.layers] == ["net.0", "net.1", "net.2"]
    assert training["loss_last"] is not None and training["global_grad_norm_last"] > 0
    assert training["update_ratio"]["net.0"]["samples"] == STEPS
    assert all(not m._forward_hooks for m in model.modules())
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


class Failing(Tiny):
    """Its training inputs go through ``FailFrom``: raises or turns NaN from the ``fail_at``-th batch on."""

    def __init__(self, mode: str, fail_at: int) -> None:
        super().__init__()
        self.fail = FailFrom(mode, fail_at)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((self.fail(x), y), batch_idx)


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_lightning_run_that_raises_leaves_no_hook_and_a_report(tmp_path, mode: str) -> None:
    from gradscope.errors import GradscopeError

    torch.manual_seed(0)
    model = Failing(mode, fail_at=5)  # the 3rd optimizer step (2 micro-batches each)
    log_dir = tmp_path / "tb"
    callback = GradscopeCallback(every=1, log_dir=str(log_dir))
    run = trainer(tmp_path, callback, 6, accumulate_grad_batches=ACCUMULATE)
    with pytest.raises(RuntimeError if mode == "raise" else GradscopeError):
        run.fit(model, loader(BATCH * ACCUMULATE * 6))
    assert callback.scope is not None and callback.scope.closed
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    optimizer = run.optimizers[0]
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    report = callback.report
    assert report is not None
    training = report.analysis["training"]
    assert training["steps"] == (2 if mode == "raise" else 3)
    if mode == "nan":
        assert training["first_nonfinite"]["step"] == 2
        assert any(f.code == "nonfinite" for f in report.findings)
    assert list(log_dir.glob("**/events.out.tfevents.*"))


class Diverging(Tiny):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.net = diverging_net(at)


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 4, 10, 50])
def test_lightning_stops_at_the_first_nan_step_and_names_the_layer(tmp_path, every: int) -> None:
    from gradscope.errors import GradscopeError

    torch.manual_seed(0)
    model = Diverging(at=6)
    callback = GradscopeCallback(every=every)
    run = trainer(tmp_path, callback, 12)
    with pytest.raises(GradscopeError) as info:
        run.fit(model, loader(BATCH * 12))
    record = info.value.record
    where = (record["step"], record["layer"], record["role"], record["origin"])
    assert where == (6, "net.1", "activation", "produced")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # step 6's update never ran
    assert run.global_step == 6
    report = callback.report
    assert report is not None and callback.scope.closed
    assert report.analysis["training"]["first_nonfinite"]["layer"] == "net.1"
    # the default log_dir is the trainer's own (default_root_dir without a logger)
    assert list((tmp_path / "gradscope").glob("events.out.tfevents.*"))
