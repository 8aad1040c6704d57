"""The audit report and its findings: the objects behind JSON schema 1."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from gradscope.jsonsafe import json_safe
from gradscope.record import Record
from gradscope.version import version

SCHEMA = 1


class Severity(str, Enum):
    """How bad a finding is.  ``error``: training will fail or be corrupted;
    ``warning``: likely harmful; ``info``: advice."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        return {"error": 2, "warning": 1, "info": 0}[self.value]


@dataclass
class Fix:
    """What to change: a sentence and a snippet a user can paste."""

    summary: str
    code: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"summary": self.summary, "code": self.code}


@dataclass
class Finding:
    """One diagnosis: code, severity, layers, evidence (numbers) and the fix."""

    code: str
    severity: Severity
    layers: list[str]
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: Fix | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": Severity(self.severity).value,
            "layers": list(self.layers),
            "message": self.message,
            "evidence": json_safe(self.evidence),
            "fix": self.fix.to_dict() if self.fix is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        fix = data.get("fix")
        return cls(
            code=data["code"],
            severity=Severity(data["severity"]),
            layers=list(data.get("layers", [])),
            message=data.get("message", ""),
            evidence=dict(data.get("evidence", {})),
            fix=Fix(fix["summary"], fix.get("code", "")) if fix else None,
        )


@dataclass
class Report:
    """What an audit (or a watched run) found."""

    record: Record
    model: dict[str, Any] = field(default_factory=dict)  # source, format, parameters, type
    run: dict[str, Any] = field(default_factory=dict)  # input_shape, input_dtype, loss, batches, ...
    findings: list[Finding] = field(default_factory=list)
    analysis: dict[str, Any] = field(default_factory=dict)  # depth profile and per-layer gains

    @property
    def layers(self) -> list[Any]:
        return self.record.layers

    def inconclusive_reasons(self) -> list[str]:
        """Why a required analysis could not run (set by the diagnosis); empty when all ran."""
        return [str(r) for r in self.analysis.get("inconclusive") or []]

    def summary(self) -> dict[str, Any]:
        """Counts and the verdict.  ``healthy`` is True, False, or None ("inconclusive")
        when nothing was found but a required analysis could not run: gradscope
        never calls what it could not see healthy (the reasons are listed)."""
        errors = sum(1 for f in self.findings if Severity(f.severity) is Severity.ERROR)
        warnings = sum(1 for f in self.findings if Severity(f.severity) is Severity.WARNING)
        infos = sum(1 for f in self.findings if Severity(f.severity) is Severity.INFO)
        reasons = self.inconclusive_reasons()
        healthy: bool | None = False if errors + warnings else (None if reasons else True)
        verdict = {True: "healthy", False: "unhealthy", None: "inconclusive"}[healthy]
        out: dict[str, Any] = {"errors": errors, "warnings": warnings, "infos": infos, "healthy": healthy}
        out["verdict"] = verdict
        if reasons:
            out["inconclusive"] = reasons
        return out

    @property
    def inconclusive(self) -> bool:
        return self.summary()["healthy"] is None

    def worst(self) -> Severity | None:
        if not self.findings:
            return None
        return max((Severity(f.severity) for f in self.findings), key=lambda s: s.rank)

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        record = self.record.to_dict()
        return json_safe(
            {
                "schema": SCHEMA,
                "gradscope_version": version(),
                "model": dict(self.model),
                "run": dict(self.run),
                "layers": record["layers"],
                "findings": [f.to_dict() for f in self.findings],
                "summary": self.summary(),
                "input": record["input"],
                "not_executed": record["not_executed"],
                "notes": record["notes"],
                "analysis": self.analysis,
            }
        )

    def to_html(self) -> str:
        """The report as one self-contained HTML page (``gradscope.render.html``): nothing is fetched."""
        from gradscope.render import render

        return render(self, "html")

    def _repr_html_(self) -> str:
        """Jupyter's rich display: the HTML report as a fragment with its own scoped style."""
        from gradscope.render.html import render_html_fragment
        from gradscope.render.sanitize import clean_tree

        return render_html_fragment(clean_tree(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"unsupported report schema {data.get('schema')!r}; this gradscope reads schema {SCHEMA}")
        record = Record.from_dict(
            {
                "layers": data.get("layers", []),
                "input": data.get("input"),
                "not_executed": data.get("not_executed", []),
                "notes": data.get("notes", []),
            }
        )
        return cls(
            record=record,
            model=dict(data.get("model", {})),
            run=dict(data.get("run", {})),
            findings=[Finding.from_dict(f) for f in data.get("findings", [])],
            analysis=dict(data.get("analysis", {})),
        )
