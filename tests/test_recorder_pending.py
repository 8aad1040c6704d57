"""The recorder's pending sample copies across an early merge (``Recorder._take``).

A layer called in a loop many times per forward, over several micro-batches,
passes PENDING_SAMPLE_BUDGET (lowered here) many times within one step: every
early merge must keep every element (counts in closed form) and the running
count of pending elements must stay the true one, else the budget is overrun.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import gradscope.recorder as recorder_module
from gradscope.recorder import Recorder
from gradscope.stats import Sample, take_sample

CALLS = 10  # calls of the shared layer per forward
MICRO = 3  # micro-batches (forward+backward) per step
ROWS, WIDTH = 3, 4  # every hooked tensor has 12 elements
BUDGET = 50  # a merge every 4-5 sample copies


class SharedLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(CALLS):
            x = torch.tanh(self.lin(x))
        return x


def _pending_sample_elements(rec: Recorder) -> int:
    entries = [value for _, _, value in rec._pending] + list(rec._input_pending)
    return sum(value.values.numel() for value in entries if isinstance(value, Sample))


def test_early_merges_keep_every_element_and_the_pending_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder_module, "PENDING_SAMPLE_BUDGET", BUDGET)
    torch.manual_seed(0)
    model = SharedLoop()
    elements = ROWS * WIDTH
    counted: list[int] = []
    held: list[int] = []
    alive: list[int] = []  # copies in memory right after each take: the queue's and the new one
    # every site of ``_take``: the model's input, each call's output, its gradient, the weighted site's input
    with Recorder(model, sample=1024, record_inputs=True) as rec:  # 1024 > 12: every element is in the copy
        rec.start()

        def counting_take_sample(tensor: torch.Tensor, sample: int | None = None, **kwargs: Any) -> Sample:
            taken = take_sample(tensor, sample, **kwargs)
            alive.append(_pending_sample_elements(rec) + taken.values.numel())
            return taken

        monkeypatch.setattr(recorder_module, "take_sample", counting_take_sample)

        def check(module: nn.Module, args: tuple, output: torch.Tensor) -> None:  # after the recorder's own hook
            counted.append(rec._pending_elements)
            held.append(_pending_sample_elements(rec))

        handle = model.lin.register_forward_hook(check)
        try:
            for _ in range(MICRO):
                model(torch.randn(ROWS, WIDTH)).pow(2).mean().backward()
                counted.append(rec._pending_elements)
                held.append(_pending_sample_elements(rec))
        finally:
            handle.remove()
        record = rec.finish()

    assert counted == held  # the running count is the copies really waiting
    # what the budget promises: at most the one copy that crossed it on top
    assert max(alive) <= BUDGET + elements
    assert BUDGET < max(alive) and any(b < a for a, b in zip(held, held[1:], strict=False))  # merges happened
    names = ["lin"] + [f"lin#{k}" for k in range(2, CALLS + 1)]
    assert [layer.name for layer in record.layers] == names
    for layer in record.layers:  # closed form: every element of every call of every micro-batch
        assert layer.activation.count == MICRO * elements, layer.name
        assert layer.gradient.count == MICRO * elements, layer.name
    assert record.input.count == MICRO * elements
    assert record.layers[0].input.count == MICRO * elements  # the call site that owns the weight
