"""fp16/fp8 overflow of attention scores, which no module outputs.

The audit measures, per attention module, the largest finite score q·kᵀ·scale
(``gradscope.attention_scores``; ``report.run["attention_scores"]``).  A score
beyond a format's maximum becomes +inf in that format's matmul, and the softmax
turns every row holding one into NaN (inf - inf): the run fails at its first
step in that format.  (Scores that overflow to -inf, and masks, only get weight
0: the largest positive score is what is judged.)  Less than one binade of headroom (HEADROOM_WARN_BINADES, as for
module outputs in ``precision``) is a warning: scores grow as q and k train.

Formats: those the run asks about, for scores computed in a wider dtype; a
model already in half precision computed its scores in its own format, and the
nonfinite rule sees what overflowed there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradscope.diagnose import thresholds as th
from gradscope.diagnose.layers import Context
from gradscope.diagnose.precision import code_prefix
from gradscope.formats import get_format
from gradscope.report import Finding, Fix, Severity

_FIX_CODE = """# 1. scale the scores by 1/sqrt(head_dim) before the softmax, as
#    F.scaled_dot_product_attention does by default:
scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
# 2. or compute the scores and the softmax in float32 inside autocast:
scores = (q.float() @ k.float().transpose(-2, -1)) * scale
weights = scores.softmax(dim=-1).to(v.dtype)
# 3. or train in bf16, whose range (3.4e38) holds them:
with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
    loss = model(x)"""


def rule_attention_scores(ctx: Context) -> list[Finding]:
    """One finding per format whose range the attention scores leave (or nearly)."""
    rows = [r for r in ctx.attention_scores or [] if r.get("calls") and math.isfinite(r.get("max_score", math.nan))]
    findings = []
    for fmt in ctx.formats:
        finding = _format_finding(fmt, rows)
        if finding is not None:
            findings.append(finding)
    return findings


def _format_finding(fmt: str, rows: Sequence[Mapping[str, Any]]) -> Finding | None:
    limit = get_format(fmt).max
    judged = [(r, math.log2(limit / r["max_score"]) if r["max_score"] > 0 else math.inf) for r in rows]
    flagged = [(r, headroom) for r, headroom in judged if headroom < th.HEADROOM_WARN_BINADES]
    if not flagged:
        return None
    worst, headroom = min(flagged, key=lambda t: t[1])
    over = [r for r, h in flagged if h < 0]
    severity = Severity.ERROR if over else Severity.WARNING
    modules = [str(r["module"]) for r, _ in flagged]
    verb = (
        f"which is beyond {fmt}'s maximum {limit:.6g}: in {fmt} the scores become inf and the softmax NaN"
        if headroom < 0
        else f"within one binade of {fmt}'s maximum {limit:.6g} (headroom {headroom:.2f} binades): "
        "one doubling as q and k train overflows"
    )
    message = (
        f"The attention scores (q·kᵀ·scale, inside the module, seen by no layer output) of '{worst['module']}' "
        f"reach {worst['max_score']:.3g}, {verb}."
    )
    code = f"{code_prefix(fmt)}-overflow"
    return Finding(
        code=code,
        severity=severity,
        layers=modules,
        message=message,
        evidence={
            "where": "attention scores",
            "format": fmt,
            "format_max": limit,
            "worst_module": worst["module"],
            "worst_max_score": worst["max_score"],
            "headroom_binades": headroom,
            "modules": {str(r["module"]): r["max_score"] for r, _ in flagged},
            "measured_from": sorted({s for r, _ in flagged for s in r.get("source", [])}),
        },
        fix=Fix(
            f"keep the attention scores inside {fmt}'s range: scale them by 1/√head_dim, compute them and "
            "the softmax in float32, or train in bf16",
            _FIX_CODE,
        ),
    )
