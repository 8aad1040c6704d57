"""The Hugging Face callback feeds each evaluation's ``eval_loss`` to ``scope.validation`` (real
``transformers.Trainer``, tiny custom module, in-memory data, CPU, nothing downloaded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gradscope.integrations.huggingface import GradscopeTrainerCallback  # noqa: E402

BATCH = 4
STEPS = 6
EVAL_EVERY = 2


class TinyRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.net(x)
        result = {"logits": out}
        if labels is not None:
            result["loss"] = nn.functional.mse_loss(out, labels)
        return result


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Evaluations(transformers.TrainerCallback):
    """The Trainer's own eval_loss at each evaluation, to compare with gradscope's."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen.append((state.global_step, metrics["eval_loss"]))


@pytest.mark.slow
def test_trainer_feeds_evaluations_automatically(tmp_path) -> None:
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    callback, evaluations = GradscopeTrainerCallback(every=1), Evaluations()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        learning_rate=1e-2,
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=EVAL_EVERY,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=TinyRegressor(),
        args=args,
        train_dataset=Rows(BATCH * STEPS, 0),
        eval_dataset=Rows(2 * BATCH, 1),
        callbacks=[callback, evaluations],
    )
    try:
        trainer.train()
    finally:
        torch.set_num_threads(old)
    validation = callback.report.analysis["regularisation"]["validation"]
    history = [(e["step"], e["loss"]) for e in validation["history"]]
    assert len(evaluations.seen) == STEPS // EVAL_EVERY
    assert [s for s, _ in history] == [s for s, _ in evaluations.seen]
    for (_, loss), (_, hf_loss) in zip(history, evaluations.seen, strict=True):
        assert loss == pytest.approx(hf_loss, rel=1e-6)
    assert "eval_loss" in validation["history"][0]["metrics"]
    # the Trainer's AdamW and its no-decay groups for biases and LayerNorm were read
    optimizer = callback.report.analysis["regularisation"]["optimizer"]
    assert optimizer["optimizer"] == "AdamW"
    assert sorted(g["weight_decay"] for g in optimizer["groups"]) == [0.0, 0.01]
