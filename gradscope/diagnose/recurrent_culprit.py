"""The depth findings whose change happens inside a recurrent layer name that layer.

The depth rules compare ∂ℓ/∂h between the loss end and each parametrised call
site, so a gradient that grows (or dies) *inside* an nn.RNN/GRU/LSTM, through
time or at saturated gates, shows up at the layer below it (typically the
embedding), whose own weights are only the victim.  A recurrent layer R is the
culprit of a depth finding at call site W when

* R reads W's output (R runs right after W, and R's recorded input has W's
  output's element count), and
* across R itself, from the gradient entering it (its output's ∂ℓ/∂h, or the
  loss end's when its outputs reach the loss only through its final state) to
  the gradient at its input (∂ℓ/∂x_t, measured per step), ∂ℓ/∂h changes by at
  least half the decades of W's change (or to exactly zero), and
* R has a finding explaining it: growth or decay through time in the same
  direction, or saturated gates for a decay.

The finding then names R (W stays in the evidence as the layer where it shows)
and carries R's fix, which reaches the recurrent weights.  A change that
happens between layers is left as it is.
"""

from __future__ import annotations

import math
from typing import Any

from gradscope.diagnose.layers import TRANSPARENT_TYPES, Context
from gradscope.record import LayerRecord
from gradscope.recurrent_init import EVIDENCE_KEY
from gradscope.report import Finding, Fix, Severity

RECURRENT_TYPES = {"RNN", "LSTM", "GRU"}
# Share of the depth change (in decades) that must happen across the recurrent layer.
SHARE_OF_CHANGE = 0.5


def _input_gradient_rms(layer: LayerRecord) -> float | None:
    profile = layer.time.get("input_gradient")
    if profile is None:
        return None
    count = sum(profile.counts)
    total = sum(profile.sumsq)
    return math.sqrt(total / count) if count > 0 and math.isfinite(total) else None


def _entering_rms(layer: LayerRecord, reference: float) -> float:
    stats = layer.gradient
    if stats is not None and stats.count > 0 and stats.moments_valid and stats.rms > 0:
        return float(stats.rms)
    return reference


def _reader(ctx: Context, victim: LayerRecord) -> LayerRecord | None:
    """The recurrent call site that reads ``victim``'s output, if the next one does
    (past a Dropout/Identity in between, which changes no scale that matters here)."""
    position = ctx.position[victim.name] + 1
    while position < len(ctx.layers) and ctx.layers[position].type in TRANSPARENT_TYPES:
        position += 1
    if position >= len(ctx.layers):
        return None
    reader = ctx.layers[position]
    if reader.type not in RECURRENT_TYPES:
        return None
    given, produced = reader.get("input"), victim.activation
    if given is not None and produced is not None and given.count != produced.count:
        return None
    return reader


def _explaining(findings: list[Finding], exploding: bool) -> dict[str, Finding]:
    """Recurrent call site -> the finding that explains a change across it."""
    out: dict[str, Finding] = {}
    wanted = {"exploding-through-time"} if exploding else {"vanishing-through-time", "saturated-units"}
    for f in findings:
        if f.code not in wanted or Severity(f.severity) == Severity.INFO:
            continue
        if f.code == "saturated-units" and EVIDENCE_KEY not in f.evidence:
            continue  # a Sigmoid/Tanh call site, not a recurrent cell's gates
        for name in f.layers:
            out.setdefault(name, f)
    return out


def _across(reader: LayerRecord, reference: float) -> float | None:
    entering = _entering_rms(reader, reference)
    leaving = _input_gradient_rms(reader)
    return None if leaving is None else leaving / entering


def _carries(across: float, ratio: float, exploding: bool) -> bool:
    if not exploding and across == 0.0:
        return True
    if across <= 0 or ratio <= 0:
        return False
    decades, total = math.log10(across), math.log10(ratio)
    return decades >= SHARE_OF_CHANGE * total if exploding else decades <= SHARE_OF_CHANGE * total


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _merged_fix(explaining: list[Finding], exploding: bool, culprits: list[str]) -> Fix:
    summaries = list(dict.fromkeys(f.fix.summary for f in explaining if f.fix is not None))
    codes = list(dict.fromkeys(f.fix.code for f in explaining if f.fix is not None and f.fix.code))
    names = ", ".join(repr(n) for n in culprits)
    codes.append(
        "# or all at once (orthogonal recurrent weights, zero gate biases, LSTM forget bias 1):\n"
        f"# from gradscope.fix import apply_init; apply_init(model, 'recurrent', layers=[{names}])"
    )
    lead = "The change happens inside the recurrent layer, so its weights are what to fix: "
    return Fix(lead + " / ".join(summaries), "\n\n".join(codes))


def attribute_to_recurrent(ctx: Context, findings: list[Finding]) -> list[Finding]:
    """Rewrite the depth findings whose change happens inside a recurrent layer (in place)."""
    for finding in findings:
        if finding.code not in ("exploding-gradient", "vanishing-gradient"):
            continue
        exploding = finding.code == "exploding-gradient"
        reference = finding.evidence.get("reference_gradient_rms")
        if not reference:
            continue
        explaining = _explaining(findings, exploding)
        culprits: dict[str, dict[str, Any]] = {}
        kept: list[str] = []
        for name in finding.layers:
            victim = ctx.record.layer(name)
            stats = victim.gradient
            reader = _reader(ctx, victim)
            if reader is None or reader.name not in explaining or stats is None or not stats.moments_valid:
                kept.append(name)
                continue
            across = _across(reader, reference)
            ratio = float(stats.rms) / reference
            if across is None or not _carries(across, ratio, exploding):
                kept.append(name)
                continue
            culprits.setdefault(reader.name, {"shows_at": [], "change_across_layer": across})
            culprits[reader.name]["shows_at"].append(name)
        if not culprits:
            continue
        names = list(culprits)
        victims = [v for c in culprits.values() for v in c["shows_at"]]
        verb = "grows" if exploding else "shrinks"
        across_text = "; ".join(
            f"{c['change_across_layer']:.3g}x across '{n}'" if c["change_across_layer"] > 0 else f"to 0 across '{n}'"
            for n, c in culprits.items()
        )
        causes = list(dict.fromkeys(explaining[n].code for n in names))
        finding.message = (
            f"{finding.message} It {verb} inside the recurrent layer(s) {_quoted(names)} ({across_text}; see "
            f"{', '.join(causes)}), not between layers: {_quoted(victims)} only receive(s) it."
        )
        finding.layers = names + [k for k in kept if k not in names]
        finding.evidence["recurrent_culprits"] = culprits
        finding.evidence["shows_at"] = victims
        finding.evidence[EVIDENCE_KEY] = names
        finding.fix = _merged_fix([explaining[n] for n in names], exploding, names)
    return findings
