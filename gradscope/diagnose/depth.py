"""Depth analysis and the vanishing/exploding rules, as the course teaches them.

Backprop multiplies one Jacobian per layer, so what matters is how the signal
changes *across depth*: the forward gain ``Var[h^t] / Var[h^{t-1}]``, the
backward gain of ``∂ℓ/∂h`` (its RMS), and their products.  The rules are judged
on ``∂ℓ/∂h`` (each layer's ``gradient`` role), never on weight gradients: in a
30-layer ReLU stack with Xavier init the weight-gradient norms stay nearly flat
while ``∂ℓ/∂h`` shrinks by ~10^4.

Robustness choices (the rules run on models nobody here has seen):

* Only *parametrised* layers (a matrix-shaped weight: Linear, Conv, Embedding,
  attention) are compared, so element-wise layers between them (activations,
  Dropout, Identity, which legitimately halve a variance or rescale by 1/(1-p))
  never trigger anything; residual and Transformer blocks are judged by what
  their weights see.
* Ratios are relative: the gradient of the last parametrised layer (the loss
  end, whose scale is ~1/batch for a mean-reduced loss) is the reference for
  the backward pass; the output of the first parametrised layer that is not
  an Embedding for the forward pass.  Only the course's absolute range
  [1e-6, 1e3] looks at raw values, and its lower end only when the network
  itself shrank the gradient.
* A layer followed by normalisation is judged by ``RMS(∂ℓ/∂h) · std(h)``:
  the normalisation divides its gradient by its output's std, whatever the
  depth.  Forward drift is measured only after the last normalisation layer,
  which resets the forward scale.
* The signal is judged where it *arrives*: vanishing means the run of layers
  at the input end (backward) or output end (forward) is out of the band.  A
  branch whose gradient is small by construction, such as attention's
  query/key projections at init, does not make a network vanish while the
  residual path around it carries a healthy gradient to the input.
* Widths differ (784 → 128 → 10): Kaiming's fan_in mode keeps the per-element
  RMS, its fan_out mode and the backward pass keep the per-example norm.  A
  ratio counts as out of range only when it is out of range under both
  normalisations.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope import advice
from gradscope.diagnose import thresholds as th
from gradscope.diagnose.init import compounding_runs, init_fix, poor_init_layers
from gradscope.diagnose.layers import BATCHNORM_TYPES, EMBEDDING_TYPES, NORM_TYPES, Context, width
from gradscope.diagnose.structure import Structure, find_structure
from gradscope.record import LayerRecord
from gradscope.report import Finding, Fix, Severity
from gradscope.stats import Stats

# A BatchNorm in training mode divides by the standard deviation of the n values
# it sees per channel (batch x H x W; Ioffe & Szegedy 2015), and its backward pass
# by the same.  That batch variance has n - 1 degrees of freedom, and the mean of
# 1/σ_B², an inverse chi-square's, is finite only beyond 2 of them (E[1/χ²_k] =
# 1/(k - 2) for k > 2): with n <= 3 values per channel the gradient's scale is
# unbounded (n = 2 normalises any pair to ±1; torch refuses n = 1).  Wu & He
# 2018 (Group Normalization) show BatchNorm's error rising fast as its batch shrinks.
BATCHNORM_MIN_VALUES = 4
# The GroupNorm the fix proposes keeps at least this many channels per group, so
# that a group normalises over 4x BATCHNORM_MIN_VALUES values even on a 1x1 map
# (Wu & He 2018's default of 32 groups would leave one channel, one value, per
# group of a 32-channel layer there).
GROUP_MIN_CHANNELS = 16


def _valid(stats: Stats | None) -> bool:
    return stats is not None and stats.count > 0 and stats.moments_valid


def _std(stats: Stats | None) -> float | None:
    if not _valid(stats):
        return None
    value = stats.std  # type: ignore[union-attr]
    return value if math.isfinite(value) else None


def _rms(stats: Stats | None) -> float | None:
    if not _valid(stats):
        return None
    value = stats.rms  # type: ignore[union-attr]
    return value if math.isfinite(value) else None


def _div(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def depth_rows(ctx: Context) -> list[dict[str, Any]]:
    """One row per layer in execution order: std, ∂ℓ/∂h RMS, gains and cumulative gains.

    ``forward_gain`` divides by the variance of the layer's own input when it
    was recorded (parametrised layers in an audit), else by the previous
    layer's output; ``backward_gain`` is RMS(∂ℓ/∂h^{t-1}) / RMS(∂ℓ/∂h^t), how
    much the gradient grows passing back through layer t.  The cumulative
    values are the telescoped products: ``Var[h^t] / Var[model input]`` (the
    first layer's output when the input is not floating point) and
    ``RMS(∂ℓ/∂h^t) / RMS(∂ℓ/∂h)`` of the layer closest to the loss.
    """
    layers = ctx.layers
    ref_var = None
    if _valid(ctx.record.input):
        ref_var = ctx.record.input.var  # type: ignore[union-attr]
    if not ref_var:
        ref_var = next((s**2 for s in (_std(x.activation) for x in layers) if s), None)
    end_rms = next((r for r in (_rms(x.gradient) for x in reversed(layers)) if r), None)
    rows: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        std = _std(layer.activation)
        rms = _rms(layer.gradient)
        var = None if std is None else std**2
        source = layer.input if _valid(layer.input) else (layers[i - 1].activation if i > 0 else ctx.record.input)
        in_std = _std(source)
        prev_rms = _rms(layers[i - 1].gradient) if i > 0 else None
        rows.append(
            {
                "name": layer.name,
                "index": layer.index,
                "type": layer.type,
                "activation_std": std,
                "gradient_rms": rms,
                "forward_gain": _div(var, None if in_std is None else in_std**2),
                "backward_gain": _div(prev_rms, rms),
                "cum_forward_gain": _div(var, ref_var),
                "cum_backward_gain": _div(rms, end_rms),
            }
        )
    return rows


def _envelope(value: float, ref: float, layer: LayerRecord, ref_layer: LayerRecord) -> tuple[float, float]:
    """(low, high) of the amplitude ratio under per-element and per-example normalisation."""
    ratio = value / ref
    w, w_ref = width(layer), width(ref_layer)
    if not w or not w_ref:
        return ratio, ratio
    per_example = ratio * math.sqrt(w / w_ref)
    return min(ratio, per_example), max(ratio, per_example)


Item = tuple[LayerRecord, float, float, float]  # (layer, amplitude, low ratio, high ratio)


def _scan(ctx: Context, role: str) -> tuple[list[Item], LayerRecord | None, float | None]:
    """Compare parametrised layers with the reference end of the network.

    Backward (``gradient``): the reference is the parametrised layer closest to
    the loss, and the list runs from it towards the input.  Forward
    (``activation``): the reference is the first parametrised layer that is not
    an Embedding (a lookup table's scale is a choice, usually normalised right
    after), and the list runs towards the output.
    """
    backward = role == "gradient"
    measure = _rms if backward else _std
    layers = _body(ctx)
    if backward:
        layers.reverse()
    else:
        layers = _unnormalised_tail([x for x in layers if x.type not in EMBEDDING_TYPES] or layers, ctx)
    measured = [(x, v) for x in layers if (v := measure(x.stats.get(role))) is not None]
    if not backward and structure(ctx).zero_init:
        # A zero-initialised layer outputs exactly zero by design (see zero-init).
        measured = [(x, v) for x, v in measured if v != 0.0]
    if backward:
        measured = [(x, v * _norm_scale(ctx, x)) for x, v in measured if not _small_by_design(ctx, x, v)]
    if len(measured) < 2:
        return [], None, None
    ref_layer, ref = measured[0]
    if ref <= 0:
        return [], ref_layer, ref
    items = [(layer, value, *_envelope(value, ref, layer, ref_layer)) for layer, value in measured[1:]]
    return items, ref_layer, ref


def structure(ctx: Context) -> Structure:
    """The recognised architecture (zero-init, layer scale, head boundary), computed once per diagnosis."""
    found = ctx.cache.get("structure")
    if found is None:
        found = ctx.cache["structure"] = find_structure(ctx)
    return found  # type: ignore[no-any-return]


def _body(ctx: Context) -> list[LayerRecord]:
    """The parametrised layers before the head boundary (global pooling, [CLS]
    selection), where depth compounds; all of them when there is no boundary.

    Across the boundary the per-element gradient shrinks with the number of
    pooled positions (1/T for a mean over T), so a ratio taken across it depends
    on the image size, not on depth (He et al. 2015's 22-layer plain net at 32 and
    at 128 pixels is the same network)."""
    layers = ctx.parametrised()
    boundary = structure(ctx).head_boundary
    if boundary is None:
        return layers
    last = ctx.position[boundary["last_body_layer"]]
    body = [x for x in layers if ctx.position[x.name] <= last]
    return body if len([x for x in body if x.type not in EMBEDDING_TYPES]) >= 2 else layers


def _small_by_design(ctx: Context, layer: LayerRecord, rms: float) -> bool:
    """∂ℓ/∂h exactly zero behind a zero-initialised parameter, or inside a branch
    scaled by a layer-scale gain: small by construction, not by depth."""
    found = structure(ctx)
    if rms == 0.0 and found.zero_init:
        return True
    return found.in_scaled_branch(layer)


def _norm_scale(ctx: Context, layer: LayerRecord) -> float:
    """The std of a layer's output when a normalisation layer follows it, else 1.

    BatchNorm/LayerNorm divide their input by its std, and so divide the
    gradient flowing back into it by the same std (Ioffe & Szegedy 2015): a
    conv fed unnormalised pixels gets a gradient 100x smaller for that reason
    alone.  ``RMS(∂ℓ/∂h) · std(h)`` is the gradient with respect to the
    normalised tensor, which depth, not input scale, decides.
    """
    kind, norm = ctx.activation_after(layer)
    if kind != "norm":
        return 1.0
    # The normalisation divides by the std of *its* input: the layer's output
    # plus the residual stream when a residual add sits between them (BERT's
    # post-LN blocks), so its recorded input is the right scale when there is one.
    std = _std(norm.input) if norm is not None else None
    std = std or _std(layer.activation)
    if not std:
        return 1.0
    # It divides by sqrt(var + eps), not by the std: below eps (BatchNorm gains
    # drawn at N(0, 0.02^2) shrink every block's output until its variance is far
    # below 1e-5) the normalisation no longer rescales, and the gradient is not
    # multiplied back up; dividing by the std alone hid that collapse.
    return math.sqrt(std * std + ctx.norm_eps(norm))


def _unnormalised_tail(layers: list[LayerRecord], ctx: Context) -> list[LayerRecord]:
    """The parametrised layers after the last normalisation layer before the output.

    A normalisation layer (BatchNorm, LayerNorm...) resets the forward scale
    (Ioffe & Szegedy 2015), so forward drift is only measured over the stretch
    it cannot reach: a ResNet fed unnormalised pixels, or a Transformer whose
    blocks each end in a LayerNorm, has no forward drift to report.
    """
    norms = [ctx.position[x.name] for x in ctx.layers if x.type in NORM_TYPES]
    if not norms or not layers:
        return layers
    last_norm = max(norms)
    return [x for x in layers if ctx.position[x.name] > last_norm]


def _far_segment(items: list[Item], condition: Any) -> list[Item]:
    """The run of items at the far end (input end backward, output end forward) that
    all satisfy ``condition``, from the far end inwards.

    The signal is judged where it *arrives*: a branch whose gradient is small by
    construction (the query/key projections of attention at init) but whose
    neighbours on the residual path are fine does not make the network vanish.
    """
    segment: list[Item] = []
    for item in reversed(items):
        if not condition(item):
            break
        segment.append(item)
    return segment


def _loss_terms(layer: LayerRecord) -> float:
    """How many terms a mean-reduced loss averages over at this layer's output:
    examples times positions (one per row of logits)."""
    stats, shape = layer.activation, layer.output_shape
    if stats is None or not stats.count or not shape:
        return 1.0
    return max(1.0, stats.count / max(int(shape[-1]), 1))


def _vanishing_gradient(item: Item, terms: float = 1.0) -> bool:
    # The course's absolute floor [1e-6, ...] is judged per loss term (a mean
    # over 65,536 examples makes every gradient 65,536x smaller, and a healthy
    # network keeps it so), and only where the depth analysis shows decay: the
    # width-corrected ratio a decade or more down.  A loss scaled down makes
    # every layer's gradient tiny without any decay: that is a precision and
    # effective-learning-rate question (rule_precision says so), not vanishing.
    floor = item[1] * terms < th.GRADIENT_RMS_MIN and item[3] < th.FLOOR_NEEDS_DECAY
    return item[3] < th.DEPTH_WARN_LOW or floor


def _exploding(item: Item) -> bool:
    return item[2] > th.DEPTH_WARN_HIGH


def _vanishing(item: Item) -> bool:
    return item[3] < th.DEPTH_WARN_LOW


def first_unhealthy(ctx: Context) -> tuple[str | None, str | None]:
    """Where the cumulative product leaves the healthy band for good: forward, the
    first layer in execution order of the run that stays out until the output;
    backward, the first layer in the gradient's order (from the loss) of the run
    that stays out until the input."""
    fwd, _, _ = _scan(ctx, "activation")
    bwd, ref_layer, _ = _scan(ctx, "gradient")
    terms = _loss_terms(ref_layer) if ref_layer is not None else 1.0
    first_f = first_b = None
    for items, conditions, is_forward in (
        (fwd, (_vanishing, _exploding), True),
        (bwd, (lambda item: _vanishing_gradient(item, terms), _exploding), False),
    ):
        for condition in conditions:
            segment = _far_segment(items, condition)
            if segment:
                if is_forward:
                    first_f = segment[-1][0].name
                else:
                    first_b = segment[-1][0].name
                break
    if first_b is None:
        # The absolute ceiling of the course's range also marks the backward pass.
        for layer in reversed(ctx.parametrised()):
            rms = _rms(layer.gradient)
            if rms is not None and rms > th.GRADIENT_RMS_MAX:
                first_b = layer.name
                break
    return first_f, first_b


def _severity(extreme: float, low: bool) -> Severity:
    if low:
        return Severity.ERROR if extreme < th.DEPTH_ERROR_LOW else Severity.WARNING
    return Severity.ERROR if extreme > th.DEPTH_ERROR_HIGH else Severity.WARNING


def _hidden_squash(rows: list[dict[str, Any]]) -> str | None:
    """Return "Sigmoid" or "Tanh" when it is the activation after most analysed layers
    (a sigmoid stack, not one sigmoid at the output), else None."""
    kinds = [row["activation_after"] for row in rows]
    for kind, name in (("sigmoid", "Sigmoid"), ("tanh", "Tanh")):
        if kinds and kinds.count(kind) * 2 >= len(kinds):
            return name
    return None


def _depth_fix(ctx: Context, exploding: bool, flagged: list[str] | None = None) -> Fix:
    """Init calls when the init is at fault; an activation change for sigmoid/tanh
    stacks; a larger batch when BatchNorms on the gradient's path see too few values
    per channel; otherwise normalisation or residuals (where the network has none),
    with LSUV as the data-driven init.  ``flagged``: the layers the finding names."""
    starved_bn = _few_value_batchnorms(ctx, flagged or [])
    if starved_bn and not ctx.during_training:
        return _few_values_fix(starved_bn)
    rows = ctx.analysis.get("init") or []
    # Only layers whose gains really multiply (chained, not branches that a
    # residual or normalisation rescues) are worth re-initialising.
    chained = {id(r) for run in compounding_runs(ctx, rows) for r in run}
    bad = [r for r in poor_init_layers(rows) if id(r) in chained]
    squash = _hidden_squash(rows)
    plain = not any(x.type in NORM_TYPES for x in ctx.layers)
    deep = len(ctx.parametrised()) >= th.PLAIN_DEEP_LAYERS
    tail = ""
    if plain and deep:
        tail = " For a plain stack this deep, also add normalisation (BatchNorm/LayerNorm) or residual connections."
    clip_code = f"\n# and cap spikes while training:\n# {advice.CLIP_PLACEHOLDER_CODE}" if exploding else ""
    if ctx.during_training:
        return _training_depth_fix(ctx, exploding, bad)
    if squash == "Sigmoid" and not exploding:
        return Fix(
            "Sigmoid's derivative is at most 0.25, so a deep sigmoid stack vanishes whatever the init: "
            "use ReLU (or GELU) with Kaiming init." + tail,
            advice.swap_activation_code("Sigmoid", "ReLU"),
        )
    if bad:
        fix = init_fix(bad)
        return Fix(fix.summary + tail, fix.code + clip_code)
    if squash and not exploding:
        return Fix(
            f"{squash} saturates and shrinks the gradient at every layer: use ReLU (or GELU) with Kaiming init." + tail,
            advice.swap_activation_code(squash, "ReLU"),
        )
    starved = _starved_norms(ctx)
    if starved and not exploding:
        shown = ", ".join(f"'{name}'" for name in starved[:3]) + (f" +{len(starved) - 3}" if len(starved) > 3 else "")
        return Fix(
            f"Normalisation layers {shown} receive inputs whose variance is below their eps, so they no longer "
            "rescale the signal: the normalisation gains before them are far below 1 and shrink it block by "
            "block. Reset the normalisation weights to PyTorch's default 1 (and biases to 0).",
            "from torch import nn\n\n"
            "norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)\n"
            "for module in model.modules():\n"
            "    if isinstance(module, norms) and module.weight is not None:\n"
            "        nn.init.ones_(module.weight)\n"
            "        nn.init.zeros_(module.bias)",
        )
    # A network that already normalises is not told to add normalisation.
    structural = (
        ", and add normalisation (BatchNorm/LayerNorm) or residual connections."
        if plain
        else f" (the network already has {sum(x.type in NORM_TYPES for x in ctx.layers)} normalisation layers)."
    )
    return Fix(
        "Rescale each layer from data with LSUV (Mishkin & Matas 2016)" + structural,
        "from gradscope.fix import apply_init\n\n"
        'apply_init(model, scheme="lsuv", inputs=batch)  # batch: one input batch of your data' + clip_code,
    )


def values_per_channel(layer: LayerRecord) -> int | None:
    """How many values a BatchNorm averages per channel: every dimension of its
    output but the channel one (dimension 1; torch's layout), batch x H x W for 2-d."""
    shape = layer.output_shape
    if not shape or len(shape) < 2 or not shape[1]:
        return None
    return math.prod(int(d) for d in shape) // int(shape[1])


def _batch_statistics(ctx: Context, layer: LayerRecord) -> bool:
    """Whether the BatchNorm normalises with the batch's statistics: in training mode
    or without running statistics (as far as the model, when at hand, tells;
    torchvision's FrozenBatchNorm2d never does)."""
    if "Frozen" in layer.type:
        return False
    module = ctx.module_of(layer)
    if module is None:
        return ctx.mode != "eval"  # an audit runs the model in training mode unless asked
    has_running = getattr(module, "running_mean", None) is not None
    # The audit's mode, when known: the model is back in its own mode by now.
    training = ctx.mode == "train" if ctx.mode in ("train", "eval") else bool(getattr(module, "training", True))
    return training or not has_running


def _few_value_batchnorms(ctx: Context, flagged: list[str]) -> list[tuple[LayerRecord, int]]:
    """(BatchNorm, values per channel) for each BatchNorm with fewer than
    BATCHNORM_MIN_VALUES per channel that the flagged signal starts at or passes
    through: placed after the earliest flagged layer (the gradient comes from the
    loss, through every layer after it)."""
    if not flagged:
        return []
    first = min(ctx.position[name] for name in flagged if name in ctx.position)
    found = []
    for layer in ctx.layers[first:]:
        if layer.type not in BATCHNORM_TYPES or not _batch_statistics(ctx, layer):
            continue
        count = values_per_channel(layer)
        if count is not None and count < BATCHNORM_MIN_VALUES:
            found.append((layer, count))
    return found


def _few_values_fix(starved: list[tuple[LayerRecord, int]]) -> Fix:
    names = [layer.name for layer, _ in starved]
    shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    counts = sorted({count for _, count in starved})
    counted = " or ".join(str(c) for c in counts)
    first = starved[0][0]
    shape = "x".join(str(d) for d in first.output_shape or [])
    return Fix(
        f"{len(names)} BatchNorm layer(s) ({shown}) normalise over only {counted} value(s) per channel "
        f"(batch x height x width; '{first.name}' outputs {shape}): a batch variance from so few values "
        f"makes its gradient unbounded (fewer than {BATCHNORM_MIN_VALUES} per channel). Use a larger batch "
        "or larger inputs, so that every BatchNorm sees at least "
        f"{BATCHNORM_MIN_VALUES} values per channel, or replace BatchNorm by GroupNorm, which does not depend "
        "on the batch (Wu & He 2018).",
        "from torch import nn\n\n"
        "# a larger batch or larger inputs; or GroupNorm in place of each BatchNorm (Wu & He 2018):\n"
        "def group_norm(bn: nn.BatchNorm2d) -> nn.GroupNorm:\n"
        f"    # Wu & He's 32 groups, but at least {GROUP_MIN_CHANNELS} channels per group: a group must see\n"
        "    # enough values even on a 1x1 map, where one channel per group would be one value\n"
        "    wide = (g for g in (32, 16, 8, 4, 2) if bn.num_features % g == 0 and bn.num_features // g >= "
        f"{GROUP_MIN_CHANNELS})\n"
        "    return nn.GroupNorm(max(wide, default=1), bn.num_features, eps=bn.eps)\n\n"
        "for module in list(model.modules()):\n"
        "    for child_name, child in list(module.named_children()):\n"
        "        if isinstance(child, nn.BatchNorm2d):\n"
        "            setattr(module, child_name, group_norm(child))",
    )


def _starved_norms(ctx: Context) -> list[str]:
    """Normalisation layers whose input variance is below their eps (a tenth of it):
    they divide by ~sqrt(eps) instead of the std and pass a vanishing signal on."""
    starved = []
    for layer in ctx.layers:
        if layer.type not in NORM_TYPES:
            continue
        if layer.type in BATCHNORM_TYPES and not _batch_statistics(ctx, layer):
            # Eval mode divides by the running variance, not by this input's: eps plays
            # no part (field sweep: MobileNetV2 in eval was told to reset gains already 1).
            continue
        before = ctx.previous(layer)
        std = _std(layer.input) or (_std(before.activation) if before is not None else None)
        if std is not None and std * std < 0.1 * ctx.norm_eps(layer):
            starved.append(layer.name)
    return starved


def _training_depth_fix(ctx: Context, exploding: bool, bad: list[dict[str, Any]]) -> Fix:
    """In the middle of training: keep the weights, act on the step (clipping, the
    learning rate) or on the architecture; an init change only for the next run."""
    later = ""
    if bad:
        later = "\n# for the next run from scratch:\n" + "\n".join(
            "# " + line for line in init_fix(bad).code.splitlines()
        )
    if exploding:
        return Fix(
            "Cap the global gradient norm and lower the learning rate; keep the trained weights.",
            advice.CLIP_PLACEHOLDER_CODE + later,
        )
    return Fix(
        "Keep the trained weights: add normalisation (BatchNorm/LayerNorm) or residual connections to the stack, "
        "or raise the learning rate of the early layers.",
        "# e.g. between two layers: nn.Sequential(layer, nn.LayerNorm(features), activation)" + later,
    )


def _per_layer(ratio: float, steps: int) -> float | None:
    if steps <= 0 or ratio <= 0 or not math.isfinite(ratio):
        return None
    return ratio ** (1.0 / steps)


def _ordered(ctx: Context, items: list[Item]) -> list[str]:
    return sorted({t[0].name for t in items}, key=lambda name: ctx.position[name])


def rule_gradient(ctx: Context) -> list[Finding]:
    """vanishing-gradient / exploding-gradient, on ∂ℓ/∂h across depth and the absolute range."""
    scanned, ref_layer, ref = _scan(ctx, "gradient")
    findings: list[Finding] = []
    if ref_layer is None or ref is None or ref <= 0:
        return findings
    n = len(scanned) + 1
    terms = _loss_terms(ref_layer)
    low = _far_segment(scanned, lambda item: _vanishing_gradient(item, terms))
    if low:
        worst = min(low, key=lambda t: t[3])
        relative = [t for t in low if t[3] < th.DEPTH_WARN_LOW]
        severity = _severity(min(t[3] for t in relative), low=True) if relative else Severity.WARNING
        span = scanned.index(worst) + 1
        ratio = worst[1] / ref
        if ratio > 0:
            message = (
                f"∂ℓ/∂h shrinks {1 / ratio:.3g}x from '{ref_layer.name}' ({_reference_role(ctx)}) "
                f"to '{worst[0].name}', "
                f"{span} parametrised layers back ({_fmt_gain(_per_layer(ratio, span))} per layer): "
                "the early layers barely learn."
            )
        else:
            message = (
                f"∂ℓ/∂h is exactly zero at '{worst[0].name}', {span} parametrised layers back from "
                f"'{ref_layer.name}' ({_reference_role(ctx)}): the layers before it get no gradient at all."
            )
        findings.append(
            Finding(
                code="vanishing-gradient",
                severity=severity,
                layers=_ordered(ctx, low),
                message=message,
                evidence={
                    "reference_layer": ref_layer.name,
                    "reference_gradient_rms": ref,
                    "worst_layer": worst[0].name,
                    "worst_gradient_rms": worst[1],
                    "ratio": ratio,
                    "ratio_width_corrected": worst[3],
                    "per_layer_gain": _per_layer(ratio, span),
                    "parametrised_layers": n,
                    "first_unhealthy_backward": low[-1][0].name,
                    "threshold_warning": th.DEPTH_WARN_LOW,
                    "threshold_error": th.DEPTH_ERROR_LOW,
                    "absolute_floor": th.GRADIENT_RMS_MIN,
                },
                fix=_depth_fix(ctx, exploding=False, flagged=_ordered(ctx, low)),
            )
        )
    high = _far_segment(scanned, _exploding)
    every = [(ref_layer, ref, 1.0, 1.0), *scanned]
    # The course's absolute ceiling: a gradient this large anywhere means huge updates.
    huge = [t for t in every if t[1] > th.GRADIENT_RMS_MAX and all(t[0] is not h[0] for h in high)]
    if high or huge:
        worst = max(high + huge, key=lambda t: t[1])
        severity = _severity(max((t[2] for t in high), default=0.0), low=False) if high else Severity.WARNING
        if any(t[1] > th.GRADIENT_RMS_MAX * th.DEPTH_WARN_HIGH for t in high + huge):
            severity = Severity.ERROR
        ratio = worst[1] / ref
        span = every.index(worst)
        findings.append(
            Finding(
                code="exploding-gradient",
                severity=severity,
                layers=_ordered(ctx, high + huge),
                message=_exploding_message(ctx, ref_layer, worst, ratio),
                evidence={
                    "reference_layer": ref_layer.name,
                    "reference_gradient_rms": ref,
                    "worst_layer": worst[0].name,
                    "worst_gradient_rms": worst[1],
                    "ratio": ratio,
                    "per_layer_gain": _per_layer(ratio, span),
                    "parametrised_layers": n,
                    "threshold_warning": th.DEPTH_WARN_HIGH,
                    "threshold_error": th.DEPTH_ERROR_HIGH,
                    "absolute_ceiling": th.GRADIENT_RMS_MAX,
                },
                fix=_depth_fix(ctx, exploding=True, flagged=_ordered(ctx, high + huge)),
            )
        )
    return findings


def _reference_role(ctx: Context) -> str:
    if structure(ctx).head_boundary is not None:
        return "the last layer before the pooled head"
    return "next to the loss"


def _exploding_message(ctx: Context, ref_layer: LayerRecord, worst: Item, ratio: float) -> str:
    healthy = f"healthy values stay within [{th.GRADIENT_RMS_MIN:g}, {th.GRADIENT_RMS_MAX:g}]"
    if worst[0] is ref_layer or ratio < th.DEPTH_WARN_HIGH:
        # Large without growing across depth: the scale comes from the loss end.
        return (
            f"∂ℓ/∂h of '{worst[0].name}' has RMS {worst[1]:.3g} ({healthy}) without growing across depth "
            f"from '{ref_layer.name}' ({_reference_role(ctx)}): the loss or its scale makes every gradient "
            "this large, so updates will be too."
        )
    return (
        f"∂ℓ/∂h grows {ratio:.3g}x from '{ref_layer.name}' ({_reference_role(ctx)}) to '{worst[0].name}' "
        f"(RMS {worst[1]:.3g}; {healthy}): updates will blow up."
    )


def rule_activations(ctx: Context) -> list[Finding]:
    """vanishing-activations / exploding-activations: the forward std across depth."""
    scanned, ref_layer, ref = _scan(ctx, "activation")
    findings: list[Finding] = []
    if ref_layer is None or ref is None or ref <= 0:
        return findings
    n = len(scanned) + 1
    for code, condition, low in (
        ("vanishing-activations", _vanishing, True),
        ("exploding-activations", _exploding, False),
    ):
        picked = _far_segment(scanned, condition)
        if not picked:
            continue
        worst = min(picked, key=lambda t: t[3]) if low else max(picked, key=lambda t: t[2])
        extreme = worst[3] if low else worst[2]
        ratio = worst[1] / ref
        span = scanned.index(worst) + 1
        verb = "collapses" if low else "blows up"
        findings.append(
            Finding(
                code=code,
                severity=_severity(extreme, low=low),
                layers=_ordered(ctx, picked),
                message=(
                    f"The forward signal {verb}: output std goes from {ref:.3g} at '{ref_layer.name}' to "
                    f"{worst[1]:.3g} at '{worst[0].name}' ({ratio:.3g}x over {span} parametrised layers, "
                    f"{_fmt_gain(_per_layer(ratio, span))} per layer)."
                ),
                evidence={
                    "reference_layer": ref_layer.name,
                    "reference_std": ref,
                    "worst_layer": worst[0].name,
                    "worst_std": worst[1],
                    "ratio": ratio,
                    "ratio_width_corrected": extreme,
                    "per_layer_gain": _per_layer(ratio, span),
                    "parametrised_layers": n,
                    "first_unhealthy_forward": picked[-1][0].name,
                    "threshold_warning": th.DEPTH_WARN_LOW if low else th.DEPTH_WARN_HIGH,
                    "threshold_error": th.DEPTH_ERROR_LOW if low else th.DEPTH_ERROR_HIGH,
                },
                fix=_depth_fix(ctx, exploding=not low),
            )
        )
    return findings


def _fmt_gain(gain: float | None) -> str:
    return "gain n/a" if gain is None else f"gain {gain:.3g}"
