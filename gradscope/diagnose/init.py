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
                "has_bias": layer.parameters > math.prod(layer.weight_shape or [0]),
            }
        )
    return rows


def _gain_off(row: dict[str, Any]) -> bool:
    gain = row["predicted_gain"]
    if gain is None or row["normalised"]:
        return False
    return not (th.INIT_GAIN_LOW <= gain <= th.INIT_GAIN_HIGH)


def poor_init_layers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose init is both far from the recommendation and predicts a gain far from 1
    (zero-initialised layers excepted: their zero is a design choice, see ``zero-init``)."""
    return [r for r in rows if _gain_off(r) and r["off_recommendation"] and r["weight_std"] > 0]


def _quoted(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def init_fix(rows: list[dict[str, Any]], max_lines: int = 8) -> Fix:
    """The init calls for the given rows (per layer when few, ``apply_init`` on exactly
    those layers when many); biases are zeroed with the weights (He et al. 2015 and
    Glorot & Bengio 2010 start them at 0)."""
    schemes = sorted({r["scheme"] for r in rows})
    summary = "re-initialise " + ", ".join(
        f"{'Kaiming (He et al. 2015)' if s == 'kaiming' else 'Xavier (Glorot & Bengio 2010)'}" for s in schemes
    )
    names = [r["name"] for r in rows]
    if len(rows) <= max_lines:
        code = "import torch.nn as nn\n\n" + "\n".join(_row_code(r) for r in rows)
        summary += " for " + _quoted(names, max_lines)
    else:
        modules = sorted({r["name"].split("#")[0] for r in rows})
        code = (
            "from gradscope.fix import apply_init\n\n"
            f'apply_init(model, scheme="auto", layers={modules!r})  # the {len(rows)} layers named, e.g.\n'
            + "\n".join("# " + line for r in rows[:2] for line in _row_code(r).splitlines())
        )
        summary += f" for {len(rows)} layers ({_quoted(names)})"
    return Fix(summary + ", so that each layer keeps the signal's variance (gain ≈ 1).", code)


def _row_code(row: dict[str, Any]) -> str:
    code = str(row["code"])
    if row.get("has_bias"):
        target = advice.module_expression(row["name"].split("#")[0])
        code += f"\nnn.init.zeros_({target}.bias)"
    return code


def compounding_runs(ctx: Context, rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Runs of rows whose gains multiply: each layer feeds the next one directly.

    Two rows are chained when what the second layer receives is what the first
    (with its activation) put out: equal second moments within CHAIN_TOLERANCE.
    A normalisation, a residual add, parallel projections (attention's query,
    key and value all read the same input) or a layer-scaled branch breaks the
    chain.  Layers after a head boundary and the output layer (its gain only
    scales the logits, which the loss sees once) are left out.
    """
    from gradscope.diagnose.depth import structure

    found = structure(ctx)
    last_body = None
    if found.head_boundary is not None:
        last_body = ctx.position[found.head_boundary["last_body_layer"]]
    usable = []
    for row in rows:
        layer = ctx.by_name[row["name"]]
        if last_body is not None and ctx.position[layer.name] > last_body:
            continue
        if found.in_scaled_branch(layer) or row["weight_std"] == 0:
            continue
        usable.append(row)
    if found.head_boundary is None and usable and rows and usable[-1] is rows[-1]:
        usable = usable[:-1]
    runs: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    for row in usable:
        broken = row["predicted_gain"] is None or row["measured_gain"] is None
        if broken or (current and not _chained(ctx, current[-1], row)):
            if len(current) >= 2:
                runs.append(current)
            current = []
        if not broken:
            current.append(row)
    if len(current) >= 2:
        runs.append(current)
    return runs


def _chained(ctx: Context, before: dict[str, Any], after: dict[str, Any]) -> bool:
    layer = ctx.by_name[before["name"]]
    kind, act = ctx.activation_after(layer)
    out = _second_moment(act.activation if act is not None and kind != "norm" else layer.activation)
    nxt = ctx.by_name[after["name"]]
    stats = nxt.input
    if stats is None:  # a record without inputs (watch): what the previous call site put out
        prev = ctx.previous(nxt)
        stats = prev.activation if prev is not None else None
    received = _second_moment(stats)
    if out is None or received is None or out <= 0:
        return False
    return 1 / th.CHAIN_TOLERANCE <= received / out <= th.CHAIN_TOLERANCE


def _out_of_band(gain: float | None) -> bool:
    return gain is not None and not (th.INIT_STACK_LOW <= gain <= th.INIT_STACK_HIGH)


