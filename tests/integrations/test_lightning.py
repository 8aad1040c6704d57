"""The Lightning callback, through the real ``lightning.Trainer`` on CPU."""

from __future__ import annotations

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gradscope.integrations.lightning import GradscopeCallback  # noqa: E402

BATCH = 4
ACCUMULATE = 2
STEPS = 4


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
        self.val_forwards = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)  # calls the submodule, not self

    def validation_step(self, batch, batch_idx):
        self.val_forwards += 1
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=BATCH)


def test_lightning_callback_records_per_optimizer_step(tmp_path) -> None:
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model = Tiny()
    callback = GradscopeCallback(every=1, log_dir=str(tmp_path / "tb"))
    trainer = pl.Trainer(
        max_steps=STEPS,
        accumulate_grad_batches=ACCUMULATE,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=2 * ACCUMULATE,  # a validation pass in the middle of training
        limit_val_batches=2,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
    )
    try:
        trainer.fit(model, loader(BATCH * ACCUMULATE * STEPS), loader(2 * BATCH))
    finally:
        torch.set_num_threads(old)
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
    """Raises ``RuntimeError`` (mode "raise") or feeds NaN (mode "nan") from the
    ``fail_at``-th training batch on."""

    def __init__(self, mode: str, fail_at: int) -> None:
        super().__init__()
        self.mode, self.fail_at, self.batches = mode, fail_at, 0

    def training_step(self, batch, batch_idx):
        self.batches += 1
        if self.batches >= self.fail_at:
            if self.mode == "raise":
                raise RuntimeError("the data pipeline broke")
            batch = (batch[0] * float("nan"), batch[1])
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_lightning_run_that_raises_leaves_no_hook_and_a_report(tmp_path, mode: str) -> None:
    from gradscope.errors import GradscopeError

    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model = Failing(mode, fail_at=5)  # the 3rd optimizer step (2 micro-batches each)
    log_dir = tmp_path / "tb"
    callback = GradscopeCallback(every=1, log_dir=str(log_dir))
    trainer = pl.Trainer(
        max_steps=6,
        accumulate_grad_batches=ACCUMULATE,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
    )
    try:
        with pytest.raises(RuntimeError if mode == "raise" else GradscopeError):
            trainer.fit(model, loader(BATCH * ACCUMULATE * 6))
    finally:
        torch.set_num_threads(old)
    assert callback.scope is not None and callback.scope.closed
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    optimizer = trainer.optimizers[0]
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    report = callback.report
    assert report is not None
    training = report.analysis["training"]
    assert training["steps"] == (2 if mode == "raise" else 3)
    if mode == "nan":
        assert training["first_nonfinite"]["step"] == 2
        assert any(f.code == "nonfinite" for f in report.findings)
    assert list(log_dir.glob("**/events.out.tfevents.*"))


class Blowup(nn.Module):
    """inf from its ``at``-th training forward on."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        return x * float("inf") if self.training and self.calls > self.at else x


class Diverging(pl.LightningModule):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), Blowup(at), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 4, 10, 50])
def test_lightning_stops_at_the_first_nan_step_and_names_the_layer(tmp_path, every: int) -> None:
    from gradscope.errors import GradscopeError

    torch.manual_seed(0)
    model = Diverging(at=6)
    callback = GradscopeCallback(every=every)
    trainer = pl.Trainer(
        max_steps=12,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
    )
    with pytest.raises(GradscopeError) as info:
        trainer.fit(model, loader(BATCH * 12))
    record = info.value.record
    where = (record["step"], record["layer"], record["role"], record["origin"])
    assert where == (6, "net.1", "activation", "produced")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # step 6's update never ran
    assert trainer.global_step == 6
    report = callback.report
    assert report is not None and callback.scope.closed
    assert report.analysis["training"]["first_nonfinite"]["layer"] == "net.1"
    # the default log_dir is the trainer's own (default_root_dir without a logger)
    assert list((tmp_path / "gradscope").glob("events.out.tfevents.*"))
