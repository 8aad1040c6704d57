"""Gradients clipped before ``scope.step()``: the norms gradscope sees stop at one ceiling.

The plain loop ``backward → clip_grad_norm_(max_norm) → scope.step → optimizer.step``
hands gradscope clipped gradients.  ``clip_grad_norm_`` scales every gradient by
``max_norm / (norm + 1e-6)`` when the norm exceeds ``max_norm``
(torch.nn.utils.clip_grads_with_norm_), so each clipped step measures
``max_norm · norm / (norm + 1e-6)``: ``max_norm`` to within ``1e-6 / norm``
relative (``1e-6 / max_norm`` at most, since only norms above ``max_norm`` are
clipped), and to float32 rounding (~1e-7) in the measurement.  A spike is
then invisible (the field trial's 1000x batch, true norm 615, read 1.0) and
AutoClip's percentile is taken over clipped norms.

Norms a model produces are continuous values: three of them at the run's
maximum to within CEILING_TOLERANCE does not happen by chance, while clipping
produces it on every step whose true norm is above ``max_norm``.  Except when
the gradients themselves repeat: the same batch with no learning (a learning
rate of 0, a benchmark, an "overfit one batch" check before its first update)
gives the same norm each step.  So the ceiling counts only with evidence that
the gradients differed: two different losses among the steps at the ceiling,
or, without losses, a step below it (clipping caps varying norms; repeated
gradients vary in nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Relative agreement of two norms that counts as "the same ceiling": the clipping
# factor's own deviation (1e-6 / max_norm at most, added in ``_tolerance``) plus
# 1e-5 for the float32 rounding of the measured norm (6e-8) with a wide margin.
CEILING_TOLERANCE = 1e-5
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grads_with_norm_: max_norm / (total_norm + 1e-6)
# Steps at the ceiling before the run is said to be clipped before step(): two
# could be a coincidence of a quantised loss; three at 1e-5 are not.
CEILING_STEPS = 3


@dataclass
class ClipCeiling:
    """The run's largest finite norm and how many steps met it."""

    ceiling: float = 0.0
    at_ceiling: int = 0
    seen: int = 0
    announced: bool = False
    below: bool = False  # a step's norm below the ceiling was seen
    losses: set[float] = field(default_factory=set)  # the losses of the steps at the ceiling (a few)

    def observe(self, norm: float, loss: float | None = None) -> bool:
        """Count one step's norm (and its loss, when given); True exactly once, when
        the ceiling is first established."""
        if not math.isfinite(norm) or norm <= 0:
            return False
        self.seen += 1
        if math.isclose(norm, self.ceiling, rel_tol=CEILING_TOLERANCE + CLIP_EPS / max(self.ceiling, norm)):
            self.at_ceiling += 1
            self._loss(loss)
        elif norm > self.ceiling:
            self.below = self.below or self.at_ceiling > 0
            self.ceiling, self.at_ceiling, self.losses = norm, 1, set()
            self._loss(loss)
        else:
            self.below = True
        if self.clipped and not self.announced:
            self.announced = True
            return True
        return False

    def _loss(self, loss: float | None) -> None:
        if loss is not None and math.isfinite(loss) and len(self.losses) < CEILING_STEPS:
            self.losses.add(loss)

    @property
    def clipped(self) -> bool:
        if self.at_ceiling < CEILING_STEPS:
            return False
        return len(self.losses) >= 2 if self.losses else self.below

    def message(self) -> str:
        return (
            f"the global gradient norms seen stop at {self.ceiling:.4g} on {self.at_ceiling} of {self.seen} steps: "
            "the gradients are clipped before scope.step(), so spikes and AutoClip see clipped norms; "
            "call scope.observe_gradients() right after backward() (and set scope.clip_max_norm to your max_norm) "
            "to see the real ones"
        )

    def summary(self) -> dict[str, Any] | None:
        """``analysis["training"]["clipped_before_step"]``: None unless the ceiling was found."""
        if not self.clipped:
            return None
        return {"ceiling": self.ceiling, "steps_at_ceiling": self.at_ceiling, "steps": self.seen}
