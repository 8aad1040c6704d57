"""Rendering a Report: console text (rich), JSON schema 1, Markdown, a self-contained HTML page.

``render(report, fmt)`` is the one entry point; the CLI, the demos and the
watch callback all go through it, so a report looks the same everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradscope.report import Report

FORMATS: tuple[str, ...] = ("table", "json", "markdown", "html")


def render(report: Report, fmt: str = "table", *, width: int = 100, color: bool = False) -> str:
    """Render ``report`` as ``table`` (console text), ``json``, ``markdown`` or ``html``.

    Args:
        report: what an audit returned (or ``Report.from_dict`` of a saved one).
        fmt: one of ``FORMATS``.
        width: the console width for ``table``; no line is longer.
        color: ANSI colour for ``table`` (off whenever ``NO_COLOR`` is set).

    Escape sequences and control characters in the report's strings (layer
    names, messages, evidence: they may come from model code or a foreign JSON)
    are removed for ``table``, ``markdown`` and ``html`` and escaped in ``json``
    (``gradscope.render.sanitize``); ``html`` also escapes every string as HTML.

    Returns:
        The rendered text, without a trailing newline.

    Raises:
        GradscopeError: ``fmt`` is not one of ``FORMATS``.
    """
    from gradscope.render.sanitize import clean_tree, escape_json_controls

    if fmt == "json":
        from gradscope.render.jsonout import render_json

        # The data stays exactly as recorded; only characters a terminal would act on are escaped.
        return escape_json_controls(render_json(report))
    # Strings from model code or a foreign report JSON never reach the terminal raw.
    report = clean_tree(report)
    if fmt == "table":
        from gradscope.render.console import render_console

        return render_console(report, width=width, color=color)
    if fmt == "markdown":
        from gradscope.render.markdown import render_markdown

        return render_markdown(report)
    if fmt == "html":
        from gradscope.render.html import render_html

        return render_html(report)
    from gradscope.errors import GradscopeError

    raise GradscopeError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "render"]
