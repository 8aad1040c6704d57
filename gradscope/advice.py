"""The formulas behind gradscope's fixes: init scales, init snippets, loss scale, clipping.

Pure functions of numbers (and of host-side ``Stats``), so that the diagnosis,
the fixer and the renderers agree on every value they show.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from gradscope.diagnose import thresholds as th
from gradscope.formats import get_format
from gradscope.stats import Stats

ROOT = "model"  # the variable name the snippets assume for the user's model

# -- init scales --------------------------------------------------------------


def xavier_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    """Glorot & Bengio 2010: ``gain * sqrt(2 / (fan_in + fan_out))``.

    The compromise between the forward condition ``n_in·Var[w] = 1`` and the
    backward one ``n_out·Var[w] = 1``.

    Example:
        >>> round(xavier_std(100, 100), 4)
        0.1
    """
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def kaiming_gain(nonlinearity: str = "relu", negative_slope: float = 0.01) -> float:
    """He et al. 2015's gain, as ``torch.nn.init.calculate_gain`` defines it.

    ReLU zeroes half of a symmetric input, so ``sqrt(2)``; a leaky ReLU of slope
    ``a`` keeps ``(1 + a^2)/2`` of the second moment, so ``sqrt(2 / (1 + a^2))``.
    """
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1.0 + negative_slope**2))
    return 1.0


def kaiming_std(fan_in: int, gain: float = math.sqrt(2.0)) -> float:
    """He et al. 2015: ``gain / sqrt(fan_in)`` (fan_in mode keeps the forward variance).

    Example:
        >>> round(kaiming_std(200), 4)
        0.1
    """
    return gain / math.sqrt(fan_in)


def activation_factor(kind: str, negative_slope: float = 0.01) -> float | None:
    """``E[act(y)^2] / E[y^2]`` for a zero-mean symmetric ``y``, where theory gives it.

    ReLU keeps half of the second moment (He et al. 2015, eq. 7), a leaky ReLU
    ``(1 + a^2)/2``, the identity all of it.  Other activations (tanh, sigmoid,
    GELU...) depend on the input's scale: None, meaning "measure it".
    """
    if kind == "relu":
        return th.RELU_FACTOR
    if kind == "leaky_relu":
        return (1.0 + negative_slope**2) / 2.0
    if kind == "identity":
        return 1.0
    return None


def predicted_gain(fan_in: int, weight_var: float, factor: float) -> float:
    """The per-layer variance gain an init predicts: ``n_in · Var[w] · factor``."""
    return fan_in * weight_var * factor


# -- snippets ---------------------------------------------------------------------

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def module_expression(qualname: str, root: str = ROOT) -> str:
    """The Python expression reaching a submodule from the model variable.

    Example:
        >>> module_expression("blocks.3.fc")
        'model.blocks[3].fc'
        >>> module_expression("model")
        'model'
    """
    if qualname in ("", ROOT):
        return root
    parts = qualname.split(".")
    if not all(p.isdigit() or _IDENTIFIER.match(p) for p in parts):
        return f"{root}.get_submodule({qualname!r})"
    expr = root
    for part in parts:
        expr += f"[{part}]" if part.isdigit() else f".{part}"
    return expr


def init_code(
    layer: str,
    scheme: str,
    *,
    nonlinearity: str = "relu",
    negative_slope: float = 0.01,
    weight: str = "weight",
    bias: bool = False,
    root: str = ROOT,
) -> str:
    """The ``torch.nn.init`` call that gives ``layer`` the init ``scheme``.

    Args:
        layer: the module's qualified name (``blocks.3.fc``; a call-site suffix
            such as ``#2`` is dropped).
        scheme: "kaiming" or "xavier".
        nonlinearity: the activation after the layer, for Kaiming ("relu" or
            "leaky_relu"; anything else is initialised as "linear").
        negative_slope: the leaky ReLU's slope.
        weight: the parameter's name.
        bias: also zero the bias (He et al. 2015 start biases at 0).

    Example:
        >>> init_code("blocks.3.fc", "kaiming")
        'nn.init.kaiming_normal_(model.blocks[3].fc.weight, nonlinearity="relu")'
        >>> init_code("head", "xavier", bias=True)
        'nn.init.xavier_normal_(model.head.weight)\\nnn.init.zeros_(model.head.bias)'
    """
    target = module_expression(layer.split("#")[0], root)
    if scheme == "kaiming":
        if nonlinearity == "leaky_relu":
            line = f'nn.init.kaiming_normal_({target}.{weight}, a={negative_slope:g}, nonlinearity="leaky_relu")'
        elif nonlinearity == "relu":
            line = f'nn.init.kaiming_normal_({target}.{weight}, nonlinearity="relu")'
        else:
            line = f'nn.init.kaiming_normal_({target}.{weight}, nonlinearity="linear")'
    elif scheme == "xavier":
        line = f"nn.init.xavier_normal_({target}.{weight})"
    else:
        raise ValueError(f"no per-layer init snippet for scheme {scheme!r}; use 'kaiming' or 'xavier'")
    if bias:
        line += f"\nnn.init.zeros_({target}.bias)"
    return line


def swap_activation_code(old: str, new: str = "ReLU") -> str:
    """A pasteable snippet replacing every ``nn.<old>`` module of the model by ``nn.<new>``,
    followed by the init that suits the new activation."""
    return (
        "import torch.nn as nn\n"
        "from gradscope.fix import apply_init\n\n"
        "def swap(module: nn.Module) -> None:\n"
        f"    # replace every nn.{old} by nn.{new}, in place\n"
        "    for name, child in module.named_children():\n"
        f"        if isinstance(child, nn.{old}):\n"
        f"            setattr(module, name, nn.{new}())\n"
        "        else:\n"
        "            swap(child)\n\n"
        "swap(model)\n"
        'apply_init(model, scheme="auto")  # Kaiming for the ReLU layers'
    )


# -- loss scale ---------------------------------------------------------------------


def _finite_nonzero(stats: Stats) -> int:
    return stats.count_exponents()


def loss_scale_from_stats(stats: Iterable[Stats], fmt: str = "fp16") -> dict[str, Any] | None:
    """The loss scale ``2^k`` that suits the observed gradients in format ``fmt``.

    Every gradient is multiplied by the loss scale, which shifts each value's
    binade by ``k``.  From the exponent histograms: ``k_max`` is the largest
    ``k`` with ``absmax · 2^k <= max`` (no overflow); shifting up only moves
    mass out of the flush-to-zero and subnormal binades, so the largest safe
    ``k`` brings the most mass into the normal range.  We keep one binade of
    headroom below ``k_max`` for the next batch, and compare with
    ``torch.amp.GradScaler``'s default start of ``2^16``.

    Returns None when there is no finite non-zero gradient value.
    """
    items = [s for s in stats if s is not None and s.count > 0]
    if not items:
        return None
    merged = Stats.merged(items)
    total = _finite_nonzero(merged)
    if total == 0:
        return None
    form = get_format(fmt)
    counts = merged.binade_counts()
    top = max(counts)
    # absmax is exact when finite; otherwise bound by the top finite binade.
    absmax = merged.absmax if math.isfinite(merged.absmax) else 2.0 ** (top + 1)
    k_max = math.floor(math.log2(form.max / absmax)) if absmax > 0 else 0
    k = k_max - th.LOSS_SCALE_HEADROOM_BINADES

    def fractions(shift: int) -> dict[str, float]:
        over = merged.count_exponents(lo=form.max_exponent + 1 - shift)
        normal = merged.count_exponents(lo=form.normal_exponent - shift, hi=form.max_exponent - shift)
        flushed = merged.count_exponents(hi=form.subnormal_exponent - 2 - shift)
        return {"overflow_frac": over / total, "normal_frac": normal / total, "flushed_frac": flushed / total}

    chosen, default, unscaled = fractions(k), fractions(th.GRADSCALER_DEFAULT_EXPONENT), fractions(0)
    default_overflows = absmax * 2.0**th.GRADSCALER_DEFAULT_EXPONENT > form.max or default["overflow_frac"] > 0
    if default_overflows:
        comparison = (
            f"GradScaler's default 2^{th.GRADSCALER_DEFAULT_EXPONENT} overflows: it would skip steps and halve down"
        )
    elif default["flushed_frac"] > 0.001:
        comparison = (
            f"GradScaler's default 2^{th.GRADSCALER_DEFAULT_EXPONENT} is safe but leaves "
            f"{default['flushed_frac']:.1%} of the gradient values flushed to zero"
        )
    else:
        comparison = f"GradScaler's default 2^{th.GRADSCALER_DEFAULT_EXPONENT} is safe and flushes almost nothing"
    return {
        "format": fmt,
        "exponent": k,
        "scale": 2.0**k,
        "max_exponent_no_overflow": k_max,
        "gradient_absmax": absmax,
        "normal_frac": chosen["normal_frac"],
        "flushed_frac": chosen["flushed_frac"],
        "unscaled_flushed_frac": unscaled["flushed_frac"],
        "unscaled_normal_frac": unscaled["normal_frac"],
        "default_exponent": th.GRADSCALER_DEFAULT_EXPONENT,
        "default_overflows": default_overflows,
        "default_normal_frac": default["normal_frac"],
        "default_flushed_frac": default["flushed_frac"],
        "comparison": comparison,
        "method": (
            f"largest k with gradient absmax {absmax:.3g} x 2^k <= {fmt} max {form.max:g} is {k_max}; "
            f"minus {th.LOSS_SCALE_HEADROOM_BINADES} binade of headroom for the next batch"
        ),
        "code": f'scaler = torch.amp.GradScaler("cuda", init_scale=2.0**{k})',
    }


# -- clipping -------------------------------------------------------------------------

# What an audit says about clipping: one pass gives one norm, which is no
# distribution to take a threshold from.  The course's typical threshold is 5;
# gradscope.watch derives one from the run's norms (AutoClip).
CLIP_PLACEHOLDER_CODE = (
    "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.0)  "
    "# the course's typical threshold; gradscope.watch derives one from your run's norms"
)


def global_grad_norm(weight_grads: Iterable[Stats], steps: int = 1) -> float | None:
    """The global gradient norm per step, from merged per-parameter statistics.

    ``count · E[g^2]`` summed over parameters is the squared norm summed over
    the merged steps; divided by ``steps`` it is the mean squared norm per step.
    """
    total = 0.0
    seen = False
    for s in weight_grads:
        if s is None or s.count == 0 or not s.moments_valid:
            continue
        total += s.count * s.rms**2
        seen = True
    if not seen:
        return None
    return math.sqrt(total / max(steps, 1))


def clip_threshold(norms: Sequence[float]) -> dict[str, Any] | None:
    """A global-norm clipping threshold from observed gradient norms, and how it was chosen.

    With a history (at least ``AUTOCLIP_MIN_HISTORY`` norms) it is AutoClip's
    rule (Seetharaman et al. 2020): the 10th percentile of all observed norms.
    With fewer, there is no distribution to take a percentile of: twice the
    median observed norm, so that ordinary steps pass and spikes are cut.

    Example:
        >>> clip_threshold([3.0])["threshold"]
        6.0
    """
    finite = sorted(n for n in norms if math.isfinite(n) and n > 0)
    if not finite:
        return None
    if len(finite) >= th.AUTOCLIP_MIN_HISTORY:
        rank = (len(finite) - 1) * th.AUTOCLIP_PERCENTILE / 100.0
        lo, hi = math.floor(rank), math.ceil(rank)
        value = finite[lo] + (finite[hi] - finite[lo]) * (rank - lo)
        method = (
            f"AutoClip (Seetharaman et al. 2020): {th.AUTOCLIP_PERCENTILE:g}th percentile "
            f"of {len(finite)} observed global gradient norms"
        )
    else:
        median = statistics.median(finite)
        value = th.CLIP_FEW_NORMS_FACTOR * median
        method = (
            f"{th.CLIP_FEW_NORMS_FACTOR:g} x the median of {len(finite)} observed global gradient norm(s) "
            f"({median:.3g}); too few for AutoClip's percentile, re-derive it from a training run "
            "with gradscope.watch"
        )
    value = float(f"{value:.3g}")
    return {
        "threshold": value,
        "method": method,
        "norms_observed": len(finite),
        "median_norm": statistics.median(finite),
        "code": f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={value:g})",
    }
