"""The ``gradscope`` command.  Each subcommand lives in its own module and is
imported only when it runs, so ``gradscope --help`` never imports torch.

Subcommands: audit, fix, report, demo, and dashboard (from the watch work,
registered when ``gradscope/cli/dashboard.py`` exists).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

import click

from gradscope.cli.app import App

# name -> (module, attribute, one-line help shown by `gradscope --help` without importing the module)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "audit": ("gradscope.cli.audit", "audit", "Audit a model's per-layer activation and gradient health."),
    "fix": ("gradscope.cli.fix", "fix", "Re-initialise a model's weights and save the fixed state_dict."),
    "report": ("gradscope.cli.report", "report", "Re-render a saved JSON report."),
    "demo": ("gradscope.cli.demo", "demo", "Run the built-in examples: findings, fix, healthy re-audit."),
    "dashboard": ("gradscope.cli.dashboard", "dashboard", "Lay out TensorBoard dashboards for a gradscope run."),
}


def _available(name: str) -> bool:
    module = COMMANDS[name][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _available(name)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS or not _available(cmd_name):
            return None
        module_name, attr, _ = COMMANDS[cmd_name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # e.g. an optional dependency of that one command
            raise click.UsageError(f"the {cmd_name} command is unavailable: {exc}", ctx) from exc
        command = getattr(module, attr, None)
        return command if isinstance(command, click.Command) else None

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """click's main, with one line per usage error instead of click's three.

        click prints "Usage: ...", "Try ... for help." and "Error: ..."; here it is
        ``gradscope: error: <message> (see 'gradscope audit --help')`` and exit 2.
        """
        from gradscope.cli.stdout import StdoutError, silence_stdout, standard_streams_open

        standard_streams_open()
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SystemExit:
            # click meets EPIPE while echoing --help and calls sys.exit(1) itself,
            # after wrapping stdout in its _PacifyFlushWrapper: same contract as a report.
            if type(sys.stdout).__name__ != "_PacifyFlushWrapper":
                raise
            silence_stdout()
            _error_line("cannot write to stdout: stdout was closed by its reader (broken pipe)")
            sys.exit(2)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else (prog_name or "gradscope")
            _error_line(f"{exc.format_message()} (see '{command} --help')")
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _error_line(exc.format_message())
            sys.exit(exc.exit_code)
        except click.Abort:
            _error_line("interrupted")
            sys.exit(130)
        except (OSError, StdoutError) as exc:  # --help or --version to a stdout that cannot take it
            silence_stdout()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            _error_line(reason if isinstance(exc, StdoutError) else f"cannot write to stdout: {reason}")
            sys.exit(2)
        sys.exit(code if isinstance(code, int) else 0)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The stored one-liners, so listing commands imports none of them.
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _error_line(message: str) -> None:
    from gradscope.render.sanitize import clean_text

    click.echo(f"gradscope: error: {' '.join(clean_text(message).split())}", err=True)


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from gradscope.cli.stdout import emit
    from gradscope.version import version

    emit(f"gradscope {version()}\n")
    ctx.exit(0)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks and warnings.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """gradscope: per-layer gradient health for PyTorch, with the fix.

    Exit codes: 0 healthy (nothing at or above --fail-on), 1 findings at or
    above --fail-on, 2 usage, load or input error, 130/143 interrupted by
    SIGINT/SIGTERM (no partial output is left).

    Start with:  gradscope demo
    """
    ctx.ensure_object(App).debug = ctx.ensure_object(App).debug or debug


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point (``gradscope = "gradscope.cli:main"``)."""
    return cli.main(args=argv, prog_name="gradscope")


__all__ = ["cli", "main"]
