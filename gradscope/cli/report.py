"""``gradscope report FILE.json``: re-render a saved JSON report (schema 1)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gradscope.cli.app import (
    debug_option,
    exit_code,
    get_app,
    render_report,
    report_output_options,
    use_color,
    write_text_atomic,
)


@click.command()
@click.argument("file", metavar="FILE.json")
@report_output_options
@debug_option
def report(file: str, fmt: str, output: str | None, fail_on: str, width: int | None) -> None:
    """Re-render FILE.json (from `gradscope audit --format json`) as a table, JSON or Markdown.

    FILE.json may be '-' for stdin.
    """
    app = get_app()
    color = fmt == "table" and not output and use_color()
    stdin = sys.stdin
    with app.guard():
        from gradscope.errors import InputError
        from gradscope.report import Report

        text = stdin.read() if file == "-" else _read(Path(file))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{file!r} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        if not isinstance(data, dict):
            raise InputError(f"{file!r} is not a gradscope report (a JSON object)")
        try:
            loaded = Report.from_dict(data)
        except ValueError as exc:
            raise InputError(f"{file!r}: {exc}") from None
        except (KeyError, TypeError) as exc:
            raise InputError(f"{file!r} is not a gradscope report (schema 1): missing or bad field {exc}") from None
        rendered = render_report(loaded, fmt, width=width, color=color)
        if output:
            write_text_atomic(output, rendered)
    if not output:
        click.echo(rendered, nl=False)
    raise click.exceptions.Exit(exit_code(loaded, fail_on))


def _read(path: Path) -> str:
    from gradscope.loaders.detect import check_file

    check_file(path, "report")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        from gradscope.errors import InputError

        raise InputError(f"{str(path)!r} is not a text (JSON) file") from None
