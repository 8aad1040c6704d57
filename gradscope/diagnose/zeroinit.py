"""Zero gradients: a zero parameter that recovers (by design), one that never
does, and a layer whose weight gradient is structurally zero.

A zero-initialised classifier head (torchvision's ViT), the last layer of a
residual branch (Fixup, Zhang et al. 2019) or a zero residual gain (ReZero,
Bachlechner et al. 2020; SkipInit, De & Smith 2020) makes ∂ℓ/∂h below it
exactly zero at step 0.  The first update moves the zero parameter (its own
gradient is not zero), and from then on the gradient reaches the layers
below.  The depth rules leave those exact zeros out (see ``structure.py``);
this rule says why, so that nobody reads the silence as health or the zeros
as vanishing.

Not every zero recovers: the first update moves the zero parameter only if its
own gradient is not zero.  A zero RMSNorm gain in front of a SwiGLU MLP feeds
it zeros (silu(0)·up(0) = 0: every gradient of the MLP and of the gain is 0);
a zero Linear before a ReLU gets relu'(0) = 0 from PyTorch.  Such a parameter
sits at a stationary point: ∂ℓ/∂w = 0 for it and for every layer it silences,
and no optimizer moves a parameter whose gradient is zero (SGD and Adam step in
proportion to it, weight decay scales the zero).  That is an error.

A layer whose weight gradient is not exactly zero but a million times below its
neighbours' is the rounding of a structural zero (a top-1 router renormalised to
weight 1: the loss does not depend on its logits): it never learns either.
"""

from __future__ import annotations

import math

from gradscope import advice
from gradscope.diagnose import thresholds as th
from gradscope.diagnose.layers import NORM_TYPES, Context
from gradscope.diagnose.structure import Structure, gain_like
from gradscope.record import LayerRecord
from gradscope.report import Finding, Fix, Severity
from gradscope.stats import Stats


