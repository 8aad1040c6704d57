"""The Hugging Face callback feeds each evaluation's ``eval_loss`` to ``scope.validation`` (real
``transformers.Trainer``, tiny custom module, in-memory data, CPU, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import BATCH, Rows, TinyRegressor, training_args, transformers

from gradscope.integrations.huggingface import GradscopeTrainerCallback

STEPS = 6
EVAL_EVERY = 2


class Evaluations(transformers.TrainerCallback):
    """The Trainer's own eval_loss at each evaluation, to compare with gradscope's."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen.append((state.global_step, metrics["eval_loss"]))


@pytest.mark.slow
def test_trainer_feeds_evaluations_automatically(tmp_path) -> None:
    torch.manual_seed(0)
    callback, evaluations = GradscopeTrainerCallback(every=1), Evaluations()
    args = training_args(
        tmp_path,
        STEPS,
        per_device_eval_batch_size=BATCH,
        learning_rate=1e-2,
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=EVAL_EVERY,
    )
    trainer = transformers.Trainer(
        model=TinyRegressor(),
        args=args,
        train_dataset=Rows(BATCH * STEPS, 0),
        eval_dataset=Rows(2 * BATCH, 1),
        callbacks=[callback, evaluations],
    )
    trainer.train()
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
