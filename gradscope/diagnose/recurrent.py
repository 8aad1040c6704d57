"""Through time: does ∂ℓ/∂h of a recurrent layer explode or vanish along the sequence?

Backprop through time multiplies one Jacobian per step, ``∂h_t/∂h_{t-1} =
diag(f'(a_t)) · W_hh`` for ``h_t = f(W_ih x_t + W_hh h_{t-1} + b)`` (Bengio et
al. 1994; Pascanu et al. 2013, eq. 5-7), exactly as depth multiplies one per
layer.  Two views of the same product:

* measured: the RMS of ∂ℓ/∂x_t at each step ``t`` (``gradscope.sequence``);
  a least-squares line through its logarithm gives the factor per step going
  back in time (``TimeProfile.backward_factor``);
* predicted, plain ``nn.RNN`` only: the spectral radius ρ of ``W_hh``.  Why the
  radius and not the spectral norm: the norm of the product of k equal
  Jacobians behaves as ρ^k for large k (Gelfand's formula ‖W^k‖^{1/k} -> ρ),
  so ρ is the per-step rate that compounds over a long sequence; the largest
  singular value σ only bounds it (ρ <= σ) and over-predicts growth for a
  non-normal W.  σ is reported beside ρ: Pascanu et al. 2013 (Sec. 3.1) show
  that σ < 1 (tanh: f' <= 1) is *sufficient* for vanishing and σ > 1
  *necessary* for exploding.  With tanh, f' <= 1 only shrinks the product,
  so ρ < 1 predicts vanishing for sure, while ρ > 1 predicts exploding only
  where the units stay unsaturated: exploding is judged on the measurement.

Gated cells (``nn.LSTM``, ``nn.GRU``): the cell state's path is scaled by the
forget/update gate, not by ``W_hh`` (Hochreiter & Schmidhuber 1997's constant
error carousel), so their recurrent spectra are reported per gate block as
evidence and the verdict comes from the measurement alone.

Thresholds: the per-step factor is what is judged, not the change over the
audited length (a sequence twice as long squares the change): the factor,
taken at the end of its 95% confidence interval nearest to 1, compounded over
``thresholds.THROUGH_TIME_HORIZON`` steps (or the audited length when longer),
against the depth decades (``thresholds.DEPTH_*``): two decades warn, four are
an error, as across layers.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope import advice
from gradscope.diagnose import thresholds as th
from gradscope.diagnose.layers import Context
from gradscope.record import LayerRecord
from gradscope.recurrent_init import EVIDENCE_KEY
from gradscope.report import Finding, Fix, Severity
from gradscope.timeprofile import TimeProfile

RECURRENT_TYPES = {"RNN", "LSTM", "GRU"}
GATES = {"LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n"), "RNN": ("h",)}  # torch's row-block order
# Eigenvalues of an n x n matrix cost O(n^3): up to this size exactly (float64),
# beyond it Gelfand's formula through repeated squaring (ρ ≈ ‖W^k‖_F^{1/k}).
EXACT_EIGEN_MAX = 1024
GELFAND_SQUARINGS = 10  # k = 2^10: the Frobenius factor sqrt(n) contributes n^{1/2048} (< 1.5% at n = 10^6)
# A line through fewer points is no growth rate.
MIN_STEPS = 3
# The init advice (orthogonal per gate block, or the identity for a ReLU RNN) is
# already in place when every block's spectral radius and largest singular value
# are 1 within this tolerance: nn.init.orthogonal_ and eye_ give exactly 1 up to
# float32 rounding (~1e-7), while torch's default U(±1/√H) gives ρ ≈ 1/√3 and
# σ ≈ 2/√3 (circular law; Marchenko-Pastur edge), far from both.
ORTHOGONAL_TOLERANCE = 0.05
# An LSTM's forget gate counts as open when its effective bias (b_ih + b_hh, mean
# over the units) is past 0.5, midway between torch's default (mean 0) and the
# 1 that the advice sets (Gers et al. 2000; Jozefowicz et al. 2015).
FORGET_BIAS_OPEN = 0.5
THROUGH_TIME = "through-time"  # the analysis name in report.analysis["not_assessed"]


def spectral_radius(matrix: Any) -> float:
    """ρ(W), the largest |eigenvalue| (exact below EXACT_EIGEN_MAX, else Gelfand's formula)."""
    import torch

    from gradscope.placement import whole_tensor

    w = whole_tensor(matrix).to("cpu", torch.float64)
    if w.shape[0] <= EXACT_EIGEN_MAX:
        return float(torch.linalg.eigvals(w).abs().max())
    log_scale = 0.0  # log of the factor divided out, so that powers never overflow
    power = w
    for _ in range(GELFAND_SQUARINGS):
        norm = float(torch.linalg.matrix_norm(power))
        if norm == 0.0 or not math.isfinite(norm):
            return 0.0 if norm == 0.0 else math.nan
        power = power / norm
        log_scale = 2.0 * (log_scale + math.log(norm))
        power = power @ power
    k = 2**GELFAND_SQUARINGS
    return math.exp((log_scale + math.log(float(torch.linalg.matrix_norm(power)) or 1e-300)) / k)


def spectral_norm(matrix: Any) -> float | None:
    """σ_max(W), below EXACT_EIGEN_MAX (None above: one SVD too many)."""
    import torch

    from gradscope.placement import whole_tensor

    w = whole_tensor(matrix)
    if max(w.shape) > EXACT_EIGEN_MAX:
        return None
    return float(torch.linalg.matrix_norm(w.to("cpu", torch.float64), ord=2))


def recurrent_spectra(module: Any, kind: str) -> list[dict[str, Any]]:
    """ρ and σ of every ``weight_hh_l{k}[_reverse]`` of a torch RNN module, per gate block."""
    hidden = int(module.hidden_size)
    rows: list[dict[str, Any]] = []
    for name, weight in module.named_parameters(recurse=False):
        if not name.startswith("weight_hh_l"):
            continue
        projection = getattr(module, name.replace("weight_hh", "weight_hr"), None)
        blocks = []
        for g, gate in enumerate(GATES[kind]):
            block = weight[g * hidden : (g + 1) * hidden]
            # With proj_size, h_{t-1} = W_hr·(...): the step's matrix is W_block·W_hr.
            square = block @ projection if projection is not None else block
            blocks.append(
                {"gate": gate, "spectral_radius": spectral_radius(square), "spectral_norm": spectral_norm(square)}
            )
        rows.append({"parameter": name, "blocks": blocks})
    return rows


def _profile(layer: LayerRecord) -> TimeProfile | None:
    return layer.time.get("input_gradient")


def _steps(layer: LayerRecord, module: Any) -> int | None:
    for profile in layer.time.values():
        return profile.steps
    shape = layer.output_shape
    if module is None or not shape:
        return None
    dim = 0 if len(shape) < 3 else (1 if getattr(module, "batch_first", False) else 0)
    return int(shape[dim])


def _quoted(name: str) -> str:
    return f"'{name}'"


def _clip_line(ctx: Context) -> tuple[str, str]:
    """(summary, snippet line) of the clipping advice: a threshold only from more than one norm."""
    clip = ctx.analysis.get("clip")
    if clip and clip.get("norms_observed", 0) > 1:
        return (
            f"clip the global gradient norm at {clip['threshold']:.3g} ({clip['method']})",
            f"torch.nn.utils.clip_grad_norm_({advice.ROOT}.parameters(), max_norm={clip['threshold']:g})"
            "  # after backward, before optimizer.step()",
        )
    return (
        "clip the global gradient norm (Pascanu et al. 2013); gradscope.watch derives the threshold "
        "from the run's norms (one audit pass gives too few)",
        "",
    )


def _init_snippet(layer: LayerRecord, module: Any, kind: str, orthogonal: bool, forget: bool) -> list[str]:
    """Recurrent init for this module: orthogonal per gate block (Saxe et al. 2014: every singular
    value 1, so the linearised product keeps ∂ℓ/∂h's norm), identity for a ReLU RNN (Le et al. 2015);
    with ``forget``, an LSTM's forget-gate bias at 1.  Only the parts asked for: a part already in
    place is never advised again."""
    target = advice.module_expression(layer.module)
    names = [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_hh_l")] if module else []
    if not names:
        names = ["weight_hh_l0"]
    listed = ", ".join(f"{target}.{n}" for n in names) + ("," if len(names) == 1 else "")
    lines = ["import torch", "import torch.nn as nn", "", "with torch.no_grad():"]
    if kind == "RNN":
        relu = getattr(module, "nonlinearity", "tanh") == "relu"
        init = "nn.init.eye_(w)  # IRNN: identity recurrence (Le et al. 2015)" if relu else "nn.init.orthogonal_(w)"
        lines += [f"    for w in ({listed}):", f"        {init}"]
        return lines
    gates = len(GATES[kind])
    lines += [f"    hidden = {target}.hidden_size"]
    if orthogonal:
        lines += [
            f"    for w in ({listed}):",
            f"        for gate in range({gates}):  # {', '.join(GATES[kind])} blocks",
            "            nn.init.orthogonal_(w[gate * hidden : (gate + 1) * hidden])",
        ]
    if forget and kind == "LSTM":
        # Gers et al. 2000, Jozefowicz et al. 2015: a forget-gate bias of 1 keeps the cell state's gradient.
        biases = [n.replace("weight_hh", "bias_hh") for n in names]
        lines += [
            f"    for b in ({', '.join(f'{target}.{n}' for n in biases)}{',' if len(biases) == 1 else ''}):",
            "        b[hidden : 2 * hidden].fill_(1.0)  # forget gate open at the start (Jozefowicz et al. 2015)",
        ]
    return lines


def _lstm_arguments(module: Any) -> str:
    args = f"{module.input_size}, {module.hidden_size}, num_layers={module.num_layers}"
    if module.batch_first:
        args += ", batch_first=True"
    if module.bidirectional:
        args += ", bidirectional=True"
    return args


def _gated_alternative(layer: LayerRecord, module: Any) -> list[str]:
    if module is None:
        return ["# or a gated cell (nn.LSTM / nn.GRU), whose cell state carries the gradient through time"]
    return [
        "# or a gated cell, whose cell state carries the gradient through time (Hochreiter & Schmidhuber 1997):",
        f"# {advice.module_expression(layer.module)} = nn.LSTM({_lstm_arguments(module)})",
    ]


def _gated_replacement(layer: LayerRecord, module: Any) -> list[str]:
    """The gated cell as the fix itself, for an RNN whose init is already right."""
    target = advice.module_expression(layer.module)
    args = _lstm_arguments(module) if module is not None else "input_size, hidden_size"
    return [
        "import torch.nn as nn",
        "",
        "# a gated cell: its cell state carries the gradient through time (Hochreiter & Schmidhuber 1997);",
        "# its state is a pair (h, c) where the RNN's is h",
        f"{target} = nn.LSTM({args})",
    ]


def truncation_window(factor: float | None, steps: int | None) -> int | None:
    """The steps back over which ∂ℓ/∂h keeps at least DEPTH_WARN_LOW of its size:
    factor^k >= DEPTH_WARN_LOW (the same two decades that warn across depth)."""
    if factor is None or not 0 < factor < 1:
        return None
    k = int(math.log(th.DEPTH_WARN_LOW) / math.log(factor))
    return max(1, min(k, steps - 1)) if steps else max(1, k)


def _remaining(row: dict[str, Any], factor: float, vanishing: bool) -> tuple[str, list[str]]:
    """(summary, snippet comment lines) for what is left once the init advice is in place:
    the per-step factor then comes from the activation's derivative (tanh' <= 1, ReLU's
    dead units) or the gates, which no init of W_hh changes."""
    kind = row["kind"]
    cause = {
        "RNN": f"{row.get('nonlinearity', 'tanh')}'s derivative",
        "LSTM": "the forget gate",
        "GRU": "the update gate",
    }.get(kind, "the recurrence")
    parts: list[str] = []
    lines: list[str] = []
    if kind == "RNN":
        parts.append("use a gated cell (nn.LSTM/nn.GRU)")
    window = truncation_window(factor, row.get("steps")) if vanishing else None
    if window is not None:
        parts.append(f"truncate backprop through time to {window} steps")
        lines.append(
            f"# or truncated BPTT: feed the sequence in chunks of {window} steps and detach the carried "
            "state between chunks (h = h.detach()), over which ∂ℓ/∂h keeps >= "
            f"{th.DEPTH_WARN_LOW:g} of its size"
        )
    parts.append("add skip connections in time (a residual over steps) so the gradient bypasses the recurrence")
    radius = row.get("spectral_radius_max")
    shown = f" (spectral radius {radius:.3g})" if radius is not None else ""
    summary = f"the recurrent weights are already orthogonal{shown}, so the rest comes from {cause}: " + ", or ".join(
        parts
    )
    return summary, lines


def _analyse(ctx: Context, layer: LayerRecord) -> tuple[dict[str, Any], list[str]]:
    """The through-time numbers of one layer, and what could not be assessed."""
    module = ctx.module_of(layer)
    kind = layer.type if layer.type in RECURRENT_TYPES else "marked"
    missing: list[str] = []
    row: dict[str, Any] = {"layer": layer.name, "kind": kind}
    steps = _steps(layer, module)
    row["steps"] = steps
    profile = _profile(layer)
    bidirectional = bool(getattr(module, "bidirectional", False))
    if profile is None:
        missing.append(f"{_quoted(layer.name)}: no per-step gradient reached its input (no backward through it)")
    elif bidirectional:
        # ∂ℓ/∂x_t sums a forward chain growing back in time and a reverse one growing
        # forward: one line through it would cancel the two.
        missing.append(f"{_quoted(layer.name)}: bidirectional, so the measured profile mixes both directions")
    else:
        factor = profile.backward_factor()
        if factor is None or profile.steps < MIN_STEPS:
            missing.append(f"{_quoted(layer.name)}: too few time steps ({profile.steps}) to measure a rate")
        else:
            row["measured_factor_per_step"] = factor
            row["measured_change"] = factor ** (profile.steps - 1)
            bounds = profile.backward_factor_bounds()
            if bounds is not None:
                row["measured_factor_bounds"] = list(bounds)
            row["input_gradient_rms"] = profile.rms()
        if profile.other_lengths:
            row["calls_of_other_lengths_left_out"] = profile.other_lengths
    if kind == "marked":
        missing.append(f"{_quoted(layer.name)}: a marked sequence module; its recurrence (if any) is not known")
        return row, missing
    if module is None:
        missing.append(f"{_quoted(layer.name)}: recurrent weights not analysed (the model is not at hand)")
        return row, missing
    spectra = recurrent_spectra(module, kind)
    row["recurrent_weights"] = spectra
    radii = [b["spectral_radius"] for s in spectra for b in s["blocks"] if math.isfinite(b["spectral_radius"])]
    if radii:
        row["spectral_radius_max"] = max(radii)
    if kind != "RNN":
        row["spectral_radius_role"] = "evidence only: the gates, not W_hh alone, set a gated cell's factor per step"
    row["init_in_place"] = _init_in_place(spectra)
    if kind == "LSTM":
        row["forget_bias_mean"] = _forget_bias_mean(module)
    if kind == "RNN":
        row["nonlinearity"] = getattr(module, "nonlinearity", "tanh")
    if kind == "RNN" and radii and steps:
        row["predicted_factor_per_step"] = max(radii)
        row["predicted_change"] = max(radii) ** max(steps - 1, 0)
    row["horizon_steps"] = horizon_steps(steps)
    return row, missing


def horizon_steps(steps: int | None) -> int:
    """The sequence length a through-time verdict is judged over: the audited length,
    or THROUGH_TIME_HORIZON when that is longer (a model trains on longer sequences
    than a quick audit feeds it)."""
    return max(steps or 0, th.THROUGH_TIME_HORIZON)


def judged_factor(row: dict[str, Any]) -> float | None:
    """The measured per-step factor as judged: the end of its 95% interval nearest to 1
    (1 itself when the interval holds 1: no trend the measurement can vouch for)."""
    factor = row.get("measured_factor_per_step")
    if factor is None:
        return None
    bounds = row.get("measured_factor_bounds")
    if not bounds:
        return factor
    low, high = bounds
    if low > 1.0:
        return float(low)
    if high < 1.0:
        return float(high)
    return 1.0


def _init_in_place(spectra: list[dict[str, Any]]) -> bool:
    """Whether every recurrent block already has spectral radius 1 and norm 1 (the state
    the init advice produces): re-advising it would change nothing."""
    blocks = [b for s in spectra for b in s["blocks"]]
    if not blocks:
        return False
    for b in blocks:
        radius, norm = b["spectral_radius"], b["spectral_norm"]
        if not (math.isfinite(radius) and abs(radius - 1) <= ORTHOGONAL_TOLERANCE):
            return False
        if norm is not None and abs(norm - 1) > ORTHOGONAL_TOLERANCE:
            return False
    return True


def _forget_bias_mean(module: Any) -> float | None:
    """Mean effective forget-gate bias (b_ih + b_hh, torch's i, f, g, o order) over layers and units."""
    hidden = int(module.hidden_size)
    total, count = 0.0, 0
    for name, bias in module.named_parameters(recurse=False):
        if name.startswith("bias_hh_l"):
            paired = getattr(module, name.replace("bias_hh", "bias_ih"), None)
            forget = bias.detach()[hidden : 2 * hidden].double()
            if paired is not None:
                forget = forget + paired.detach()[hidden : 2 * hidden].double()
            total += float(forget.sum())
            count += hidden
    return total / count if count else None


def _severity(change: float, vanishing: bool) -> Severity | None:
    if vanishing:
        if change <= th.DEPTH_ERROR_LOW:
            return Severity.ERROR
        return Severity.WARNING if change <= th.DEPTH_WARN_LOW else None
    if change >= th.DEPTH_ERROR_HIGH:
        return Severity.ERROR
    return Severity.WARNING if change >= th.DEPTH_WARN_HIGH else None


def _verdict(row: dict[str, Any]) -> tuple[str, Severity, str] | None:
    """(code, severity, basis) for one analysed layer, or None."""
    kind = row["kind"]
    span = row.get("horizon_steps") or horizon_steps(row.get("steps"))
    judged = judged_factor(row)
    measured = judged ** (span - 1) if judged is not None else None
    radius = row.get("predicted_factor_per_step")
    predicted = radius ** (span - 1) if radius is not None else None
    if measured is not None:
        row["judged_factor_per_step"] = judged
        row["judged_change_over_horizon"] = measured
        severity = _severity(measured, vanishing=False)
        if severity is not None:
            return "exploding-through-time", severity, "measured"
        severity = _severity(measured, vanishing=True)
        if severity is not None:
            if kind in ("LSTM", "GRU"):
                # A gated cell's decay is set by its forget/update gate (about 0.5 at torch's default
                # init), which training opens: advice (forget bias 1), not an alarm.
                severity = Severity.INFO
            return "vanishing-through-time", severity, "measured"
    if predicted is not None:
        # tanh/ReLU derivatives are <= 1: ρ < 1 can only vanish faster than predicted; ρ > 1 explodes
        # only where units stay unsaturated, which the measurement (when there is one) has the last word on.
        if _severity(predicted, vanishing=True) is not None:
            return "vanishing-through-time", Severity.WARNING, "predicted"
        if measured is None and _severity(predicted, vanishing=False) is not None:
            return "exploding-through-time", Severity.WARNING, "predicted"
    return None


def _fix(
    ctx: Context, layer: LayerRecord, row: dict[str, Any], module: Any, factor: float, vanishing: bool
) -> tuple[str, list[str], str]:
    """(summary, snippet lines, clipping line) of the fix: only what is not already in place."""
    kind = row["kind"]
    clip_summary, clip_code = _clip_line(ctx)
    orthogonal = kind in RECURRENT_TYPES and not row.get("init_in_place")
    forget_bias = row.get("forget_bias_mean")
    forget = vanishing and kind == "LSTM" and (forget_bias is None or forget_bias < FORGET_BIAS_OPEN)
    lines: list[str] = []
    if orthogonal or forget:
        lines = _init_snippet(layer, module, kind, orthogonal, forget)
    if kind == "RNN" and orthogonal:
        lines += _gated_alternative(layer, module)
        relu = row.get("nonlinearity") == "relu"
        init_summary = "identity recurrent weights (IRNN, Le et al. 2015)" if relu else "orthogonal recurrent weights"
        summary = (
            f"before training starts, give {_quoted(layer.name)} {init_summary} (spectral radius 1), "
            "or use nn.LSTM/nn.GRU"
        )
    elif kind in ("LSTM", "GRU") and (orthogonal or forget):
        summary = "before training starts, " + (
            f"initialise {_quoted(layer.name)}'s recurrent weights orthogonally per gate block"
            + (" and set the forget-gate bias to 1" if forget else "")
            if orthogonal
            else f"set {_quoted(layer.name)}'s forget-gate bias to 1 (its recurrent weights are already orthogonal)"
        )
    elif kind in RECURRENT_TYPES:
        summary, remaining = _remaining(row, factor, vanishing)
        summary = f"{_quoted(layer.name)}: {summary}"
        lines = (_gated_replacement(layer, module) if kind == "RNN" else []) + remaining
    else:
        summary = f"keep the Jacobian of {_quoted(layer.name)}'s recurrence near norm 1 (orthogonal recurrent weights)"
    if not vanishing and clip_code:
        lines += [clip_code]
    if not vanishing:
        summary += f"; {clip_summary}"
    return summary, lines, clip_code


def _finding(ctx: Context, layer: LayerRecord, row: dict[str, Any], verdict: tuple[str, Severity, str]) -> Finding:
    code, severity, basis = verdict
    module = ctx.module_of(layer)
    vanishing = code == "vanishing-through-time"
    steps = row.get("steps")
    radius = row.get("spectral_radius_max")
    span = row.get("horizon_steps") or horizon_steps(steps)
    if basis == "measured":
        factor, change = row["measured_factor_per_step"], row["measured_change"]
        judged = row.get("judged_factor_per_step", factor)
        how = "measured on ∂ℓ/∂x_t"
        bounds = row.get("measured_factor_bounds")
        interval = f", 95% interval {bounds[0]:.3g}-{bounds[1]:.3g}" if bounds else ""
    else:
        factor, change = row["predicted_factor_per_step"], row["predicted_change"]
        judged, interval = factor, ""
        how = "predicted from the recurrent weights"
    over_horizon = judged ** (span - 1)
    verb = "shrinks" if vanishing else "grows"
    spectral = f"; recurrent spectral radius {radius:.3g}" if radius is not None else ""
    message = (
        f"{_quoted(layer.name)}: ∂ℓ/∂h {verb} by a factor {factor:.3g} per step back through time "
        f"({how}{interval}{spectral}; {change:.3g}x over the {steps} steps seen, "
        f"{over_horizon:.3g}x over {span} steps, a usual training length): "
        + (
            "early steps get almost no gradient, so long-range dependencies are not learned."
            if vanishing
            else "early steps get huge gradients, so updates blow up."
        )
    )
    summary, lines, clip_code = _fix(ctx, layer, row, module, factor, vanishing)
    if ctx.during_training:
        # watch: the weights are being trained; never re-initialise them mid-run.
        summary = summary.replace("before training starts, ", "for the next run, ")
        lines = ["# for the next run, before training starts:", *lines] if lines else lines
        if not vanishing and clip_code:
            lines = [f"{clip_code}  # this run, now", "", *[x for x in lines if x != clip_code]]
    evidence = {
        "basis": basis,
        "factor_per_step": factor,
        "change_over_sequence": change,
        "judged_factor_per_step": judged,
        "change_over_horizon": over_horizon,
        "steps": steps,
        "thresholds": [th.DEPTH_WARN_LOW, th.DEPTH_WARN_HIGH, th.DEPTH_ERROR_LOW, th.DEPTH_ERROR_HIGH],
    } | {k: v for k, v in row.items() if k not in ("layer", "input_gradient_rms", "recurrent_weights")}
    if row["kind"] in RECURRENT_TYPES and not row.get("init_in_place"):
        evidence[EVIDENCE_KEY] = [layer.name]  # what apply_init(model, "auto") re-initialises
    return Finding(
        code=code,
        severity=severity,
        layers=[layer.name],
        message=message,
        evidence=evidence,
        fix=Fix(summary, "\n".join(lines)),
    )


def rule_through_time(ctx: Context) -> list[Finding]:
    """exploding-/vanishing-through-time for each recurrent or marked sequence layer; fills
    ``analysis["recurrent"]`` and says what was not assessed in ``analysis["not_assessed"]``."""
    layers = [x for x in ctx.layers if x.type in RECURRENT_TYPES or x.time]
    not_assessed = ctx.analysis.setdefault("not_assessed", [])
    if not layers:
        not_assessed.append(
            {
                "analysis": THROUGH_TIME,
                "reason": "no recurrent layer (nn.RNN, nn.LSTM, nn.GRU) and no module marked with sequence_modules",
            }
        )
        return []
    findings: list[Finding] = []
    rows: dict[str, Any] = {}
    for layer in layers:
        row, missing = _analyse(ctx, layer)
        rows[layer.name] = row
        for reason in missing:
            not_assessed.append({"analysis": THROUGH_TIME, "layer": layer.name, "reason": reason})
            ctx.record.note(f"through time, not assessed: {reason}")
        verdict = _verdict(row)
        if verdict is not None:
            findings.append(_finding(ctx, layer, row, verdict))
    ctx.analysis["recurrent"] = rows
    return findings
