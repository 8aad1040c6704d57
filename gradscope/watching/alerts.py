"""Alerts with state: the life story of each finding over a run.

A finding is keyed by (code, first layer) and belongs to the *source* that
evaluates it: ``nonfinite`` (every flush and every per-step check that finds
something), ``training`` (spikes, update ratios, skipped steps: every flush)
and ``diagnosis`` (the layer diagnosis, which runs only every
DIAGNOSE_EVERY_STEPS steps).  Each observation says which sources ran; a key
changes state only when its own source ran, so a finding is never "cleared"
by a flush that did not re-evaluate it.  Four kinds of alert:

* ``appeared``  – a key becomes active (first time, or again after a clear);
* ``escalated`` – an active key's severity rises (warning → error);
* ``moved``     – an active key's layer list changes;
* ``cleared``   – its source ran and the key was absent.

Each key keeps a bounded history (first and last few observations), so the
final report can say how each finding evolved without storing every flush.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradscope.report import Finding, Severity

KEEP_FIRST = 5
KEEP_LAST = 5
HEADLINE_NUMBERS = 4  # numeric evidence values kept per observation
SENTENCE_CHARS = 110  # one console line: code, layers, step, one sentence, where the details are
SOURCES = ("nonfinite", "training", "diagnosis")
KINDS = ("appeared", "escalated", "moved", "cleared")
_MARK = {Severity.ERROR: "✖", Severity.WARNING: "▲", Severity.INFO: "•"}


# Codes a run has at most one finding of (DESIGN.md: "one finding per run, layers
# listed"): a change of its layers is the same finding moving, not a new one.
ONE_PER_RUN = ("update-ratio",)


def finding_key(finding: Finding) -> tuple[str, str]:
    if finding.code in ONE_PER_RUN:
        return finding.code, ""
    return finding.code, finding.layers[0] if finding.layers else ""


def _headline(evidence: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in evidence.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[name] = float(value)
        if len(out) == HEADLINE_NUMBERS:
            break
    return out


# A sentence ends at ". " / "; " before a capital or at the end; "1.5e3" and "e.g." do not end one.
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]])[.;:](?=\s+[A-Z(])")


def first_sentence(message: str, limit: int = SENTENCE_CHARS) -> str:
    """The first sentence of ``message``, cut to ``limit`` characters."""
    text = " ".join(message.split())
    match = _SENTENCE_END.search(text)
    if match is not None:
        text = text[: match.start()]
    text = text.rstrip(".")
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _layers(names: list[str], limit: int = 3) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:limit]) + (f" +{len(names) - limit}" if len(names) > limit else "")
    return f" [{shown}]"


@dataclass
class Alert:
    """One change of state of a finding, at the step of the observation that saw it."""

    kind: str  # one of KINDS
    step: int
    finding: Finding
    previous: str | None = None  # escalated: the old severity; moved: the old layers; cleared: first active step

    def line(self, details: str = "scope.report()") -> str:
        """The console line: step, mark, code, layers, one sentence, where the details are."""
        severity = Severity(self.finding.severity)
        head = f"gradscope step {self.step}: "
        code = self.finding.code + _layers(self.finding.layers)
        if self.kind == "cleared":
            return f"{head}✓ {code} cleared (active since step {self.previous})"
        if self.kind == "escalated":
            what = f"escalated {self.previous} → {severity.value}: "
        elif self.kind == "moved":
            was = (self.previous or "").split(", ")
            what = f"now in other layers (was{_layers(was) if was != [''] else ' none'}): "
        else:
            what = f"{severity.value}: "
        return f"{head}{_MARK[severity]} {code} {what}{first_sentence(self.finding.message)} (details: {details})"

    def markdown(self) -> str:
        """The alert for TensorBoard's Text plugin (Markdown): the line, then the full message and fix."""
        severity = Severity(self.finding.severity).value
        layers = f" ({', '.join(self.finding.layers)})" if self.finding.layers else ""
        if self.kind == "cleared":
            return f"- **cleared** `{self.finding.code}`{layers} (active since step {self.previous})"
        label = {"appeared": severity, "escalated": f"escalated {self.previous} → {severity}", "moved": "moved"}
        text = f"- **{label[self.kind]}** `{self.finding.code}`{layers}: {self.finding.message}"
        if self.finding.fix is not None and self.finding.fix.summary:
            text += f"\n  - fix: {self.finding.fix.summary}"
        return text


@dataclass
class FindingHistory:
    """What one (code, layer) did over the run."""

    first_step: int
    last_step: int
    source: str = "diagnosis"
    flushes: int = 0
    alerts: int = 0
    active: bool = False
    active_since: int | None = None
    severity: Severity = Severity.INFO
    layers: list[str] = field(default_factory=list)
    latest: Finding | None = None
    first: list[dict[str, Any]] = field(default_factory=list)
    last: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=KEEP_LAST))
    worst: Severity = Severity.INFO

    def observe(self, step: int, finding: Finding) -> None:
        entry = {"step": step, "severity": Severity(finding.severity).value} | _headline(finding.evidence)
        if len(self.first) < KEEP_FIRST:
            self.first.append(entry)
        else:
            self.last.append(entry)
        self.flushes += 1
        self.last_step = step
        self.latest = finding
        severity = Severity(finding.severity)
        if severity.rank > self.worst.rank:
            self.worst = severity

    def evolution(self) -> dict[str, Any]:
        """The evidence fields the final report adds to the finding."""
        return {
            "first_step": self.first_step,
            "last_step": self.last_step,
            "flushes_seen": self.flushes,
            "alerts": self.alerts,
            "active_at_end": self.active,
            "history": self.first + list(self.last),
        }


