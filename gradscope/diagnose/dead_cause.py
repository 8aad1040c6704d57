"""Why a ReLU layer's units are dead: the shift before it, measured.

A unit dies when its pre-activation stays below 0.  The usual cause is a shift
that pushes it there, the bias of the Linear/Conv that produces it or the beta
of the BatchNorm before the ReLU, rather than the weights: the diagnosis
compares the dead units' shift with the spread of their pre-activation.

- BatchNorm (training mode): channel c's output is gamma_c * x_hat + beta_c with
  x_hat standardised over the batch (Ioffe & Szegedy 2015, Alg. 1), so its std is
  |gamma_c| and its shift in stds is beta_c / |gamma_c|.
- Linear/Conv: unit c's output is w_c . x + b_c; with inputs of RMS r the
  spread of w_c . x is about ||w_c|| r (independent inputs), so the shift is
  b_c / (||w_c|| r).  r is the RMS recorded for the layer just before the
  producer (or the model's input for the first layer).

The model's parameters are read on the host, after the run: never in a hook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gradscope import advice
from gradscope.diagnose import thresholds as th
from gradscope.diagnose.layers import BATCHNORM_TYPES, TRANSPARENT_TYPES, Context
from gradscope.record import LayerRecord

BIAS = "bias"  # a Linear/Conv bias
BETA = "batchnorm-beta"  # a BatchNorm's shift
UPSTREAM = "upstream"  # the producer received no signal: a dead layer before it
UNKNOWN = "unknown"  # no shift large enough: the weights / training moved the units


@dataclass
class DeadCause:
    """The measured cause of one layer's dead units."""

    kind: str  # BIAS, BETA, UPSTREAM or UNKNOWN
    producer: str | None  # the layer producing the pre-activation
    producer_type: str | None
    target: str | None  # the module expression whose ``.bias`` to reset (BIAS/BETA)
    dead_shift_median: float | None  # median bias/beta of the dead units
    live_shift_median: float | None  # median bias/beta of the live units (None: none live)
    shift_in_stds: float | None  # dead units' median shift / their pre-activation std

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "producer": self.producer,
            "producer_type": self.producer_type,
            "dead_shift_median": self.dead_shift_median,
            "live_shift_median": self.live_shift_median,
            "shift_in_stds": self.shift_in_stds,
        }


def producer_of(ctx: Context, layer: LayerRecord) -> LayerRecord | None:
    """The layer whose output the ReLU received: the closest one before it in
    execution order, dropout and identity layers skipped."""
    for prev in reversed(ctx.layers[: ctx.position[layer.name]]):
        if prev.type not in TRANSPARENT_TYPES:
            return prev
    return None


def _input_rms(ctx: Context, producer: LayerRecord) -> float | None:
    before = ctx.previous(producer)
    stats = before.activation if before is not None else ctx.record.input
    if stats is None or stats.count == 0 or not stats.moments_valid:
        return None
    return stats.rms


def _median(values: torch.Tensor) -> float | None:
    return float(values.median()) if values.numel() else None


def dead_cause(ctx: Context, layer: LayerRecord) -> DeadCause:
    """The cause of ``layer``'s dead units (``layer.units`` recorded), from the model's
    parameters; UNKNOWN when the model is not at hand or the shift does not explain them."""
    producer = producer_of(ctx, layer)
    unknown = DeadCause(UNKNOWN, None if producer is None else producer.name, None, None, None, None, None)
    units = layer.units
    if producer is None or units is None or ctx.model is None:
        return unknown
    unknown.producer_type = producer.type
    try:
        module = ctx.model.get_submodule("" if producer.module == "model" else producer.module)
    except AttributeError:
        return unknown
    bias = getattr(module, "bias", None)
    weight = getattr(module, "weight", None)
    if not isinstance(bias, torch.Tensor) or not isinstance(weight, torch.Tensor) or bias.numel() != units.units:
        return unknown
    bias = bias.detach().to("cpu", torch.float64).reshape(-1)
    weight = weight.detach().to("cpu", torch.float64)
    if producer.type in BATCHNORM_TYPES:
        if _input_rms(ctx, producer) == 0.0:  # a constant-zero input: the dead layer is before it
            return DeadCause(UPSTREAM, producer.name, producer.type, None, None, None, None)
        kind, spread = BETA, weight.reshape(-1).abs()
    elif producer.fan_in is not None and weight.dim() >= 2 and weight.shape[0] == units.units:
        rms_in = _input_rms(ctx, producer)
        if rms_in is None:
            return unknown
        kind, spread = BIAS, weight.reshape(units.units, -1).norm(dim=1) * rms_in
    else:
        return unknown
    dead = ~units.fired
    shifts = bias[dead] / spread[dead]
    shift_in_stds = _median(shifts.nan_to_num(nan=0.0))  # 0/0: no spread and no shift
    expression = advice.module_expression(producer.module)
    found = DeadCause(
        kind, producer.name, producer.type, expression, _median(bias[dead]), _median(bias[~dead]), shift_in_stds
    )
    if kind == BIAS and bool((spread[dead] == 0).all()):
        found.kind = UPSTREAM  # no input signal reached the producer: the dead layer is before it
    elif shift_in_stds is None or not shift_in_stds <= -th.DEAD_CAUSE_SHIFT_STDS:
        found.kind = UNKNOWN
    if found.shift_in_stds is not None and not math.isfinite(found.shift_in_stds):
        found.shift_in_stds = None  # -inf (no spread): said by the kind, not as a number
    return found
