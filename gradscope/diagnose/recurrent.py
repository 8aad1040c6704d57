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

Thresholds: the depth ones (``thresholds.DEPTH_*``): two decades of change
over the steps seen warn, four are an error, as across layers.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope import advice
from gradscope.diagnose import thresholds as th
from gradscope.diagnose.layers import Context
from gradscope.record import LayerRecord
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
THROUGH_TIME = "through-time"  # the analysis name in report.analysis["not_assessed"]


def _module(ctx: Context, layer: LayerRecord) -> Any:
    if ctx.model is None:
        return None
    try:
        return ctx.model if layer.module == "model" else ctx.model.get_submodule(layer.module)
    except AttributeError:
        return None


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


def _init_snippet(layer: LayerRecord, module: Any, kind: str, vanishing: bool) -> list[str]:
    """Recurrent init for this module: orthogonal per gate block (Saxe et al. 2014: every singular
    value 1, so the linearised product keeps ∂ℓ/∂h's norm), identity for a ReLU RNN (Le et al. 2015)."""
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
    lines += [
        f"    hidden = {target}.hidden_size",
        f"    for w in ({listed}):",
        f"        for gate in range({gates}):  # {', '.join(GATES[kind])} blocks",
        "            nn.init.orthogonal_(w[gate * hidden : (gate + 1) * hidden])",
    ]
    if vanishing and kind == "LSTM":
        # Gers et al. 2000, Jozefowicz et al. 2015: a forget-gate bias of 1 keeps the cell state's gradient.
        biases = [n.replace("weight_hh", "bias_hh") for n in names]
        lines += [
            f"    for b in ({', '.join(f'{target}.{n}' for n in biases)}{',' if len(biases) == 1 else ''}):",
            "        b[hidden : 2 * hidden].fill_(1.0)  # forget gate open at the start (Jozefowicz et al. 2015)",
        ]
    return lines


def _gated_alternative(layer: LayerRecord, module: Any) -> list[str]:
    if module is None:
        return ["# or a gated cell (nn.LSTM / nn.GRU), whose cell state carries the gradient through time"]
    args = f"{module.input_size}, {module.hidden_size}, num_layers={module.num_layers}"
    if module.batch_first:
        args += ", batch_first=True"
    if module.bidirectional:
        args += ", bidirectional=True"
    return [
        "# or a gated cell, whose cell state carries the gradient through time (Hochreiter & Schmidhuber 1997):",
        f"# {advice.module_expression(layer.module)} = nn.LSTM({args})",
    ]


def _analyse(ctx: Context, layer: LayerRecord) -> tuple[dict[str, Any], list[str]]:
    """The through-time numbers of one layer, and what could not be assessed."""
    module = _module(ctx, layer)
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
    if kind == "RNN" and radii and steps:
        row["nonlinearity"] = getattr(module, "nonlinearity", "tanh")
        row["predicted_factor_per_step"] = max(radii)
        row["predicted_change"] = max(radii) ** max(steps - 1, 0)
    return row, missing


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
    measured = row.get("measured_change")
    predicted = row.get("predicted_change")
    if measured is not None:
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


def _finding(ctx: Context, layer: LayerRecord, row: dict[str, Any], verdict: tuple[str, Severity, str]) -> Finding:
    code, severity, basis = verdict
    module = _module(ctx, layer)
    vanishing = code == "vanishing-through-time"
    steps = row.get("steps")
    radius = row.get("spectral_radius_max")
    if basis == "measured":
        factor, change = row["measured_factor_per_step"], row["measured_change"]
        how = "measured on ∂ℓ/∂x_t"
    else:
        factor, change = row["predicted_factor_per_step"], row["predicted_change"]
        how = "predicted from the recurrent weights"
    verb = "shrinks" if vanishing else "grows"
    spectral = f"; recurrent spectral radius {radius:.3g}" if radius is not None else ""
    message = (
        f"{_quoted(layer.name)}: ∂ℓ/∂h {verb} by a factor {factor:.3g} per step back through time "
        f"({change:.3g}x over the {steps} steps seen, {how}{spectral}): "
        + (
            "early steps get almost no gradient, so long-range dependencies are not learned."
            if vanishing
            else "early steps get huge gradients, so updates blow up."
        )
    )
    kind = row["kind"]
    lines = _init_snippet(layer, module, kind, vanishing) if kind in RECURRENT_TYPES else []
    clip_summary, clip_code = _clip_line(ctx)
    if kind == "RNN":
        lines += _gated_alternative(layer, module)
    if not vanishing and clip_code:
        lines += [clip_code]
    if kind == "RNN":
        relu = row.get("nonlinearity") == "relu"
        init_summary = "identity recurrent weights (IRNN, Le et al. 2015)" if relu else "orthogonal recurrent weights"
        summary = (
            f"before training starts, give {_quoted(layer.name)} {init_summary} (spectral radius 1), "
            "or use nn.LSTM/nn.GRU"
        )
    elif kind in ("LSTM", "GRU"):
        summary = (
            f"before training starts, initialise {_quoted(layer.name)}'s recurrent weights orthogonally per gate block"
        )
        if vanishing and kind == "LSTM":
            summary += " and set the forget-gate bias to 1"
    else:
        summary = f"keep the Jacobian of {_quoted(layer.name)}'s recurrence near norm 1 (orthogonal recurrent weights)"
    if not vanishing:
        summary += f"; {clip_summary}"
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
        "steps": steps,
        "thresholds": [th.DEPTH_WARN_LOW, th.DEPTH_WARN_HIGH, th.DEPTH_ERROR_LOW, th.DEPTH_ERROR_HIGH],
    } | {k: v for k, v in row.items() if k not in ("layer", "input_gradient_rms", "recurrent_weights")}
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
