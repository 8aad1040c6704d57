"""dead-units and saturated-units: activations that stopped passing gradient.

Both are judged from whole-tensor statistics of the activation's output, which
the record holds for every call site: the fraction of exact zeros for ReLU,
the second moment relative to the asymptotes for tanh and sigmoid.
"""

from __future__ import annotations

import math

from gradscope import advice
from gradscope.diagnose import thresholds as th
from gradscope.diagnose.layers import DYING_TYPES, INIT_TYPES, SATURATING_TYPES, Context
from gradscope.record import LayerRecord
from gradscope.report import Finding, Fix, Severity


def _feeding_layer(ctx: Context, layer: LayerRecord) -> LayerRecord | None:
    """The closest parametrised layer before ``layer`` in execution order."""
    for prev in reversed(ctx.layers[: ctx.position[layer.name]]):
        if prev.type in INIT_TYPES or prev.fan_in is not None:
            return prev
    return None


def _feeder_expressions(ctx: Context, hits: list[tuple[LayerRecord, float]]) -> list[str]:
    """The module expressions of the layers feeding each hit activation, once each."""
    out: list[str] = []
    for layer, _ in hits:
        feeder = _feeding_layer(ctx, layer)
        if feeder is not None and feeder.type in INIT_TYPES:
            target = advice.module_expression(feeder.module)
            if target not in out:
                out.append(target)
    return out


def rule_dead_units(ctx: Context) -> list[Finding]:
    """ReLU outputs that are (almost) all exact zeros: the units never fire."""
    hits: list[tuple[LayerRecord, float]] = []
    for layer in ctx.layers:
        stats = layer.activation
        if layer.type not in DYING_TYPES or stats is None or stats.count == 0:
            continue
        zero = stats.zero_frac
        if zero >= th.DEAD_WARN_ZERO_FRAC:
            hits.append((layer, zero))
    if not hits:
        return []
    worst = max(hits, key=lambda t: t[1])
    severity = Severity.ERROR if worst[1] >= th.DEAD_ERROR_ZERO_FRAC else Severity.WARNING
    feeder = _feeding_layer(ctx, worst[0])
    lines = ["import torch.nn as nn", ""]
    for target in _feeder_expressions(ctx, hits):
        lines += [
            f"nn.init.zeros_({target}.bias)  # a large negative bias keeps every unit below 0",
            f'nn.init.kaiming_normal_({target}.weight, nonlinearity="relu")',
        ]
    lines += [
        "# or let negative inputs pass a little gradient:",
        "# replace nn.ReLU() by nn.LeakyReLU(0.01) or nn.GELU()",
    ]
    return [
        Finding(
            code="dead-units",
            severity=severity,
            layers=[t[0].name for t in hits],
            message=(
                f"{worst[1]:.1%} of the outputs of '{worst[0].name}' ({worst[0].type}) are exactly zero "
                f"(a healthy ReLU sits near 50%): its units never activate, so no gradient flows through them."
            ),
            evidence={
                "worst_layer": worst[0].name,
                "zero_frac": worst[1],
                "layers": len(hits),
                "feeding_layer": feeder.name if feeder is not None else None,
                "threshold_warning": th.DEAD_WARN_ZERO_FRAC,
                "threshold_error": th.DEAD_ERROR_ZERO_FRAC,
            },
            fix=Fix(
                "Reset the biases feeding the ReLU to 0 with Kaiming weights (lower the learning rate if "
                "they died in training), or use LeakyReLU/GELU.",
                "\n".join(lines),
            ),
        )
    ]


def saturated_lower_bound(second_moment: float, level: float = th.SATURATION_LEVEL) -> float:
    """A lower bound on P(|u| >= level) for |u| <= 1 from E[u^2] alone.

    E[u^2] <= P + (1 - P) level^2, hence P >= (E[u^2] - level^2) / (1 - level^2).
    """
    return max(0.0, (second_moment - level**2) / (1.0 - level**2))


def _centred_second_moment(layer: LayerRecord) -> float | None:
    """E[u^2] with u mapped to [-1, 1]: u = y for tanh, u = 2y - 1 for sigmoid."""
    stats = layer.activation
    if stats is None or stats.count == 0 or not stats.moments_valid:
        return None
    mean, var = stats.mean, stats.var
    if layer.type == "Sigmoid":
        # E[(2y-1)^2] = 4 E[y^2] - 4 E[y] + 1
        value = 4.0 * (var + mean**2) - 4.0 * mean + 1.0
    else:
        value = var + mean**2
    return value if math.isfinite(value) else None


