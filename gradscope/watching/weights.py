"""Weights over time: norm trajectory, decay vs gradient share, sparsity, ``l1-not-sparse``.

Measured at the diagnosis cadence (the Scope's full flushes, at most every
``DIAGNOSE_EVERY_STEPS`` steps), for each parameter with two or more dimensions
(the weights of Linear, Conv, Embedding...): its 2-norm, how many elements are
exactly zero, and how many are *near* zero, ``0 < |w| < SPARSITY_RTOL · RMS(w)``
(the latter from a strided sample of ``NEAR_ZERO_SAMPLE`` elements of a larger weight).
All of it is reduced on the device and reaches the host in one transfer.

Decay vs gradient, per step, for a parameter with learning rate η and weight
decay λ: the decay moves it by ``ηλ‖θ‖`` (the lecture's ``(1 − ηλ)θ``), the
gradient by ``η‖g‖`` (exact for SGD; for adaptive optimizers it is the scale of
the raw gradient, not of the normalised step).  ``decay_share`` is
``ηλ‖θ‖ / (ηλ‖θ‖ + η‖g‖)``: near 1 the decay dominates (weights collapse), near
0 it does nothing.

``l1-not-sparse``: a subgradient L1 penalty in the loss moves every weight by
``±ηλ`` each step, so weights that L1 would zero oscillate in a band of width
~ηλ around zero and never reach it.  A layer with at least
``L1_PILEUP_FRAC`` of its weights in ``0 < |w| < SPARSITY_RTOL·RMS`` has that
signature: for a dense Gaussian (or uniform) layer that band holds about
0.8 % (0.6 %) of the weights (P(|z| < 0.01) for z ~ N(0, 1)), so 20 % is 25x
what a layer without a pile-up shows.  The proximal step ``S_ηλ`` turns them into
exact zeros, which this rule does not count.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradscope.device_constants import on_device
from gradscope.distributed import ReductionGroup, sum_over_group
from gradscope.numbers import percent, significant
from gradscope.placement import ParameterRef, ParameterTable
from gradscope.report import Finding, Fix, Severity
from gradscope.stats import dense_view, strided_sample
from gradscope.watching.step_norms import squared_norms

SPARSITY_RTOL = 1e-2  # "near zero": |w| below 1 % of the layer's RMS
L1_PILEUP_FRAC = 0.2  # near-zero (non-zero) fraction that is a pile-up (see the module docstring)
L1_MIN_ELEMENTS = 64  # smaller weights give too coarse a fraction to judge
# The near-zero fraction is read from a strided sample of this many elements of a
# larger weight (exact for smaller ones): its standard error is at most
# sqrt(0.25 / 65536) = 0.2 % (binomial), against a 20 % pile-up threshold and the
# ~0.8 % a dense layer shows.  Exact zeros are counted over every element.
NEAR_ZERO_SAMPLE = 1 << 16
TRAJECTORY_POINTS = 64  # (step, norm) points kept per weight (the first one is kept apart)


def _numel(ref: ParameterRef) -> int:
    """Elements of the whole (unsharded) parameter."""
    return math.prod(ref.shape)


@dataclass
class WeightTrack:
    """One weight's history at the diagnosis cadence (bounded)."""

    layer: str
    numel: int
    first: tuple[int, float] | None = None
    trajectory: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=TRAJECTORY_POINTS))
    zero_frac: float = math.nan
    near_zero_frac: float = math.nan  # 0 < |w| < tolerance
    tolerance: float = math.nan
    decay_step: float | None = None  # ηλ‖θ‖
    gradient_step: float | None = None  # η‖g‖
    applied: str = "none"

    @property
    def decay_share(self) -> float | None:
        if self.decay_step is None or self.gradient_step is None:
            return None
        total = self.decay_step + self.gradient_step
        return self.decay_step / total if total > 0 else None

    def measured_factor(self) -> float | None:
        """Per-step factor of the norm between the last two measurements: (‖θ_t‖/‖θ_s‖)^(1/(t−s))."""
        if len(self.trajectory) < 2:
            return None
        (s, a), (t, b) = self.trajectory[-2], self.trajectory[-1]
        if t <= s or a <= 0 or not math.isfinite(a) or not math.isfinite(b):
            return None
        return (b / a) ** (1.0 / (t - s))

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "elements": self.numel,
            "norm_first": self.first[1] if self.first else None,
            "norm_last": self.trajectory[-1][1] if self.trajectory else None,
            "trajectory": [list(p) for p in self.trajectory],
            "measured_norm_factor_per_step": self.measured_factor(),
            "zero_frac": self.zero_frac,
            "near_zero_frac": self.near_zero_frac,
            "near_zero_tolerance": self.tolerance,
            "near_zero_rule": f"0 < |w| < {SPARSITY_RTOL:g} x RMS(w)",
            "decay_step": self.decay_step,
            "gradient_step": self.gradient_step,
            "decay_share": self.decay_share,
            "decay_applied": self.applied,
        }


