"""What the watch tests share: seeded batches, a layer that turns infinite on cue,
and the documented training step (``scope.step`` after backward, before
``optimizer.step``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradscope.watching import Scope


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s inputs (8 x 6) and regression targets (8 x 3), the same in every test."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


class Poison(nn.Module):
    """Tanh whose output turns NaN while ``on`` is set: a layer that produces the NaN itself
    (on one rank's rows only, when only that rank sets it)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        return y * math.nan if self.on else y


class Blowup(nn.Module):
    """Multiplies by inf from its ``at``-th call on (a forward that produces inf);
    ``at`` None: never.  Every call counts, evaluation forwards included."""

    def __init__(self, at: int | None = None) -> None:
        super().__init__()
        self.at = at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.at is not None and self.calls > self.at:
            return x * torch.tensor(float("inf"))
        return x


def blowup_model(at: int | None = None) -> nn.Sequential:
    """6 -> 16 -> 3 with a ``Blowup`` as layer "1" (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), Blowup(at), nn.Tanh(), nn.Linear(16, 3))


def train(
    model: nn.Module,
    scope: Scope,
    steps: int,
    loss_scale: Callable[[int], float] | None = None,
    *,
    evaluation: torch.Tensor | None = None,
    completed: list[int] | None = None,
) -> int:
    """Train ``steps`` steps on ``batch`` with SGD as documented; return the steps completed.

    ``loss_scale(step)`` multiplies that step's loss; ``evaluation``: a batch the
    model sees under no_grad before each step; ``completed`` gets each step whose
    ``optimizer.step()`` ran, so a caller whose run raises knows how far it went.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    done = 0
    for step in range(steps):
        if evaluation is not None:
            with torch.no_grad():
                model(evaluation)
        x, y = batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if loss_scale is not None:
            loss = loss * loss_scale(step)
        loss.backward()
        scope.step(opt, loss=loss)
        opt.step()
        done += 1
        if completed is not None:
            completed.append(step)
    return done


class _NanGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by NaN when ``poison``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, poison: bool) -> torch.Tensor:
        ctx.poison = poison
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad * torch.tensor(float("nan")) if ctx.poison else grad), None


class NanInBackward(nn.Module):
    """Forward finite; while ``poison`` is true (at its forward), its backward sends NaN
    to the layers before it (a NaN made in backward, not in forward)."""

    def __init__(self, poison: bool = True) -> None:
        super().__init__()
        self.poison = poison

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NanGradient.apply(x, self.poison)
