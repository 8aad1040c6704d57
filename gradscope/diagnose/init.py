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
from gradscope.diagnose.layers import (
    ACTIVATION_TYPES,
    INIT_TYPES,
    NORM_TYPES,
    SQUASH_TYPES,
    TRANSPARENT_TYPES,
    Context,
    is_parametrised,
)
from gradscope.diagnose.structure import Structure
from gradscope.record import LayerRecord
from gradscope.report import Finding, Fix, Severity
from gradscope.stats import Stats

DEPTH_CODES = {"vanishing-gradient", "exploding-gradient", "vanishing-activations", "exploding-activations"}
KAIMING_KINDS = {"relu", "leaky_relu", "gelu", "silu", "mish", "elu", "celu", "hardswish", "softplus"}
# Two statistics of one tensor agree to this relative tolerance: the same float32
# (or narrower) values, accumulated in float64 (gradscope.stats) in another order
# after a reshape or permute, differ by ~1e-12; any operation on the values (an
# add, an average) moves the second moment or an extreme by far more.
SAME_TENSOR_TOLERANCE = 1e-6


def _second_moment(stats: Stats | None) -> float | None:
    if stats is None or stats.count == 0 or not stats.moments_valid:
        return None
    value = stats.rms**2
    return value if math.isfinite(value) else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _input_second_moment(ctx: Context, layer: LayerRecord) -> float | None:
    """``E[x^2]`` of what ``layer`` reads: its recorded input, else what the layer
    before it (or the model's input) put out."""
    in_m2 = _second_moment(layer.input)
    if in_m2 is not None:
        return in_m2
    prev = ctx.previous(layer)
    return _second_moment(prev.activation) if prev is not None else _second_moment(ctx.record.input)


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
        in_m2 = _input_second_moment(ctx, layer)
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
    """Runs of rows whose gains multiply into what the loss sees.

    Two rows are chained when the second layer receives what the first (with its
    activation) put out (``_feeds``): the same tensor, not merely one of the same
    scale.  A normalisation, a residual add, parallel projections (attention's
    query, key and value all read the same input), attention itself or a
    layer-scaled branch breaks the chain.  Layers after a head boundary and the
    output layer (its gain only scales the logits, which the loss sees once) are
    left out.

    A run counts only when its product is what the network does to the signal
    (``_compounds``): its end feeds the output layer or the head, or its gain is
    so large that a residual add passes it on.  A run that ends a residual branch
    is rescued by the add when its gain is small, one whose end is normalised
    whatever its gain (the docstring of ``rule_poor_init``).
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
    return [run for run in runs if _compounds(ctx, found, run, rows)]


def _chained(ctx: Context, before: dict[str, Any], after: dict[str, Any]) -> bool:
    return _feeds(ctx, ctx.by_name[before["name"]], ctx.by_name[after["name"]])


def _output_end(ctx: Context, layer: LayerRecord) -> LayerRecord:
    """The record of what ``layer`` puts out: its activation's when one follows it."""
    kind, act = ctx.activation_after(layer)
    return act if act is not None and kind != "norm" else layer


def _passes_through(layer: LayerRecord, ctx: Context) -> bool:
    """A layer that may sit between two chained layers: an activation, a transparent
    layer, or a module of no parameters that is no normalisation (a pooling, a
    library's own activation class).  A parametrised layer, a normalisation or a
    module with parameters of its own (a layer scale, a GRN) changes the signal in
    a way the per-layer gains do not account for."""
    if layer.type in ACTIVATION_TYPES or layer.type in TRANSPARENT_TYPES:
        return True
    return layer.type not in NORM_TYPES and layer.parameters == 0 and not is_parametrised(layer, ctx.by_name)


