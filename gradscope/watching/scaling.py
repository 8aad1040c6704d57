"""GradScaler support: how to read the scale without a host sync, whether the
gradients in ``.grad`` are still scaled, and statistics divided by the scale.

``torch.amp.GradScaler`` starts at 2^16, doubles after 2000 clean steps and
halves on overflow (skipping that step), so its scale is a power of two unless
the user chose another ``init_scale``/factors.  Dividing a statistics vector by
a power of two is exact: moments scale, and the exponent histogram shifts by
log2(scale) bins.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradscope.stats import HIST, HIST_BINS, M2, MAX, MEAN, MIN, Stats


def active_scaler(scaler: Any) -> Any:
    """The scaler when it is a GradScaler that is enabled, else None."""
    if scaler is None:
        return None
    is_enabled = getattr(scaler, "is_enabled", None)
    if callable(is_enabled) and not is_enabled():
        return None
    return scaler


def scale_value(scaler: Any) -> torch.Tensor | float | None:
    """The current scale without reading it back: the scaler's device tensor, or
    the Python number a custom scaler keeps (left a number: written into the
    ring with ``fill_`` and divided by as a kernel argument, never copied to
    the device as a new tensor each step).

    ``GradScaler.get_scale()`` calls ``.item()``; ``_get_scale_async()`` (present
    in torch.amp and torch.cuda.amp) returns the tensor it would have read.
    """
    getter = getattr(scaler, "_get_scale_async", None)
    if getter is None:
        return None
    value = getter()
    return value if isinstance(value, torch.Tensor) else float(value)


def grads_already_unscaled(scaler: Any, optimizer: Any) -> bool:
    """True when ``scaler.unscale_(optimizer)`` ran this step (Lightning and users
    who clip call it before the optimizer step), read from the scaler's per-
    optimizer stage without a sync.  Unknown means scaled (the default state)."""
    if optimizer is None:
        return False
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        return False
    state = states.get(id(optimizer))
    if not state:
        return False
    stage = state.get("stage")
    return getattr(stage, "name", "") == "UNSCALED"


def divide_stats(stats: Stats, scale: float) -> Stats:
    """Statistics of ``x / scale`` from those of ``x``.

    Exact for a power-of-two scale.  For another scale the histogram shifts by
    round(log2(scale)) bins (each count may land one binade off).  Counts that
    fall below fp32's smallest subnormal become zeros; the top bin (non-finite
    values and finite ones >= 2^105) stays where it is.
    """
    if scale == 1.0 or not math.isfinite(scale) or scale <= 0.0:
        return stats
    v = stats.vector.clone()
    v[MEAN] = v[MEAN] / scale
    v[M2] = v[M2] / (scale * scale)
    v[MIN] = v[MIN] / scale
    v[MAX] = v[MAX] / scale
    shift = round(math.log2(scale))
    hist = stats.vector[HIST:]
    out = torch.zeros_like(hist)
    out[0] = hist[0]
    out[HIST_BINS - 1] = hist[HIST_BINS - 1]
    middle = torch.arange(1, HIST_BINS - 1)
    target = middle - shift
    target = torch.where(target < 1, torch.zeros_like(target), target)
    target = target.clamp(max=HIST_BINS - 1)
    out.index_add_(0, target, hist[1 : HIST_BINS - 1])
    v[HIST:] = out
    return Stats(v)
