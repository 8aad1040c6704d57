"""The run-level numbers of a watched run, read from each flush's ring: global
gradient norms (history for AutoClip, spikes), losses, the GradScaler's scale
and skipped steps, and the trainer's clipping; ``summary()`` is
``analysis["training"]`` of the report.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from gradscope.training import SpikeSummary, clip_advice
from gradscope.watching.clip_ceiling import ClipCeiling
from gradscope.watching.divergence import NonfiniteSpans
from gradscope.watching.norms import NormHistogram, Spike, SpikeDetector
from gradscope.watching.overflow import OverflowedNorms
from gradscope.watching.step_norms import LOSS, NORM, SCALE, StepNorms


@dataclass
class RingReading:
    """What the ring of one flush said, step by step."""

    global_norms: list[tuple[int, float]] = field(default_factory=list)  # (step, norm)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    scale_now: float | None = None
    first_bad_norm: int | None = None
    first_bad_loss: int | None = None
    spike: Spike | None = None
    ceiling_found: bool = False  # norms first seen pinned at one ceiling (clip_ceiling)


class TrainingState:
    """Global norms, losses and loss scales over the whole run (bounded memory)."""

    def __init__(self, spans: NonfiniteSpans | None = None) -> None:
        self.history = NormHistogram()
        self.detector = SpikeDetector()
        self.spikes = SpikeSummary()
        self.last_scale: float | None = None
        self.skipped = 0
        self.scale_history: deque[tuple[int, float]] = deque(maxlen=64)
        self.loss_last: float | None = None
        self.global_last: float | None = None
        self.global_max: float = 0.0
        self.flushes = 0
        # The trainer's gradient clipping (observe_gradients): its max_norm, for the summary.
        self.clip_max_norm: float | None = None
        self.clipped_steps = 0
        self.post_clip_last: float | None = None
        # Norms pinned at one ceiling: gradients clipped before step() (clip_ceiling).
        self.ceiling = ClipCeiling()
        # The run's non-finite steps and open episode (gradscope.watching.divergence):
        # their norms are the diverged run's or a bad batch's, kept out of the AutoClip
        # history, the spike detector and the norm summary; the steps after an
        # episode that cleared come back in.
        self.spans = spans if spans is not None else NonfiniteSpans()
        # Norms that overflowed float32 over finite gradients, measured again by the
        # check that found them (gradscope.watching.overflow): read in place of inf.
        self.overflowed = OverflowedNorms()

    def read(self, steps: list[int], ring: torch.Tensor | None, norms: StepNorms) -> RingReading:
        """Walk the ring's slots of ``steps``: scales, losses, norms, spikes."""
        out = RingReading()
        for t in steps:
            slot = t % norms.every
            if ring is None:
                break
            if norms.scale_given[slot]:
                self._read_scale(float(ring[SCALE, slot]), out)
            loss: float | None = None
            if norms.loss_given[slot]:
                loss = float(ring[LOSS, slot])
                out.losses.append((t, loss))
                self.loss_last = loss
                if not math.isfinite(loss) and out.first_bad_loss is None:
                    out.first_bad_loss = t
            if not norms.norm_given[slot]:
                continue  # tier "light": gradient norms on sampled steps only
            self._read_norm(t, float(ring[NORM, slot]), out, loss)
        return out

    def peek(self, steps: list[int], ring: torch.Tensor | None, norms: StepNorms) -> RingReading:
        """What ``read`` will say of the ring's slots of ``steps`` (scale, losses, norms
        and the first non-finite ones), without reading them into the run's state:
        the flush searches its step first, so that a step it finds non-finite never
        enters the norm history (gradscope.watching.divergence)."""
        out = RingReading()
        if ring is None:
            return out
        for t in steps:
            slot = t % norms.every
            if norms.scale_given[slot]:
                out.scale_now = float(ring[SCALE, slot])
            if norms.loss_given[slot]:
                loss = float(ring[LOSS, slot])
                out.losses.append((t, loss))
                if not math.isfinite(loss) and out.first_bad_loss is None:
                    out.first_bad_loss = t
            if norms.norm_given[slot]:
                norm = float(ring[NORM, slot])
                if not math.isfinite(norm):
                    norm = self.overflowed.get(t, norm)
                out.global_norms.append((t, norm))
                if not math.isfinite(norm) and out.first_bad_norm is None:
                    out.first_bad_norm = t
        return out

    def _read_scale(self, scale: float, out: RingReading) -> None:
        if self.last_scale is not None and scale < self.last_scale:
            self.skipped += 1  # GradScaler halves the scale when it skips a step
        self.last_scale = out.scale_now = scale

    def _read_norm(self, t: int, norm: float, out: RingReading, loss: float | None = None) -> None:
        true = self.overflowed.take(t)
        if true is not None and not math.isfinite(norm):
            norm = true  # finite gradients whose float32 squared norm overflowed
        out.global_norms.append((t, norm))
        if not math.isfinite(norm) and out.first_bad_norm is None:
            out.first_bad_norm = t
        if self.spans.is_bad(t):
            # A step already known non-finite (an unsampled one, found by its own
            # check).  A sampled bad step is read before its flush finds it: its
            # norm, non-finite, then only counts as such.  Non-finite norms of an
            # open episode count as such too; its finite ones are real samples.
            if not math.isfinite(norm):
                self.history.add(norm)
            return
        if self.clip_max_norm is None and self.ceiling.observe(norm, loss):
            out.ceiling_found = True  # said by the flush, on the writing rank only
        if self.clip_max_norm and math.isfinite(norm):
            # torch.nn.utils.clip_grads_with_norm_: factor max_norm / (norm + 1e-6), at most 1
            self.post_clip_last = norm * min(1.0, self.clip_max_norm / (norm + 1e-6))
            self.clipped_steps += norm > self.clip_max_norm
        self.history.add(norm)
        if math.isfinite(norm):
            self.global_last = norm
            self.global_max = max(self.global_max, norm)
        found = self.detector.observe(t, norm)
        if found is not None:
            self.spikes.add(found)
            out.spike = found

    def summary(
        self,
        *,
        steps: int,
        every: int,
        tier: str,
        sampled_steps: int,
        scaler_seen: bool,
        update_ratio: Any,
        first_nonfinite: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The run-level numbers: norms, clip advice, loss scale, update ratios."""
        clip = clip_advice(self.history)
        return {
            "steps": steps,
            "every": every,
            "tier": tier,
            "flushes": self.flushes,
            "sampled_steps": sampled_steps,
            "global_grad_norm_last": self.global_last,
            "global_grad_norm_max": self.global_max,
            "nonfinite_norm_steps": self.history.nonfinite,
            "norm_overflow_steps": self.overflowed.count,
            "clip": clip,
            "spikes": self.spikes.count,
            "spike_steps": list(self.spikes.steps),
            "loss_last": self.loss_last,
            "loss_scale": self.last_scale,
            "loss_scale_history": [list(x) for x in self.scale_history],
            "skipped_steps": self.skipped if scaler_seen else None,
            "update_ratio": update_ratio,
            "first_nonfinite": first_nonfinite,
            "clipped_before_step": self.ceiling.summary(),
            "clipping": None
            if not self.clip_max_norm
            else {
                "norms": "measured before the trainer's gradient clipping",
                "max_norm": self.clip_max_norm,
                "clipped_steps": self.clipped_steps,
                "global_grad_norm_post_clip_last": self.post_clip_last,
            },
        }
