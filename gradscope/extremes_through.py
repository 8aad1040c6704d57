"""Exact extremes of a piecewise-linear layer's output from its input's.

A ReLU, ReLU6, Hardtanh, LeakyReLU with a slope >= 0 or Identity applies a
non-decreasing function f elementwise, so min f(x) = f(min x) and
max f(x) = f(max x).  These f are clamps and one multiplication, which give the
same float whether computed on one number or by a vectorised kernel, and they
propagate NaN (f(NaN) = NaN, and the input's min/max are NaN when it holds one),
so the result equals ``torch.aminmax`` of the output bit for bit.  The recorder
uses it when the layer's input is the output it recorded just before: one
pass over the tensor less on a sampled step (a CNN's in-place ReLU after each
BatchNorm reads 16 MB less each; the MLP benchmark's eight ReLUs 1 MB each).

Sigmoid, Tanh, GELU… are not here: their scalar and vectorised kernels may
differ in the last bit, and the extremes are promised exact.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import nn

Through = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _identity(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lo, hi


def _relu(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lo.clamp_min(0), hi.clamp_min(0)


@cache
def _kind(cls: Any) -> str | None:
    if cls is nn.ReLU:
        return "relu"
    if cls in (nn.ReLU6, nn.Hardtanh):
        return "clamp"
    if cls is nn.LeakyReLU:
        return "leaky"
    if cls is nn.Identity:
        return "identity"
    return None


def extremes_through(module: nn.Module) -> Through | None:
    """The map from input extremes to output extremes of ``module``, or None
    when it is not one of torch.nn's piecewise-linear non-decreasing layers
    (subclasses excluded: they may override ``forward``)."""
    cls: Any = type(module)
    kind = _kind(cls)
    if kind is None:
        return None
    if kind == "relu":
        return _relu
    if kind == "identity":
        return _identity
    if kind == "clamp":
        low, high = float(module.min_val), float(module.max_val)  # type: ignore[arg-type]
        if low > high:
            return None
        return lambda lo, hi: (lo.clamp(low, high), hi.clamp(low, high))
    slope = float(module.negative_slope)  # type: ignore[arg-type]
    if slope < 0:
        return None  # decreasing on the negative side: the extremes swap and mix
    return lambda lo, hi: (
        torch.nn.functional.leaky_relu(lo, slope),
        torch.nn.functional.leaky_relu(hi, slope),
    )


def in_place(module: nn.Module) -> bool:
    """Whether the layer overwrites its input (``inplace=True``)."""
    return bool(getattr(module, "inplace", False))
