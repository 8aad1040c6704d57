"""``gradscope report FILE.json``: re-render a saved JSON report (schema 1)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

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

# The largest report read.  A schema-1 report holds ~9 KB of statistics per layer
# (measured: a 5-layer MLP's JSON is 45 KB), so 256 MiB is ~30,000 layers, far above
# any model gradscope audits; the bound keeps '-' fed by an endless producer
# (``< /dev/zero``) from growing until memory runs out.
MAX_REPORT_BYTES = 256 * 2**20
_CHUNK = 2**20


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
    with app.guard(out_of_memory=f"out of memory reading the report {file!r}"):
        from gradscope.cli.paths import check_input_file, plan_outputs
        from gradscope.cli.staging import Staging
        from gradscope.errors import InputError
        from gradscope.report import Report

        sources = [] if file == "-" else [check_input_file(file, "report")]
        plan = plan_outputs(sources, {"--output": output})
        text = _read_stdin(stdin) if file == "-" else _read(Path(file))
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


def _too_large(what: str) -> Exception:
    from gradscope.errors import InputError

    return InputError(
        f"{what} is larger than {MAX_REPORT_BYTES // 2**20} MiB, more than any gradscope report; "
        "pass the report JSON that `gradscope audit --format json` wrote"
    )


def _decode(data: bytes, what: str) -> str:
    from gradscope.errors import InputError

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} is not a text (JSON) file") from None


def _read_stdin(stdin: Any) -> str:
    """Standard input up to MAX_REPORT_BYTES (one byte more says it is too large)."""
    source = getattr(stdin, "buffer", stdin)
    chunks: list[Any] = []
    size = 0
    while size <= MAX_REPORT_BYTES:
        chunk = source.read(min(_CHUNK, MAX_REPORT_BYTES + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_REPORT_BYTES:
        raise _too_large("standard input")
    if chunks and isinstance(chunks[0], str):  # a text stream without a byte buffer
        return "".join(chunks)
    return _decode(b"".join(chunks), "standard input")


def _read(path: Path) -> str:
    from gradscope.errors import InputError

    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_REPORT_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read report {str(path)!r}: {exc.strerror or exc}") from None
    if len(data) > MAX_REPORT_BYTES:
        raise _too_large(f"report {str(path)!r}")
    return _decode(data, repr(str(path)))
