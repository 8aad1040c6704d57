"""Init analysis: the gain each parametrised layer's init predicts, beside the measured one.

For a layer ``y = W x`` followed by an activation ``a``, He et al. 2015 (eq. 7)
give ``E[a(y)^2] = factor · Var[y] = factor · n_in · Var[w] · E[x^2]``, so the
layer+activation pair multiplies the signal's second moment by the predicted
gain ``n_in · Var[w] · factor`` (factor 1/2 for ReLU, 1 for the identity,
measured for the others).  The measured gain is the same ratio read from the
record: ``E[a^2] / E[x^2]``.  The init that restores gain 1 is Kaiming for the
ReLU family and Xavier (Glorot & Bengio 2010) for tanh/sigmoid/identity.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope import advice
from gradscope.diagnose import thresholds as th
from gradscope.diagnose.layers import INIT_TYPES, SQUASH_TYPES, Context
from gradscope.report import Finding, Fix, Severity
from gradscope.stats import Stats

DEPTH_CODES = {"vanishing-gradient", "exploding-gradient", "vanishing-activations", "exploding-activations"}
KAIMING_KINDS = {"relu", "leaky_relu", "gelu", "silu", "mish", "elu", "celu", "hardswish", "softplus"}


def _second_moment(stats: Stats | None) -> float | None:
    if stats is None or stats.count == 0 or not stats.moments_valid:
        return None
    value = stats.rms**2
    return value if math.isfinite(value) else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _recommendation(kind: str, after_norm: str | None) -> tuple[str, str]:
    """(scheme, nonlinearity for Kaiming) for the activation kind after a layer."""
    effective = after_norm or kind
    if effective in KAIMING_KINDS:
        return "kaiming", "leaky_relu" if effective == "leaky_relu" else "relu"
    return "xavier", "linear"


def analyse_init(ctx: Context) -> list[dict[str, Any]]:
    """One row per analysable parametrised layer (Linear, Conv), in execution order."""
    rows: list[dict[str, Any]] = []
    for layer in ctx.layers:
        if layer.type not in INIT_TYPES or layer.call != 1 or layer.fan_in is None:
            continue
        weight = layer.weight
        if weight is None or weight.count == 0 or not weight.moments_valid:
            continue
        kind, act = ctx.activation_after(layer)
        after_norm: str | None = None
        if kind == "norm" and act is not None:
            # conv -> BatchNorm -> ReLU: the convention (He et al. 2016) still
            # follows the activation behind the normalisation.
            beyond, _ = ctx.activation_after(act)
            after_norm = beyond if beyond not in ("norm",) else "identity"
        slope = ctx.negative_slope(act) if kind == "leaky_relu" else 0.01
        weight_var = weight.var
        factor = advice.activation_factor(kind, slope)
        out_m2 = _second_moment(layer.activation)
        act_m2 = _second_moment(act.activation) if act is not None and kind != "norm" else None
        if factor is None and kind != "norm":
            factor = _ratio(act_m2, out_m2)  # measured: E[a(y)^2] / E[y^2]
        predicted = (
            None if kind == "norm" or factor is None else advice.predicted_gain(layer.fan_in, weight_var, factor)
        )
        in_m2 = _second_moment(layer.input)
        if in_m2 is None:
            prev = ctx.previous(layer)
            in_m2 = _second_moment(prev.activation) if prev is not None else _second_moment(ctx.record.input)
        measured_out = act_m2 if act_m2 is not None and kind != "norm" else out_m2
        measured = _ratio(measured_out, in_m2)
        scheme, nonlinearity = _recommendation(kind, after_norm)
        if scheme == "kaiming":
            gain = advice.kaiming_gain(nonlinearity, slope)
            recommended = advice.kaiming_std(layer.fan_in, gain)
        else:
            recommended = advice.xavier_std(layer.fan_in, layer.fan_out or layer.fan_in)
        std = math.sqrt(weight_var)
        code = advice.init_code(
            layer.module, scheme, nonlinearity=nonlinearity, negative_slope=slope, weight=layer.weight_name or "weight"
        )
        off = std / recommended if recommended > 0 else math.inf
        rows.append(
            {
                "name": layer.name,
                "type": layer.type,
                "fan_in": layer.fan_in,
                "fan_out": layer.fan_out,
                "weight_std": std,
                "activation_after": (f"norm→{after_norm}" if kind == "norm" else kind),
                "predicted_gain": predicted,
                "measured_gain": measured,
                "scheme": scheme,
                "recommended_std": recommended,
                "code": code,
                "normalised": kind == "norm",
                "nonlinearity": nonlinearity,
                "negative_slope": slope if nonlinearity == "leaky_relu" else None,
                "std_ratio": off,
                "off_recommendation": not (1 / th.INIT_STD_TOLERANCE <= off <= th.INIT_STD_TOLERANCE),
                "flag": None,
            }
        )
    return rows


def _gain_off(row: dict[str, Any]) -> bool:
    gain = row["predicted_gain"]
    if gain is None or row["normalised"]:
        return False
    return not (th.INIT_GAIN_LOW <= gain <= th.INIT_GAIN_HIGH)


def poor_init_layers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose init is both far from the recommendation and predicts a gain far from 1."""
    return [r for r in rows if _gain_off(r) and r["off_recommendation"]]


