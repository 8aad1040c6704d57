"""saturated-units inside fused recurrent cells: the gates of nn.LSTM and nn.GRU.

A torch LSTM/GRU computes its gates inside one module, so no Sigmoid/Tanh call
site is recorded for them (``units.rule_saturated_units`` never sees them).  Each
gate unit j has the pre-activation (torch's documentation of nn.LSTM / nn.GRU)

    a_j = b_ih[j] + b_hh[j] + W_ih[j]·x_t + W_hh[j]·h_{t-1}

(for the GRU's new gate the recurrent half is scaled by the reset gate r in
[0, 1]).  From the weights and the recorded statistics of the layer's input x
and output h, without running the model again:

* centre: the summed bias (the GRU's new gate: the value of ``b_in + r·b_hn``
  closest to 0 over r in [0, 1]);
* spread: ``‖W_ih[j]‖₂·rms(x) + ‖W_hh[j]‖₂·rms(h)``, the RMS a sum of many
  weighted inputs has when the inputs are uncorrelated, added over the two
  halves (the triangle inequality: no cancellation between them is assumed).

A unit counts as saturated when ``|centre| - SPREAD_SIGMAS·spread`` is beyond
the saturation point of its function (``thresholds.SATURATION_BINADE_*``:
|a| >= 4 for a sigmoid, 2 for a tanh, where the derivative is below a
fourteenth of its maximum): then almost every input leaves it on its
asymptote, and the gate's weights (and what flows through the gate) get almost
no gradient.

An LSTM forget gate held open (f -> 1) and a GRU update gate held at z -> 1
keep the cell state and carry the gradient through time (Gers et al. 2000;
Tallec & Ollivier 2018's chrono init sets such biases on purpose): alone they
are no fault and are only reported as evidence.
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

# torch's row-block order of weight_ih/weight_hh/bias_*, the gates' names and functions.
GATES: dict[str, tuple[tuple[str, str], ...]] = {
    "LSTM": (("input", "sigmoid"), ("forget", "sigmoid"), ("cell", "tanh"), ("output", "sigmoid")),
    "GRU": (("reset", "sigmoid"), ("update", "sigmoid"), ("new", "tanh")),
}
# The gate whose saturation at the open end (positive pre-activation) carries the state.
CARRY_GATE = {"LSTM": "forget", "GRU": "update"}
SATURATION_POINT = {"sigmoid": 2.0**th.SATURATION_BINADE_SIGMOID, "tanh": 2.0**th.SATURATION_BINADE_TANH}
# Three spreads: under the normal approximation of a sum of many weighted inputs
# (central limit theorem) fewer than 0.14% of the pre-activations reach the
# unsaturated side of the point.
SPREAD_SIGMAS = 3.0
# The LSTM forget-gate bias the fix sets (Gers et al. 2000; Jozefowicz et al. 2015).
FORGET_BIAS = 1.0


def _rms(stats: Any) -> float | None:
    if stats is None or stats.count == 0 or not stats.moments_valid:
        return None
    value = math.sqrt(max(stats.var + stats.mean**2, 0.0))
    return value if math.isfinite(value) else None


def _layer_suffixes(module: Any) -> list[str]:
    return [n[len("weight_ih") :] for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_ih")]


def gate_saturation(module: Any, kind: str, input_rms: float | None, state_rms: float | None) -> list[dict[str, Any]]:
    """Per stacked layer/direction and gate: the fraction of saturated units, the side they sit on."""
    import torch

    hidden = int(module.hidden_size)
    rows: list[dict[str, Any]] = []
    for suffix in _layer_suffixes(module):
        w_ih = getattr(module, "weight_ih" + suffix).detach().to("cpu", torch.float64)
        w_hh = getattr(module, "weight_hh" + suffix).detach().to("cpu", torch.float64)
        b_ih = getattr(module, "bias_ih" + suffix, None)
        b_hh = getattr(module, "bias_hh" + suffix, None)
        zeros = torch.zeros(w_ih.shape[0], dtype=torch.float64)
        b_ih = zeros if b_ih is None else b_ih.detach().to("cpu", torch.float64)
        b_hh = zeros if b_hh is None else b_hh.detach().to("cpu", torch.float64)
        projection = getattr(module, "weight_hr" + suffix, None)
        if projection is not None:  # h_{t-1} = W_hr·(...): the step's matrix is W_hh·W_hr
            w_hh = w_hh @ projection.detach().to("cpu", torch.float64)
        # Layer 0 reads the recorded input; a stacked layer reads the one below: |h| <= 1.
        x_rms = input_rms if suffix.startswith("_l0") and input_rms is not None else 1.0
        h_rms = state_rms if state_rms is not None else 1.0
        for g, (gate, function) in enumerate(GATES[kind]):
            rows_g = slice(g * hidden, (g + 1) * hidden)
            bias_i, bias_h = b_ih[rows_g], b_hh[rows_g]
            if kind == "GRU" and gate == "new":
                # a = b_in + r·b_hn with r in [0, 1]: the end of that segment nearest to 0,
                # or 0 when the segment crosses it.
                ends = torch.stack([bias_i, bias_i + bias_h])
                centre = torch.where(ends[0] * ends[1] > 0, ends.abs().min(0).values * ends[0].sign(), 0.0)
            else:
                centre = bias_i + bias_h
            spread = w_ih[rows_g].norm(dim=1) * x_rms + w_hh[rows_g].norm(dim=1) * h_rms
            margin = centre.abs() - SPREAD_SIGMAS * spread
            saturated = margin >= SATURATION_POINT[function]
            count = int(saturated.sum())
            high = int((saturated & (centre > 0)).sum())
            rows.append(
                {
                    "parameters": suffix.lstrip("_"),
                    "gate": gate,
                    "function": function,
                    "saturated_frac": count / hidden,
                    "open_frac": high / hidden,  # saturated at the positive end
                    "bias_mean": float(centre.mean()),
                    "spread_mean": float(spread.mean()),
                }
            )
    return rows


def _input_rms(ctx: Context, layer: LayerRecord) -> float | None:
    own = _rms(layer.get("input"))
    if own is not None:
        return own
    prev = ctx.previous(layer)
    return _rms(prev.activation) if prev is not None else None


def _faulty(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The gates saturated on at least SATURATED_WARN_FRAC of their units, a carry gate held
    open only when the other gates of the same layer are saturated too."""
    hits = [r for r in rows if r["saturated_frac"] >= th.SATURATED_WARN_FRAC]
    out = []
    for r in hits:
        carry_open = r["gate"] == CARRY_GATE[kind] and r["open_frac"] >= th.SATURATED_WARN_FRAC
        others = [h for h in hits if h["parameters"] == r["parameters"] and h is not r]
        if carry_open and len(others) < len(GATES[kind]) - 1:
            continue
        out.append(r)
    return out


