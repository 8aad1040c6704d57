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
                f"{worst[1]:.1%} of the outputs of {worst[0].name} ({worst[0].type}) are exactly zero "
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


def rule_saturated_units(ctx: Context) -> list[Finding]:
    """tanh/sigmoid outputs piled up at the asymptotes (derivative near zero)."""
    hits: list[tuple[LayerRecord, float]] = []
    for layer in ctx.layers:
        if layer.type not in SATURATING_TYPES:
            continue
        m2 = _centred_second_moment(layer)
        if m2 is None:
            continue
        bound = saturated_lower_bound(m2)
        if bound >= th.SATURATED_WARN_FRAC:
            hits.append((layer, bound))
    if not hits:
        return []
    worst = max(hits, key=lambda t: t[1])
    severity = Severity.ERROR if worst[1] >= th.SATURATED_ERROR_FRAC else Severity.WARNING
    feeder = _feeding_layer(ctx, worst[0])
    lines = ["import torch.nn as nn", ""]
    for target in _feeder_expressions(ctx, hits):
        lines.append(f"nn.init.xavier_normal_({target}.weight)  # Glorot & Bengio 2010: tanh stays near-linear")
    lines.append("# or normalise the pre-activations: insert nn.LayerNorm(features) before the activation")
    derivative = "1 - y^2 <= 0.19" if worst[0].type == "Tanh" else "y(1 - y) <= 0.048"
    return [
        Finding(
            code="saturated-units",
            severity=severity,
            layers=[t[0].name for t in hits],
            message=(
                f"At least {worst[1]:.0%} of the outputs of {worst[0].name} ({worst[0].type}) sit at its "
                f"asymptotes (|u| >= {th.SATURATION_LEVEL}, derivative {derivative}): the gradient stalls there."
            ),
            evidence={
                "worst_layer": worst[0].name,
                "saturated_frac_lower_bound": worst[1],
                "activation_std": worst[0].activation.std if worst[0].activation else None,
                "layers": len(hits),
                "feeding_layer": feeder.name if feeder is not None else None,
                "level": th.SATURATION_LEVEL,
                "threshold_warning": th.SATURATED_WARN_FRAC,
                "threshold_error": th.SATURATED_ERROR_FRAC,
            },
            fix=Fix(
                "Shrink the weights feeding the activation to Xavier scale, or normalise its input.",
                "\n".join(lines),
            ),
        )
    ]
