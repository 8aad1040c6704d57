"""The tiny regression problem as the ``transformers.Trainer`` takes it (CPU, in
memory, nothing downloaded); importing this module skips the test module without
transformers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from tiny_regression import rows, tiny_net  # noqa: E402
from torch import nn  # noqa: E402

BATCH = 4


class TinyRegressor(nn.Module):
    """``tiny_net`` returning a dict with the MSE loss when given labels, as HF models do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.net(x)
        result = {"logits": out}
        if labels is not None:
            result["loss"] = nn.functional.mse_loss(out, labels)
        return result


class Rows(torch.utils.data.Dataset):
    """``tiny_regression.rows`` as HF batches: ``{"x": ..., "labels": ...}``."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.x, self.y = rows(n, seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def training_args(output_dir: Path, steps: int, **extra: Any) -> Any:
    """TrainingArguments for a quiet CPU run of ``steps`` optimizer steps of BATCH rows; ``extra`` overrides."""
    options: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    options.update(extra)
    return transformers.TrainingArguments(**options)
