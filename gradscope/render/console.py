"""The console report: rich text, readable at 80 columns and without colour.

Layout, top to bottom: a header (model, parameters, inputs, loss, run), the
per-layer table, the depth profile of log10 ∂ℓ/∂h RMS, the findings grouped by
severity (message, evidence, threshold, fix and its snippet), layers that never
ran, notes, and a one-line summary whose counts are ``report.summary()``'s.

Every string that comes from the model (layer names, messages, snippets) is put
into a :class:`rich.text.Text`, never parsed as markup, so a name such as
``blocks[0]`` prints as itself.
"""

from __future__ import annotations

import io
import math
import os
import re

from rich import box
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from gradscope.render import _format as F
from gradscope.report import Report, Severity

_SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
_SEVERITY_MARK = {Severity.ERROR: "✖", Severity.WARNING: "▲", Severity.INFO: "•"}

# The layer table's flexible columns: the smallest a layer name is cut to, and the
# widest a class name is shown (``NonDynamicallyQuantizableLinear`` is not).
_MIN_NAME = 12
_MAX_TYPE = 14


SECTIONS: tuple[str, ...] = ("header", "layers", "profile", "analysis", "findings", "extras", "summary")


def render_console(
    report: Report, *, width: int = 100, color: bool = False, sections: tuple[str, ...] | None = None
) -> str:
    """The report as console text of at most ``width`` columns.

    Args:
        report: the report to render.
        width: the console width; every line fits in it.
        color: emit ANSI styles.  Ignored when the ``NO_COLOR`` environment
            variable is set (https://no-color.org).
        sections: a subset of ``SECTIONS`` to show (default: all), e.g.
            ``("profile", "findings", "summary")`` for the demos' before/after.

    Returns:
        The text, without a trailing newline.
    """
    color = color and not os.environ.get("NO_COLOR")
    console = Console(
        record=True,
        file=io.StringIO(),
        width=width,
        height=10_000,
        color_system="standard" if color else None,
        force_terminal=False,
        no_color=not color,
        highlight=False,
        markup=False,
        emoji=False,
        soft_wrap=False,
        legacy_windows=False,
    )
    for part in _sections(report, width, set(sections or SECTIONS)):
        console.print(part)
    text = console.export_text(styles=color)
    # rich pads grid rows to the full width; trailing blanks only make diffs noisy.
    return "\n".join(_rstrip(line) for line in text.splitlines()).rstrip("\n")


_TRAILING = re.compile(r"[ \t]+((?:\x1b\[[0-9;]*m)*)$")


def _rstrip(line: str) -> str:
    """Drop trailing blanks, also those hidden before closing ANSI codes."""
    return _TRAILING.sub(r"\1", line.rstrip())


def _sections(report: Report, width: int, wanted: set[str]) -> list[RenderableType]:
    parts: list[RenderableType] = []
    if "header" in wanted:
        parts += [_header(report), Text("")]
    rows = F.layer_rows(report)
    if not rows and wanted & {"layers", "profile"}:
        parts += [Text("No layer was recorded."), Text("")]
    if rows and "layers" in wanted:
        parts += [_layer_table(report, rows, width), *_legend(rows), Text("")]
    if rows and "profile" in wanted:
        parts += [*_depth_profile(rows, width), Text("")]
    if "analysis" in wanted:
        for item in F.analysis_items(report):
            parts.append(Text(item.title, style="bold"))
            body: list[RenderableType] = [Text(line, overflow="fold") for line in item.lines]
            if item.code:
                body.append(Padding(Text(item.code, style="cyan", overflow="fold"), (0, 0, 0, 2)))
            parts += [Padding(Group(*body), (0, 0, 0, 2)), Text("")]
    if "findings" in wanted:
        parts += _findings(report)
    if "extras" in wanted and report.record.not_executed:
        parts.append(Text("Not executed (hooked, never called in the forward):", style="bold"))
        parts.append(Padding(Text(", ".join(report.record.not_executed), overflow="fold"), (0, 0, 0, 2)))
        parts.append(Text(""))
    if "extras" in wanted and report.record.notes:
        parts.append(Text("Notes:", style="bold"))
        notes = Table.grid(padding=(0, 1), pad_edge=True)
        notes.add_column(no_wrap=True)
        notes.add_column(overflow="fold")
        for note in report.record.notes:
            notes.add_row(Text(" -"), Text(note))
        parts.append(notes)
        parts.append(Text(""))
    if "summary" in wanted:
        summary = report.summary()
        style = {True: "bold green", False: "bold red"}.get(summary["healthy"], "bold yellow")
        parts.append(Text.assemble(("Summary: ", "bold"), (F.summary_text(report), style)))
    return parts