class AlertTracker:
    """Turns the findings of successive observations into alerts with state."""

    def __init__(self) -> None:
        self.histories: dict[tuple[str, str], FindingHistory] = {}
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)

    def observe(
        self, step: int, findings: Mapping[str, list[Finding]] | list[Finding], partial: Collection[str] = ()
    ) -> list[Alert]:
        """Record one observation; return the alerts it raises.

        ``findings`` maps each source that ran to its findings (an empty list:
        it ran and found nothing).  A plain list means every source ran.
        ``partial``: sources that ran on part of their evidence only (the flush at
        close covers no new step: the training rules saw no norm or loss), so their
        absent findings are not cleared (a spike that stopped the run was announced
        "cleared" at the same step).
        """
        by_source = findings if isinstance(findings, Mapping) else dict.fromkeys(SOURCES, []) | {"diagnosis": findings}
        alerts: list[Alert] = []
        seen: set[tuple[str, str]] = set()
        for source, group in by_source.items():
            for finding in group:
                key = finding_key(finding)
                if key in seen:
                    continue
                seen.add(key)
                history = self.histories.get(key)
                if history is None:
                    history = self.histories[key] = FindingHistory(first_step=step, last_step=step, source=source)
                history.source = source
                history.observe(step, finding)
                severity = Severity(finding.severity)
                if not history.active:
                    history.active, history.active_since = True, step
                    alerts.append(Alert("appeared", step, finding))
                elif severity.rank > history.severity.rank:
                    alerts.append(Alert("escalated", step, finding, history.severity.value))
                elif list(finding.layers) != history.layers:
                    alerts.append(Alert("moved", step, finding, ", ".join(history.layers)))
                history.severity, history.layers = severity, list(finding.layers)
        for key, history in self.histories.items():
            if (
                history.active
                and key not in seen
                and history.source in by_source
                and history.source not in partial
                and history.latest is not None
            ):
                history.active = False
                alerts.append(Alert("cleared", step, history.latest, str(history.active_since)))
        for alert in alerts:
            self.counts[alert.kind] += 1
            if alert.kind != "cleared":
                self.histories[finding_key(alert.finding)].alerts += 1
        return alerts

    def active(self) -> list[Finding]:
        """The findings active now (their latest observation)."""
        return [h.latest for h in self.histories.values() if h.active and h.latest is not None]

    def annotate(self, findings: list[Finding]) -> list[Finding]:
        """Add each finding's evolution to its evidence; append the findings that
        were seen during the run but are absent from ``findings``."""
        present: set[tuple[str, str]] = set()
        for finding in findings:
            key = finding_key(finding)
            present.add(key)
            history = self.histories.get(key)
            if history is not None:
                finding.evidence = dict(finding.evidence) | history.evolution()
            else:
                finding.evidence = dict(finding.evidence) | {
                    "first_step": None,
                    "flushes_seen": 0,
                    "note": "seen only in the statistics merged over the whole run",
                }
        extra: list[Finding] = []
        for key, history in self.histories.items():
            if key in present or history.latest is None:
                continue
            latest = history.latest
            extra.append(
                Finding(
                    code=latest.code,
                    severity=history.worst,
                    layers=list(latest.layers),
                    message=f"{latest.message} (seen during the run at steps {history.first_step}"
                    f"–{history.last_step}; absent from the whole-run statistics)",
                    evidence=dict(latest.evidence) | history.evolution(),
                    fix=latest.fix,
                )
            )
        return findings + extra


def run_summary(
    training: Mapping[str, Any], findings: list[Finding], alert_counts: Mapping[str, int], dashboards: str | None
) -> str:
    """The run summary printed at close: steps, first bad step, spikes, findings by
    severity, alerts, and where the dashboards and the report are."""
    lines = [
        f"gradscope run summary: {training.get('steps', 0)} steps (every={training.get('every')}, "
        f"{training.get('sampled_steps', 0)} sampled, tier {training.get('tier')})"
    ]
    first = training.get("first_nonfinite")
    if first:
        where = f" in {first['layer']}" if first.get("layer") else ""
        role = first.get("role") or "value"
        origin = f", {first['origin']}" if first.get("origin") not in (None, "unknown") else ""
        lines.append(f"  first non-finite: step {first['step']}{where} ({role}{origin})")
    else:
        lines.append("  first non-finite: none")
    spikes = training.get("spikes") or 0
    if spikes:
        steps = ", ".join(str(s) for s in (training.get("spike_steps") or [])[:5])
        lines.append(f"  gradient spikes: {spikes} (steps {steps}{' …' if spikes > 5 else ''})")
    else:
        lines.append("  gradient spikes: none")
    counts = {s: sum(1 for f in findings if Severity(f.severity) is s) for s in (Severity.ERROR, Severity.WARNING)}
    infos = sum(1 for f in findings if Severity(f.severity) is Severity.INFO)
    by_code: dict[str, int] = {}
    for finding in findings:
        if Severity(finding.severity) is not Severity.INFO:
            by_code[finding.code] = by_code.get(finding.code, 0) + 1
    codes = ", ".join(f"{code} x{n}" if n > 1 else code for code, n in by_code.items())
    lines.append(
        f"  findings: {counts[Severity.ERROR]} errors, {counts[Severity.WARNING]} warnings, {infos} info"
        + (f" ({codes})" if codes else "")
    )
    lines.append("  alerts: " + ", ".join(f"{alert_counts.get(kind, 0)} {kind}" for kind in KINDS))
    lines.append(
        f"  dashboards: tensorboard --logdir {dashboards}" if dashboards else "  dashboards: none (log_dir not set)"
    )
    lines.append("  full report: scope.report() (render it with gradscope.render)")
    return "\n".join(lines)