def _feeds(ctx: Context, layer: LayerRecord, nxt: LayerRecord) -> bool:
    """Whether ``nxt`` receives what ``layer`` (with its activation) put out.

    Execution order and equal scales are not data flow: attention over a few
    tokens hands ``o_proj`` a tensor of ``v_proj``'s scale, ``query`` reads what
    the layer before ``key`` read, and SwinV2's position-bias MLP reads a fixed
    coordinate table right after ``value`` ran.  So, from the record:

    * nothing between the two may transform the signal (``_passes_through``);
    * ``nxt``'s recorded input is the very tensor recorded just before it
      (``_same_tensor``: same element count, same exact extremes, same second
      moment), so no unrecorded operation (an add, attention, a split, another
      input) came between;
    * its second moment is the one ``layer``'s activation put out, within
      CHAIN_TOLERANCE (a Dropout in between), so the measured gains telescope.

    A record without inputs (watch) keeps the last two: the input is taken to be
    the output recorded just before ``nxt``.
    """
    start, stop = ctx.position[layer.name], ctx.position[nxt.name]
    if stop <= start or not all(_passes_through(x, ctx) for x in ctx.layers[start + 1 : stop]):
        return False
    feeder = ctx.layers[stop - 1]
    stats = nxt.input
    if stats is None:  # a record without inputs (watch): what the previous call site put out
        stats = feeder.activation
    elif not _same_tensor(stats, feeder.activation):
        return False
    out = _second_moment(_output_end(ctx, layer).activation)
    received = _second_moment(stats)
    if out is None or received is None or out <= 0:
        return False
    return 1 / th.CHAIN_TOLERANCE <= received / out <= th.CHAIN_TOLERANCE


def _same_tensor(received: Stats, sent: Stats | None) -> bool:
    """Whether two statistics describe one tensor (a reshape or permute of it at most).

    The count and the extremes are exact even when the moments come from a
    sample (``gradscope.stats``), so they fingerprint a tensor: an add, an
    attention average, a split or a different input changes at least one of them.
    The second moment must agree too when neither side was sampled (the same
    values, summed in another order).
    """
    if sent is None or received.count == 0 or received.count != sent.count:
        return False
    if received.extremes_exact and sent.extremes_exact:
        if not (_equal(received.min, sent.min) and _equal(received.max, sent.max)):
            return False
    if not received.sampled and not sent.sampled:
        got, put = _second_moment(received), _second_moment(sent)
        return got is not None and put is not None and _equal(got, put)
    return True


def _equal(a: float, b: float) -> bool:
    # The same values in float64, only the summation order may differ.
    return math.isclose(a, b, rel_tol=SAME_TENSOR_TOLERANCE, abs_tol=0.0)


def _compounds(ctx: Context, found: Structure, run: list[dict[str, Any]], rows: list[dict[str, Any]]) -> bool:
    """Whether the run's product is what the network does to its signal.

    A run whose end goes on into the output layer (or, across the head boundary,
    into the head) multiplies the signal the loss sees.  One whose end goes
    elsewhere (a residual add, attention, a normalisation) is a branch: a residual
    add ``x + f(x)`` has ``E[(x + f)^2] ≈ E[x^2] + E[f^2]``, so a branch of small
    gain leaves the stream as it was (the library inits of transformers, std 0.02,
    rely on it), while a branch of large gain passes it on (``1 + g`` per block)
    unless a normalisation follows, which divides any scale out (Ioffe & Szegedy
    2015; Ba et al. 2016).
    """
    last = ctx.by_name[run[-1]["name"]]
    if found.head_boundary is not None and last.name == found.head_boundary["last_body_layer"]:
        if _pooled_into(ctx, last, ctx.by_name[found.head_boundary["first_head_layer"]]):
            return True
    else:
        after = next((r for r in rows if ctx.position[r["name"]] > ctx.position[last.name]), None)
        if after is None:
            return True  # the run's end is the model's output
        if after is rows[-1] and found.head_boundary is None and _feeds(ctx, last, ctx.by_name[after["name"]]):
            return True  # into the output layer
    measured = math.prod(r["measured_gain"] for r in run)
    return measured > th.INIT_STACK_HIGH and not _normalised_next(ctx, last)


def _pooled_into(ctx: Context, last: LayerRecord, head: LayerRecord) -> bool:
    """Whether the head reads the body's last output through a pooling, not through
    a residual add or a normalisation.  Nothing in between may transform the signal
    (``_passes_through``), and the head's input may hold no more second moment than
    that output: an average is a convex combination, so its square is at most the
    average of the squares (Jensen), where a residual stream added to a branch of
    small gain holds far more than the branch."""
    start, stop = ctx.position[last.name], ctx.position[head.name]
    if not all(_passes_through(x, ctx) for x in ctx.layers[start + 1 : stop]):
        return False
    out = _second_moment(_output_end(ctx, last).activation)
    received = _second_moment(head.input)
    if received is None:
        return True  # a record without inputs: as far as gradscope can tell
    return out is not None and received <= th.CHAIN_TOLERANCE * out


