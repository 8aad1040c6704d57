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
)
from gradscope.cli.isolation import check_not_interrupted


@click.command()
@click.argument("file", metavar="FILE.json")
@report_output_options
@debug_option
def report(file: str, fmt: str, output: str | None, fail_on: str, width: int | None) -> None:
    """Re-render FILE.json (from `gradscope audit --format json`) as a table, JSON, Markdown or HTML.

    FILE.json may be '-' for stdin.
    """
    app = get_app()
    color = fmt == "table" and not output and use_color()
    stdin = sys.stdin
    with app.guard():
        from gradscope.cli.paths import check_input_file, plan_outputs
        from gradscope.cli.staging import Staging
        from gradscope.errors import InputError
        from gradscope.report import Report

        sources = [] if file == "-" else [check_input_file(file, "report")]
        plan = plan_outputs(sources, {"--output": output})
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
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{file!r} is not a gradscope report (schema 1): missing or bad field {exc}") from None
        try:
            rendered = render_report(loaded, fmt, width=width, color=color)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            # a report JSON that parsed but holds values of the wrong kind (written by hand or by another tool)
            raise InputError(
                f"{file!r} is not a valid gradscope report (schema 1): a field has the wrong type "
                f"({type(exc).__name__}: {exc})"
            ) from None
        with Staging(before_commit=check_not_interrupted) as staging:
            if output:
                staging.write_text(plan.files["--output"], rendered)
            staging.commit()
    if output:
        app.info(f"report written to {output}")
    else:
        app.emit(rendered)
    raise click.exceptions.Exit(exit_code(loaded, fail_on))


def _read(path: Path) -> str:
    from gradscope.errors import InputError

    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{str(path)!r} is not a text (JSON) file") from None
    except OSError as exc:
        raise InputError(f"cannot read report {str(path)!r}: {exc.strerror or exc}") from None
