"""The forgotten ``model.train()``: training steps after an evaluation with the model
still in eval mode (Dropout off, BatchNorm on running statistics), the mirror of
``train-mode-inference``'s forgotten ``model.eval()``, said under the same code.
Deliberate cases stay quiet: BatchNorm frozen under a model in training mode, and
a gradient forward in eval mode that no optimizer step follows (a saliency map)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradscope.report import Report
from gradscope.watching import Scope


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(  # dropout 0.1 everywhere (GPT-2's default)
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def gpt2_run(after_evaluation: Callable[[nn.Module], None]) -> Report:
    """3 training steps, an evaluation (model.eval(), no_grad), ``after_evaluation``, 3 more steps."""
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    with Scope(model, every=2) as scope:
        for step in range(6):
            if step == 3:
                model.eval()
                with torch.no_grad():
                    model(input_ids=torch.randint(0, 64, (4, 16), generator=generator))
                after_evaluation(model)
            ids = torch.randint(0, 64, (4, 16), generator=generator)
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            scope.step(opt, loss=loss)
            opt.step()
    return scope.report()


def mode_findings(report: Report) -> list:
    return [f for f in report.findings if f.code == "train-mode-inference"]


@pytest.mark.slow
def test_training_on_after_evaluation_without_train_is_found() -> None:
    report = gpt2_run(lambda model: None)  # model.train() forgotten
    (finding,) = mode_findings(report)
    assert finding.evidence["direction"] == "eval mode during training"
    assert finding.evidence["first_eval_mode_step"] == 3 and finding.evidence["steps"] == 3
    assert "Dropout" in finding.evidence["module_types"] and "transformer.drop" in finding.layers
    assert "model.train()" in finding.fix.code and finding.severity == "warning"
    assert report.analysis["regularisation"]["eval_mode_training_steps"] == 3


@pytest.mark.slow
def test_training_after_model_train_is_quiet() -> None:
    assert not mode_findings(gpt2_run(lambda model: model.train()))


def test_frozen_batchnorm_and_a_saliency_map_are_quiet() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * 6 * 6, 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    with Scope(model, every=1) as scope:
        for step in range(6):
            if step == 2:  # a saliency map in eval mode: gradients on, no optimizer step
                model.eval()
                image = x[:1].clone().requires_grad_(True)
                model(image).max().backward()
                model.train()
            model[1].eval()  # BatchNorm frozen on purpose (fine-tuning); the model trains
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step(opt)
            opt.step()
    report = scope.report()
    assert not mode_findings(report)
    assert report.analysis["regularisation"]["eval_mode_training_steps"] == 0
