"""Range findings for low-precision formats: overflow (values become inf) and
underflow (gradients flush to zero), answered from the exponent histograms.

Only the formats named in the run (``report.run["formats"]``), plus the
formats the record's tensors already are in, are checked: fp32 tensors against
each of them, a tensor already in bf16/fp16 against its own format and the fp8
formats asked about (an fp8 recipe casts it; ``_checked_against``).  Limits
come from ``torch.finfo`` through ``gradscope.formats``.
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
    """fp32 tensors are judged against every format the run asks about; a tensor
    already in a low-precision format (autocast to bf16, a model cast to fp16)
    against its own format and the fp8 formats asked about, which are narrower
    than both 16-bit ones: fp8 training starts from a bf16/fp16 model, and the
    field trial's bf16 Llama lost an fp8-e4m3-underflow warning its fp32 twin had.
    Not against the other 16-bit format: fp16 is the audit's default question, and
    a bf16 model's values above 65504 are no fp16 problem of a run that is bf16."""
    own = format_for_dtype(f"torch.{layer.output_dtype}") if layer.output_dtype else None
    return own is None or own == fmt or fmt.startswith("fp8")


def _cast_from(layer: LayerRecord, fmt: str) -> str:
    """The clause ' (a bf16 tensor cast to fp8_e4m3)' when the tensor already is in
    another low-precision format, so the finding says which question it answers."""
    own = format_for_dtype(f"torch.{layer.output_dtype}") if layer.output_dtype else None
    return f" (a {own} tensor cast to {fmt})" if own is not None and own != fmt else ""


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
    message = f"{what} of '{layer.name}'{_cast_from(layer, fmt)} reaches {stats.absmax:.3g}, which {verb}"
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


def _underflow_items(ctx: Context, fmt: str) -> list[tuple[LayerRecord, str, float, Stats]]:
    """(layer, role, flushed fraction, statistics) of each gradient tensor mostly flushed in ``fmt``."""
    items = []
    for layer in ctx.layers:
        if not _checked_against(layer, fmt):
            continue
        for role in UNDERFLOW_ROLES:
            stats = layer.stats.get(role)
            if stats is None or stats.count == 0:
                continue
            frac = flushed_fraction(stats, fmt)
            if frac >= th.UNDERFLOW_WARN_FRAC:
                items.append((layer, role, frac, stats))
    return items


def _worst_flushed(items: list[tuple[LayerRecord, str, float, Stats]], fmt: str, exponent: int) -> float:
    """The largest flushed fraction among the tensors once the loss is scaled by 2^exponent."""
    return max(flushed_fraction(t[3], fmt, exponent) for t in items)


def _scaling(
    items: list[tuple[LayerRecord, str, float, Stats]], fmt: str, scale: dict[str, Any] | None
) -> dict[str, Any]:
    """What loss scaling does for the flushed tensors: where GradScaler's default
    start ends up, and whether one scale keeps both ends in range.

    torch.amp.GradScaler starts at 2^16 and halves the scale at every step whose
    gradients overflow, skipping that step (PyTorch documentation), so it lands
    on the largest 2^j <= 2^16 that does not overflow, min(16, k_max), after
    16 - k_max skipped steps.  "Rescued" means that landing scale brings every
    tensor below UNDERFLOW_WARN_FRAC flushed; "fits" means the recommended scale
    (k_max minus the headroom binade) does."""
    default = th.GRADSCALER_DEFAULT_EXPONENT
    if scale is None:  # no finite non-zero gradient to place the scale: the default start alone
        return {"lands": default, "skipped": 0, "rescued": _worst_flushed(items, fmt, default) < th.UNDERFLOW_WARN_FRAC}
    k_max = int(scale["max_exponent_no_overflow"])
    lands = min(default, k_max) if scale["default_overflows"] else default
    at_lands = _worst_flushed(items, fmt, lands)
    at_chosen = _worst_flushed(items, fmt, int(scale["exponent"]))
    return {
        "lands": lands,
        "skipped": default - lands,
        "rescued": at_lands < th.UNDERFLOW_WARN_FRAC,
        "flushed_at_landing": at_lands,
        "fits": at_chosen < th.UNDERFLOW_WARN_FRAC,
        "flushed_at_recommended": at_chosen,
    }