def _pre_activation(ctx: Context, layer: LayerRecord) -> LayerRecord | None:
    """The layer whose output this activation received: the one just before it in
    execution order, with the same output shape (Linear -> Tanh)."""
    prev = ctx.previous(layer)
    if prev is None or prev.output_shape != layer.output_shape:
        return None
    stats = prev.activation
    if stats is None or stats.count == 0 or stats.nonfinite_count > 0:
        return None
    return prev


def saturated_fraction(pre: LayerRecord, kind: str) -> float:
    """The exact fraction of pre-activations at or beyond the saturation point, from the
    binade histogram: |y| >= 2 for tanh (binades >= 1), |x| >= 4 for sigmoid (binades >= 2)."""
    stats = pre.activation
    assert stats is not None
    lowest = th.SATURATION_BINADE_TANH if kind == "Tanh" else th.SATURATION_BINADE_SIGMOID
    return stats.hist_frac(stats.count_exponents(lo=lowest))


def rule_saturated_units(ctx: Context) -> list[Finding]:
    """tanh/sigmoid outputs piled up at the asymptotes (derivative near zero).

    The fraction is counted, not bounded: the pre-activation's binade histogram
    holds how many values lie beyond the saturation point exactly (or, for
    tensors larger than the audit's sample, within ±0.0005).  Without a
    recorded pre-activation, the lower bound from the output's second moment.
    """
    hits: list[tuple[LayerRecord, float, bool]] = []
    for layer in ctx.layers:
        if layer.type not in SATURATING_TYPES:
            continue
        pre = _pre_activation(ctx, layer)
        if pre is not None:
            frac, exact = saturated_fraction(pre, layer.type), True
        else:
            m2 = _centred_second_moment(layer)
            if m2 is None:
                continue
            frac, exact = saturated_lower_bound(m2), False
        if frac >= th.SATURATED_WARN_FRAC:
            hits.append((layer, frac, exact))
    if not hits:
        return []
    worst = max(hits, key=lambda t: t[1])
    layer, frac, exact = worst
    severity = Severity.ERROR if frac >= th.SATURATED_ERROR_FRAC else Severity.WARNING
    feeder = _feeding_layer(ctx, layer)
    lines = ["import torch.nn as nn", ""]
    for target in _feeder_expressions(ctx, [(t[0], t[1]) for t in hits]):
        lines.append(f"nn.init.xavier_normal_({target}.weight)  # Glorot & Bengio 2010: tanh stays near-linear")
        lines.append(f"nn.init.zeros_({target}.bias)")
    lines.append("# or normalise the pre-activations: insert nn.LayerNorm(features) before the activation")
    if exact:
        where = "|pre-activation| >= 2" if layer.type == "Tanh" else "|pre-activation| >= 4"
        derivative = "1 - y^2 < 0.071" if layer.type == "Tanh" else "y(1 - y) < 0.018"
        amount = f"{_percent(frac)} of the outputs"
    else:
        where = f"|u| >= {th.SATURATION_LEVEL}"
        derivative = "1 - y^2 <= 0.19" if layer.type == "Tanh" else "y(1 - y) <= 0.048"
        amount = f"At least {_percent(frac)} of the outputs"
    more = f" ({len(hits)} layers, first '{hits[0][0].name}')" if len(hits) > 1 else ""
    message = (
        f"{amount[0].upper() + amount[1:]} of '{layer.name}' ({layer.type}) sit at its asymptotes{more} "
        f"({where}, derivative {derivative}): the gradient stalls there."
    )
    evidence = {
        "worst_layer": layer.name,
        "saturated_frac": frac if exact else None,
        "saturated_frac_lower_bound": frac if not exact else _bound_or_none(layer),
        "counted": exact,
        "per_layer": {t[0].name: t[1] for t in hits},
        "activation_std": layer.activation.std if layer.activation else None,
        "layers": len(hits),
        "feeding_layer": feeder.name if feeder is not None else None,
        "threshold_warning": th.SATURATED_WARN_FRAC,
        "threshold_error": th.SATURATED_ERROR_FRAC,
    }
    return [
        Finding(
            code="saturated-units",
            severity=severity,
            layers=[t[0].name for t in hits],
            message=message,
            evidence=evidence,
            fix=Fix(
                "Shrink the weights feeding the activation to Xavier scale with zero biases, or normalise its input.",
                "\n".join(lines),
            ),
        )
    ]


def _percent(frac: float) -> str:
    """81.2%, 100% (only when every value is), 99.95% rather than a rounded 100%."""
    if frac >= 1.0:
        return "100%"
    text = f"{frac:.1%}"
    if text == "100.0%":
        text = f"{frac:.3%}"
    return text


def _bound_or_none(layer: LayerRecord) -> float | None:
    m2 = _centred_second_moment(layer)
    return None if m2 is None else saturated_lower_bound(m2)
