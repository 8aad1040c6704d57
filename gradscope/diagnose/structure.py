"""What the architecture itself says about where a signal is small by design.

The depth rules compare layers along the path the signal actually travels.
Three structures make a layer's numbers small at init without anything being
wrong, and are recognised here from the record (and the model, when at hand):

* **Zero-initialised parameters** (a zero-init classifier head as torchvision's
  ViT; the last layer of a residual branch as Fixup, Zhang et al. 2019; a zero
  residual gain as ReZero, Bachlechner et al. 2020, or SkipInit, De & Smith
  2020): ∂ℓ/∂h below them is exactly zero at step 0 and becomes non-zero after
  the first update moves them.
* **Layer-scale parameters** (a learnable per-channel gain of 1e-6…1e-4 at init
  on a residual branch: CaiT, Touvron et al. 2021; ResMLP; ConvNeXt's gamma,
  Liu et al. 2022): the branch's gradient is that gain times the main path's.
* **Reduction boundaries** (global average pooling, a [CLS] token, a mean over
  time): the head after it sees one vector per example where the body saw
  many positions, so per-element and per-example ratios across the boundary
  depend on the input's resolution or length, not on depth.  The body before
  the last such boundary is judged on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gradscope.diagnose.layers import EMBEDDING_TYPES, Context, width
from gradscope.record import LayerRecord

# A per-channel gain whose values all lie at or below this magnitude at init is a
# layer scale: CaiT uses 1e-5 (depth > 24) to 1e-1, ConvNeXt 1e-6, ResMLP 1e-1 to
# 1e-6 with depth (Touvron et al. 2021, Table 1).  Anything up to 1e-3 shrinks its
# branch's gradient by three decades or more, beyond any depth effect we judge.
LAYER_SCALE_MAX = 1e-3
# Parameters larger than this are not per-channel gains (widths stay below 1e5).
LAYER_SCALE_MAX_NUMEL = 100_000
# A boundary reduces the values per example by at least this factor: 2x2 pooling
# (4) or more; a stride-2 convolution is a parametrised layer, not a boundary.
REDUCTION_MIN_FACTOR = 2.0


@dataclass
class Structure:
    """Zero-init and layer-scale parameters and the reduction boundary of one record."""

    zero_layers: list[str] = field(default_factory=list)  # recorded layers whose weight is all zeros
    zero_parameters: list[str] = field(default_factory=list)  # other all-zero parameters (ReZero/SkipInit gains)
    layer_scales: dict[str, float] = field(default_factory=dict)  # parameter name -> its largest |value|
    scaled_scopes: list[str] = field(default_factory=list)  # module prefixes of layer-scaled branches
    head_boundary: dict[str, Any] | None = None  # the last reduction boundary, when there is one

    @property
    def zero_init(self) -> bool:
        return bool(self.zero_layers or self.zero_parameters)

    def in_scaled_branch(self, layer: LayerRecord) -> bool:
        return any(layer.module.startswith(scope + ".") for scope in self.scaled_scopes)


def _all_zero(layer: LayerRecord) -> bool:
    w = layer.weight
    return w is not None and w.count > 0 and w.nonfinite_count == 0 and w.absmax == 0.0


def _model_parameters(ctx: Context) -> list[tuple[str, Any]]:
    model = ctx.model
    if model is None or not hasattr(model, "named_parameters"):
        return []
    try:
        return [(n, p) for n, p in model.named_parameters() if getattr(p, "requires_grad", True)]
    except Exception:  # a shell whose parameters cannot be listed: judge the record alone
        return []


def gain_like(shape: Any) -> bool:
    """One non-singleton dimension at most: [C], [C, 1, 1], [1, 1, C] or a scalar."""
    return sum(1 for s in shape if int(s) > 1) <= 1


def find_structure(ctx: Context) -> Structure:
    """Recognise zero-init and layer-scale parameters and the head boundary.

    The model's parameters are read (one reduction each, host side) only for
    gain-shaped parameters, and only when some gradient in the record is
    small enough for the answer to matter: never on a healthy step of watch.
    """
    found = Structure(zero_layers=[x.name for x in ctx.layers if x.call == 1 and _all_zero(x)])
    found.head_boundary = _head_boundary(ctx)
    if ctx.during_training or not _suspicious(ctx):
        # In training the gains have moved off their init (and reading each one
        # would cost a host sync per parameter at every flush): the record alone.
        return found
    import torch

    recorded = {x.module for x in ctx.layers}
    for name, param in _model_parameters(ctx):
        if not isinstance(param, torch.Tensor) or param.numel() == 0 or param.numel() > LAYER_SCALE_MAX_NUMEL:
            continue
        owner, _, pname = name.rpartition(".")
        if pname == "bias" or not gain_like(param.shape):
            continue
        with torch.no_grad():
            peak = float(param.detach().abs().max())
        if peak == 0.0:
            if owner not in recorded or pname != "weight":
                found.zero_parameters.append(name)
        elif peak <= LAYER_SCALE_MAX and math.isfinite(peak):
            found.layer_scales[name] = peak
            found.scaled_scopes.append(_branch_scope(ctx, owner))
    return found


def _branch_scope(ctx: Context, owner: str) -> str:
    """The module prefix of the branch a gain scales: its owner, or the owner's
    parent when the owner is a small wrapper holding only the gain (timm's
    ``LayerScale`` next to the branch it scales)."""
    inside = [x for x in ctx.layers if x.module.startswith(owner + ".")]
    if inside or "." not in owner:
        return owner
    return owner.rpartition(".")[0]


def _suspicious(ctx: Context) -> bool:
    """Some ∂ℓ/∂h is exactly zero or a thousand times below the loss end's."""
    rms = [g.rms for x in ctx.layers if (g := x.gradient) is not None and g.count > 0 and g.moments_valid]
    rms = [r for r in rms if math.isfinite(r)]
    if not rms:
        return False
    return min(rms) == 0.0 or min(rms) < 1e-3 * max(rms)


