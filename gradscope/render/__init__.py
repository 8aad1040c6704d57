"""Rendering a Report: console text (rich), JSON schema 1, Markdown.

``render(report, fmt)`` is the one entry point; the CLI, the demos and the
watch callback all go through it, so a report looks the same everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradscope.report import Report

FORMATS: tuple[str, ...] = ("table", "json", "markdown")


def render(report: Report, fmt: str = "table", *, width: int = 100, color: bool = False) -> str:
    """Render ``report`` as ``table`` (console text), ``json`` or ``markdown``.

    Args:
        report: what an audit returned (or ``Report.from_dict`` of a saved one).
        fmt: one of ``FORMATS``.
        width: the console width for ``table``; no line is longer.
        color: ANSI colour for ``table`` (off whenever ``NO_COLOR`` is set).

    Returns:
        The rendered text, without a trailing newline.

    Raises:
        GradscopeError: ``fmt`` is not one of ``FORMATS``.
    """
    if fmt == "table":
        from gradscope.render.console import render_console

        return render_console(report, width=width, color=color)
    if fmt == "json":
        from gradscope.render.jsonout import render_json

        return render_json(report)
    if fmt == "markdown":
        from gradscope.render.markdown import render_markdown

        return render_markdown(report)
    from gradscope.errors import GradscopeError

    raise GradscopeError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "render"]
