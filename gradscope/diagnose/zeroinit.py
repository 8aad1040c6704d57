"""zero-init: a layer or gain that is zero by design, said as information.

A zero-initialised classifier head (torchvision's ViT), the last layer of a
residual branch (Fixup, Zhang et al. 2019) or a zero residual gain (ReZero,
Bachlechner et al. 2020; SkipInit, De & Smith 2020) makes ∂ℓ/∂h below it
exactly zero at step 0.  The first update moves the zero parameter (its own
gradient is not zero), and from then on the gradient reaches the layers
below.  The depth rules leave those exact zeros out (see ``structure.py``);
this rule says why, so that nobody reads the silence as health or the zeros
as vanishing.
"""

from __future__ import annotations

from gradscope.diagnose.layers import Context
from gradscope.report import Finding, Fix, Severity


def _quoted(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def rule_zero_init(ctx: Context) -> list[Finding]:
    """One info naming the zero-initialised layers/gains and the layers they silence."""
    from gradscope.diagnose.depth import structure

    found = structure(ctx)
    if not found.zero_init:
        return []
    silenced = [
        x.name
        for x in ctx.parametrised()
        if (g := x.gradient) is not None and g.count > 0 and g.moments_valid and g.rms == 0.0
    ]
    if not silenced:
        return []  # a zero table or bias that silences nothing (Swin's relative position bias): nothing to say
    what = found.zero_layers + found.zero_parameters
    subject = _quoted(what)
    verb = "is" if len(what) == 1 else "are"
    effect = (
        f"so ∂ℓ/∂h of {len(silenced)} parametrised layer(s) below it ({_quoted(silenced)}) is exactly zero "
        "at step 0; the gradient reaches them after the first update moves the zeros."
    )
    # A layer's own name may be a parameter path (ReZero's 'blocks.0.alpha'): layers lists recorded layers only.
    layers = [name for name in found.zero_layers if name in ctx.by_name] or silenced[:1]
    return [
        Finding(
            code="zero-init",
            severity=Severity.INFO,
            layers=layers,
            message=f"{subject} {verb} zero-initialised by design, {effect}",
            evidence={
                "zero_layers": list(found.zero_layers),
                "zero_parameters": list(found.zero_parameters),
                "silenced_layers": silenced,
            },
            fix=Fix(
                "Nothing to change: a zero-initialised head or residual branch is a deliberate choice "
                "(torchvision's ViT, Fixup, ReZero, SkipInit).",
                "",
            ),
        )
    ]
