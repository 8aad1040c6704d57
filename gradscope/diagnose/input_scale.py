"""Ratios measured from an input far from unit scale: name the input, not the init.

Every init convention (LeCun et al. 1998, Glorot & Bengio 2010, He et al. 2015)
keeps a unit-variance signal at unit variance; it assumes the data were
standardised first (LeCun et al. 1998, "Efficient BackProp", sec. 4.3: shift
each input to zero mean, scale it to unit variance).  An input of RMS 1e-3 makes
the first layer's biases outweigh its weighted input (PyTorch's default bias,
U(±1/√fan_in), has RMS 1/√(3·fan_in) ≈ 0.07 at fan_in 64), so every gain
measured from it is a ratio to a near-zero reference, and zeroing the biases
(or re-initialising anything) leaves a network that still sees almost nothing
of its data.  An input of RMS 1e3 passes through a ReLU stack scaled (a
bias-free ReLU network is homogeneous of degree 1) into logits a thousand times
too large.  In both cases the cure is the input's scale.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope.diagnose import thresholds as th
from gradscope.diagnose.layers import Context
from gradscope.record import LayerRecord
from gradscope.report import Finding, Fix, Severity


def input_rms(ctx: Context) -> float | None:
    """RMS of the model's floating-point input, when the record has it."""
    stats = ctx.record.input
    if stats is None or stats.count == 0 or not stats.moments_valid:
        return None
    rms = stats.rms
    return rms if math.isfinite(rms) and rms > 0 else None


def off_scale(rms: float | None) -> bool:
    return rms is not None and not (th.INPUT_RMS_LOW <= rms <= th.INPUT_RMS_HIGH)


def reads_model_input(ctx: Context, layer: LayerRecord) -> bool:
    """Whether ``layer`` is the first parametrised layer and reads the model's input itself
    (the same count and second moment: ``gradscope.diagnose.init._same_tensor``'s fingerprint)."""
    first = next(iter(ctx.parametrised()), None)
    if first is None or first.name != layer.name:
        return False
    received, given = layer.input, ctx.record.input
    if received is None or given is None:
        return True
    return received.count == given.count and math.isclose(received.rms, given.rms, rel_tol=1e-6)


def _fix(rms: float) -> Fix:
    return Fix(
        "standardise the inputs (zero mean, unit variance per feature, with the training set's statistics; "
        "LeCun et al. 1998), the scale every init assumes; the weights and biases are fine.",
        "# once, over the training data (x_train: its inputs as one tensor):\n"
        "mean = x_train.mean(dim=0, keepdim=True)\n"
        "std = x_train.std(dim=0, keepdim=True).clamp_min(1e-8)\n"
        "# then for every batch, in training and at inference:\n"
        "x = (x - mean) / std\n"
        f"# (at the least, rescale: x = x * {1 / rms:.3g}, for the measured RMS {rms:.3g})",
    )


def input_scale_finding(ctx: Context, layers: list[str], consequence: str, evidence: dict[str, Any]) -> Finding:
    rms = input_rms(ctx)
    assert rms is not None
    direction = "small" if rms < th.INPUT_RMS_LOW else "large"
    return Finding(
        code="poor-init",
        severity=Severity.WARNING,
        layers=layers,
        message=(
            f"The model's input has RMS {rms:.3g}, far too {direction} for the unit scale every init assumes "
            f"(healthy [{th.INPUT_RMS_LOW:g}, {th.INPUT_RMS_HIGH:g}]): {consequence}"
        ),
        evidence={
            "cause": "input-scale",
            "input_rms": rms,
            "healthy_input_rms": [th.INPUT_RMS_LOW, th.INPUT_RMS_HIGH],
            **evidence,
        },
        fix=_fix(rms),
    )
