"""One device vector per flush: the ring of per-step numbers, the sampled step's
per-parameter gradient norms and the update ratios travel together with the
layer statistics (one transfer; one reduction under torch.distributed), and
come back as host numbers on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from gradscope.watching.step_norms import LOSS, NORM, SCALE, StepNorms
from gradscope.watching.update_ratio import UpdateRatios


@dataclass
class PackLayout:
    """Where each part sits in the packed vector."""

    ring: bool = False
    names: list[str] = field(default_factory=list)  # per-parameter norms, in this order
    ratios: list[tuple[int, list[str]]] = field(default_factory=list)  # (sampled step, layers)
    weights: int = 0  # weights measured (gradscope.watching.weights): 4 numbers each
    inputs: bool = False  # how many forwards' first inputs were non-finite (not reduced: local only)
    stop: bool = False  # the stop flag comes last (gradscope.watching.agreement)


@dataclass
class Unpacked:
    """The host side of a flush's packed vector, reduced over the ranks."""

    ring: torch.Tensor | None = None  # rows NORM (norms), LOSS and SCALE (means over ranks)
    names: list[str] = field(default_factory=list)
    param_norms: torch.Tensor | None = None
    ratios: list[tuple[int, list[str], Any]] = field(default_factory=list)
    weights: torch.Tensor | None = None  # the weights measurement's vector, summed over the ranks
    inputs_nonfinite: float | None = None  # forwards whose first input was non-finite (None: not packed)
    stop: float = 0.0  # ranks that hold a record of a non-finite step (summed)


def pack(
    norms: StepNorms,
    ratios: UpdateRatios,
    stop: bool | None = None,
    inputs: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, PackLayout]:
    """Take (and reset) what waits for the flush, as one device vector; ``weights``:
    a full flush's weights measurement (``WeightWatch.launch``); ``stop``
    (under torch.distributed): whether this rank holds a record of a non-finite step;
    ``inputs``: a device scalar, the number of non-finite first inputs of the sampled
    step's forwards (only without a reduction group: it would be summed over ranks)."""
    pieces: list[torch.Tensor] = []
    layout = PackLayout(ring=norms.buf is not None)
    if norms.buf is not None:
        pieces.append(norms.buf.reshape(-1))
    if norms.param_norms is not None:
        layout.names, values = norms.param_norms
        pieces.append(values.reshape(-1).float())
    ready = ratios.ready
    pieces.extend(r.float() for _, _, r in ready)
    ratios.ready = []
    norms.param_norms = None
    if weights is not None:
        pieces.append(weights.reshape(-1).float())
        layout.weights = weights.numel() // 4
    if inputs is not None:
        pieces.append(inputs.reshape(1).float())
        layout.inputs = True
    if stop is not None:
        device = pieces[0].device if pieces else norms.default_device()
        pieces.append(torch.full((1,), float(stop), device=device))  # a fill, not a host-to-device copy
        layout.stop = True
    if not pieces:
        return None, PackLayout()
    device = pieces[0].device
    packed = torch.cat([p.to(device) for p in pieces])
    if norms.buf is not None:
        norms.buf.fill_(math.nan)
    layout.ratios = [(step, layer_names) for step, layer_names, _ in ready]
    return packed, layout


def unpack(host: torch.Tensor | None, layout: PackLayout, every: int, ranks: int, reduced: bool) -> Unpacked:
    """Squared norms (summed over ranks) to norms; losses and scales summed over
    ranks to their mean (the ranks' mean loss is the global batch's)."""
    if host is None:
        return Unpacked()
    out = Unpacked()
    offset = 0
    if layout.ring:
        ring = host[: 3 * every].reshape(3, every).clone()
        ring[NORM] = ring[NORM].sqrt()
        ring[LOSS] = ring[LOSS] / ranks
        ring[SCALE] = ring[SCALE] / ranks
        out.ring = ring
        offset = 3 * every
    names = layout.names
    if names:
        if reduced:
            squares = host[offset : offset + len(names)]
            present = host[offset + len(names) : offset + 2 * len(names)] > 0
            out.names = [name for name, here in zip(names, present.tolist(), strict=True) if here]
            out.param_norms = squares[present].sqrt()
            offset += 2 * len(names)
        else:
            out.names = names
            out.param_norms = host[offset : offset + len(names)].sqrt()
            offset += len(names)
    for step, layer_names in layout.ratios:
        k = len(layer_names)
        diff, before = host[offset : offset + k], host[offset + k : offset + 2 * k]
        out.ratios.append((step, layer_names, (diff / before).sqrt()))
        offset += 2 * k
    if layout.weights:
        out.weights = host[offset : offset + 4 * layout.weights].clone()  # the host buffer is reused
        offset += 4 * layout.weights
    if layout.inputs:
        out.inputs_nonfinite = float(host[offset])
        offset += 1
    if layout.stop:
        out.stop = float(host[offset])
    return out
