"""The tiny regression problem as a ``lightning.Trainer`` takes it (CPU); importing
this module skips the test module without Lightning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from tiny_regression import rows, tiny_net  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

BATCH = 4


class Tiny(pl.LightningModule):
    """``tiny_net`` with the MSE loss, trained by SGD; counts its validation batches."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()
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


def loader(n: int, seed: int = 0) -> DataLoader:
    """``tiny_regression.rows`` in batches of BATCH."""
    return DataLoader(TensorDataset(*rows(n, seed)), batch_size=BATCH)


def trainer(root: Path, callback: Any, steps: int, **extra: Any) -> Any:
    """A quiet CPU Trainer of ``steps`` optimizer steps, no logger, checkpoint or sanity check; ``extra`` overrides."""
    options: dict[str, Any] = dict(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=[callback],
    )
    options.update(extra)
    return pl.Trainer(**options)