def _normalised_next(ctx: Context, layer: LayerRecord) -> bool:
    """A normalisation is the next layer that is not transparent after ``layer``'s output."""
    end = _output_end(ctx, layer)
    for nxt in ctx.layers[ctx.position[end.name] + 1 :]:
        if nxt.type not in TRANSPARENT_TYPES:
            return nxt.type in NORM_TYPES
    return False


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
    from gradscope.diagnose.logits import logit_scale_finding, with_logits

    stack = _stack_findings(ctx)
    head = logit_scale_finding(ctx)
    if head is None:
        return stack
    # One poor-init finding whose fix re-initialises the stack and the head together.
    return [with_logits(stack[0], head), *stack[1:]] if stack else [head]


def _stack_findings(ctx: Context) -> list[Finding]:
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
    # The weights' product is (just) inside the band, the signal is not: a layer
    # whose own weight is far off may still be the cause, the rest of the stack
    # (or the measurement's spread) taking it over the edge.
    explaining = _explaining_layers(run, measured)
    if explaining:
        return [_weights_finding(ctx, run, predicted, measured, bad=explaining)]
    return _bias_finding(ctx, run, predicted, measured)


def _explaining_layers(run: list[dict[str, Any]], measured: float) -> list[dict[str, Any]]:
    """The fewest poorly initialised rows of ``run`` (worst predicted gain first) whose
    re-initialisation brings the measured gain back into the band.

    Re-initialising a row to its recommendation makes its predicted gain ≈ 1, so
    the measured product divided by the rows' predicted gains is what the signal
    would do after the fix (He et al. 2015's gains multiply along the stack).
    None when no such set exists: then the weights do not explain the measurement.
    """
    poor = sorted(poor_init_layers(run), key=lambda r: -abs(math.log(r["predicted_gain"])))
    chosen: list[dict[str, Any]] = []
    remaining = measured
    for row in poor:
        chosen.append(row)
        remaining /= row["predicted_gain"]
        if not _out_of_band(remaining):
            return sorted(chosen, key=lambda r: run.index(r))
    return []


def _weights_finding(
    ctx: Context,
    stack: list[dict[str, Any]],
    predicted: float,
    measured: float | None,
    bad: list[dict[str, Any]] | None = None,
) -> Finding:
    """The weights of ``bad`` (default: every row of the stack whose gain is off) cause it."""
    if bad is None:
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
        + (
            f"the signal measured across them confirms it ({measured:.3g})."
            if _out_of_band(predicted)
            else f"the signal measured across them changes {measured:.3g}x, outside the healthy "
            f"[{th.INIT_STACK_LOW:g}, {th.INIT_STACK_HIGH:g}]."
        )
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
            "stack_layers": [r["name"] for r in stack],
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


# One layer's measured gain scatters around its prediction by up to ~2x in
# either direction with no bias at all: He et al.'s gain is an expectation over
# the weights, and a 32-channel conv on correlated features gives a ReLU'd
# chi-square of few degrees of freedom (relative spread ~0.4; the field's
# Kaiming conv stack measured 0.49-1.49 per layer for a predicted 1.0).
BIAS_NOISE_FACTOR = 2.0


def _beyond_noise(ratio: float) -> bool:
    return not (1 / BIAS_NOISE_FACTOR <= ratio <= BIAS_NOISE_FACTOR)


def _bias_explains(effect: float | None, ratio: float) -> bool:
    """The biases' own effect leaves the noise band on the side the measurement is off.
    Unknown biases (no model, no bias statistics) are never blamed."""
    if effect is None or not _beyond_noise(effect):
        return False
    return (effect > 1) == (ratio > 1)


