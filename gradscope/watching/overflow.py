"""Finite gradients whose float32 squared norm overflowed: no NaN/Inf event.

The per-step global norm is a float32 sum of squares (``step_norms.squared_norms``,
as ``clip_grad_norm_`` computes it), so it reads inf as soon as the norm passes
√(float32 max) ≈ 1.8e19 although every element is finite: a GradScaler that
grew its scale for ~100k steps under bf16 autocast (bf16 never overflows, so
the scale never halves: ×2 every 2000 steps), or very large but finite
gradients.  Only then (the rare path, where a host read is acceptable: without
it the run would stop) the gradients are looked at again, overflow-safely:

* every element finite?  ``amax(|g|)`` is finite exactly when no element is
  NaN or inf (one reduction per tensor, no full-size mask: LESSONS "A masked
  isnan | isinf check allocates a full-size boolean tensor");
* the true norm, accumulated in float64 (whose squares reach 1e308), divided by
  the GradScaler's scale when the gradients were still scaled, for AutoClip and
  the spike detector in place of inf.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable

import torch

# √(float32 max): a float32 squared norm overflows above it.
FLOAT32_SQUARE_LIMIT = math.sqrt(torch.finfo(torch.float32).max)
# Steps whose true norm waits for its flush (at most one flush's steps, ``every``;
# bounded like the spike window, gradscope.watching.norms.SPIKE_WINDOW).
MAX_PENDING = 64


def elements_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite (reads the host: rare path only)."""
    if tensor.numel() == 0:
        return True
    with torch.no_grad():
        return bool(torch.isfinite(tensor.detach().abs().amax()))


def true_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The 2-norm of all ``tensors`` together, accumulated in float64: finite for
    any finite elements (reads the host: rare path only)."""
    with torch.no_grad():
        total = 0.0
        for tensor in tensors:
            total += float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64)) ** 2
    return math.sqrt(total)


class OverflowedNorms:
    """The true global norm of steps whose float32 norm overflowed over finite
    gradients, from the check that found them until the flush reads their slot."""

    def __init__(self) -> None:
        self._norms: OrderedDict[int, float] = OrderedDict()
        self.count = 0  # steps whose norm overflowed float32 (the training summary)

    def add(self, step: int, norm: float) -> None:
        if step not in self._norms:
            self.count += 1
        self._norms[step] = norm
        while len(self._norms) > MAX_PENDING:
            self._norms.popitem(last=False)

    def get(self, step: int, default: float) -> float:
        """The true norm of ``step`` if known, else ``default`` (kept for ``take``)."""
        return self._norms.get(step, default)

    def take(self, step: int) -> float | None:
        """The true norm of ``step``, once (None: not an overflow found by a check)."""
        return self._norms.pop(step, None)

    def measure(self, step: int, grads: list[tuple[str, torch.Tensor]], scale: float | None) -> dict[str, float] | None:
        """If every gradient element is finite, remember the true global norm of
        ``step`` (divided by ``scale``: gradients still scaled by a GradScaler) and
        return each parameter's true norm whose float32 square overflowed; None
        when some element is NaN/inf (a real event, for the search)."""
        if not grads or not all(elements_finite(grad) for _, grad in grads):
            return None
        divide = scale if scale else 1.0
        norms = {name: true_norm([grad]) / divide for name, grad in grads}
        self.add(step, math.sqrt(sum(n * n for n in norms.values())))
        return {name: norm for name, norm in norms.items() if norm * divide > FLOAT32_SQUARE_LIMIT}
