"""``gradscope dashboard LOGDIR``: start TensorBoard on a gradscope run and print its URL.

TensorBoard runs in this process (its own server thread) until Ctrl-C.  The
"gradscope" dashboard is under CUSTOM SCALARS; the per-layer scalars, the
exponent histograms, the findings (TEXT) and the depth profile (IMAGES) are in
their usual tabs.

TensorBoard is written as a program of its own: it writes notices to stderr
(the "--load_fast" banner) and, when the address cannot be bound, werkzeug
prints the OS error and calls ``sys.exit(1)``.  Here its stderr is held while
it starts (shown with --debug) and every failure is one gradscope line, exit 2.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Iterator

import click

from gradscope.cli.app import App, debug_option


@click.command("dashboard")
@click.argument("logdir", type=click.Path(file_okay=False))
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port to serve on (default: the first free one from 6006).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default).")
@debug_option
@click.pass_context
def dashboard(ctx: click.Context, logdir: str, port: int | None, host: str) -> None:
    """Launch TensorBoard on LOGDIR (written by watch(log_dir=...) or audit --tensorboard)."""
    app = ctx.ensure_object(App)
    from gradscope.errors import InputError
    from gradscope.tensorboard import launch_dashboard

    held = io.StringIO()
    try:
        with _stderr_held(held):
            url, _server = launch_dashboard(logdir, port=port, host=host)
    except InputError as exc:
        app.abort(str(exc))
    except (Exception, SystemExit) as exc:  # TensorBoard's errors, and werkzeug's sys.exit(1) on a failed bind
        _show_held(app, held)
        where = host if port is None else f"{host}:{port}"
        app.abort(f"TensorBoard could not start on {where}: {_reason(exc, held.getvalue())}")
    _show_held(app, held)
    click.echo(f"{url}#custom_scalars", nl=True)
    if not _has_events(logdir):
        app.info(f"note: {logdir!r} holds no TensorBoard run yet; the dashboard fills in once a run writes there")
    click.echo("gradscope: TensorBoard is running; press Ctrl-C to stop", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


@contextlib.contextmanager
def _stderr_held(buffer: io.StringIO) -> Iterator[None]:
    with contextlib.redirect_stderr(buffer):
        yield


def _show_held(app: App, held: io.StringIO) -> None:
    """TensorBoard's own notices, only with --debug."""
    if app.debug and held.getvalue().strip():
        click.echo(held.getvalue().rstrip(), err=True)


def _reason(exc: BaseException, held: str) -> str:
    """The one-line reason: TensorBoard's message, or what werkzeug printed before exiting."""
    if isinstance(exc, SystemExit):
        lines = [line.strip() for line in held.splitlines() if line.strip()]
        return lines[-1] if lines else f"it exited with status {exc.code}"
    message = getattr(exc, "msg", None) or str(exc)
    return " ".join(str(message).split()) or type(exc).__name__


def _has_events(logdir: str) -> bool:
    """Whether any TensorBoard events file lies under ``logdir`` (the first one found ends the walk)."""
    for _root, _dirs, names in os.walk(logdir):
        if any("tfevents" in name for name in names):
            return True
    return False


__all__ = ["dashboard"]