def _quoted(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _exactly_zero(stats: Stats | None) -> bool:
    """Recorded, finite, and every value exactly 0."""
    return stats is not None and stats.count > 0 and stats.nonfinite_count == 0 and stats.absmax == 0.0


def rule_zero_init(ctx: Context) -> list[Finding]:
    """Zero parameters (permanent: an error; by design: an info) and structurally zero weight gradients."""
    return _zero_parameters(ctx) + _structural_zero(ctx)


def _zero_parameters(ctx: Context) -> list[Finding]:
    """One error for the zero layers whose own weight gradient is zero too, one info for the others."""
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
    # A zero layer whose own weight gradient was not recorded (a JSON record without
    # it) keeps the benefit of the doubt: by design.
    permanent = [name for name in found.zero_layers if _exactly_zero(ctx.by_name[name].weight_grad)]
    findings = [_permanent_zero(ctx, permanent, silenced)] if permanent else []
    if found.zero_parameters or len(permanent) < len(found.zero_layers):
        findings.append(_by_design(ctx, found, permanent, silenced))
    return findings


def _by_design(ctx: Context, found: Structure, permanent: list[str], silenced: list[str]) -> Finding:
    """The info: zero by design, the gradient reaches the silenced layers after the first update."""
    what = [n for n in found.zero_layers if n not in permanent] + found.zero_parameters
    subject = _quoted(what)
    verb = "is" if len(what) == 1 else "are"
    effect = (
        f"so ∂ℓ/∂h of {len(silenced)} parametrised layer(s) below it ({_quoted(silenced)}) is exactly zero "
        "at step 0; the gradient reaches them after the first update moves the zeros."
    )
    # A layer's own name may be a parameter path (ReZero's 'blocks.0.alpha'): layers lists recorded layers only.
    layers = [name for name in what if name in ctx.by_name] or silenced[:1]
    return Finding(
        code="zero-init",
        severity=Severity.INFO,
        layers=layers,
        message=f"{subject} {verb} zero-initialised by design, {effect}",
        evidence={
            "zero_layers": [n for n in found.zero_layers if n not in permanent],
            "zero_parameters": list(found.zero_parameters),
            "silenced_layers": silenced,
        },
        fix=Fix(
            "Nothing to change: a zero-initialised head or residual branch is a deliberate choice "
            "(torchvision's ViT, Fixup, ReZero, SkipInit).",
            "",
        ),
    )


def _without_weight_gradient(ctx: Context) -> list[str]:
    """Parametrised layers whose ∂ℓ/∂h or weight gradient is exactly zero: they do not learn."""
    return [x.name for x in ctx.parametrised() if _exactly_zero(x.gradient) or _exactly_zero(x.weight_grad)]


def _permanent_zero(ctx: Context, permanent: list[str], silenced: list[str]) -> Finding:
    """The error: zero layers whose own weight gradient is zero never leave zero."""
    dead = [n for n in dict.fromkeys(silenced + _without_weight_gradient(ctx)) if n not in permanent]
    dead.sort(key=lambda n: ctx.position[n])
    one = len(permanent) == 1
    own = "is its own weight gradient" if one else "are their own weight gradients"
    message = (
        f"{_quoted(permanent)} {'is' if one else 'are'} all zeros and so {own}: "
        "a zero parameter with a zero gradient is a stationary point that no update leaves "
        "(SGD and Adam step in proportion to the gradient, weight decay scales the zero)"
    )
    if dead:
        message += (
            f", so {len(dead)} parametrised layer(s) {'it silences' if one else 'they silence'} ({_quoted(dead)}) "
            "never get a weight gradient either"
        )
    message += "; this is not a zero-init by design, training never recovers from it."
    layers = [ctx.by_name[n] for n in permanent]
    lines = ["import math", "import torch.nn as nn", ""] + [_reinit_line(ctx, x) for x in layers]
    return Finding(
        code="vanishing-gradient",
        severity=Severity.ERROR,
        layers=permanent + dead,
        message=message,
        evidence={
            "zero_layers": permanent,
            "zero_layer_weight_grad_absmax": 0.0,
            "silenced_layers": dead,
            "permanent": True,
        },
        fix=Fix(_reinit_summary(layers), "\n".join(lines)),
    )


def _is_gain(layer: LayerRecord) -> bool:
    """A normalisation's gain or another per-channel scale: it starts at 1."""
    return layer.type in NORM_TYPES or gain_like(layer.weight_shape or [])


def _reinit_summary(layers: list[LayerRecord]) -> str:
    gains = [x.name for x in layers if _is_gain(x)]
    others = [x.name for x in layers if not _is_gain(x)]
    parts = ([f"initialise the gain(s) {_quoted(gains)} at 1"] if gains else []) + (
        [f"initialise {_quoted(others)} with the layer's standard init"] if others else []
    )
    text = " and ".join(parts)
    return (
        text[0].upper() + text[1:] + " (zero-initialise only what has a gradient of its own at zero: the last "
        "layer of a residual branch or a head, a residual gain)."
    )


def _reinit_line(ctx: Context, layer: LayerRecord) -> str:
    """The init call that moves a zero layer off its stationary point."""
    target = advice.module_expression(layer.module)
    weight = f"{target}.{layer.weight_name or 'weight'}"
    if _is_gain(layer):
        return f"nn.init.ones_({weight})  # a gain starts at 1: the layer passes its normalised input on"
    if callable(getattr(ctx.module_of(layer), "reset_parameters", None)):
        return f"{target}.reset_parameters()  # the layer's standard init"
    fan_in = layer.fan_in or 1
    # LeCun et al. 1998: std 1/sqrt(fan_in) keeps the output's variance at the input's.
    return f"nn.init.normal_({weight}, std=1 / math.sqrt({fan_in}))  # LeCun init"


# -- a weight gradient that is zero but for rounding ---------------------------------------------


def _weight_grad_rms(layer: LayerRecord) -> float | None:
    """The RMS of the layer's weight gradient, when recorded, finite and first call site."""
    g = layer.weight_grad
    if layer.call != 1 or g is None or g.count == 0 or not g.moments_valid or g.nonfinite_count > 0:
        return None
    return g.rms if math.isfinite(g.rms) else None


def _learning_neighbours(rows: list[tuple[LayerRecord, float]], i: int) -> list[tuple[LayerRecord, float]]:
    """The closest layers before and after row ``i`` whose weight gradient is not zero."""
    before = next(((x, r) for x, r in reversed(rows[:i]) if r > 0), None)
    after = next(((x, r) for x, r in rows[i + 1 :] if r > 0), None)
    return [t for t in (before, after) if t is not None]


def _structural_zero(ctx: Context) -> list[Finding]:
    """A weight gradient STRUCTURAL_ZERO_RATIO or more below both learning neighbours'.

    Audits only: in training the layer-scale gains (1e-6 at init, whose branch's
    gradients are that small by design) are not read from the model, so they
    could not be told from a structural zero.
    """
    if ctx.during_training:
        return []
    from gradscope.diagnose.depth import structure

    found = structure(ctx)
    rows = [(x, r) for x in ctx.layers if (r := _weight_grad_rms(x)) is not None]
    hits: list[tuple[LayerRecord, float, list[tuple[LayerRecord, float]]]] = []
    for i, (layer, rms) in enumerate(rows):
        if rms == 0.0:
            # Exact zeros are the zero-init and dead-unit findings' (a zero layer, a dead
            # ReLU), or the audit input's: attention over one position (sequence length 1)
            # gives query and key p(1 - p) = 0 exactly, which longer inputs do not.
            continue
        if found.in_scaled_branch(layer):
            continue  # a layer-scaled branch is small by design
        around = _learning_neighbours(rows, i)
        if around and rms < th.STRUCTURAL_ZERO_RATIO * min(r for _, r in around) and _output_cut(layer, around):
            hits.append((layer, rms, around))
    return [_structural_finding(ctx, hits)] if hits else []


def _output_cut(layer: LayerRecord, around: list[tuple[LayerRecord, float]]) -> bool:
    """Whether the loss itself is cut from the layer's output: its ∂ℓ/∂h is as far below
    the neighbours' as its weight gradient.  A weight gradient is ∂ℓ/∂h times the
    layer's input, so a tiny input (a layer before it scaled by 1e-8, an eval-mode
    signal that vanished) makes it tiny with ∂ℓ/∂h intact: the layer learns, slowly,
    and the rule that judges the input's scale names it (field sweep: an MLP with
    its first layer at 1e-8 was told its second was "zero by construction").
    Unknown ∂ℓ/∂h: not claimed."""
    own = layer.gradient
    theirs = [x.gradient.rms for x, _ in around if x.gradient is not None and x.gradient.moments_valid]
    if own is None or not own.moments_valid or not theirs or min(theirs) <= 0:
        return False
    return own.rms < th.STRUCTURAL_ZERO_RATIO * min(theirs)


def _is_router(layer: LayerRecord) -> bool:
    """A mixture-of-experts router: transformers' *Router/*TopKRouter, or a module called gate/router."""
    leaf = layer.module.rpartition(".")[2].lower()
    return "router" in layer.type.lower() or leaf in ("gate", "router")


def _structural_finding(
    ctx: Context, hits: list[tuple[LayerRecord, float, list[tuple[LayerRecord, float]]]]
) -> Finding:
    layer, rms, around = min(hits, key=lambda t: t[1] / min(r for _, r in t[2]))
    ratio = rms / min(r for _, r in around)
    neighbours = ", ".join(f"'{x.name}' {r:.3g}" for x, r in around)
    names = [t[0].name for t in hits]
    more = f" ({len(hits)} layers, first '{names[0]}')" if len(hits) > 1 else ""
    message = (
        f"The weight gradient of '{layer.name}' (RMS {rms:.3g}) is {ratio:.2g} times that of the layers around it "
        f"({neighbours}){more}: below {th.STRUCTURAL_ZERO_RATIO:g}, this is the rounding of a gradient that is "
        "zero by construction, so the layer never learns while the rest of the model does."
    )
    if any(_is_router(t[0]) for t in hits):
        summary = (
            "A top-1 router whose chosen weight is renormalised to 1 gets no gradient from the loss: weight each "
            "expert's output by its router probability without renormalising (Switch Transformer, Fedus et al. "
            "2022), route to two experts or more, or add the load-balancing loss, which reaches the router."
        )
        code = (
            "# transformers' MoE models: add the router's load-balancing loss to the loss\n"
            "config.output_router_logits = True  # loss += router_aux_loss_coef x aux loss\n"
            "# or route each token to two experts:\n"
            "config.num_experts_per_tok = 2"
        )
    else:
        summary = (
            "Find what makes the loss independent of this layer's output (a normalisation that cancels it, a "
            "hard selection such as argmax or a renormalised top-1, a detach) and remove it."
        )
        code = (
            f"out = {advice.module_expression(layer.module)}(x)  # x: the layer's input\n"
            "print(torch.autograd.grad(loss, out, retain_graph=True)[0].abs().max())  # ~0: the loss ignores it"
        )
    return Finding(
        code="vanishing-gradient",
        severity=Severity.WARNING,
        layers=names,
        message=message,
        evidence={
            "worst_layer": layer.name,
            "weight_grad_rms": rms,
            "neighbour_weight_grad_rms": {x.name: r for x, r in around},
            "ratio": ratio,
            "threshold_ratio": th.STRUCTURAL_ZERO_RATIO,
            "per_layer": {t[0].name: t[1] for t in hits},
        },
        fix=Fix(summary, code),
    )
