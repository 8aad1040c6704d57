"""Per-unit liveness of ReLU-family outputs: which units fired at least once.

A dead ReLU unit outputs 0 for every input, so no gradient reaches the weights
that feed it (Lu et al. 2019, "Dying ReLU and Initialization").  The fraction of
zeros of the whole tensor cannot tell 75% of units that never fire from every
unit firing a quarter of the time; this module keeps, per unit, the largest
output seen, so the diagnosis counts the units that stayed at or below 0.

**The unit axis.**  A unit is one feature of the layer's output: the channel
axis (dim 1) after a layer that lays its output out channels-first (convolutions,
batch/group/instance norms, pooling: ``(N, C, ...)``), the last axis after one
that keeps features last (``nn.Linear``, layer/RMS norms, embeddings, Hugging
Face's ``Conv1D``: ``(N, C)`` and transformers' ``(N, L, C)``).  The layout is
that of the closest preceding recorded layer in the same forward that defines
one (dropout or identity layers in between pass it on); with none seen, a
2-D output's units are its last axis and a higher-rank output's are dim 1
(PyTorch's channels-first convention).

**Hot path.**  The forward hook enqueues ``amax`` over every axis but the unit
axis (device work, no host read) and merges it with the site's previous peak
by ``torch.maximum``: the state is one vector per site, whatever the batch.  The
maximum is mergeable across passes, micro-batches and flushes; the host side
keeps the OR of "fired" (peak > 0).  Under torch.distributed each rank keeps its
own (``reduction: "per rank"``): a unit dead on one rank's batch may fire on
another's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

# Activations that output exactly 0 for every negative input: a unit whose
# pre-activation stays below 0 is dead (the diagnosis' DYING_TYPES).
TAPPED_TYPES = frozenset({"ReLU", "ReLU6"})
CHANNELS_FIRST = "channels_first"
FEATURES_LAST = "features_last"
# Class names whose output is (N, C, ...): torch's conv, norm, pooling and resampling layers.
_CHANNELS_FIRST_NAME = re.compile(
    r"(?:Conv(?:Transpose)?[123]d|BatchNorm(?:[123]d)?|GroupNorm|InstanceNorm[123]d|Pool[123]d|"
    r"Upsample|UpsamplingNearest2d|UpsamplingBilinear2d|PixelShuffle|PixelUnshuffle|LocalResponseNorm)$"
)
# Class names whose output keeps features on the last axis.  "Conv1D" (capital D)
# is Hugging Face's GPT-2 projection, a Linear with transposed weight.
_FEATURES_LAST_NAME = re.compile(r"(?:Linear|LayerNorm|RMSNorm|Embedding|EmbeddingBag|Bilinear|Conv1D)$")


def layout_of(type_name: str) -> str | None:
    """The output layout a layer type defines, or None when it passes its input's on."""
    if _FEATURES_LAST_NAME.search(type_name):
        return FEATURES_LAST
    if _CHANNELS_FIRST_NAME.search(type_name):
        return CHANNELS_FIRST
    return None


def unit_axis(ndim: int, layout: str | None) -> int:
    """The axis holding the units of an ``ndim``-dimensional output (module docstring)."""
    if ndim <= 2:
        return ndim - 1  # (C,) or (N, C): Linear and BatchNorm1d agree
    if layout == FEATURES_LAST:
        return ndim - 1
    return 1


@dataclass
class UnitLiveness:
    """Host side: which units of one call site fired (output > 0) at least once."""

    axis: int  # the unit axis of the output
    fired: torch.Tensor  # bool, one per unit
    positions: int  # outputs seen per unit (samples × positions, summed over passes)
    reduction: str | None = None  # "per rank" under torch.distributed, else None

    @property
    def units(self) -> int:
        return int(self.fired.numel())

    @property
    def dead(self) -> int:
        return int((~self.fired).sum())

    def dead_indices(self) -> list[int]:
        return [int(i) for i in torch.nonzero(~self.fired).flatten()]

    def merge(self, other: UnitLiveness) -> UnitLiveness:
        """A unit fired if it fired in either (the OR of two maxima > 0)."""
        if other.axis != self.axis or other.units != self.units:
            return self if self.positions >= other.positions else other  # a changed layout: keep the larger
        return UnitLiveness(self.axis, self.fired | other.fired, self.positions + other.positions, self.reduction)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "axis": self.axis,
            "units": self.units,
            "dead": self.dead,
            "positions": self.positions,
            "dead_indices": self.dead_indices(),
        }
        if self.reduction is not None:
            out["reduction"] = self.reduction
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitLiveness:
        fired = torch.ones(int(data["units"]), dtype=torch.bool)
        dead = data.get("dead_indices") or []
        if dead:
            fired[torch.tensor(dead, dtype=torch.long)] = False
        return cls(int(data["axis"]), fired, int(data.get("positions", 0)), data.get("reduction"))


@dataclass
class _Peak:
    axis: int
    peak: torch.Tensor  # on the output's device, one per unit
    positions: int


class UnitTaps:
    """Device side: per call site, the largest output of each unit since the last flush."""

    def __init__(self) -> None:
        self._layout: str | None = None
        self._pending: dict[str, _Peak] = {}

    def new_forward(self) -> None:
        """A root forward begins: no layout seen yet."""
        self._layout = None

    def on_forward(self, key: str, type_name: str, output: torch.Tensor) -> None:
        """Track the layout; for a ReLU-family site, merge its per-unit peak (device ops only)."""
        if type_name not in TAPPED_TYPES:
            layout = layout_of(type_name)
            if layout is not None:
                self._layout = layout
            return
        if output.dim() == 0 or output.numel() == 0:
            return
        axis = unit_axis(output.dim(), self._layout)
        units = output.shape[axis]
        others = tuple(d for d in range(output.dim()) if d != axis)
        with torch.no_grad():
            peak = output.detach().amax(dim=others) if others else output.detach().clone()
        positions = output.numel() // units
        before = self._pending.get(key)
        if before is not None and before.axis == axis and before.peak.shape == peak.shape:
            self._pending[key] = _Peak(axis, torch.maximum(before.peak, peak), before.positions + positions)
        else:
            self._pending[key] = _Peak(axis, peak, positions)

    def take(self) -> list[tuple[str, int, int, torch.Tensor]]:
        """(site, axis, positions, peak on its device) of every pending site; clears them."""
        pending, self._pending = self._pending, {}
        return [(key, p.axis, p.positions, p.peak.reshape(-1)) for key, p in pending.items()]

    def discard(self) -> None:
        self._pending = {}


def liveness_from_host(axis: int, positions: int, peak: torch.Tensor, reduction: str | None) -> UnitLiveness:
    """The host record of a peak vector read back at flush."""
    return UnitLiveness(axis, peak > 0, positions, reduction)