def _fix_lines(ctx: Context, culprits: list[tuple[LayerRecord, str, list[dict[str, Any]]]]) -> list[str]:
    lines = ["import torch", "", "with torch.no_grad():"]
    for layer, kind, hits in culprits:
        target = advice.module_expression(layer.module)
        suffixes = sorted({h["parameters"] for h in hits})
        for suffix in suffixes:
            lines.append(f"    for b in ({target}.bias_ih_{suffix}, {target}.bias_hh_{suffix}):")
            lines.append("        b.zero_()  # gates back in their sensitive range")
            if kind == "LSTM":
                lines.append(
                    f"    {target}.bias_hh_{suffix}[{target}.hidden_size : 2 * {target}.hidden_size]"
                    f".fill_({FORGET_BIAS:g})  # forget gate open (Gers et al. 2000; Jozefowicz et al. 2015)"
                )
    names = ", ".join(repr(layer.module) for layer, _, _ in culprits)
    lines.append(f"# or re-initialise the whole cells: gradscope.fix.apply_init(model, 'recurrent', layers=[{names}])")
    return lines


def rule_saturated_gates(ctx: Context) -> list[Finding]:
    """saturated-units for the gates of nn.LSTM / nn.GRU (the model must be at hand)."""
    culprits: list[tuple[LayerRecord, str, list[dict[str, Any]]]] = []
    per_layer: dict[str, Any] = {}
    seen: set[str] = set()
    for layer in ctx.layers:
        if layer.type not in GATES or layer.module in seen:
            continue
        module = ctx.module_of(layer)
        if module is None or not hasattr(module, "hidden_size"):
            continue
        seen.add(layer.module)
        rows = gate_saturation(module, layer.type, _input_rms(ctx, layer), _rms(layer.activation))
        per_layer[layer.name] = rows
        hits = _faulty(rows, layer.type)
        if hits:
            culprits.append((layer, layer.type, hits))
    if per_layer:
        ctx.analysis["gates"] = per_layer
    if not culprits:
        return []
    worst = max((h["saturated_frac"] for _, _, hits in culprits for h in hits), default=0.0)
    severity = Severity.ERROR if worst >= th.SATURATED_ERROR_FRAC else Severity.WARNING
    described = "; ".join(
        f"'{layer.name}' ({kind}): "
        + ", ".join(f"{h['gate']} {h['saturated_frac']:.0%} of units (bias {h['bias_mean']:.3g})" for h in hits)
        for layer, kind, hits in culprits
    )
    summary = (
        "Reset the saturated cells' gate biases to 0 (the LSTM forget gate's to 1, Gers et al. 2000; "
        "Jozefowicz et al. 2015) so every gate starts in its sensitive range."
    )
    lines = _fix_lines(ctx, culprits)
    if ctx.during_training:  # watch: never reset parameters that are being trained mid-run
        summary = "For the next run: " + summary[0].lower() + summary[1:]
        lines = ["# for the next run, before training starts:", *lines]
    message = (
        f"Gates stuck at their asymptotes in {described}: the summed gate bias lies beyond "
        f"{SPREAD_SIGMAS:g} spreads of W·x + W·h from the saturation point (sigmoid |a| >= 4, tanh |a| >= 2), "
        "so those gates pass almost no gradient to their weights or to the layer's input."
    )
    return [
        Finding(
            code="saturated-units",
            severity=severity,
            layers=[layer.name for layer, _, _ in culprits],
            message=message,
            evidence={
                "gates": {layer.name: hits for layer, _, hits in culprits},
                "spread_sigmas": SPREAD_SIGMAS,
                EVIDENCE_KEY: [layer.name for layer, _, _ in culprits],
                "saturation_point": SATURATION_POINT,
                "threshold_warning": th.SATURATED_WARN_FRAC,
                "threshold_error": th.SATURATED_ERROR_FRAC,
            },
            fix=Fix(summary, "\n".join(lines)),
        )
    ]
