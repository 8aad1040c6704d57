"""Mixture-of-experts layers with fused expert weights: routing collapse and per-expert init.

The audit's ``ExpertProbe`` (``gradscope.experts``) puts, per fused experts
module, the tokens each expert received, each expert's weight std and weight
gradient RMS, and the fans of one expert's matrix into ``run["experts"]``.  Two
rules read them, under existing codes:

* ``dead-units`` — experts that receive (almost) no token.  An expert is a unit
  of the layer that fires only for the tokens routed to it; one that receives
  none passes no signal and gets an exactly zero weight gradient (measured, in
  the evidence), the defining trait of a dead unit.  Like a dead ReLU it does
  not come back by itself: the router is pushed towards the experts that
  already win (Shazeer et al. 2017, §4: "the gating network tends to converge
  to a state where it always produces large weights for the same few experts";
  with the top-k weights renormalised, as in Mixtral, the losers' logits get no
  gradient at all).  The cure is the load-balancing loss (Fedus et al. 2022,
  Switch Transformer, §2.2, α = 1e-2), a router started small (their §2.4:
  scale 0.1 of the default; transformers' ``_init_weights`` uses std
  ``initializer_range``), and router jitter (their §2.4 / Mixtral's
  ``router_jitter_noise``).  ``vanishing-gradient`` was the other candidate; it
  means a gradient shrinking through depth, which this is not: the starved
  experts' gradient is not small, it is absent, and the layers around are fine.
* ``poor-init`` — a fused expert weight whose std is far from what one expert's
  fan-in calls for, confirmed by the experts layer's measured gain: torch's
  fans of a 3-D tensor (``size(1)·size(2)`` in, ``size(0)·size(2)`` out) are not
  one expert's, so the fix states the std and ``apply_init`` applies it.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope import advice
from gradscope.diagnose import thresholds as th
from gradscope.diagnose.layers import Context
from gradscope.record import LayerRecord
from gradscope.report import Finding, Fix, Severity

ROUTING = "expert-routing"  # the analysis name in report.analysis["not_assessed"]
# Parameter names of the projection that writes the experts' output (transformers:
# ``down_proj``; Mixtral's legacy ``w2``): the one Xavier sizes, since nothing
# but the residual add follows it.
OUTPUT_PROJECTIONS = ("down", "w2", "out")


def _layer(ctx: Context, module: str) -> LayerRecord | None:
    """The first call site of the experts module in the record."""
    return next((x for x in ctx.layers if x.module == module and x.call == 1), None)


def _m2(stats: Any) -> float | None:
    if stats is None or stats.count == 0 or not stats.moments_valid:
        return None
    value = float(stats.rms) ** 2
    return value if math.isfinite(value) else None


def _measured_gain(layer: LayerRecord | None) -> float | None:
    """E[out²] / E[in²] of the experts module: what its experts (weighted by the
    router, whose top-k weights sum to 1) do to the second moment."""
    if layer is None:
        return None
    out, inp = _m2(layer.activation), _m2(layer.input)
    return out / inp if out is not None and inp is not None and inp > 0 else None


def _is_output_projection(name: str) -> bool:
    return any(tag in name.lower() for tag in OUTPUT_PROJECTIONS)


def _weight_row(weight: dict[str, Any]) -> dict[str, Any]:
    """One fused parameter: its per-expert fans, std and the init they call for.

    The projection into the experts' hidden layer feeds a SiLU/GELU gate (Kaiming,
    as ``diagnose.init`` recommends before the ReLU family); the output projection
    feeds only the residual add (Xavier, as before no activation).
    """
    fan_in, fan_out = int(weight["fan_in"]), int(weight["fan_out"])
    stds = [float(s) for s in weight["weight_std"] if math.isfinite(float(s))]
    output = _is_output_projection(weight["name"])
    if output:
        scheme, recommended = "xavier", advice.xavier_std(fan_in, fan_out)
    else:
        scheme, recommended = "kaiming", advice.kaiming_std(fan_in, advice.kaiming_gain("relu"))
    std = math.sqrt(sum(s * s for s in stds) / len(stds)) if stds else math.nan
    worst = max(stds, key=lambda s: abs(math.log(s / recommended)) if s > 0 else math.inf) if stds else math.nan
    return {
        "name": weight["name"],
        "shape": weight["shape"],
        "fan_in": fan_in,
        "fan_out": fan_out,
        "weight_std": std,
        "worst_expert_std": worst,
        "predicted_gain": fan_in * std * std,  # He et al. 2015: n_in · Var[w] per matrix
        "scheme": scheme,
        "recommended_std": recommended,
        "std_ratio": std / recommended if recommended > 0 else math.inf,
        "grad_rms": weight.get("grad_rms"),
    }


def _routing(entry: dict[str, Any]) -> dict[str, Any]:
    """Token shares per expert and which experts are starved (thresholds.py)."""
    counts = entry.get("tokens_per_expert")
    experts, top_k, tokens = int(entry["experts"]), int(entry.get("top_k") or 0), int(entry.get("tokens") or 0)
    if not counts or not top_k or not tokens:
        return {"assessed": False, "reason": "the router's choice of experts could not be read"}
    fair = tokens * top_k / experts
    shares = [c / fair for c in counts]
    out: dict[str, Any] = {
        "tokens": tokens,
        "top_k": top_k,
        "fair_share_tokens": fair,
        "tokens_per_expert": counts,
        "share_of_fair": shares,
    }
    if fair < th.EXPERT_MIN_FAIR_TOKENS:
        out.update(
            assessed=False,
            reason=(
                f"{tokens} tokens give each of the {experts} experts {fair:.3g} expected choices, fewer than "
                f"{th.EXPERT_MIN_FAIR_TOKENS}: an empty expert could be chance (give a larger batch)"
            ),
        )
        return out
    starved = [e for e, share in enumerate(shares) if share <= th.EXPERT_STARVED_SHARE]
    busiest = sorted(range(experts), key=lambda e: -counts[e])[: max(top_k, experts - len(starved))]
    out.update(
        assessed=True,
        starved=starved,
        busiest=sorted(busiest),
        busiest_share=sum(counts[e] for e in busiest) / (tokens * top_k),
    )
    return out


def expert_rows(ctx: Context) -> list[dict[str, Any]]:
    """``analysis["experts"]``: per fused experts module, its routing and its weights."""
    if ctx.cache.get("experts") is not None:
        return list(ctx.cache["experts"])
    rows = []
    for entry in ctx.experts or []:
        layer = _layer(ctx, entry["module"])
        rows.append(
            {
                "module": entry["module"],
                "layer": layer.name if layer is not None else None,
                "type": entry.get("type"),
                "experts": entry["experts"],
                "router": entry.get("router"),
                "router_bias": bool(entry.get("router_bias")),
                "routing": _routing(entry),
                "measured_gain": _measured_gain(layer),
                "weights": [_weight_row(w) for w in entry.get("weights") or []],
            }
        )
    ctx.cache["experts"] = rows
    ctx.analysis["experts"] = rows
    not_assessed = [r for r in rows if not r["routing"]["assessed"]]
    if not_assessed:
        notes = ctx.analysis.setdefault("not_assessed", [])
        for row in not_assessed:
            notes.append(
                {"analysis": ROUTING, "layer": row["layer"] or row["module"], "reason": row["routing"]["reason"]}
            )
    return rows


def _experts_list(indices: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def _starved_grad_rms(row: dict[str, Any]) -> float | None:
    """The largest weight-gradient RMS of any starved expert over the fused weights
    (0.0 when no gradient reached them, as a starved expert's cannot)."""
    values = [
        float(w["grad_rms"][e])
        for w in row["weights"]
        if w.get("grad_rms") is not None
        for e in row["routing"]["starved"]
    ]
    return max(values) if values else None


def rule_expert_routing(ctx: Context) -> list[Finding]:
    """dead-units: experts that the router never chooses (the module docstring)."""
    collapsed = [r for r in expert_rows(ctx) if r["routing"].get("starved")]
    if not collapsed:
        return []
    worst = max(collapsed, key=lambda r: len(r["routing"]["starved"]) / r["experts"])
    routing = worst["routing"]
    starved = routing["starved"]
    grad = _starved_grad_rms(worst)
    got = "no" if all(routing["tokens_per_expert"][e] == 0 for e in starved) else "almost no"
    message = (
        f"The router of '{worst['layer'] or worst['module']}' sends {got} token to experts "
        f"{_experts_list(starved)} of {worst['experts']} ({routing['tokens']} tokens, top-{routing['top_k']}: "
        f"{routing['fair_share_tokens']:.3g} choices each if balanced); experts {_experts_list(routing['busiest'])} "
        f"take {routing['busiest_share']:.1%} of them. The starved experts pass no signal and their weights get "
        + (f"a gradient of RMS {grad:.3g}" if grad is not None else "no gradient")
        + ": they never learn, and nothing in the plain loss sends tokens back to them."
    )
    lines = [
        "import torch.nn as nn",
        "",
        "# The load-balancing loss (Fedus et al. 2022, Switch Transformer, alpha = 1e-2) pulls the router",
        "# towards a uniform load; transformers' *ForCausalLM adds it to the loss when labels are given:",
        "model.config.output_router_logits = True  # read at every forward",
        "model.router_aux_loss_coef = 0.01  # the model's copy of config.router_aux_loss_coef",
        "# When the routers' own weights or bias cause the collapse, start them as transformers'",
        "# _init_weights does (std = initializer_range, bias 0):",
    ]
    for row in collapsed:
        if row["router"]:
            target = advice.module_expression(row["router"])
            lines.append(f"nn.init.normal_({target}.weight, std=model.config.initializer_range)")
            if row.get("router_bias"):
                lines.append(f"nn.init.zeros_({target}.bias)")
    lines.append("# While training, multiplicative router jitter (Fedus et al. 2022, eps = 1e-2) also helps;")
    lines.append("# Mixtral's blocks take it as config.router_jitter_noise when the model is built.")
    return [
        Finding(
            code="dead-units",
            severity=Severity.WARNING,
            layers=[r["layer"] or r["module"] for r in collapsed],
            message=message,
            evidence={
                "cause": "expert-routing",
                "worst_layer": worst["layer"] or worst["module"],
                "experts": worst["experts"],
                "top_k": routing["top_k"],
                "tokens": routing["tokens"],
                "starved_experts": starved,
                "tokens_per_expert": routing["tokens_per_expert"],
                "busiest_experts": routing["busiest"],
                "busiest_share": routing["busiest_share"],
                "starved_grad_rms": grad,
                "modules": {r["layer"] or r["module"]: r["routing"]["starved"] for r in collapsed},
                "threshold_share_of_fair": th.EXPERT_STARVED_SHARE,
                "min_fair_tokens": th.EXPERT_MIN_FAIR_TOKENS,
            },
            fix=Fix(
                "Add the load-balancing loss (output_router_logits=True, router_aux_loss_coef=0.01; Fedus et al. "
                "2022), which spreads the tokens over training whatever the cause; re-initialising the collapsed "
                "routers at std initializer_range cures at once a collapse that their own weights or bias cause; "
                "router jitter helps the starved experts get tokens early.",
                "\n".join(lines),
            ),
        )
    ]


def poor_expert_weights(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The fused weights of an experts module whose init is poor: the layer's measured
    gain leaves the healthy band upwards (``INIT_STACK_HIGH``), and the weight's std is
    off its recommendation with a per-matrix gain above ``INIT_GAIN_HIGH``.

    Only too large: a branch of small gain ends in a residual add that leaves the
    stream as it was (as for Linear layers, ``diagnose.init._compounds``; HF's std
    0.02 at hidden size 64 has a gain of 4e-6 and trains), while one of large gain
    multiplies the residual stream it is added to, which the next block's pre-norm
    divides out of that block's branch input only.
    """
    gain = row["measured_gain"]
    if gain is None or gain <= th.INIT_STACK_HIGH:
        return []
    return [
        w for w in row["weights"] if w["std_ratio"] > th.INIT_STD_TOLERANCE and w["predicted_gain"] > th.INIT_GAIN_HIGH
    ]


def rule_expert_init(ctx: Context) -> list[Finding]:
    """poor-init: fused expert weights far too large for one expert's fan-in."""
    if ctx.during_training:
        return []  # never advise re-initialising weights that are being trained
    bad = [(row, weights) for row in expert_rows(ctx) if (weights := poor_expert_weights(row))]
    if not bad:
        return []
    row, weights = max(bad, key=lambda t: t[0]["measured_gain"])
    worst = max(weights, key=lambda w: w["std_ratio"])
    lines = [
        "import torch.nn as nn",
        "",
        "# One expert's matrix of a fused (E, out, in) weight has fan_in = in; torch.nn.init's",
        "# fans of a 3-D tensor do not, so the std is given explicitly:",
    ]
    targets = []
    for r, ws in bad:
        for w in ws:
            target = f"{advice.module_expression(r['module'])}.{w['name']}"
            lines.append(
                f"nn.init.normal_({target}, std={w['recommended_std']:.4g})  # {w['scheme']}, fan_in {w['fan_in']}"
            )
            targets.append(
                {"module": r["module"], "parameter": w["name"], "fan_in": w["fan_in"], "fan_out": w["fan_out"],
                 "weight_std": w["weight_std"], "recommended_std": w["recommended_std"], "scheme": w["scheme"],
                 "predicted_gain": w["predicted_gain"]}
            )  # fmt: skip
    lines += ["# or: from gradscope.fix import apply_init; apply_init(model, 'auto')"]
    message = (
        f"The fused expert weights of '{row['layer'] or row['module']}' are far too large for one expert's fan-in: "
        f"'{worst['name']}' has std {worst['weight_std']:.3g} where {worst['scheme']} asks "
        f"{worst['recommended_std']:.3g} "
        f"(fan_in {worst['fan_in']} per expert, a gain of {worst['predicted_gain']:.3g} per matrix), and the experts "
        f"multiply the signal's second moment by {row['measured_gain']:.3g}, above the healthy "
        f"{th.INIT_STACK_HIGH:g}."
    )
    return [
        Finding(
            code="poor-init",
            severity=Severity.WARNING,
            layers=[r["layer"] or r["module"] for r, _ in bad],
            message=message,
            evidence={
                "cause": "fused-experts",
                "worst_layer": row["layer"] or row["module"],
                "measured_gain": row["measured_gain"],
                "worst_parameter": worst["name"],
                "worst_weight_std": worst["weight_std"],
                "worst_recommended_std": worst["recommended_std"],
                "worst_fan_in": worst["fan_in"],
                "parameters": targets,
                "healthy_stack_range": [th.INIT_STACK_LOW, th.INIT_STACK_HIGH],
                "healthy_gain_range": [th.INIT_GAIN_LOW, th.INIT_GAIN_HIGH],
                "std_tolerance": th.INIT_STD_TOLERANCE,
            },
            fix=Fix(
                "Re-initialise the fused expert weights per expert (Kaiming before the gate, Xavier for the "
                "output projection; He et al. 2015, Glorot & Bengio 2010), with one expert's fan-in.",
                "\n".join(lines),
            ),
        )
    ]
