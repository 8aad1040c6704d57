"""Range findings for low-precision formats: overflow (values become inf) and
underflow (gradients flush to zero), answered from the exponent histograms.

Only the formats named in the run (``report.run["formats"]``) are checked;
limits come from ``torch.finfo`` through ``gradscope.formats``.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope import advice
from gradscope.diagnose import thresholds as th
from gradscope.diagnose.layers import Context
from gradscope.formats import format_for_dtype, get_format
from gradscope.record import LayerRecord
from gradscope.report import Finding, Fix, Severity
from gradscope.stats import Stats

OVERFLOW_ROLES = ("activation", "gradient", "weight_grad")
UNDERFLOW_ROLES = ("gradient", "weight_grad")


def code_prefix(fmt: str) -> str:
    """``fp16`` -> ``fp16``; ``fp8_e4m3`` -> ``fp8-e4m3`` (finding codes use dashes)."""
    return fmt.replace("_", "-")


def _headroom(stats: Stats, fmt: str) -> float:
    absmax = stats.absmax
    if not math.isfinite(absmax):
        return -math.inf
    if absmax == 0:
        return math.inf
    return math.log2(get_format(fmt).max / absmax)


def _checked_against(layer: LayerRecord, fmt: str) -> bool:
    """A tensor already in a low-precision format (autocast to bf16, a model
    cast to fp16) is judged against its own format only: the range of another
    format says nothing about it.  fp32 tensors are judged against every
    format the run asks about."""
    own = format_for_dtype(f"torch.{layer.output_dtype}") if layer.output_dtype else None
    return own is None or own == fmt


def _overflow_items(ctx: Context, fmt: str) -> list[tuple[LayerRecord, str, Stats, float, float]]:
    form = get_format(fmt)
    items = []
    for layer in ctx.layers:
        if not _checked_against(layer, fmt):
            continue
        for role in OVERFLOW_ROLES:
            stats = layer.stats.get(role)
            if stats is None or stats.count == 0:
                continue
            over = stats.hist_frac(stats.count_exponents(lo=form.max_exponent + 1))
            headroom = _headroom(stats, fmt)
            if stats.nonfinite_count > 0:
                continue  # NaN/inf already: the nonfinite rule names where it started
            if over > 0 or headroom < th.HEADROOM_WARN_BINADES:
                items.append((layer, role, stats, over, headroom))
    return items


def _overflow(ctx: Context, fmt: str) -> Finding | None:
    items = _overflow_items(ctx, fmt)
    if not items:
        return None
    form = get_format(fmt)
    over = [t for t in items if t[3] > 0 or t[4] < 0]
    severity = Severity.ERROR if over else Severity.WARNING
    worst = min(items, key=lambda t: t[4])
    layer, role, stats, frac, headroom = worst
    roles = sorted({t[1] for t in items})
    names = sorted({t[0].name for t in items}, key=lambda n: ctx.position[n])
    first = next(t[0] for t in sorted(items, key=lambda t: ctx.position[t[0].name]))
    what = "∂ℓ/∂h" if role == "gradient" else ("the weight gradient" if role == "weight_grad" else "the output")
    if severity is Severity.ERROR:
        verb = f"exceeds {fmt}'s maximum {form.max:g} and becomes inf"
    else:
        verb = f"is within one binade of {fmt}'s maximum {form.max:g}"
    message = f"{what} of '{layer.name}' reaches {stats.absmax:.3g}, which {verb}"
    if len(names) > 1:
        message += f" ({len(names)} layers affected, first '{first.name}')"
    activations = [t[0] for t in items if t[1] == "activation"]
    if activations:
        block = min(activations, key=lambda x: ctx.position[x.name])
        target = advice.module_expression(block.module)
        if fmt.startswith("fp8"):
            summary = (
                f"Keep '{block.name}' in bf16/fp32, or give the tensor a per-tensor scale (amax scaling) "
                f"so that its values fit {fmt}'s maximum {form.max:g}."
            )
        else:
            wider = "bf16 (fp32's range)" if fmt == "fp16" else "fp32"
            summary = (
                f"Keep this block in fp32 (autocast off around '{block.name}'), or use {wider}, "
                "or rescale the layer so its outputs stay well below the maximum."
            )
        fix = Fix(
            summary,
            'with torch.autocast(device_type="cuda", enabled=False):\n'
            f"    out = {target}(x.float())  # x: the block's input; this block runs in fp32\n"
            '# or train in bf16: torch.autocast(device_type="cuda", dtype=torch.bfloat16)',
        )
    else:
        fix = Fix(
            "Gradients this large overflow unscaled: fix the exploding gradient first, lower the loss "
            "scale, or clip the global norm.",
            advice.CLIP_PLACEHOLDER_CODE,
        )
    return Finding(
        code=f"{code_prefix(fmt)}-overflow",
        severity=severity,
        layers=names,
        message=message + ".",
        evidence={
            "format": fmt,
            "format_max": form.max,
            "worst_layer": layer.name,
            "role": role,
            "absmax": stats.absmax,
            "overflow_frac": frac,
            "headroom_binades": headroom,
            "headroom_threshold_binades": th.HEADROOM_WARN_BINADES,
            "roles": roles,
        },
        fix=fix,
    )


def flushed_fraction(stats: Stats, fmt: str, scale_exponent: int = 0) -> float:
    """Fraction of the finite non-zero values that flush to zero in ``fmt`` once
    multiplied by ``2^scale_exponent``: two or more binades below its smallest
    subnormal (the binade just below rounds up to it)."""
    total = stats.count_exponents()
    if total == 0:
        return 0.0
    return stats.count_exponents(hi=get_format(fmt).subnormal_exponent - 2 - scale_exponent) / total


def _underflow(ctx: Context, fmt: str) -> Finding | None:
    items: list[tuple[LayerRecord, str, float]] = []
    rescued = True  # does GradScaler's default start bring every such tensor back?
    for layer in ctx.layers:
        if not _checked_against(layer, fmt):
            continue
        for role in UNDERFLOW_ROLES:
            stats = layer.stats.get(role)
            if stats is None or stats.count == 0:
                continue
            frac = flushed_fraction(stats, fmt)
            if frac >= th.UNDERFLOW_WARN_FRAC:
                items.append((layer, role, frac))
                default = flushed_fraction(stats, fmt, th.GRADSCALER_DEFAULT_EXPONENT)
                rescued = rescued and default < th.UNDERFLOW_WARN_FRAC
    if not items:
        return None
    scale = ctx.analysis.get("loss_scale") if fmt == "fp16" else None
    if scale is None or scale.get("format") != fmt:
        scale = advice.loss_scale_from_stats(
            (s for x in ctx.layers for r in UNDERFLOW_ROLES if (s := x.stats.get(r)) is not None), fmt
        )
    worst = max(items, key=lambda t: t[2])
    names = sorted({t[0].name for t in items}, key=lambda n: ctx.position[n])
    evidence: dict[str, Any] = {
        "format": fmt,
        "smallest_subnormal": get_format(fmt).smallest_subnormal,
        "worst_layer": worst[0].name,
        "worst_role": worst[1],
        "worst_flushed_frac": worst[2],
        "tensors": len(items),
        "threshold_frac": th.UNDERFLOW_WARN_FRAC,
    }
    if scale is not None:
        evidence.update(
            recommended_loss_scale_exponent=scale["exponent"],
            flushed_frac_after_scaling=scale["flushed_frac"],
            gradscaler_default_exponent=scale["default_exponent"],
            gradscaler_default_overflows=scale["default_overflows"],
        )
        fix = Fix(
            f"Scale the loss by 2^{scale['exponent']} ({scale['method']}); {scale['comparison']}.",
            scale["code"] + "\nscaler.scale(loss).backward()\nscaler.step(optimizer)\nscaler.update()",
        )
    else:
        fix = Fix("Use loss scaling (torch.amp.GradScaler) or bf16.", 'scaler = torch.amp.GradScaler("cuda")')
    role = "∂ℓ/∂h" if worst[1] == "gradient" else "weight gradient"
    message = (
        f"{worst[2]:.0%} of the {role} values of '{worst[0].name}' fall below {fmt}'s smallest subnormal "
        f"and would flush to zero ({len(items)} gradient tensor(s) mostly lost)"
    )
    if rescued and fmt == "fp16":
        message += f"; GradScaler's default 2^{th.GRADSCALER_DEFAULT_EXPONENT} brings them back"
    small = loss_end_smallness(ctx)
    if small is not None:
        name, per_term = small
        evidence["loss_end_layer"] = name
        evidence["loss_end_gradient_rms_per_term"] = per_term
        message += (
            f"; it is this small already at '{name}' next to the loss (RMS {per_term:.3g} per loss term) "
            "and does not decay with depth: the loss itself is scaled down, which is a precision and "
            "learning-rate question, not vanishing"
        )
        fix = Fix(
            fix.summary + " A loss multiplied by s multiplies every gradient by s: with SGD the step is "
            "lr x gradient, so the effective learning rate is s x lr (divide the scale out, or raise lr by 1/s); "
            "Adam-like optimizers are invariant to s until the gradients reach their eps.",
            fix.code + "\n# or remove the scale from the loss: loss = criterion(output, target)  # no tiny factor",
        )
    return Finding(
        code=f"{code_prefix(fmt)}-underflow",
        # Unscaled fp16 gradients underflow routinely (attention's query/key at
        # init); it is harmful only when the standard cure, GradScaler's default
        # start, is not enough.  bf16/fp8 get no GradScaler default: warning.
        severity=Severity.INFO if rescued and fmt == "fp16" else Severity.WARNING,
        layers=names,
        message=message + ".",
        evidence=evidence,
        fix=fix,
    )


def loss_end_smallness(ctx: Context) -> tuple[str, float] | None:
    """(layer, RMS per loss term) when ∂ℓ/∂h of the parametrised layer next to the loss is
    below the course's floor even per loss term (a mean over 65,536 examples is not small
    for that reason): the loss itself is scaled down."""
    from gradscope.diagnose.depth import _loss_terms

    for layer in reversed(ctx.parametrised()):
        stats = layer.gradient
        if stats is None or stats.count == 0 or not stats.moments_valid or stats.rms == 0:
            continue
        per_term = stats.rms * _loss_terms(layer)
        return (layer.name, per_term) if per_term < th.GRADIENT_RMS_MIN else None
    return None


def rule_precision(ctx: Context) -> list[Finding]:
    """Overflow and underflow findings for every format the run asks about."""
    findings: list[Finding] = []
    for fmt in ctx.formats:
        for check in (_overflow, _underflow):
            finding = check(ctx, fmt)
            if finding is not None:
                findings.append(finding)
    return findings
