"""Where did the first NaN/Inf come from?  Search one flush's record in the
order things happen in a training step.

Order of events in a step: the weights exist first (a previous update may have
written NaN into them), then the forward computes activations in execution
order, then the loss, then the backward computes ∂ℓ/∂h in reverse execution
order, then the weight gradients.  The first non-finite tensor in that order is
where the trouble starts; whether that layer *produced* it or *received* it is
read from its neighbour in the same order: an activation is received when the
layer that ran just before it (or the model input, or the layer's own weight)
was already non-finite.  For a network with branches "the layer that ran just
before" is an approximation of "the layer that fed it" (stated in the record).
"""

from __future__ import annotations

from typing import Any

from gradscope.record import LayerRecord, Record
from gradscope.stats import Stats


def _bad(stats: Stats | None) -> bool:
    return stats is not None and stats.nonfinite_count > 0


def _describe(
    layer: LayerRecord,
    role: str,
    stats: Stats | None,
    step: int,
    origin: str,
    source: str | None,
    weight_dtypes: dict[str, str] | None = None,
) -> dict[str, Any]:
    if role in ("activation", "gradient"):
        dtype = layer.output_dtype
    else:
        dtype = (weight_dtypes or {}).get(layer.name)
    return {
        "step": step,
        "layer": layer.name,
        "type": layer.type,
        "role": role,
        "dtype": dtype,
        "origin": origin,  # "produced" or "received"
        "source": source,  # what it came from (received) or which computation made it (produced)
        # The callers checked the statistics exist; None only reads as "unknown".
        "nonfinite_count": stats.nonfinite_count if stats is not None else None,
        "has_nan": stats.has_nan if stats is not None else None,
        "has_inf": stats.has_inf if stats is not None else None,
        "count": stats.count if stats is not None else None,
    }


def first_nonfinite(
    record: Record,
    step: int,
    *,
    loss_finite: bool | None = None,
    include_gradients: bool = True,
    weight_dtypes: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """The first non-finite tensor of one step's record, or None.

    ``weight_dtypes`` maps layer names to their weight's dtype (for the weight
    roles).  ``include_gradients=False`` ignores ∂ℓ/∂h and weight gradients (used under a
    GradScaler, whose overflowing steps are expected and skipped by the scaler).
    """
    layers = sorted(record.layers, key=lambda layer: layer.index)
    for layer in layers:
        if _bad(layer.weight):
            source = "the previous optimizer update"
            return _describe(layer, "weight", layer.weight, step, "produced", source, weight_dtypes)
    previous: LayerRecord | None = None
    for layer in layers:
        act = layer.activation
        if _bad(act):
            if previous is None:
                received = _bad(record.input)
                source = "the model input" if received else f"the forward of {layer.name}"
            else:
                received = _bad(previous.activation)
                source = previous.name if received else f"the forward of {layer.name}"
            return _describe(layer, "activation", act, step, "received" if received else "produced", source)
        if act is not None:
            previous = layer
    if loss_finite is False:
        return {
            "step": step,
            "layer": None,
            "type": None,
            "role": "loss",
            "dtype": None,
            "origin": "produced",
            "source": "the loss function (every recorded activation was finite)",
            "nonfinite_count": 1,
            "has_nan": None,
            "has_inf": None,
            "count": 1,
        }
    if not include_gradients:
        return None
    with_grad = [layer for layer in layers if layer.gradient is not None]
    for position in range(len(with_grad) - 1, -1, -1):  # backward runs in reverse order
        layer = with_grad[position]
        if _bad(layer.gradient):
            after = with_grad[position + 1] if position + 1 < len(with_grad) else None
            if after is None:
                origin, source = "produced", "the backward of the loss"
            elif _bad(after.gradient):  # pragma: no cover - the search order makes this impossible
                origin, source = "received", after.name
            else:
                origin, source = "produced", f"the backward of {after.name}"
            return _describe(layer, "gradient", layer.gradient, step, origin, source)
    for layer in layers:
        if _bad(layer.weight_grad):
            received = _bad(layer.gradient)
            source = f"∂ℓ/∂h of {layer.name}" if received else f"the weight-gradient computation of {layer.name}"
            origin = "received" if received else "produced"
            return _describe(layer, "weight_grad", layer.weight_grad, step, origin, source, weight_dtypes)
    return None