def _header(report: Report) -> RenderableType:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, text in F.header_items(report):
        grid.add_row(Text(label), Text(text))
    title = Text("gradscope report", style="bold")
    return Group(title, grid)


def _layer_table(report: Report, rows: list[F.LayerRow], width: int) -> Table:
    """The per-layer table, with every column width decided here so that it fits ``width``.

    Numbers are never cut; the layer name gives way first (cut in the middle),
    then the type (cut at the end); flags wrap onto a second line if needed.
    """
    fmt = F.primary_format(report)
    headers = ["#", "layer", "type", "act std", "∂ℓ/∂h rms", "w std", "rec std", f"{fmt} hr", "flags"]
    cells = [
        [
            r.index,
            r.name,
            r.type,
            r.activation_std,
            r.gradient_rms,
            r.weight_std,
            r.recommended_std,
            r.headroom,
            " ".join(r.flags),
        ]
        for r in rows
    ]
    natural = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    widths = list(natural)
    widths[2] = min(widths[2], _MAX_TYPE)
    widths[8] = min(widths[8], 12)
    # Below ~78 columns not every column fits at a readable width: drop the least
    # needed ones (the type, then the init columns, then the headroom) rather than
    # cut every number.  The Markdown and JSON reports always keep them all.
    kept = list(range(len(headers)))
    minimum = {1: 8, 2: 6, 8: 5}
    for drop in (2, 6, 5, 7):
        if sum(minimum.get(i, widths[i]) for i in kept) + 2 * (len(kept) - 1) <= width:
            break
        kept.remove(drop)

    # SIMPLE_HEAD draws a one-space divider between columns, plus one space of left
    # padding on every column but the first (pad_edge=False): two spaces per gap.
    def excess() -> int:
        return sum(widths[i] for i in kept) + 2 * (len(kept) - 1) - width

    # Shrink what can give, in order: the type (the name says more), the layer name,
    # the flags (which then wrap), and finally both names to their bare minimum.
    for column, floor in ((2, 8), (1, _MIN_NAME), (8, 5), (1, 6), (2, 4)):
        if excess() <= 0:
            break
        if column in kept:
            widths[column] = max(floor, widths[column] - excess())

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0, 0, 1))
    for i in kept:
        header = headers[i]
        numeric = i == 0 or 3 <= i <= 7
        table.add_column(
            header,
            justify="right" if numeric else "left",
            no_wrap=i != 8,
            overflow="fold" if i == 8 else "ellipsis",
            width=widths[i],
        )
    for r, c in zip(rows, cells, strict=True):
        flagged = bool(r.flags)
        styled = [
            Text(c[0]),
            Text(F.truncate_middle(c[1], widths[1]), style="bold" if flagged else ""),
            Text(F.truncate_end(c[2], widths[2])),
            *(Text(v) for v in c[3:7]),
            Text(c[7], style="red" if c[7].startswith("-") else ""),
            Text(c[8], style="red" if flagged else ""),
        ]
        table.add_row(*(styled[i] for i in kept))
    return table


def _legend(rows: list[F.LayerRow]) -> list[RenderableType]:
    seen: list[str] = []
    for r in rows:
        for flag in r.flags:
            if flag not in seen:
                seen.append(flag)
    lines: list[RenderableType] = [
        Text(
            "act std: std of the layer's output · ∂ℓ/∂h rms: RMS of the loss gradient w.r.t. that output · "
            "w std / rec std: weight std now / recommended · hr: binades of headroom below the format's max",
            style="dim",
            overflow="fold",
        )
    ]
    if seen:
        meaning = " · ".join(f"{f} = {F.FLAG_MEANING.get(f, f)}" for f in seen)
        lines.append(Text("flags: " + meaning, style="dim", overflow="fold"))
    return lines