@dataclass
class WeightLaunch:
    """A measurement launched on the device: the weights' names and their vector
    (squared norm, zeros, near zeros, elements sampled per weight; float32)."""

    names: list[str]
    vector: torch.Tensor


class WeightWatch:
    """Norms, sparsity and decay share of every weight, at the diagnosis cadence.

    Parameters are looked up by name at each measurement (``gradscope.placement``:
    FSDP swaps and frees parameter storage, so none is kept), as this rank's part:
    shards are summed over ``group`` (squared norms and counts), replicas counted
    once, so every rank holds the numbers of the whole weight.
    """

    def __init__(
        self,
        parameters: nn.Module | Callable[[], Iterable[ParameterRef]],
        group: ReductionGroup | None = None,
    ) -> None:
        if isinstance(parameters, nn.Module):
            table = ParameterTable(parameters)
            self._table: Callable[[], Iterable[ParameterRef]] = lambda: table
        else:
            self._table = parameters
        self.group = group
        self._weights: list[ParameterRef] | None = None  # the table's weights, chosen at the first measure
        self.tracks: dict[str, WeightTrack] = {}

    def _chosen(self, owner: bool) -> list[tuple[ParameterRef, torch.Tensor]]:
        """(ref, this rank's part now) of each trainable floating weight of two or more
        dimensions; the part is empty where this rank holds none or a replica another
        rank counts."""
        if self._weights is None:
            chosen = []
            for ref in self._table():
                local = ref.resolve(owner)
                if local is None or not local.requires_grad or not local.value.is_floating_point():
                    continue
                if len(ref.shape) >= 2:
                    chosen.append(ref)
                    self.tracks[ref.name] = WeightTrack(layer=ref.name.rpartition(".")[0] or "model", numel=_numel(ref))
            self._weights = chosen
        out = []
        for ref in self._weights:
            local = ref.resolve(owner)
            if local is None:
                continue
            value = local.value if local.owned else local.value.new_empty(0)
            out.append((ref, value.detach()))
        return out

    def launch(self) -> WeightLaunch | None:
        """The device side of a measurement (no host read): per weight, this rank's
        squared norm and its (zeros, near zeros, elements sampled), as one float32
        vector of 4 numbers per weight whose sum over ``group`` is the whole
        weights' (the flush packs it into its own reduction and transfer).  With a
        group the squared norms are summed first (one all-reduce on the device)
        so that the near-zero tolerance is the whole weight's."""
        parts = self._chosen(self.group is None or self.group.rank == 0)
        if not parts:
            return None
        with torch.no_grad():
            device = parts[0][1].device
            # Squared norms as the per-step gradient norms take them (a BLAS dot per
            # weight on the CPU, 2.7x faster there than vector_norm).
            squares = squared_norms([w for _, w in parts])
            # summed on a copy: the vector keeps this rank's part
            whole = sum_over_group(self.group, squares)
            counts = self._counts(parts, whole.sqrt(), device)
            vector = torch.cat([squares.unsqueeze(1).to(torch.float32), counts], dim=1).reshape(-1)
        return WeightLaunch([ref.name for ref, _ in parts], vector)

    def complete(
        self,
        step: int,
        launched: WeightLaunch,
        summed: torch.Tensor,
        decays: dict[str, tuple[float, float, str]] | None = None,
        grad_norms: dict[str, float] | None = None,
    ) -> None:
        """The host side: ``summed`` is ``launched.vector`` summed over the group, on
        the host; ``decays`` maps parameter name -> (lr, weight_decay, applied),
        ``grad_norms`` name -> ‖g‖."""
        rows = summed.to(torch.float64).reshape(len(launched.names), 4).tolist()
        decays = decays or {}
        grad_norms = grad_norms or {}
        for name, (squared, zeros, near, sampled) in zip(launched.names, rows, strict=True):
            near_frac = near / sampled if sampled > 0 else math.nan
            if not math.isfinite(squared):
                # A float32 sum of squares that overflowed (‖w‖ above ~1.8e19, a blow-up's
                # weights) made the near-zero tolerance inf: every weight would count as
                # near zero.  Not measured (gradscope.watching.overflow).
                near_frac = math.nan
            norm = math.sqrt(squared) if squared >= 0 else math.nan
            self._record(self.tracks[name], step, norm, zeros, near_frac, decays.get(name), grad_norms.get(name))

    def measure(
        self,
        step: int,
        decays: dict[str, tuple[float, float, str]] | None = None,
        grad_norms: dict[str, float] | None = None,
    ) -> None:
        """``launch`` and ``complete`` at once (one host read; with a group, two
        all-reduces: the norms first, for the near-zero tolerance)."""
        launched = self.launch()
        if launched is None:
            return
        self.complete(step, launched, sum_over_group(self.group, launched.vector).cpu(), decays, grad_norms)

    @staticmethod
    def _counts(
        parts: list[tuple[ParameterRef, torch.Tensor]], norms: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """(zeros, near zeros, elements sampled) per weight, float32, shape (k, 3).

        Exact zeros by ``count_nonzero`` over each weight in place (a sum of booleans
        costs 4x as much on the CPU and a temporary as large); near zeros from a
        strided sample (see NEAR_ZERO_SAMPLE), as the sample's elements below the
        tolerance minus its zeros (two counts, no boolean temporary combined).
        Concatenating every weight's sample into one pass was slower (24 vs 14 ms
        for the benchmark MLP's 9 weights, 2026-12-02): the gathers and index
        arrays cost more than the per-weight calls they save.
        """
        zeros: list[torch.Tensor] = []
        near: list[torch.Tensor] = []
        sizes: list[float] = []
        for (ref, w), norm in zip(parts, norms, strict=True):
            if w.numel() == 0:
                zeros.append(torch.zeros((), dtype=torch.int64, device=device))
                near.append(zeros[-1])
                sizes.append(0.0)
                continue
            tol = (norm / math.sqrt(_numel(ref)) * SPARSITY_RTOL).to(w.dtype)
            zeros.append(w.numel() - torch.count_nonzero(w))
            # |w| < tol over the whole weight allocated a full-size temporary per weight
            # per measurement (8 ms for a 1024 x 1024 weight on a busy CPU).
            picked = strided_sample(w, dense_view(w), NEAR_ZERO_SAMPLE) if w.numel() > NEAR_ZERO_SAMPLE else w
            below = torch.count_nonzero(picked.abs() < tol)
            near.append((below - (picked.numel() - torch.count_nonzero(picked))).clamp_min(0))  # tol 0: all-zero
            sizes.append(float(picked.numel()))
        # the sample sizes are host-known: a cached device copy, not a copy per weight per measurement
        sampled = on_device(tuple(sizes), device, torch.float32)
        return torch.stack([torch.stack(zeros).to(torch.float32), torch.stack(near).to(torch.float32), sampled], dim=1)

    @staticmethod
    def _record(
        track: WeightTrack,
        step: int,
        norm: float,
        zeros: float,
        near_frac: float,
        decay: tuple[float, float, str] | None,
        g: float | None,
    ) -> None:
        n = max(track.numel, 1)
        if track.first is None:
            track.first = (step, norm)
        track.trajectory.append((step, norm))
        track.zero_frac = zeros / n
        track.near_zero_frac = near_frac
        track.tolerance = norm / math.sqrt(n) * SPARSITY_RTOL
        lr, wd, applied = decay if decay is not None else (math.nan, 0.0, "none")
        track.applied = applied
        track.decay_step = lr * wd * norm if applied != "none" and math.isfinite(lr) else 0.0
        track.gradient_step = lr * g if g is not None and math.isfinite(lr) and math.isfinite(g) else None

    def summary(self) -> dict[str, Any]:
        return {name: track.to_dict() for name, track in self.tracks.items() if track.first is not None}

    def l1_finding(self) -> Finding | None:
        """``l1-not-sparse`` for the layers whose weights pile up near zero without reaching it."""
        piled = [
            (name, t)
            for name, t in self.tracks.items()
            if t.numel >= L1_MIN_ELEMENTS and t.near_zero_frac >= L1_PILEUP_FRAC
        ]
        if not piled:
            return None
        layers = list(dict.fromkeys(t.layer for _, t in piled))
        name, worst = max(piled, key=lambda item: item[1].near_zero_frac)
        targets = ", ".join(repr("" if layer == "model" else layer) for layer in layers)  # "": the root
        return Finding(
            code="l1-not-sparse",
            severity=Severity.WARNING,
            layers=layers,
            message=(
                f"{percent(worst.near_zero_frac)} of {name}'s weights sit within {significant(worst.tolerance)} "
                f"of zero (1% of its RMS) but only {percent(worst.zero_frac)} are exactly zero: the signature of an "
                "L1 penalty taken by (sub)gradient, which never makes weights exactly zero"
            ),
            evidence={
                "parameters": {
                    n: {"near_zero_frac": t.near_zero_frac, "zero_frac": t.zero_frac, "tolerance": t.tolerance}
                    for n, t in piled
                },
                "threshold_near_zero_frac": L1_PILEUP_FRAC,
                "near_zero_rule": f"0 < |w| < {SPARSITY_RTOL:g} x RMS(w)",
            },
            fix=Fix(
                "drop the L1 term from the loss and apply its proximal step S_ηλ (soft-threshold) after "
                "each optimizer step: the weights L1 should remove become exactly zero",
                "import gradscope.fix\n\n"
                "loss = criterion(model(x), y)  # no L1 term here\n"
                "loss.backward()\n"
                "optimizer.step()\n"
                f"for name in [{targets}]:\n"
                "    gradscope.fix.soft_threshold_(model.get_submodule(name), lam=lr * l1_lambda)",
            ),
        )