def rule_poor_init(ctx: Context) -> list[Finding]:
    """poor-init: the init's compounded gain across the stack leaves the healthy band.

    A warning when the gains that the weights predict (``n_in·Var[w]·factor``)
    multiply, across the layers that compound, to outside ``[INIT_STACK_LOW,
    INIT_STACK_HIGH]``, and the signal measured end to end over the same layers
    confirms it (residuals and normalisation rescue a branch's small gain: no
    finding then).  When the weights predict a healthy gain but the measured one
    leaves the band, the biases (or the input) are the cause, and the fix says
    so.  Never during training: re-initialising a model that has been trained
    throws the training away.
    """
    if ctx.during_training:
        return []
    rows = ctx.analysis.get("init") or []
    judged = []
    for run in compounding_runs(ctx, rows):
        predicted = math.prod(r["predicted_gain"] for r in run)
        # The rows are chained, so their measured gains telescope: from the input
        # of the first to the activation after the last, what the signal really did.
        measured = math.prod(r["measured_gain"] for r in run)
        if _out_of_band(measured):
            judged.append((run, predicted, measured))
    if not judged:
        return []
    run, predicted, measured = max(judged, key=lambda t: abs(math.log(t[2])) if t[2] > 0 else math.inf)
    if _out_of_band(predicted):
        return [_weights_finding(ctx, run, predicted, measured)]
    return _bias_finding(ctx, run, predicted, measured)


def _weights_finding(ctx: Context, stack: list[dict[str, Any]], predicted: float, measured: float | None) -> Finding:
    bad = [r for r in stack if _gain_off(r) and r["off_recommendation"]] or [r for r in stack if _gain_off(r)]
    for row in bad:
        row["flag"] = "poor-init"
    gains = [r["predicted_gain"] for r in bad]
    worst = max(bad, key=lambda r: abs(math.log(r["predicted_gain"])) if r["predicted_gain"] > 0 else math.inf)
    spread = (
        f"{min(gains):.2g}"
        if math.isclose(min(gains), max(gains), rel_tol=0.05)
        else (f"{min(gains):.2g}–{max(gains):.2g}")
    )
    squash = [r for r in bad if any(t.lower() in r["activation_after"] for t in SQUASH_TYPES)]
    message = (
        f"The weights of {len(bad)} layer(s) ({_quoted([r['name'] for r in bad])}) predict a variance gain of "
        f"{spread} per layer (at '{worst['name']}': std {worst['weight_std']:.3g} where {worst['scheme']} asks "
        f"{worst['recommended_std']:.3g}), {predicted:.3g} compounded over the {len(stack)} layers that multiply; "
        f"the signal measured across them confirms it ({measured:.3g})."
    )
    return Finding(
        code="poor-init",
        severity=Severity.WARNING,
        layers=[r["name"] for r in bad],
        message=message,
        evidence={
            "cause": "weights",
            "layers": len(bad),
            "compounding_layers": len(stack),
            "worst_layer": worst["name"],
            "worst_weight_std": worst["weight_std"],
            "worst_recommended_std": worst["recommended_std"],
            "worst_predicted_gain": worst["predicted_gain"],
            "predicted_gains": gains,
            "compounded_predicted_gain": predicted,
            "measured_gain_end_to_end": measured,
            "healthy_stack_range": [th.INIT_STACK_LOW, th.INIT_STACK_HIGH],
            "healthy_gain_range": [th.INIT_GAIN_LOW, th.INIT_GAIN_HIGH],
            "std_tolerance": th.INIT_STD_TOLERANCE,
            "saturating_activations": len(squash),
        },
        fix=init_fix(bad),
    )


def _bias_finding(ctx: Context, stack: list[dict[str, Any]], predicted: float, measured: float | None) -> list[Finding]:
    """The weights predict a healthy product, the measurement does not: the layers whose
    measured gain is far above what their weights predict owe it to their biases."""
    culprits = [
        r
        for r in stack
        if r.get("has_bias")
        and r["measured_gain"] is not None
        and r["predicted_gain"]
        and not (0.5 <= r["measured_gain"] / r["predicted_gain"] <= 2.0)
    ]
    if not culprits:
        return []
    for row in culprits:
        row["flag"] = "poor-init"
    names = [r["name"] for r in culprits]
    code = "import torch.nn as nn\n\n" + "\n".join(
        f"nn.init.zeros_({advice.module_expression(n.split('#')[0])}.bias)" for n in names
    )

    def off(row: dict[str, Any]) -> float:
        ratio = row["measured_gain"] / row["predicted_gain"]
        return abs(math.log(ratio)) if ratio > 0 else math.inf

    worst = max(culprits, key=off)
    return [
        Finding(
            code="poor-init",
            severity=Severity.WARNING,
            layers=names,
            message=(
                f"The biases of {_quoted(names)} move the signal: '{worst['name']}' multiplies its second moment "
                f"by {worst['measured_gain']:.3g} where its weights alone predict {worst['predicted_gain']:.3g}, "
                f"and across the stack the signal changes {measured:.3g}x while the weights predict "
                f"{predicted:.3g}x."
            ),
            evidence={
                "cause": "biases",
                "layers": len(culprits),
                "compounded_predicted_gain": predicted,
                "measured_gain_end_to_end": measured,
                "worst_layer": worst["name"],
                "worst_measured_gain": worst["measured_gain"],
                "worst_predicted_gain": worst["predicted_gain"],
                "healthy_stack_range": [th.INIT_STACK_LOW, th.INIT_STACK_HIGH],
            },
            fix=Fix("Start the biases at zero (He et al. 2015; Glorot & Bengio 2010); the weights are fine.", code),
        )
    ]