def _depth_profile(rows: list[F.LayerRow], width: int) -> list[RenderableType]:
    """log10 ∂ℓ/∂h RMS per layer as a bar, on an axis that always shows the healthy range."""
    values = [r.log10_gradient_rms for r in rows if r.log10_gradient_rms is not None]
    title = Text("Depth profile: log10 ∂ℓ/∂h RMS per layer, input → output", style="bold")
    if not values:
        return [title, Text("  no finite, non-zero gradient was recorded")]
    healthy_lo, healthy_hi = F.HEALTHY_LOG10
    lo = math.floor(min(min(values), healthy_lo))
    hi = math.ceil(max(max(values), healthy_hi))
    index_w = max(len(r.index) for r in rows)
    # the name gives way to keep a track of at least 20 characters (and room for " !")
    name_w = max(6, min(24, max(len(r.name) for r in rows), width - (index_w + 1 + 1 + 6 + 1) - 20 - 2))
    prefix = index_w + 1 + name_w + 1 + 6 + 1  # "idx name  -12.3 "
    track = max(10, width - prefix - 2)

    def column(value: float) -> int:
        return min(track - 1, max(0, round((value - lo) / (hi - lo) * (track - 1))))

    bound_cols = {column(healthy_lo), column(healthy_hi)}
    axis = [" "] * track
    for label_value in (lo, healthy_lo, healthy_hi, hi):
        label = f"{label_value:g}"
        start = min(track - len(label), max(0, column(label_value) - len(label) // 2))
        if all(c == " " for c in axis[max(0, start - 1) : start + len(label) + 1]):
            axis[start : start + len(label)] = list(label)
    lines: list[RenderableType] = [
        title,
        Text(" " * prefix + "".join(axis), style="dim"),
    ]
    for r in rows:
        name = F.truncate_middle(r.name, name_w).ljust(name_w)
        head = f"{r.index:>{index_w}} {name} "
        if r.log10_gradient_rms is None:
            lines.append(Text(head + f"{r.gradient_rms:>6}"))
            continue
        v = r.log10_gradient_rms
        end = column(v)
        bar = ["█" if c <= end else ("|" if c in bound_cols else "·") for c in range(track)]
        outside = v < healthy_lo or v > healthy_hi
        text = Text(head + f"{v:6.1f} ")
        text.append("".join(bar), style="red" if outside else "green")
        if outside:
            text.append(" !", style="bold red")
        lines.append(text)
    lines.append(
        Text(
            f"bars start at 10^{lo}; | marks the healthy range [1e{healthy_lo:g}, 1e{healthy_hi:g}]; ! = outside it",
            style="dim",
            overflow="fold",
        )
    )
    return lines


def _findings(report: Report) -> list[RenderableType]:
    groups = F.grouped(report.findings)
    if not groups:
        return [Text("No findings: nothing out of the healthy ranges.", style="green"), Text("")]
    parts: list[RenderableType] = []
    for severity, findings in groups:
        style = _SEVERITY_STYLE[severity]
        parts.append(Text(f"{F.SEVERITY_TITLE[severity]} ({len(findings)})", style=style + " underline"))
        for finding in findings:
            head = Text.assemble(
                (f"{_SEVERITY_MARK[severity]} {finding.code}", style),
                (" · " + F.layer_list(finding.layers), ""),
            )
            head.overflow = "fold"
            parts.append(head)
            body: list[RenderableType] = [Text(finding.message, overflow="fold")]
            measured, thresholds = F.evidence_entries(finding.evidence)
            if measured:
                body.append(Text("evidence:", style="bold"))
                body.append(Padding(_evidence_table(measured), (0, 0, 0, 2)))
            if thresholds:
                body.append(
                    Text.assemble(
                        ("threshold: ", "bold"),
                        ", ".join(f"{k}={v}" for k, v in thresholds),
                        overflow="fold",
                    )
                )
            if finding.fix is not None:
                body.append(Text.assemble(("fix: ", "bold"), finding.fix.summary, overflow="fold"))
                if finding.fix.code.strip():
                    code = Text(finding.fix.code.strip("\n"), style="cyan", overflow="fold")
                    body.append(Padding(code, (0, 0, 0, 4)))
            parts.append(Padding(Group(*body), (0, 0, 0, 2)))
        parts.append(Text(""))
    return parts


def _evidence_table(entries: list[tuple[str, str]]) -> Table:
    """Evidence as a short two-column table (key, value), one measurement a row."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in entries:
        table.add_row(Text(key), Text(value))
    return table
