"""The run-level numbers of a watched run, read from each flush's ring: global
gradient norms (history for AutoClip, spikes), losses, the GradScaler's scale
and skipped steps, and the trainer's clipping; ``summary()`` is
``analysis["training"]`` of the report.

A run that steps several optimizers (a GAN's G and D, each given to ``step()``)
measures at each step the parameters of the optimizer stepping
(``step_norms.OptimizerScopes``); their norms are different quantities (D's
norm is 4x G's in a DCGAN loop), so each optimizer has its own spike window and
AutoClip history: a G step is never compared with D's norms, nor clipped at a
threshold drawn from them.  The run-level ``clip`` is then None and each
optimizer's is in ``optimizers``.
"""

from __future__ import annotations

import dataclasses
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
class OptimizerNorms:
    """One optimizer's norms: its AutoClip history and spike window."""

    history: NormHistogram = field(default_factory=NormHistogram)
    detector: SpikeDetector = field(default_factory=SpikeDetector)
    last: float | None = None
    max: float = 0.0
    spike_steps: list[int] = field(default_factory=list)  # the first SpikeSummary.MAX_STEPS
    spikes: int = 0


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
        self.history = NormHistogram()  # every step's norm (one optimizer: the AutoClip history)
        self.by_optimizer: dict[int, OptimizerNorms] = {}  # step_norms.OptimizerScopes' index
        self.labels: list[str] = []
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
        # Clipping by value (Lightning's gradient_clip_algorithm="value"): each element
        # capped at this; the norm after it is not a function of the norm before.
        self.clip_max_value: float | None = None
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
        self.labels = list(norms.scopes.labels)
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
            self._read_norm(t, float(ring[NORM, slot]), out, loss, norms.optimizer_at[slot])
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

    def _read_norm(self, t: int, norm: float, out: RingReading, loss: float | None = None, key: int = 0) -> None:
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
        own = self.by_optimizer.setdefault(key, OptimizerNorms())
        own.history.add(norm)
        if math.isfinite(norm):
            self.global_last = own.last = norm
            self.global_max = max(self.global_max, norm)
            own.max = max(own.max, norm)
        found = own.detector.observe(t, norm)
        if found is not None:
            if len(self.labels) > 1:
                found = dataclasses.replace(found, optimizer=self.labels[key])
            self.spikes.add(found)
            own.spikes += 1
            if len(own.spike_steps) < SpikeSummary.MAX_STEPS:
                own.spike_steps.append(t)
            out.spike = found

    def clip(self, spike: Spike | None = None) -> dict[str, Any] | None:
        """AutoClip advice: the run's with one optimizer; with several, the spiking
        optimizer's for ``spike``, else None (each optimizer's is in ``optimizers``)."""
        if len(self.by_optimizer) <= 1:
            return clip_advice(self.history)
        if spike is not None and spike.optimizer in self.labels:
            own = self.by_optimizer.get(self.labels.index(spike.optimizer))
            return clip_advice(own.history) if own is not None else None
        return None

    def optimizers(self) -> list[dict[str, Any]] | None:
        """Per optimizer (several only): its norms, spikes and AutoClip advice."""
        if len(self.by_optimizer) <= 1:
            return None
        return [
            {
                "optimizer": self.labels[key] if key < len(self.labels) else str(key),
                "steps_measured": own.history.count + own.history.zeros + own.history.nonfinite,
                "global_grad_norm_last": own.last,
                "global_grad_norm_max": own.max,
                "clip": clip_advice(own.history),
                "spikes": own.spikes,
                "spike_steps": list(own.spike_steps),
            }
            for key, own in sorted(self.by_optimizer.items())
        ]

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
        clip = self.clip()
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
            "optimizers": self.optimizers(),
            "spikes": self.spikes.count,
            "spike_steps": list(self.spikes.steps),
            "loss_last": self.loss_last,
            "loss_scale": self.last_scale,
            "loss_scale_history": [list(x) for x in self.scale_history],
            "skipped_steps": self.skipped if scaler_seen else None,
            "update_ratio": update_ratio,
            "first_nonfinite": first_nonfinite,
            "clipped_before_step": self.ceiling.summary(),
            "clipping": self._clipping(),
        }

    def _clipping(self) -> dict[str, Any] | None:
        """The trainer's clipping, as the trainer said (integrations set it)."""
        if self.clip_max_norm:
            return {
                "norms": "measured before the trainer's gradient clipping",
                "algorithm": "norm",
                "max_norm": self.clip_max_norm,
                "clipped_steps": self.clipped_steps,
                "global_grad_norm_post_clip_last": self.post_clip_last,
            }
        if self.clip_max_value:
            return {
                "norms": "measured before the trainer's gradient clipping",
                "algorithm": "value",
                "max_value": self.clip_max_value,
                "max_norm": None,
                "clipped_steps": None,
                "global_grad_norm_post_clip_last": None,
            }
        return None
