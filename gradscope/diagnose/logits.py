"""poor-init on the output layer: logits too large for the softmax at init.

A classifier trained with softmax cross-entropy should start from near-uniform
predictions, a loss of about ln C over C classes ("verify loss @ init",
Karpathy 2019, *A Recipe for Training Neural Networks*).  For logits of
standard deviation σ across classes, Jensen's inequality bounds the expected
log-partition by ``ln C + σ²/2``; for C Gaussian logits the bound is nearly
tight up to ``σ = √(2 ln C)``, past which the largest logit alone sets the loss
(``≈ σ·√(2 ln C)``, the random-energy model's freezing point, Derrida 1981).
At ``σ = √(2 ln C)`` the expected loss is already 1.7-2x ln C (simulated:
1.67x at C = 10, 1.85x at 128, 1.96x at 50,257; ``tests/test_logit_scale.py``)
and it grows linearly in σ beyond: confident random predictions whose
correction is the first thing training spends its steps on (the "hockey
stick" loss curve).

The chain rule (``gradscope.diagnose.init``) leaves the output layer's gain
out of the stack, since the loss sees it once; this rule is where its scale is
judged.  The usual cause is a head that shares its weight with an embedding
initialised for lookups, not for a projection: ``nn.Embedding``'s default
N(0, 1) tied to the head of a width-d model gives ``σ ≈ √d``; GPT-2 and BERT
initialise the shared table at std 0.02 for this reason (Radford et al. 2019;
Devlin et al. 2019).

Only at audit time, and only when gradscope built the loss as cross-entropy
over the model's output (it then knows C and which tensor the softmax reads);
during training confident logits are what learning produces.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope import advice
from gradscope.diagnose.layers import INIT_TYPES, TRANSPARENT_TYPES, Context
from gradscope.record import LayerRecord
from gradscope.report import Finding, Fix, Severity

# The logits' std the fix aims for: E[loss] <= ln C + σ²/2 puts the loss at init
# within half a nat of a uniform prediction's ln C.
TARGET_LOGIT_STD = 1.0
# The std GPT-2 and BERT give the table their head shares (Radford et al. 2019;
# Devlin et al. 2019).
TIED_STD = 0.02


def logit_std_limit(classes: int) -> float:
    """√(2 ln C): there the loss at init is about twice ln C (module docstring)."""
    return math.sqrt(2.0 * math.log(classes))


def logits_layer(ctx: Context, classes: int) -> LayerRecord | None:
    """The recorded layer whose output the softmax reads: the last one in execution
    order whose output has the class dimension last and whose values are exactly
    the logits' count (a layer after it, a reshape aside, would have changed them)."""
    logits = ctx.loss_logits
    for layer in reversed(ctx.layers):
        shape = layer.output_shape or []
        stats = layer.activation
        if not shape or shape[-1] != classes or stats is None or stats.count == 0:
            continue
        if logits is not None and math.prod(shape) != logits:
            continue
        if _keeps_the_logits(layer):
            continue  # LogSoftmax, Dropout, Identity after the head: the head made them (field sweep)
        return layer
    return None


def _keeps_the_logits(layer: LayerRecord) -> bool:
    """A layer after the head that passes the logits on, shifted per row at most: a
    (log-)softmax (shift-invariant for the loss), a Dropout, an Identity."""
    return layer.type in TRANSPARENT_TYPES or layer.type in ("LogSoftmax", "Softmax", "Softmax2d")


def _tied_owner(ctx: Context, layer: LayerRecord) -> str | None:
    """Another module whose weight is the very tensor of ``layer`` (a head tied to an
    embedding), read from the model when it is at hand."""
    module = ctx.module_of(layer)
    if module is None or not layer.weight_name:
        return None
    weight = getattr(module, layer.weight_name, None)
    if weight is None:
        return None
    for name, module in ctx.model.named_modules():
        if name != layer.module and getattr(module, "weight", None) is weight:
            return name
    return None