def init_fix(rows: list[dict[str, Any]], max_lines: int = 8) -> Fix:
    """The init calls for the given rows (per layer when few, ``apply_init`` when many)."""
    schemes = sorted({r["scheme"] for r in rows})
    summary = "re-initialise " + ", ".join(
        f"{'Kaiming (He et al. 2015)' if s == 'kaiming' else 'Xavier (Glorot & Bengio 2010)'}" for s in schemes
    )
    if len(rows) <= max_lines:
        code = "import torch.nn as nn\n\n" + "\n".join(r["code"] for r in rows)
        summary += " for " + ", ".join(r["name"] for r in rows)
    else:
        code = (
            "from gradscope.fix import apply_init\n\n"
            f'apply_init(model, scheme="auto")  # {len(rows)} layers, e.g.\n'
            + "\n".join("# " + r["code"] for r in rows[:3])
        )
        summary += f" for {len(rows)} layers"
    return Fix(summary + ", so that each layer keeps the signal's variance (gain ≈ 1).", code)


def rule_poor_init(ctx: Context) -> list[Finding]:
    """poor-init: weight scales far from what fan-in/fan-out and the activation call for.

    A warning only when the depth analysis shows the signal actually suffering
    (vanishing or exploding) *and* the compounded predicted gain of the poorly
    initialised layers is far enough from 1 to explain it (the depth band, in
    amplitude); an info when only one of the two holds (residuals or
    normalisation rescued a bad init, or the depth problem has another cause).
    """
    rows = ctx.analysis.get("init") or []
    bad = poor_init_layers(rows)
    if not bad:
        return []
    hurts = bool(ctx.found & DEPTH_CODES)
    product = math.prod(r["predicted_gain"] for r in bad)
    # Does the init alone explain a depth problem?  Its compounded gain, in
    # amplitude, against the same band the depth rules use.
    amplitude = math.sqrt(product)
    explains = not (th.DEPTH_WARN_LOW <= amplitude <= th.DEPTH_WARN_HIGH)
    if not hurts and not explains:
        return []
    severity = Severity.WARNING if hurts and explains else Severity.INFO
    for row in bad:
        row["flag"] = "poor-init"
    worst = max(bad, key=lambda r: abs(math.log(r["predicted_gain"])) if r["predicted_gain"] > 0 else math.inf)
    squash = [r for r in bad if any(t.lower() in r["activation_after"] for t in SQUASH_TYPES)]
    message = (
        f"{len(bad)} layer(s) have weights whose scale predicts a per-layer gain of "
        f"{worst['predicted_gain']:.3g} (at {worst['name']}: std {worst['weight_std']:.3g}, "
        f"{worst['scheme']} asks {worst['recommended_std']:.3g}); compounded over them: {product:.3g}"
    )
    if not hurts:
        message += ", though the measured depth profile stays healthy"
    elif not explains:
        message += ", not enough on its own to explain the depth problem"
    return [
        Finding(
            code="poor-init",
            severity=severity,
            layers=[r["name"] for r in bad],
            message=message + ".",
            evidence={
                "layers": len(bad),
                "worst_layer": worst["name"],
                "worst_weight_std": worst["weight_std"],
                "worst_recommended_std": worst["recommended_std"],
                "worst_predicted_gain": worst["predicted_gain"],
                "compounded_predicted_gain": product,
                "healthy_gain_range": [th.INIT_GAIN_LOW, th.INIT_GAIN_HIGH],
                "std_tolerance": th.INIT_STD_TOLERANCE,
                "saturating_activations": len(squash),
            },
            fix=init_fix(bad),
        )
    ]
