"""Rate-limited alerts and the life story of each finding over a run.

A finding is keyed by (code, first layer).  It alerts once when it appears,
stays silent while it persists, and may alert again only after a flush in which
it was absent ("until it clears").  Each key keeps a bounded history: when it
first appeared, when it was last seen, how many flushes showed it, and the
first and last few observations (step, severity, headline numbers), so the
final report can say how each finding evolved without storing every flush.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gradscope.report import Finding, Severity

KEEP_FIRST = 5
KEEP_LAST = 5
HEADLINE_NUMBERS = 4  # numeric evidence values kept per observation


def finding_key(finding: Finding) -> tuple[str, str]:
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


@dataclass
class FindingHistory:
    """What one (code, layer) did over the run."""

    first_step: int
    last_step: int
    flushes: int = 0
    alerts: int = 0
    active: bool = False
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
    """Turns the findings of successive flushes into rate-limited alerts."""

    def __init__(self) -> None:
        self.histories: dict[tuple[str, str], FindingHistory] = {}

    def observe(self, step: int, findings: list[Finding]) -> list[Finding]:
        """Record one flush's findings; return those that should alert now."""
        seen: set[tuple[str, str]] = set()
        alerts: list[Finding] = []
        for finding in findings:
            key = finding_key(finding)
            if key in seen:
                continue
            seen.add(key)
            history = self.histories.get(key)
            if history is None:
                history = self.histories[key] = FindingHistory(first_step=step, last_step=step)
            history.observe(step, finding)
            if not history.active:
                history.active = True
                history.alerts += 1
                alerts.append(finding)
        for key, history in self.histories.items():
            if key not in seen:
                history.active = False  # cleared: the next appearance alerts again
        return alerts

    def clear(self, code: str) -> None:
        """Mark every key of ``code`` as cleared (for signals checked outside flushes)."""
        for (c, _), history in self.histories.items():
            if c == code:
                history.active = False

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
