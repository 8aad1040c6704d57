"""A model whose hooks never fire (compiled, or traced, before watch attached) is
said to be so, once, with the fix; an eager model never hears it."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import gradscope

NO_HOOKS = "no layer was recorded although gradients arrived"


def _train(model: nn.Module, run: nn.Module, caplog: pytest.LogCaptureFixture) -> gradscope.watching.scope.Scope:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.WARNING, logger="gradscope"), gradscope.watch(model) as scope:
        for _ in range(3):
            opt.zero_grad()
            run(torch.randn(4, 4)).pow(2).mean().backward()
            scope.step(opt)
            opt.step()
    return scope


def test_a_graph_traced_before_watch_attached_gets_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # torch.jit.trace, like torch.compile run before watch, holds a graph of the
    # model's parameters that never calls the hooked modules.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, torch.randn(2, 4))
    scope = _train(model, traced, caplog)
    assert model[0].weight.grad is not None  # it did train the watched parameters
    assert scope.report().layers == []
    notes = [note for note in scope.report().record.notes if NO_HOOKS in note]
    assert len(notes) == 1 and "compile" in notes[0]
    assert sum(NO_HOOKS in r.getMessage() for r in caplog.records) == 1  # once, not per step


def test_an_eager_model_gets_no_such_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    scope = _train(model, model, caplog)
    assert [layer.name for layer in scope.report().layers] == ["0", "1", "2"]
    assert not any(NO_HOOKS in note for note in scope.report().record.notes)
    assert not any(NO_HOOKS in r.getMessage() for r in caplog.records)