def logit_scale_finding(ctx: Context) -> Finding | None:
    """A warning when the output layer's logits have std above √(2 ln C) at init
    and its weight, not its input, is why (``rule_poor_init`` reports it)."""
    classes = ctx.loss_classes
    if ctx.during_training or classes is None or classes < 2:
        return None
    layer = logits_layer(ctx, classes)
    if layer is None or layer.type not in INIT_TYPES or layer.weight is None or not layer.weight.moments_valid:
        return None
    logits = layer.activation
    if logits is None or not logits.moments_valid or not math.isfinite(logits.std):
        return None
    limit = logit_std_limit(classes)
    if logits.std <= limit:
        return None
    weight_std = math.sqrt(layer.weight.var)
    if layer.fan_in is None or weight_std * math.sqrt(layer.fan_in) <= limit:
        # From an input of unit RMS the weight alone would give logits within the
        # limit (std ≈ σ_w·√fan_in): the input's scale is the cause, which the
        # depth rules judge (an input scaled by 2e5 is no reason to shrink the head).
        # A bias-free ReLU stack passes the scale through untouched (it is positively
        # homogeneous), so no depth rule sees it: the input's own scale is named.
        from gradscope.diagnose.input_scale import input_rms, input_scale_finding, off_scale

        rms = input_rms(ctx)
        if not off_scale(rms) or rms is None or rms < 1:
            return None
        unit = weight_std * math.sqrt(layer.fan_in) if layer.fan_in is not None else math.nan
        loss = f"; the loss at init is {ctx.loss_value:.3g} for ln {classes} = {math.log(classes):.2f}"
        return input_scale_finding(
            ctx,
            [layer.name],
            f"the logits of '{layer.name}' have std {logits.std:.3g}, above √(2 ln {classes}) = {limit:.2f}, "
            f"though its weights keep a unit input's logits at std {unit:.3g}"
            + (loss if ctx.loss_value is not None else "")
            + ".",
            {
                "logits_layer": layer.name,
                "logit_std": logits.std,
                "logit_std_limit": limit,
                "unit_input_logit_std": unit,
            },
        )
    # LeCun's std 1/√fan_in (LeCun et al. 1998, "Efficient BackProp") keeps a
    # unit-RMS input at unit RMS: logits of std ≈ TARGET_LOGIT_STD from a healthy
    # body.  Not the measured ratio (LSUV's step): when the body amplifies too,
    # its own fix changes the input this layer will see.
    recommended = TARGET_LOGIT_STD / math.sqrt(layer.fan_in)
    owner = _tied_owner(ctx, layer)
    if owner is not None:
        # A tied head also reads its own row back: the stream at a token is mostly
        # that token's (normalised) embedding, so the logit of the input token is
        # ≈ √d·‖w_row‖ = d·σ_w, an outlier the std above hides (σ_w = 1/√d leaves
        # it at √d: a loss of 7.3 for ln 128 = 4.85, measured on the GPT-2 of the
        # tests).  The tying models' own convention keeps it small.
        recommended = min(recommended, TIED_STD)
    target = owner if owner is not None else layer.module
    weight_name = layer.weight_name or "weight"
    code = "import torch.nn as nn\n\n"
    if owner is not None:
        code += f"# the same tensor as {advice.module_expression(layer.module)}.{weight_name}\n"
    code += f"nn.init.normal_({advice.module_expression(target)}.{weight_name}, std={recommended:.3g})"
    if owner is None and layer.weight_shape and layer.parameters > math.prod(layer.weight_shape):
        code += f"\nnn.init.zeros_({advice.module_expression(layer.module)}.bias)"  # as Kaiming/Xavier fixes do
    tied = f", a weight it shares with '{owner}'" if owner is not None else ""
    excess_bound = logits.std**2 / 2
    measured = f" (measured {ctx.loss_value:.3g})" if ctx.loss_value is not None else ""
    message = (
        f"The logits '{layer.name}' puts out have std {logits.std:.3g} at init (weight std {weight_std:.3g}{tied}): "
        f"above √(2 ln {classes}) = {limit:.2f}, where the loss at init reaches about twice the ln {classes} = "
        f"{math.log(classes):.2f} of a uniform prediction{measured}: training first unlearns confident random guesses."
    )
    evidence: dict[str, Any] = {
        "cause": "logit-scale",
        "logits_layer": layer.name,
        "classes": classes,
        "logit_std": logits.std,
        "logit_std_limit": limit,
        "uniform_loss": math.log(classes),
        "jensen_excess_bound": excess_bound,
        "weight_std": weight_std,
        "unit_input_logit_std": weight_std * math.sqrt(layer.fan_in),
        "recommended_std": recommended,
    }
    if owner is not None:
        evidence["tied_with"] = owner
    if ctx.loss_value is not None:
        evidence["loss_at_init"] = ctx.loss_value
    return Finding(
        code="poor-init",
        severity=Severity.WARNING,
        layers=[layer.name],
        message=message,
        evidence=evidence,
        fix=Fix(
            f"re-initialise '{target}'s weight at std {recommended:.3g}, so the logits start "
            + (
                f"small and the loss near ln {classes} (the head and the embedding share it; GPT-2 and BERT use "
                f"{TIED_STD:g})"
                if owner is not None
                else f"with std ≈ {TARGET_LOGIT_STD:g} (LeCun: 1/√fan_in) and the loss near ln {classes}"
            ),
            code,
        ),
    )


def with_logits(stack: Finding, head: Finding) -> Finding:
    """A stack's poor-init finding that also names the output layer: one fix for both
    (the head's line after the stack's), the head's evidence under ``logits``."""
    if stack.fix is None or head.fix is None:  # both are built with a fix; the type allows none
        return stack
    head_lines = head.fix.code.split("\n\n", 1)[-1]
    return Finding(
        code=stack.code,
        severity=stack.severity,
        layers=[*stack.layers, *(n for n in head.layers if n not in stack.layers)],
        message=f"{stack.message} {head.message}",
        evidence={**stack.evidence, "logits": head.evidence},
        fix=Fix(f"{stack.fix.summary.rstrip('.')}; and {head.fix.summary}.", f"{stack.fix.code}\n{head_lines}"),
    )
