"""``gradscope fix MODEL --scheme ... --out FILE``: re-initialise, re-audit, save the state_dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gradscope.cli.app import FAIL_ON, debug_option, exit_code, get_app, write_atomic
from gradscope.cli.options import InputChoice, input_options, model_options

SCHEMES = ("auto", "kaiming", "xavier", "lsuv")


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
    help="Where to write the fixed state_dict (.safetensors -> safetensors, else torch.save).",
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
    model: str, arch: str | None, trust_pickle: bool, scheme: str, out: str, fail_on: str, **input_values: Any
) -> None:
    """Re-initialise MODEL's weights, re-audit, and write the fixed state_dict to --out.

    Prints what changed (layer, scheme, weight std before and after) and the
    findings before and after.  Load the result with
    model.load_state_dict(torch.load(FILE)) or pass it back with --arch.
    """
    app = get_app()
    choice = InputChoice(**input_values)
    with app.guard():
        from gradscope.errors import InputError
        from gradscope.fix import apply_init
        from gradscope.loaders import audit_loaded, load_model

        inputs, kwargs = choice.audit_kwargs()
        loaded = load_model(model, arch=arch, trust_pickle=trust_pickle)
        if not loaded.hookable or loaded.format in ("torchscript", "export"):
            raise InputError(
                f"fix needs the Python model; {loaded.format} files cannot be re-initialised here "
                "(pass file.py:factory, or a state_dict with --arch)"
            )
        before = audit_loaded(loaded, inputs, **kwargs)
        changes = apply_init(loaded.module, scheme=scheme, inputs=inputs, **kwargs)
        after = audit_loaded(loaded, inputs, **kwargs)
        saved = _save_state_dict(loaded.module, out)
        lines = _summary(scheme, changes, before, after) + [f"wrote {out} ({saved})"]
    click.echo("\n".join(lines))
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
        lines.append(f"  {'layer':<{width}}  {'scheme':<8}  weight std before -> after")
        lines += [f"  {r[0]:<{width}}  {r[1]:<8}  {r[2]} -> {r[3]}" for r in rows]
    lines.append(f"before: {_verdict(before)}")
    lines.append(f"after:  {_verdict(after)}")
    return lines


def _save_state_dict(module: Any, out: str) -> str:
    """Write ``module.state_dict()`` atomically; safetensors for a .safetensors name."""
    import torch

    from gradscope.errors import InputError

    state = module.state_dict()
    if Path(out).suffix == ".safetensors":
        try:
            from safetensors.torch import save_model
        except ImportError:
            raise InputError(
                "writing .safetensors needs the safetensors package: pip install "
                "'gradscope[safetensors]' (or use a .pt name)"
            ) from None
        write_atomic(out, lambda tmp: save_model(module, str(tmp)))
        return f"safetensors, {len(state)} tensors"
    write_atomic(out, lambda tmp: torch.save(state, tmp))
    return f"state_dict via torch.save, {len(state)} tensors"
