"""The Markdown report, shaped for a pull-request comment.

A verdict line, the model and run, a findings table, each fix with its snippet
in a ```python block, then the per-layer table folded in ``<details>`` so the
comment stays short.  GitHub-flavoured Markdown: pipes in cells are escaped.
"""

from __future__ import annotations

from gradscope.render import _format as F
from gradscope.report import Report, Severity

_ICON = {Severity.ERROR: "🔴", Severity.WARNING: "🟠", Severity.INFO: "🔵"}


def _cell(text: str) -> str:
    """A table cell or a line of prose: one line, pipes escaped, no HTML (``<module>`` stays text)."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


def _code(text: str) -> str:
    """Inline code that survives backticks in the text."""
    text = " ".join(str(text).split())
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render_markdown(report: Report) -> str:
    """The report as GitHub-flavoured Markdown, without a trailing newline."""
    summary = report.summary()
    verdict = {True: "✅ healthy", False: "❌ unhealthy"}.get(summary["healthy"], "❔ inconclusive")
    out: list[str] = [f"## gradscope: {verdict}", "", f"**{F.summary_text(report)}**", ""]
    for label, text in F.header_items(report):
        out.append(f"- **{label}**: {_cell(text)}")
    out.append("")
    for item in F.analysis_items(report):
        out.append(
            f"**{item.title}**: " + " ".join(_cell(line) + ("" if line.endswith(".") else ".") for line in item.lines)
        )
        if item.code:
            out += ["", "```python", item.code.strip("\n"), "```"]
        out.append("")

    if report.findings:
        out += ["### Findings", "", "| severity | code | layers | message |", "| --- | --- | --- | --- |"]
        for severity, findings in F.grouped(report.findings):
            for f in findings:
                out.append(
                    f"| {_ICON[severity]} {severity.value} | {_code(f.code)} | "
                    f"{_cell(F.layer_list(f.layers))} | {_cell(f.message)} |"
                )
        out.append("")
        out += _fixes(report)
    else:
        out += ["No findings: nothing out of the healthy ranges.", ""]

    if report.record.not_executed:
        names = ", ".join(_code(n) for n in report.record.not_executed)
        out += [f"**Not executed** (hooked, never called in the forward): {names}", ""]
    if report.record.notes:
        out += ["**Notes**", ""] + [f"- {_cell(n)}" for n in report.record.notes] + [""]

    rows = F.layer_rows(report)
    if rows:
        fmt = F.primary_format(report)
        out += [
            f"<details><summary>Per-layer statistics ({len(rows)} layers)</summary>",
            "",
            f"| # | layer | type | act std | ∂ℓ/∂h rms | w std | rec std | {fmt} headroom | flags |",
            "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in rows:
            out.append(
                f"| {r.index} | {_code(r.name)} | {_cell(r.type)} | {r.activation_std} | {r.gradient_rms} | "
                f"{r.weight_std} | {r.recommended_std} | {r.headroom} | {_cell(', '.join(r.flags))} |"
            )
        out += ["", "</details>"]
    return "\n".join(out).rstrip("\n")


def _fixes(report: Report) -> list[str]:
    out: list[str] = []
    with_fix = [f for f in report.findings if f.fix is not None]
    if not with_fix:
        return out
    out += ["### Fixes", ""]
    for _severity, findings in F.grouped(with_fix):
        for f in findings:
            assert f.fix is not None
            out.append(f"**{_code(f.code)}** ({_cell(F.layer_list(f.layers))}): {_cell(f.fix.summary)}")
            measured, thresholds = F.evidence_entries(f.evidence)
            facts = [f"{k}={v}" for k, v in measured]
            limits = [f"{k}={v}" for k, v in thresholds]
            if facts or limits:
                line = "Evidence: " + ", ".join(facts) if facts else ""
                if limits:
                    line += ("; " if line else "") + "threshold: " + ", ".join(limits)
                out += ["", _cell(line)]
            if f.fix.code.strip():
                fence = "````" if "```" in f.fix.code else "```"
                out += ["", f"{fence}python", f.fix.code.strip("\n"), fence]
            out.append("")
    return out