def _scaler_clause(fmt: str, scale: dict[str, Any] | None, scaling: dict[str, Any]) -> str:
    """What GradScaler's default start does, in the words the fix uses too."""
    if fmt != "fp16":
        return ""  # GradScaler's default start is fp16's; bf16/fp8 have no such default
    default = th.GRADSCALER_DEFAULT_EXPONENT
    if scale is not None and scale["default_overflows"]:
        start = (
            f"; GradScaler's default 2^{default} overflows (gradient absmax {scale['gradient_absmax']:.3g} x "
            f"2^{default} = {scale['gradient_absmax'] * 2.0**default:.3g} > {get_format(fmt).max:g}), so it "
            f"skips {scaling['skipped']} step(s) halving down to 2^{scaling['lands']}"
        )
        if scaling["rescued"]:
            return start + ", which brings them back"
        return start + f", which still leaves {scaling['flushed_at_landing']:.0%} of a tensor flushed"
    if scaling["rescued"]:
        return f"; GradScaler's default 2^{default} brings them back"
    return ""


def _scale_fix(fmt: str, scale: dict[str, Any] | None, scaling: dict[str, Any]) -> Fix:
    """The loss scale that fits both ends, or, when none does, the wider format."""
    if scale is None:
        return Fix("Use loss scaling (torch.amp.GradScaler) or bf16.", 'scaler = torch.amp.GradScaler("cuda")')
    if not scaling["fits"]:
        return Fix(
            f"No single loss scale fits these gradients in {fmt}: 2^{scale['exponent']} ({scale['method']}) still "
            f"leaves {scaling['flushed_at_recommended']:.0%} of a tensor flushed, and a larger one overflows. "
            "Train in bf16 (fp32's range), or keep the layers whose gradients flush in fp32.",
            '# bf16 autocast: fp32\'s range, no loss scale needed\nwith torch.autocast(device_type="cuda", '
            "dtype=torch.bfloat16):\n    loss = criterion(model(x), y)\nloss.backward()",
        )
    return Fix(
        f"Scale the loss by 2^{scale['exponent']} ({scale['method']}); {scale['comparison']}.",
        scale["code"] + "\nscaler.scale(loss).backward()\nscaler.step(optimizer)\nscaler.update()",
    )


def _underflow(ctx: Context, fmt: str) -> Finding | None:
    items = _underflow_items(ctx, fmt)
    if not items:
        return None
    scale = ctx.analysis.get("loss_scale") if fmt == "fp16" else None
    if scale is None or scale.get("format") != fmt:
        scale = advice.loss_scale_from_stats(
            (s for x in ctx.layers for r in UNDERFLOW_ROLES if (s := x.stats.get(r)) is not None), fmt
        )
    scaling = _scaling(items, fmt, scale)
    # Unscaled fp16 gradients underflow routinely (attention's query/key at
    # init); it is harmful only when the standard cure, GradScaler's default
    # start (after the halvings its overflow costs), is not enough.  bf16/fp8
    # get no GradScaler default: warning.
    rescued = fmt == "fp16" and scaling["rescued"]
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
            gradscaler_lands_at_exponent=scaling["lands"],
            gradscaler_skipped_steps=scaling["skipped"],
            worst_flushed_frac_at_recommended_scale=scaling["flushed_at_recommended"],
            single_scale_fits=scaling["fits"],
        )
    evidence["gradscaler_default_rescues"] = rescued
    fix = _scale_fix(fmt, scale, scaling)
    role = "∂ℓ/∂h" if worst[1] == "gradient" else "weight gradient"
    message = (
        f"{worst[2]:.0%} of the {role} values of '{worst[0].name}'{_cast_from(worst[0], fmt)} fall below {fmt}'s "
        f"smallest subnormal and would flush to zero ({len(items)} gradient tensor(s) mostly lost)"
    )
    message += _scaler_clause(fmt, scale, scaling)
    if scale is not None and not scaling["fits"]:
        message += f"; no single loss scale fits both ends in {fmt}"
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
        severity=Severity.INFO if rescued else Severity.WARNING,
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
