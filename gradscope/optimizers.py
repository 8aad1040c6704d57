"""What gradscope reads from the user's optimizer: its family, each layer's current
learning rate, and the constructor call that rebuilds it with another one.

Why the family matters (the expected update ratio ‖Δw‖/‖w‖ of a weight w with
n elements and learning rate η):

* SGD: Δw = -η·g, so the ratio is η·‖g‖/‖w‖ exactly; with heavy-ball momentum
  μ a steady gradient gives Δw = -η·g/(1-μ) (Polyak 1964; Sutskever et al.
  2013, eq. 1-2).  It follows the gradient: it falls as training converges.
* Adam-like (Adam, AdamW, NAdam, RAdam, Adamax, Adagrad, RMSprop, Adafactor,
  Lion...): each element moves by η·m̂/(√v̂+ε), whose size is about η at most
  (Kingma & Ba 2015, Sec. 2.1: "|Δ_t| ⪅ α"; exactly η·sign(g) at the first
  step), so ‖Δw‖ ≈ c·η·√n with c <= 1 and the ratio ≈ c·η/rms(w).  It tracks
  the learning rate and the weights' scale, not the gradient's.

Both are proportional to η: scaling the learning rate by k scales the ratio by
k, which is how a target ratio turns into a learning rate.
"""

from __future__ import annotations

import math
from typing import Any

ADAPTIVE = "adaptive"
SGD_LIKE = "sgd"
UNKNOWN = "unknown"
_SGD_NAMES = {"SGD", "ASGD"}
_ADAPTIVE_NAMES = {
    "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad", "Adadelta", "RMSprop", "SparseAdam", "Adafactor",
    "Lion", "LAMB", "Lamb", "FusedAdam", "FusedLAMB", "AdamW8bit", "Adam8bit", "PagedAdamW", "PagedAdamW8bit",
}  # fmt: skip
# Constructor arguments worth repeating in a snippet (the rest keep their defaults).
_SNIPPET_KEYS = ("momentum", "dampening", "nesterov", "betas", "eps", "weight_decay")


def unwrap(optimizer: Any) -> Any:
    """The optimizer behind wrappers such as accelerate's ``AcceleratedOptimizer``."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if inner is not None and hasattr(inner, "param_groups") else optimizer


def family(optimizer: Any) -> str:
    """ADAPTIVE, SGD_LIKE or UNKNOWN, from the class name, else from the hyperparameters."""
    opt = unwrap(optimizer)
    name = type(opt).__name__
    if name in _SGD_NAMES:
        return SGD_LIKE
    if name in _ADAPTIVE_NAMES:
        return ADAPTIVE
    groups = getattr(opt, "param_groups", None) or [{}]
    if "betas" in groups[0] or ("alpha" in groups[0] and "momentum" in groups[0]):  # Adam-like, RMSprop-like
        return ADAPTIVE
    if "momentum" in groups[0]:
        return SGD_LIKE
    return UNKNOWN


def class_expression(optimizer: Any) -> str:
    """``torch.optim.SGD`` for torch's own classes, else ``module.Class``."""
    opt = unwrap(optimizer)
    cls = type(opt)
    try:
        import torch.optim

        if getattr(torch.optim, cls.__name__, None) is cls:
            return f"torch.optim.{cls.__name__}"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return f"{cls.__module__}.{cls.__name__}"


def _value(x: Any) -> float | None:
    """A learning rate as a float; a tensor lr is read here, on a sampled step (one sync)."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def updated_by_step(weight: Any) -> bool:
    """Whether ``optimizer.step()`` will update ``weight`` now: it requires a gradient
    and has one.  torch's optimizers skip a parameter whose ``.grad`` is None
    (``torch.optim.SGD._init_group``: ``if p.grad is not None``; Adam's likewise),
    weight decay and momentum included, so a frozen layer handed over with
    ``model.parameters()`` (linear probing, a frozen backbone) is held by a param
    group yet never moves.  Read after backward, before ``optimizer.step()``: two
    attribute reads, no host sync."""
    return bool(getattr(weight, "requires_grad", False)) and getattr(weight, "grad", None) is not None


def layer_learning_rates(optimizer: Any, weights: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """Layer -> (current lr, the schedule's initial lr) of the param group holding its
    weight, for the layers this step updates (``updated_by_step``): a frozen layer in a
    param group has no learning rate to judge.

    ``initial_lr`` is what torch's LR schedulers store in each group: with it a
    decayed (or warming-up) schedule is told apart from a learning rate that is
    simply small.
    """
    opt = unwrap(optimizer)
    groups = getattr(opt, "param_groups", None)
    if not groups:
        return {}
    by_param: dict[int, dict[str, Any]] = {}
    for group in groups:
        for p in group.get("params", ()):
            by_param[id(p)] = group
    out: dict[str, tuple[float, float | None]] = {}
    for name, weight in weights.items():
        group = by_param.get(id(weight))
        if group is None or not updated_by_step(weight):
            continue
        lr = _value(group.get("lr"))
        if lr is not None:
            out[name] = (lr, _value(group["initial_lr"]) if "initial_lr" in group else None)
    return out


def _literal(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_literal(v) for v in value) + ")"
    return repr(value)


def constructor_arguments(optimizer: Any) -> str:
    """``momentum=0.9, weight_decay=0.0005`` from the first param group (non-default-looking values)."""
    opt = unwrap(optimizer)
    groups = getattr(opt, "param_groups", None) or [{}]
    parts = []
    for key in _SNIPPET_KEYS:
        if key not in groups[0]:
            continue
        value = groups[0][key]
        if value in (0, 0.0, False, None) or key == "eps":
            continue
        parts.append(f"{key}={_literal(tuple(value) if isinstance(value, list) else value)}")
    return ", ".join(parts)


def round_lr(lr: float) -> float:
    """One significant digit: a learning rate is a decade-scale choice."""
    if lr <= 0 or not math.isfinite(lr):
        return lr
    return float(f"{lr:.1g}")
