"""The tiny regression problem and the failures injected into it, shared by the
Hugging Face and Lightning tests (framework-free: each framework's module wraps it)."""

from __future__ import annotations

import torch
from torch import nn
from watch_steps import Blowup  # tests/ is on the path through its conftest.py

FEATURES = 5


def tiny_net() -> nn.Sequential:
    """5 -> 16 -> 1, its hooked layers named ``net.0``, ``net.1``, ``net.2`` under a ``net`` attribute."""
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))


def diverging_net(at: int) -> nn.Sequential:
    """``tiny_net`` with a layer ``net.1`` that turns inf from its ``at``-th call on."""
    return nn.Sequential(nn.Linear(FEATURES, 16), Blowup(at), nn.Tanh(), nn.Linear(16, 1))


def rows(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded N(0, 1) inputs and their targets, the sum of the features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    return x, x.sum(dim=1, keepdim=True)


class FailFrom:
    """From its ``fail_at``-th call on, raises ``RuntimeError`` (mode "raise") or
    returns its input times NaN (mode "nan"); before that, its input unchanged."""

    def __init__(self, mode: str, fail_at: int) -> None:
        self.mode, self.fail_at, self.calls = mode, fail_at, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls < self.fail_at:
            return x
        if self.mode == "raise":
            raise RuntimeError("the data pipeline broke")
        return x * float("nan")
