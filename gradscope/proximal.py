"""The proximal (soft-threshold) step of an L1 penalty: ``gradscope.fix.soft_threshold_``.

The lecture's proximal gradient descent for ``ℓ(θ) + λ|θ|``: take the gradient
step on ``ℓ`` alone, then apply ``S_λ(x) = sign(x)·max(0, |x| − λ)`` — every
weight within λ of zero becomes exactly zero.  Adding ``λ·|θ|`` to the loss
instead (a subgradient step) moves each weight by ``±ηλ`` every step, so small
weights oscillate around zero without ever reaching it: no sparsity.  With a
learning rate η the step size of the threshold is ``ηλ`` (``S_ηλ``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional


def _targets(model_or_params: nn.Module | torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(model_or_params, torch.Tensor):
        return [model_or_params]
    if isinstance(model_or_params, nn.Module):
        # Weights (matrices, kernels, embeddings), not biases or normalisation gains:
        # the penalty regularises the weights, as the lecture's "often do not regularise the bias".
        return [p for p in model_or_params.parameters() if p.ndim >= 2]
    return list(model_or_params)


def soft_threshold_(model_or_params: nn.Module | torch.Tensor | Iterable[torch.Tensor], lam: float) -> None:
    """Apply ``S_lam`` in place: ``w ← sign(w)·max(0, |w| − lam)``.  Call it right after
    ``optimizer.step()`` with ``lam = lr * l1_lambda`` (and no L1 term in the loss).

    Args:
        model_or_params: a module (its parameters with 2 or more dimensions), a
            tensor, or an iterable of tensors (all of them).
        lam: the threshold, ≥ 0.

    No host synchronisation: one ``softshrink`` per tensor on its device.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([[-0.3, -0.05, 0.0, 0.02, 0.5]]))
        >>> soft_threshold_(w, 0.1)
        >>> int((w == 0).sum()), round(float(w.data[0, 0]), 4), round(float(w.data[0, 4]), 4)
        (3, -0.2, 0.4)
    """
    if not lam >= 0:
        raise ValueError(f"soft_threshold_: lam must be >= 0, not {lam!r}")
    with torch.no_grad():
        for tensor in _targets(model_or_params):
            tensor.copy_(functional.softshrink(tensor, lam))
