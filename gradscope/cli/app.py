"""What every command shares: one exit path for errors, output settings.

Exit codes (DESIGN.md): 0 no finding at or above ``--fail-on``, 1 findings at
or above it, 2 usage, load or input error, 130/143 interrupted by SIGINT/SIGTERM.
Diagnostics go to stderr; stdout holds only the report.  Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import click

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2

# What a MemoryError means where a model runs (audit, fix): the synthetic batch is the knob.
MODEL_OUT_OF_MEMORY = "out of memory; try a smaller --input-shape batch"

FAIL_ON = ("error", "warning", "never")
OUTPUT_FORMATS = ("table", "json", "markdown", "html")


@dataclass
class App:
    """Per-invocation state carried on the click context."""

    debug: bool = False

    def abort(self, message: str, code: int = EXIT_ERROR) -> NoReturn:
        """The one error exit: ``gradscope: error: <one line>`` on stderr, then exit ``code``."""
        from gradscope.render.sanitize import clean_text

        line = " ".join(clean_text(str(message)).split())
        click.echo(f"gradscope: error: {line}", err=True)
        raise click.exceptions.Exit(code)

    def info(self, message: str) -> None:
        from gradscope.render.sanitize import clean_text

        click.echo(f"gradscope: {clean_text(message)}", err=True)

    def emit(self, text: str) -> None:
        """The report on stdout; a stdout that cannot take it is one error line, exit 2."""
        from gradscope.cli.stdout import StdoutError, emit

        try:
            emit(text)
        except StdoutError as exc:
            self.abort(str(exc))

    @contextlib.contextmanager
    def guard(
        self, *, subject: str | None = None, isolate: bool = True, out_of_memory: str = "out of memory"
    ) -> Iterator[None]:
        """Run a command's work inside the CLI contract; every failure is one line.

        Inside the block (``isolate``, for commands that run model code): file
        descriptor 1 and ``sys.stdout`` point at stderr, so nothing but the report
        reaches stdout; torch's log records are kept in memory (shown with
        --debug); SIGINT/SIGTERM raise, so staged outputs are removed and the
        command exits 130/143.  Torch's warnings are hidden unless --debug.
        ``subject`` (the MODEL the user passed) names the code in the message
        when that code calls ``sys.exit``; ``out_of_memory`` is the line for a
        MemoryError, with the hint that fits the command.
        """
        from gradscope.cli.isolation import (
            EXIT_SIGINT,
            SignalState,
            describe_exit,
            signals_to_exceptions,
            stdout_to_stderr,
            torch_logs_captured,
        )
        from gradscope.errors import GradscopeError

        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(signals_to_exceptions())
                stack.enter_context(warnings.catch_warnings())
                if not self.debug:
                    # torch's deprecation chatter (e.g. while loading .pt2 archives) is not the
                    # user's concern; their own UserWarnings still reach stderr.
                    warnings.filterwarnings("ignore", module=r"torch(\.|$)")
                    warnings.filterwarnings("ignore", category=FutureWarning)
                    warnings.filterwarnings("ignore", category=DeprecationWarning)
                    stack.enter_context(torch_logs_captured())
                if isolate:
                    stack.enter_context(stdout_to_stderr())
                else:
                    stack.enter_context(contextlib.redirect_stdout(sys.stderr))
                yield
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BaseException as exc:
            signum = SignalState.received
            if signum is not None or isinstance(exc, KeyboardInterrupt):
                self._traceback()
                self._interrupted(signum if signum is not None else EXIT_SIGINT - 128)
            if isinstance(exc, SystemExit):
                self._traceback()
                where = f" in {subject!r}" if subject else ""
                self.abort(
                    f"the model code{where} called {describe_exit(exc.code)}; gradscope stopped, nothing written"
                )
            if isinstance(exc, GradscopeError):
                self._traceback()
                self.abort(str(exc))
            if isinstance(exc, MemoryError):
                self._traceback()
                self.abort(out_of_memory)
            if isinstance(exc, OSError) and exc.filename is not None:
                # a file the user named (an output folder that filled up, a path gone read-only)
                self._traceback()
                self.abort(f"cannot use {str(exc.filename)!r}: {exc.strerror or exc}")
            if not isinstance(exc, Exception):
                raise
            self._traceback()
            text = str(exc).strip().splitlines()
            hint = "" if self.debug else " (rerun with --debug for the traceback)"
            self.abort(f"internal error: {type(exc).__name__}: {text[0] if text else ''}{hint}")

    def _interrupted(self, signum: int) -> NoReturn:
        import signal

        name = signal.Signals(signum).name
        self.abort(f"interrupted by {name} (no partial output is left)", 128 + signum)

    def _traceback(self) -> None:
        if self.debug:
            traceback.print_exc(file=sys.stderr)


def get_app() -> App:
    ctx = click.get_current_context()
    app = ctx.find_object(App)
    if app is None:
        app = ctx.ensure_object(App)
    return app


def report_output_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options every command that prints a report shares: --format,
    --output, --fail-on, --width (``audit`` and ``report``)."""
    for option in reversed(
        [
            click.option(
                "--format",
                "fmt",
                type=click.Choice(OUTPUT_FORMATS),
                default="table",
                show_default=True,
                help="Report format; json is exactly one JSON document (schema 1) on stdout; html is one "
                "self-contained page (inline SVG charts, nothing fetched).",
            ),
            click.option(
                "--output",
                "-o",
                metavar="FILE",
                help="Write the report to FILE instead of stdout; it appears only once the command succeeded "
                "(never a link, a device, or one of the input files).",
            ),
            click.option(
                "--fail-on",
                type=click.Choice(FAIL_ON),
                default="error",
                show_default=True,
                help="Exit 1 when a finding is at or above this severity (an inconclusive verdict counts as error).",
            ),
            click.option("--width", type=click.IntRange(min=40), help="Width of the table (default: the terminal's)."),
        ]
    ):
        func = option(func)
    return func


def debug_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--debug`` on a command (also accepted before the command name)."""

    def callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.ensure_object(App).debug = True
        return value

    return click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        callback=callback,
        is_eager=True,
        help="Show tracebacks and warnings.",
    )(func)


def use_color(stream: Any = None) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def terminal_width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 160))


def exit_code(report: Any, fail_on: str) -> int:
    """1 when a finding is at or above ``fail_on`` (error > warning), else 0.

    An inconclusive verdict (a required analysis could not run) counts at the
    ``error`` level: a gate never passes what gradscope could not see."""
    if fail_on == "never":
        return EXIT_OK
    threshold = {"error": 2, "warning": 1}[fail_on]
    if report.summary().get("healthy", True) is None:
        return EXIT_FINDINGS
    worst = report.worst()
    return EXIT_FINDINGS if worst is not None and worst.rank >= threshold else EXIT_OK


def render_report(report: Any, fmt: str, *, width: int | None = None, color: bool | None = None) -> str:
    """``gradscope.render.render`` with the terminal's width and colour (never colour for json)."""
    from gradscope.render import render

    if color is None:
        color = fmt == "table" and use_color()
    text = render(report, fmt, width=width or terminal_width(), color=bool(color) and fmt == "table")
    return text if text.endswith("\n") else text + "\n"
