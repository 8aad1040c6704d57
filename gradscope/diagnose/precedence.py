"""Findings that a more specific finding explains, removed in one place.

``poor-init`` judges a layer's weights partly by the signal measured across the
layers they multiply.  When ``dead-units`` measured that the layer's *bias* (or
the BatchNorm beta after it) holds most units of the following ReLU below 0,
that signal collapse is the dead units', not the weights': a poor-init finding
naming only such layers would send the user to re-initialise weights that are
at their default init while the bias stays broken.  A poor-init finding that
also names other layers is kept whole.
"""

from __future__ import annotations

from gradscope.report import Finding

SHIFT_CAUSES = ("bias", "batchnorm-beta")  # gradscope.diagnose.dead_cause BIAS, BETA


def shift_producers(findings: list[Finding]) -> set[str]:
    """Layers whose bias/beta a dead-units finding measured as the cause."""
    out: set[str] = set()
    for f in findings:
        if f.code != "dead-units":
            continue
        for entry in (f.evidence.get("per_layer") or {}).values():
            if isinstance(entry, dict) and entry.get("cause") in SHIFT_CAUSES and entry.get("producer"):
                out.add(entry["producer"])
    return out


def drop_explained(findings: list[Finding]) -> list[Finding]:
    """``findings`` without the poor-init findings that dead units explain (module docstring)."""
    explained = shift_producers(findings)
    if not explained:
        return findings
    return [f for f in findings if not (f.code == "poor-init" and f.layers and set(f.layers) <= explained)]
