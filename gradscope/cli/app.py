"""What every command shares: one exit path for errors, atomic writes, output settings.

Exit codes (DESIGN.md): 0 no finding at or above ``--fail-on``, 1 findings at
or above it, 2 usage, load or input error.  Diagnostics go to stderr; stdout
holds only the report.  Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2

FAIL_ON = ("error", "warning", "never")
OUTPUT_FORMATS = ("table", "json", "markdown")


@dataclass
class App:
    """Per-invocation state carried on the click context."""

    debug: bool = False

    def abort(self, message: str, code: int = EXIT_ERROR) -> NoReturn:
        """The one error exit: ``gradscope: error: <one line>`` on stderr, then exit ``code``."""
        line = " ".join(str(message).split())
        click.echo(f"gradscope: error: {line}", err=True)
        raise click.exceptions.Exit(code)

    def info(self, message: str) -> None:
        click.echo(f"gradscope: {message}", err=True)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn exceptions into one-line errors (exit 2); tracebacks only with --debug.

        stdout is redirected to stderr inside, so that a model's or library's
        prints can never mix with the report (``--format json`` stays one document).
        Torch's warnings are hidden unless --debug.
        """
        from gradscope.errors import GradscopeError

        try:
            with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
                if not self.debug:
                    # torch's deprecation chatter (e.g. while loading .pt2 archives) is not the
                    # user's concern; their own UserWarnings still reach stderr.
                    warnings.filterwarnings("ignore", module=r"torch(\.|$)")
                    warnings.filterwarnings("ignore", category=FutureWarning)
                    warnings.filterwarnings("ignore", category=DeprecationWarning)
                yield
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except GradscopeError as exc:
            self._traceback()
            self.abort(str(exc))
        except KeyboardInterrupt:
            self.abort("interrupted", 130)
        except MemoryError:
            self._traceback()
            self.abort("out of memory; try a smaller --input-shape batch")
        except Exception as exc:
            self._traceback()
            text = str(exc).strip().splitlines()
            hint = "" if self.debug else " (rerun with --debug for the traceback)"
            self.abort(f"internal error: {type(exc).__name__}: {text[0] if text else ''}{hint}")

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
                help="Report format; json is exactly one JSON document (schema 1) on stdout.",
            ),
            click.option(
                "--output", "-o", metavar="FILE", help="Write the report to FILE (atomically) instead of stdout."
            ),
            click.option(
                "--fail-on",
                type=click.Choice(FAIL_ON),
                default="error",
                show_default=True,
                help="Exit 1 when a finding is at or above this severity.",
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


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` via a temporary file in the same directory and ``os.replace``.

    ``write(tmp_path)`` fills the temporary file; on any error it is deleted
    and ``path`` is left as it was (no partial file).
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        from gradscope.errors import InputError

        raise InputError(f"output {str(target)!r} is a directory")
    if not folder.is_dir():
        from gradscope.errors import InputError

        raise InputError(f"cannot write {str(target)!r}: directory {str(folder)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, _file_mode(target))  # mkstemp makes 0600; give the usual mode
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def _file_mode(target: Path) -> int:
    """The existing file's mode, else 0666 minus the umask (what open() would give)."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_text_atomic(path: str | Path, text: str) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    write_atomic(path, write)


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
