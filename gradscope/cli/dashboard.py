"""``gradscope dashboard LOGDIR``: start TensorBoard on a gradscope run and print its URL.

TensorBoard runs in this process (its own server thread) until Ctrl-C.  The
"gradscope" dashboard is under CUSTOM SCALARS; the per-layer scalars, the
exponent histograms, the findings (TEXT) and the depth profile (IMAGES) are in
their usual tabs.
"""

from __future__ import annotations

import time

import click

from gradscope.cli.app import App


@click.command("dashboard")
@click.argument("logdir", type=click.Path(file_okay=False))
@click.option("--port", type=int, default=None, help="Port to serve on (default: the first free one from 6006).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default).")
@click.pass_context
def dashboard(ctx: click.Context, logdir: str, port: int | None, host: str) -> None:
    """Launch TensorBoard on LOGDIR (written by watch(log_dir=...) or audit --tensorboard)."""
    app = ctx.ensure_object(App)
    from gradscope.errors import InputError
    from gradscope.tensorboard import launch_dashboard

    try:
        url, _server = launch_dashboard(logdir, port=port, host=host)
    except InputError as exc:
        app.abort(str(exc))
    except Exception as exc:  # TensorBoard's own errors (port in use, ...): one line, exit 2
        app.abort(f"TensorBoard could not start: {type(exc).__name__}: {exc}")
    click.echo(f"{url}#custom_scalars", nl=True)
    click.echo("gradscope: TensorBoard is running; press Ctrl-C to stop", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
