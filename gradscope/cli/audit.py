"""``gradscope audit MODEL``: load, audit, diagnose, render; exit 0/1/2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gradscope.cli.app import (
    MODEL_OUT_OF_MEMORY,
    debug_option,
    exit_code,
    get_app,
    render_report,
    report_output_options,
    use_color,
)
from gradscope.cli.isolation import check_not_interrupted
from gradscope.cli.options import (
    InputChoice,
    audit_planned_optimizer,
    input_options,
    model_options,
    optimizer_option,
    parse_optimizer_option,
)


@click.command()
@model_options
@input_options
@report_output_options
@click.option(
    "--tensorboard",
    metavar="DIR",
    help="Also write the audit as a TensorBoard run in DIR: a new (or empty) directory, never an existing run.",
)
@optimizer_option
@debug_option
def audit(
    model: str,
    arch: str | None,
    trust_code: bool,
    fmt: str,
    output: str | None,
    tensorboard: str | None,
    optimizer: str | None,
    fail_on: str,
    width: int | None,
    **input_values: object,
) -> None:
    """Audit MODEL: one (or --batches) forward+backward pass, per-layer statistics, findings and fixes.

    \b
    MODEL is one of:
      path/to/file.py:factory      a callable returning an nn.Module (or a module attribute)
      package.module:factory       the same, importable (the working directory is searched)
      model.pt2                    a torch.export archive (torch.export.save)
      weights.pt --arch SPEC       a state_dict or checkpoint (torch.save(model.state_dict()))
      weights.safetensors --arch SPEC
      model.ts --trust-code        a TorchScript file (a program: runs its code)
      model.pt --trust-code        a fully pickled module (runs the pickle's code)
    The format is read from the file's content, not its extension. Files that
    are data load with no flag; files that are code (pickled modules,
    TorchScript, .pt2 parts needing full unpickling or non-tensor operators)
    are refused before any of it runs unless --trust-code (alias
    --trust-pickle) is given. --seed also seeds the factory's random init.

    \b
    Examples:
      gradscope audit model.py:build --input-shape 32,784
      gradscope audit model.pt2 --format json > report.json
      gradscope audit model.py:build --format html -o report.html
      gradscope audit weights.safetensors --arch model.py:build --fail-on warning
      gradscope audit model.py:build --optimizer "adamw:lr=1e-3,weight_decay=0.01"

    Exit codes: 0 nothing at or above --fail-on, 1 findings at or above it,
    2 usage, load or input error (one line on stderr; --debug for the traceback),
    130/143 interrupted by SIGINT/SIGTERM.  Outputs (--output, --tensorboard)
    appear only once everything succeeded.
    """
    app = get_app()
    choice = InputChoice.from_command(input_values)
    color = fmt == "table" and not output and use_color()
    with app.guard(subject=model, out_of_memory=MODEL_OUT_OF_MEMORY):
        from gradscope.cli.paths import check_model_inputs, plan_outputs
        from gradscope.cli.staging import Staging

        # Every path and the input size are checked before any model code runs.
        sources = check_model_inputs(model, arch, choice.inputs_file)
        plan = plan_outputs(sources, {"--output": output}, {"--tensorboard": tensorboard})
        choice.check_before_loading()
        planned = parse_optimizer_option(optimizer)  # a bad --optimizer SPEC fails before any model code runs
        with Staging(before_commit=check_not_interrupted) as staging:
            from gradscope.loaders import audit_loaded, load_model

            inputs, kwargs = choice.audit_kwargs()
            loaded = load_model(model, arch=arch, trust_code=trust_code, seed=choice.seed)
            report = audit_loaded(loaded, inputs, **kwargs)
            choice.check_applied(report.run)
            if planned is not None:
                audit_planned_optimizer(report, loaded.module, planned)
            text = render_report(report, fmt, width=width, color=color)
            if tensorboard:
                run_dir = plan.directories["--tensorboard"]
                with staging.writing(run_dir):
                    _write_tensorboard(report, staging.directory(run_dir))
            if output:
                staging.write_text(plan.files["--output"], text)
            staging.commit()
    if output:
        app.info(f"report written to {output}")
    else:
        app.emit(text)
    raise click.exceptions.Exit(exit_code(report, fail_on))


def _write_tensorboard(report: Any, logdir: Path) -> None:
    from gradscope.errors import InputError

    try:
        from gradscope.tensorboard import write_audit
    except ImportError as exc:
        raise InputError(f"--tensorboard is unavailable: {exc}") from exc
    write_audit(report, logdir)