def _bias_values(ctx: Context, row: dict[str, Any]) -> list[float] | None:
    """The layer's bias values, read from the model when it is at hand."""
    bias = getattr(ctx.module_of(ctx.by_name[row["name"]]), "bias", None)
    from gradscope.placement import is_sharded  # torch: only when the model is at hand

    if bias is None or not hasattr(bias, "detach") or is_sharded(bias):
        # A sharded bias would need a collective to read whole, and the diagnosis may
        # run on one rank: unknown, so never blamed.
        return None
    values = [float(v) for v in bias.detach().double().flatten().cpu().tolist()]
    return values if values and all(math.isfinite(v) for v in values) else None


def _bias_effect(ctx: Context, row: dict[str, Any]) -> float | None:
    """The factor by which the layer's biases change its gain over its weights' alone.

    He et al. 2015's model: the pre-activation of channel c is ``y_c = b_c + z`` with
    ``z ~ N(0, s^2)``, ``s^2 = n_in · Var[w] · E[x^2]``.  Through a ReLU,
    ``E[relu(y_c)^2] = (s^2 + b_c^2) Φ(b_c/s) + b_c s φ(b_c/s)`` (the second moment of
    a rectified normal), against ``s^2/2`` with no bias; a leaky ReLU adds ``a^2``
    times the same for ``-y_c``.  Elsewhere the bias adds its square to the second
    moment entering the activation: ``(s^2 + mean b^2) / s^2``.  1 for zero biases;
    None when the biases or the input's scale are unknown.
    """
    biases = _bias_values(ctx, row)
    in_m2 = _input_second_moment(ctx, ctx.by_name[row["name"]])
    if biases is None or in_m2 is None or row["fan_in"] is None:
        return None
    s2 = row["fan_in"] * row["weight_std"] ** 2 * in_m2
    if s2 <= 0:
        return None if not any(biases) else math.inf
    kind = row["activation_after"]
    if kind not in ("relu", "leaky_relu"):
        return (s2 + sum(b * b for b in biases) / len(biases)) / s2
    slope = (row["negative_slope"] or 0.0) if kind == "leaky_relu" else 0.0
    s = math.sqrt(s2)
    rectified = sum(_rectified_m2(b, s) + slope**2 * _rectified_m2(-b, s) for b in biases) / len(biases)
    return rectified / ((1 + slope**2) * s2 / 2)


def _rectified_m2(mean: float, s: float) -> float:
    """``E[max(y, 0)^2]`` for ``y ~ N(mean, s^2)`` (the rectified normal's second moment)."""
    t = mean / s
    cdf = 0.5 * (1 + math.erf(t / math.sqrt(2)))
    pdf = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    return (s * s + mean * mean) * cdf + mean * s * pdf


def _bias_finding(ctx: Context, stack: list[dict[str, Any]], predicted: float, measured: float | None) -> list[Finding]:
    """The weights predict a healthy product, the measurement does not: the layers whose
    measured gain is far from what their weights predict, and whose biases are large
    enough to account for it (``_bias_effect``), owe it to their biases."""
    culprits = [
        r
        for r in stack
        if r.get("has_bias")
        and r["measured_gain"] is not None
        and r["predicted_gain"]
        and _beyond_noise(r["measured_gain"] / r["predicted_gain"])
        and _bias_explains(_bias_effect(ctx, r), r["measured_gain"] / r["predicted_gain"])
    ]
    if not culprits:
        return []
    from gradscope.diagnose.input_scale import input_rms, input_scale_finding, off_scale, reads_model_input

    first = culprits[0]
    if off_scale(input_rms(ctx)) and reads_model_input(ctx, ctx.by_name[first["name"]]):
        # A ratio to a near-zero reference: the input, not the biases, is off.
        first["flag"] = "poor-init"
        return [
            input_scale_finding(
                ctx,
                [first["name"]],
                f"'{first['name']}' multiplies its second moment by {first['measured_gain']:.3g} where its weights "
                f"predict {first['predicted_gain']:.3g}, because its biases outweigh its weighted input; the network "
                "starts from its biases, not from its data, and zeroing them would leave it seeing almost nothing.",
                {
                    "first_layer": first["name"],
                    "first_layer_measured_gain": first["measured_gain"],
                    "first_layer_predicted_gain": first["predicted_gain"],
                    "measured_gain_end_to_end": measured if measured is not None else math.nan,
                },
            )
        ]
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
                "stack_layers": [r["name"] for r in stack],
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
