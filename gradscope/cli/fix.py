"""``gradscope fix MODEL --scheme ... --out FILE``: re-initialise, re-audit, save the state_dict."""

from __future__ import annotations

from typing import Any

import click

from gradscope.cli.app import FAIL_ON, MODEL_OUT_OF_MEMORY, debug_option, exit_code, get_app
from gradscope.cli.isolation import check_not_interrupted
from gradscope.cli.options import InputChoice, input_options, model_options
from gradscope.render.sanitize import clean_text

SCHEMES = ("auto", "kaiming", "xavier", "lsuv", "recurrent")


@click.command()
@model_options
@input_options
@click.option(
    "--scheme",
    type=click.Choice(SCHEMES),
    default="auto",
    show_default=True,
    help="auto picks Kaiming after ReLU-family layers, Xavier otherwise; lsuv rescales layer by layer "
    "on the inputs (Mishkin & Matas 2016).",
)
@click.option(
    "--out",
    "out",
    required=True,
    metavar="FILE",
    help="Where to write the fixed weights (.safetensors -> safetensors, else torch.save); never MODEL itself. "
    "A checkpoint keeps every other entry (epoch, optimizer, ...).",
)
@click.option(
    "--fail-on",
    type=click.Choice(FAIL_ON),
    default="never",
    show_default=True,
    help="Exit 1 when the re-audit still has a finding at or above this severity.",
)
@debug_option
def fix(
    model: str, arch: str | None, trust_code: bool, scheme: str, out: str, fail_on: str, **input_values: Any
) -> None:
    """Re-initialise MODEL's weights, re-audit, and write the fixed state_dict to --out.

    Prints what changed (layer, scheme, weight std before and after) and the
    findings before and after.  A checkpoint MODEL comes out as the same
    checkpoint with the changed weights replaced (epoch, optimizer state and
    every other entry kept); a factory gives its state_dict.  Load it as you
    loaded MODEL, or pass it back with --arch.  --out appears only once
    everything succeeded.
    """
    app = get_app()
    choice = InputChoice.from_command(input_values)
    with app.guard(subject=model, out_of_memory=MODEL_OUT_OF_MEMORY):
        from gradscope.cli.paths import check_model_inputs, plan_outputs
        from gradscope.cli.staging import Staging

        # Every path and the input size are checked before any model code runs;
        # --out may never be MODEL, the --arch file or --inputs.
        sources = check_model_inputs(model, arch, choice.inputs_file)
        target = plan_outputs(sources, {"--out": out}).files["--out"]
        choice.check_before_loading()
        with Staging(before_commit=check_not_interrupted) as staging:
            from gradscope.cli.checkpoint import save_fixed
            from gradscope.errors import InputError
            from gradscope.fix import apply_init
            from gradscope.loaders import audit_loaded, load_model
            from gradscope.loaders.factory import seeded

            inputs, kwargs = choice.audit_kwargs()
            loaded = load_model(model, arch=arch, trust_code=trust_code, seed=choice.seed)
            if not loaded.hookable or loaded.format in ("torchscript", "export"):
                raise InputError(
                    f"fix needs the Python model; {loaded.format} files cannot be re-initialised here "
                    "(pass file.py:factory, or a state_dict with --arch)"
                )
            before = audit_loaded(loaded, inputs, **kwargs)
            choice.check_applied(before.run)
            # The new weights are drawn from torch's global generator (nn.init); --seed fixes
            # them as it fixes the factory, so the same file and seed give the same --out.
            with seeded(choice.seed):
                changes = apply_init(loaded.module, scheme=scheme, inputs=inputs, **kwargs)
            after = audit_loaded(loaded, inputs, **kwargs)
            with staging.writing(target, also=(RuntimeError,)):  # torch.save reports a full disk as RuntimeError
                saved = save_fixed(loaded, model, staging.file(target), target, trusted=trust_code)
            staging.commit()
        lines = _summary(scheme, changes, before, after) + [f"wrote {out} ({saved})"]
    app.emit(clean_text("\n".join(lines)) + "\n")
    raise click.exceptions.Exit(exit_code(after, fail_on))


def _field(change: Any, *names: str) -> Any:
    for name in names:
        if isinstance(change, dict) and name in change:
            return change[name]
        if hasattr(change, name):
            return getattr(change, name)
    return None


def _std(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "?"


def _verdict(report: Any) -> str:
    s = report.summary()
    codes = ", ".join(sorted(report.codes()))
    text = f"{s['errors']} errors, {s['warnings']} warnings, {s['infos']} infos"
    return (
        text + (f" ({codes})" if codes else "") + ({True: " - healthy", None: " - inconclusive"}.get(s["healthy"], ""))
    )


def _summary(scheme: str, changes: list[Any], before: Any, after: Any) -> list[str]:
    lines = [f"gradscope fix: scheme {scheme}, {len(changes)} layer(s) re-initialised"]
    rows = [
        (
            str(_field(c, "layer", "name")),
            str(_field(c, "scheme")),
            _std(_field(c, "old_std", "std_before")),
            _std(_field(c, "new_std", "std_after")),
        )
        for c in changes
    ]
    if rows:
        width = max(5, *(len(r[0]) for r in rows))
        named = max(8, *(len(r[1]) for r in rows))  # "recurrent" is longer than the rest
        lines.append(f"  {'layer':<{width}}  {'scheme':<{named}}  weight std before -> after")
        lines += [f"  {r[0]:<{width}}  {r[1]:<{named}}  {r[2]} -> {r[3]}" for r in rows]
    lines.append(f"before: {_verdict(before)}")
    lines.append(f"after:  {_verdict(after)}")
    return lines
