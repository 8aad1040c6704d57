"""``gradscope demo [NAME]``: the built-in examples (the README's first command)."""

from __future__ import annotations

import sys

import click

from gradscope.cli.app import debug_option, get_app, terminal_width, use_color


@click.command()
@click.argument("name", required=False)
@click.option("--list", "list_only", is_flag=True, help="List the examples and exit.")
@click.option("--width", type=click.IntRange(min=40), help="Width of the tables (default: the terminal's).")
@debug_option
def demo(name: str | None, list_only: bool, width: int | None) -> None:
    """Run one built-in example (or all): a broken model, its findings, the fix, the healthy re-audit.

    The exit code is the examples' own: 0 when every fix made its model healthy.
    """
    app = get_app()
    stdout = sys.stdout
    color = use_color(stdout)
    # The examples are gradscope's own code and print as they go: stdout stays stdout.
    with app.guard(isolate=False):
        from gradscope.cli.stdout import emit
        from gradscope.errors import InputError
        from gradscope.examples import EXAMPLES, run_demo

        if list_only:
            lines = [f"{key:<20} {text}" for key, text in EXAMPLES.items()]
            emit("\n".join(lines) + "\n", stdout)
            raise click.exceptions.Exit(0)
        if name is not None and name not in EXAMPLES:
            raise InputError(f"unknown example {name!r}; choose among {', '.join(EXAMPLES)}")

        def write(text: str = "") -> None:
            emit(text + "\n", stdout)

        code = run_demo(name, write=write, width=width or terminal_width(), color=color)
    raise click.exceptions.Exit(int(code or 0))
