"""Diagnosis: rules that turn a Record into Findings.  (Filled in by the diagnosis work.)"""

from __future__ import annotations

from typing import Any


def diagnose(report: Any, model: Any = None) -> None:
    """Fill ``report.findings`` and ``report.analysis``."""
    report.findings = []