def per_example_input(layer: LayerRecord) -> float | None:
    """Values per example entering ``layer``: from its recorded input, else from the
    Linear's fan-in times the positions of its output (the batch is the output's
    leading dimension)."""
    shape = layer.output_shape
    if not shape or len(shape) < 2 or not shape[0]:
        return None
    stats = layer.input
    if stats is not None and stats.count > 0:
        return stats.count / int(shape[0])
    if layer.type in ("Linear", "LazyLinear") and layer.fan_in:
        positions = math.prod(int(s) for s in shape[1:-1]) if len(shape) > 2 else 1
        return float(layer.fan_in * positions)
    return None


def _head_boundary(ctx: Context) -> dict[str, Any] | None:
    """The last reduction boundary: parametrised layer B whose input holds at least
    REDUCTION_MIN_FACTOR times fewer values per example than the previous
    parametrised layer's output, with nothing wider after it (the head)."""
    layers = [x for x in ctx.parametrised() if x.type not in EMBEDDING_TYPES]
    for i in range(len(layers) - 1, 1, -1):
        after, before = layers[i], layers[i - 1]
        entering, leaving = per_example_input(after), width(before)
        if not entering or not leaving or leaving < REDUCTION_MIN_FACTOR * entering:
            continue
        if entering == per_example_input(before):
            # B reads as many values as the previous layer did: a sibling reading the
            # same input (SwiGLU's up_proj beside gate_proj, 2.75x narrower than
            # gate_proj's output), not a head reading its pooled output.
            continue
        if any((width(x) or 0) > max(entering, width(after) or 0) for x in layers[i:]):
            continue  # a side input (a time embedding), not the head
        return {
            "last_body_layer": before.name,
            "first_head_layer": after.name,
            "values_per_example_before": leaving,
            "values_per_example_after": entering,
            "reduction": leaving / entering,
        }
    return None
