"""dead-units and saturated-units: activations that stopped passing gradient.

Both are judged from whole-tensor statistics of the activation's output, which
the record holds for every call site: the fraction of exact zeros for ReLU,
the second moment relative to the asymptotes for tanh and sigmoid.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope import advice
from gradscope.diagnose import thresholds as th
from gradscope.diagnose.dead_cause import BETA, BIAS, UNKNOWN, DeadCause, dead_cause, producer_of
from gradscope.diagnose.layers import BATCHNORM_TYPES, DYING_TYPES, INIT_TYPES, SATURATING_TYPES, Context
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
    """ReLU layers with many units that never fire.

    Per unit when the record holds the layer's liveness (``gradscope.liveness``)
    over at least DEAD_UNITS_MIN_POSITIONS outputs per unit; otherwise, for a
    record without it, from the whole tensor's fraction of exact zeros.
    """
    per_unit: list[tuple[LayerRecord, float]] = []
    by_zeros: list[tuple[LayerRecord, float]] = []
    for layer in ctx.layers:
        stats = layer.activation
        if layer.type not in DYING_TYPES:
            continue
        units = layer.units
        if units is not None and units.units > 0 and units.positions >= th.DEAD_UNITS_MIN_POSITIONS:
            if units.dead / units.units >= dead_units_limit(ctx, layer):
                per_unit.append((layer, units.dead / units.units))
        elif stats is not None and stats.count > 0 and stats.zero_frac >= th.DEAD_WARN_ZERO_FRAC:
            by_zeros.append((layer, stats.zero_frac))
    if per_unit:
        return [_dead_units_finding(ctx, per_unit, by_zeros)]
    if by_zeros:
        return [_dead_by_zeros_finding(ctx, by_zeros)]
    return []


def dead_units_limit(ctx: Context, layer: LayerRecord) -> float:
    """The dead fraction from which ``layer`` is flagged (thresholds.DEAD_UNITS_*):
    a quarter after a BatchNorm that centres each channel over the batch, else
    more than half by a binomial margin (the samples' shared component)."""
    producer = producer_of(ctx, layer)
    if producer is not None and producer.type in BATCHNORM_TYPES and ctx.mode != "eval":
        return th.DEAD_UNITS_WARN_FRAC
    units = layer.units.units if layer.units is not None else 1
    margin = th.DEAD_UNITS_MARGIN_SIGMAS * 0.5 / math.sqrt(units)  # 3 sd of Binomial(n, 1/2) / n
    return min(th.DEAD_UNITS_WARN_FRAC_UNCENTRED + margin, th.DEAD_UNITS_ERROR_FRAC)  # a layer all dead always counts


def _dead_units_finding(
    ctx: Context, hits: list[tuple[LayerRecord, float]], by_zeros: list[tuple[LayerRecord, float]]
) -> Finding:
    """The finding from per-unit liveness: the layer, the count, the measured cause and its fix."""
    layer, frac = max(hits, key=lambda t: t[1])
    units = layer.units
    assert units is not None
    severity = Severity.ERROR if frac >= th.DEAD_UNITS_ERROR_FRAC else Severity.WARNING
    causes = {hit.name: dead_cause(ctx, hit) for hit, _ in hits}
    cause = causes[layer.name]
    more = f" ({len(hits)} layers with dead units, first '{hits[0][0].name}')" if len(hits) > 1 else ""
    message = (
        f"{units.dead} of {units.units} units of '{layer.name}' ({layer.type}) never fire{more}: their output is 0 "
        f"on all {units.positions} outputs per unit seen, so no gradient reaches the weights feeding them."
    )
    if cause.kind in (BIAS, BETA):
        what = "bias" if cause.kind == BIAS else "BatchNorm beta"
        message += (
            f" The cause measured: the {what} of '{cause.producer}' ({cause.producer_type}) holds those units' "
            f"pre-activation {_stds(cause.shift_in_stds)} below 0 (median {cause.dead_shift_median:.3g} on the "
            f"dead units{_live(cause.live_shift_median)})."
        )
    stats = layer.activation
    evidence: dict[str, Any] = {
        "worst_layer": layer.name,
        "dead_units": units.dead,
        "units": units.units,
        "dead_frac": frac,
        "positions": units.positions,
        "unit_axis": units.axis,
        "zero_frac": stats.zero_frac if stats is not None else None,
        "per_layer": {
            hit.name: {
                "dead": hit.units.dead,
                "units": hit.units.units,
                "cause": causes[hit.name].kind,
                "producer": causes[hit.name].producer,
            }
            for hit, _ in hits
            if hit.units
        },
        "by_zero_fraction": [hit.name for hit, _ in by_zeros],
        "cause": cause.to_dict(),
        "layers": len(hits) + len(by_zeros),
        "feeding_layer": cause.producer,
        "threshold_warning": dead_units_limit(ctx, layer),
        "threshold_error": th.DEAD_UNITS_ERROR_FRAC,
        "min_positions": th.DEAD_UNITS_MIN_POSITIONS,
    }
    return Finding(
        code="dead-units",
        severity=severity,
        layers=[hit.name for hit, _ in hits] + [hit.name for hit, _ in by_zeros],
        message=message,
        evidence=evidence,
        fix=_dead_units_fix(ctx, hits, causes),
    )


def _stds(value: float | None) -> str:
    return "far" if value is None else f"{-value:.3g} std"


def _live(value: float | None) -> str:
    return "" if value is None else f", {value:.3g} on the live ones"


def _dead_units_fix(ctx: Context, hits: list[tuple[LayerRecord, float]], causes: dict[str, DeadCause]) -> Fix:
    """Reset the measured shift to 0 (what BatchNorm and PyTorch's zero-bias convention
    start from); where no shift explains the dead units, let negative inputs pass."""
    lines = ["import torch.nn as nn", ""]
    reset: list[str] = []
    for hit, _ in hits:
        cause = causes[hit.name]
        if cause.kind in (BIAS, BETA) and cause.target is not None and not ctx.during_training:
            line = f"nn.init.zeros_({cause.target}.bias)  # holds {hit.name}'s dead units below 0"
            if line not in lines:
                lines.append(line)
                reset.append(cause.target)
    swapped = []
    for hit, _ in hits:
        cause = causes[hit.name]
        # in training the shift is being learnt: let negative inputs pass rather than reset it
        swap = cause.kind == UNKNOWN or (ctx.during_training and cause.kind in (BIAS, BETA))
        if swap and hit.module not in swapped:
            swapped.append(hit.module)
            lines.append(f"model.set_submodule({hit.module!r}, nn.LeakyReLU(0.01))  # negative inputs pass gradient")
    if not reset and not swapped:
        lines.append("# the units die upstream: fix the first layer named above")
    if reset:
        summary = (
            f"Reset the shift that holds the units below 0 ({', '.join(f'{t}.bias' for t in reset)}) to 0; "
            "if they died in training, lower the learning rate or use LeakyReLU."
        )
    else:
        summary = (
            "No bias or BatchNorm shift explains the dead units: use LeakyReLU(0.01) there so negative inputs pass "
            "gradient, and lower the learning rate if they died in training."
        )
    return Fix(summary, "\n".join(lines))


def _dead_by_zeros_finding(ctx: Context, hits: list[tuple[LayerRecord, float]]) -> Finding:
    """ReLU outputs that are (almost) all exact zeros, without per-unit liveness."""
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
    return Finding(
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
