"""The Lightning callback feeds each validation run's logged ``val_loss`` to ``scope.validation``
(real ``lightning.Trainer``, tiny model, CPU): the report's evaluations are Lightning's own numbers."""

from __future__ import annotations

import pytest
import torch
from lightning_tiny import BATCH, Tiny, loader, trainer
from torch import nn

from gradscope.integrations.lightning import GradscopeCallback

STEPS = 6
VAL_EVERY = 2


class Logging(Tiny):
    """Logs ``val_loss`` as a user would, and keeps Lightning's value of each validation run."""

    def __init__(self) -> None:
        super().__init__()
        self.val_losses: list[tuple[int, float]] = []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", loss)
        return loss

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_losses.append((self.trainer.global_step, float(self.trainer.callback_metrics["val_loss"])))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)


@pytest.mark.slow
def test_lightning_feeds_validation_automatically(tmp_path) -> None:
    torch.manual_seed(0)
    model = Logging()
    callback = GradscopeCallback(every=1)
    run = trainer(
        tmp_path,
        callback,
        STEPS,
        num_sanity_val_steps=1,  # the sanity check is not an evaluation of training
        val_check_interval=VAL_EVERY,
        limit_val_batches=2,
    )
    run.fit(model, loader(BATCH * STEPS, 0), loader(2 * BATCH, 1))
    validation = callback.report.analysis["regularisation"]["validation"]
    history = [(e["step"], e["loss"]) for e in validation["history"]]
    assert len(history) == STEPS // VAL_EVERY == len(model.val_losses)
    for (step, loss), (lightning_step, lightning_loss) in zip(history, model.val_losses, strict=True):
        assert step == lightning_step
        assert loss == pytest.approx(lightning_loss, rel=1e-6)
    best_step, best_loss = min(model.val_losses, key=lambda item: item[1])
    assert validation["best_step"] == best_step and validation["best_loss"] == pytest.approx(best_loss, rel=1e-6)
    # the optimizer Lightning steps was read through its LightningOptimizer wrapper
    optimizer = callback.report.analysis["regularisation"]["optimizer"]
    assert optimizer["optimizer"] == "AdamW" and optimizer["groups"][0]["eta_lambda"] == pytest.approx(0.001)
