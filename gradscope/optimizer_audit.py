"""How an optimizer applies weight decay, per parameter group, and the ``weight-decay`` findings.

The lecture's update with an L2 penalty ``λ/2·‖θ‖²`` is

    θ ← (1 − ηλ)·θ − η·∂ℓ/∂θ

so each step multiplies the weights by ``1 − ηλ`` before the gradient step.  With
``ηλ ≥ 1`` that factor is ≤ 0: every step flips the sign of the weights (or zeroes
them), and past 2 it makes them grow — training is corrupted (``error``).

How each ``torch.optim`` class applies ``weight_decay`` (read from torch 2.13's
``torch/optim/*.py``):

* decoupled (``param.mul_(1 - lr * weight_decay)``, Loshchilov & Hutter 2019):
  AdamW, Adafactor, Muon, and Adam / NAdam / RAdam with ``decoupled_weight_decay=True``;
* coupled, L2 added to the gradient (``grad = grad.add(param, alpha=weight_decay)``):
  SGD, ASGD, Adam, Adamax, NAdam, RAdam, RMSprop, Adagrad, Adadelta.

For SGD coupled and decoupled are the same update.  For adaptive optimizers
(those that divide by a running RMS of the gradient) the coupled L2 term is
divided by that RMS too, so parameters with large gradients are barely decayed
and the decay is not the ``(1 − ηλ)`` above: Loshchilov & Hutter 2019
("Decoupled weight decay regularization", ICLR) show AdamW generalises better.
That is a ``warning`` with an AdamW snippet.

Biases, normalisation gains and embeddings: the lecture "often do[es] not
regularise the bias"; a normalisation gain's neutral value is 1 and decay pulls
it towards 0 (shrinking every normalised feature), so decaying gains is a
``warning``; decayed biases and embeddings are ``info``.  The fix is a
parameter-group snippet built from the model's own parameter names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradscope.diagnose.layers import NORM_TYPES
from gradscope.report import Finding, Fix, Severity

# Optimizers that scale each coordinate by a running statistic of its gradient:
# an L2 term added to the gradient is rescaled with it (Loshchilov & Hutter 2019).
ADAPTIVE = {"Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "Adafactor", "SparseAdam"}
# Always decoupled, whatever the group says.
ALWAYS_DECOUPLED = {"AdamW", "Adafactor", "Muon"}
# Take weight_decay as L2 in the gradient unless the group has decoupled_weight_decay=True.
COUPLED = {"SGD", "ASGD", "Adam", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta"}
# The lecture: "often ηλ < 1"; at ηλ >= 1 the factor (1 - ηλ) is <= 0.
DECAY_ERROR = 1.0
# The AdamW default weight decay (torch.optim.AdamW), used in the AdamW snippet.
ADAMW_DEFAULT_DECAY = 0.01
# Decoupled decay on a normalisation gain γ under an adaptive optimizer: the
# optimizer moves γ by at most ~η per step (Adam's normalised step |m/√v| ≲ 1,
# Kingma & Ba 2015, sec. 2.1), the decay pulls it by ηλγ, so even a gradient that
# always pushes γ up cannot hold it above 1/λ.  At λ ≥ 0.5 that ceiling is within
# 2x of γ's neutral value 1: decay competes with the gradient where the gain
# starts, a warning.  Below it (AdamW's default 0.01: ceiling 100) decaying
# gains is a convention question, not a fault: many standard recipes do it
# (torch.optim.AdamW(model.parameters()), the torchvision ResNet recipe's SGD
# decay on BatchNorm weights), so it is information.
NORM_DECAY_WARN = 0.5

NORM_MODULES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)
EMBEDDING_MODULES = (nn.Embedding, nn.EmbeddingBag)


@dataclass
class GroupDecay:
    """How one parameter group is decayed."""

    index: int
    lr: float
    weight_decay: float
    mode: str  # "none", "decoupled", "coupled-l2" or "unknown"
    adaptive: bool
    momentum: float
    parameters: list[str] = field(default_factory=list)

    @property
    def eta_lambda(self) -> float:
        """ηλ: the fraction of each weight removed per step by the decay alone."""
        return self.lr * self.weight_decay

    @property
    def decay_factor(self) -> float:
        """1 − ηλ: what one step multiplies the weights by when the gradient is zero."""
        return 1.0 - self.eta_lambda

    def to_dict(self) -> dict[str, Any]:
        out = {
            "group": self.index,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "eta_lambda": self.eta_lambda,
            "decay_factor_per_step": self.decay_factor,
            "applied": self.mode,
            "adaptive": self.adaptive,
            "parameters": len(self.parameters),
        }
        if self.mode == "coupled-l2" and not self.adaptive and 0 < self.momentum < 1:
            # With heavy-ball momentum the L2 term accumulates: steady-state decay ηλ/(1−μ).
            out["eta_lambda_with_momentum"] = self.eta_lambda / (1 - self.momentum)
        return out


def _number(value: Any) -> float:
    """A group's lr or weight_decay as a float (a tensor lr is read once, at the flush cadence)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


def base_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind wrappers (accelerate's AcceleratedOptimizer, itself an
    Optimizer subclass, and Lightning's LightningOptimizer): whatever ``.optimizer`` holds."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def decay_mode(kind: str, group: dict[str, Any]) -> str:
    if _number(group.get("weight_decay", 0.0) or 0.0) == 0.0:
        return "none"
    if kind in ALWAYS_DECOUPLED or group.get("decoupled_weight_decay"):
        return "decoupled"
    if kind in COUPLED:
        return "coupled-l2"
    return "unknown"


def parameter_names(model: nn.Module | None) -> dict[int, str]:
    if model is None:
        return {}
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}


def group_decays(optimizer: Any, model: nn.Module | None = None) -> list[GroupDecay]:
    """Every parameter group's lr, weight decay, ηλ and how the decay is applied."""
    optimizer = base_optimizer(optimizer)
    kind = type(optimizer).__name__
    names = parameter_names(model)
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        wd = _number(group.get("weight_decay", 0.0) or 0.0)
        lr = _number(group.get("lr", 0.0))
        momentum = group.get("momentum", 0.0)
        groups.append(
            GroupDecay(
                index=index,
                lr=lr,
                weight_decay=wd,
                mode=decay_mode(kind, group),
                adaptive=kind in ADAPTIVE,
                momentum=float(momentum) if isinstance(momentum, (int, float)) else 0.0,
                parameters=[names.get(id(p), f"group{index}[{i}]") for i, p in enumerate(group["params"])],
            )
        )
    return groups


def _owner(model: nn.Module, name: str) -> tuple[str, nn.Module | None]:
    module_name, _, _ = name.rpartition(".")
    try:
        return module_name, model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return module_name, None


def no_decay_kind(model: nn.Module, name: str, param: torch.Tensor) -> str | None:
    """ "norm", "bias" or "embedding" for parameters usually kept out of weight decay, else None."""
    _, owner = _owner(model, name)
    # Libraries' own normalisation classes (LlamaRMSNorm, T5LayerNorm) are plain
    # nn.Modules: recognised by name, as the diagnosis recognises them (field sweep:
    # Llama's RMSNorm gains were counted as "biases").
    if isinstance(owner, NORM_MODULES) or type(owner).__name__ in NORM_TYPES:
        return "norm"
    if isinstance(owner, EMBEDDING_MODULES):
        return "embedding"
    if name.rpartition(".")[2] == "bias" or param.ndim <= 1:
        return "bias"
    return None


def _optimizer_expression(optimizer: Any) -> str:
    cls = type(optimizer)
    if getattr(torch.optim, cls.__name__, None) is cls:
        return f"torch.optim.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _group_kwargs(optimizer: Any, skip: tuple[str, ...] = ("params", "weight_decay")) -> str:
    """The first group's hyper-parameters that differ from the class's own defaults (lr always)."""
    import inspect

    try:
        signature = inspect.signature(type(optimizer).__init__).parameters
        defaults = {k: v.default for k, v in signature.items() if v.default is not inspect.Parameter.empty}
    except (TypeError, ValueError):
        defaults = {}
    group = optimizer.param_groups[0]
    items = []
    for key, value in group.items():
        if (
            key in skip
            or key not in defaults
            or not isinstance(value, (int, float, bool, tuple))
            or isinstance(value, torch.Tensor)
        ):
            continue
        if key != "lr" and defaults.get(key) == value:
            continue
        if key in ("initial_lr", "maximize", "foreach", "capturable", "differentiable", "fused"):
            continue
        items.append(f"{key}={value!r}")
    return ", ".join(items)


def param_group_snippet(
    model: nn.Module, optimizer: Any, no_decay: list[str], weight_decay: float, expression: str | None = None
) -> str:
    """Code that rebuilds the optimizer with ``no_decay`` (parameter names) in a group without decay.

    With another ``expression`` (AdamW for an Adam-family optimizer) only the
    learning rate is carried over, unless the class is Adam's own family
    (whose betas, eps and amsgrad AdamW shares)."""
    optimizer = base_optimizer(optimizer)
    own = _optimizer_expression(optimizer)
    expression = expression or own
    if expression == own or type(optimizer).__name__ == "Adam":
        kwargs = _group_kwargs(optimizer)
    else:
        lr = optimizer.param_groups[0].get("lr")
        kwargs = f"lr={lr!r}" if isinstance(lr, (int, float)) else ""
    names = ", ".join(repr(n) for n in no_decay)
    if len(names) <= 60:
        lines = [f"no_decay = {{{names}}}"]
    else:  # one name per line: long lists stay readable and pasteable
        lines = ["no_decay = {", *(f"    {n!r}," for n in no_decay), "}"]
    lines += [
        "named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]",
        "decay = [p for n, p in named if n not in no_decay]",
        "keep = [p for n, p in named if n in no_decay]",
        f"optimizer = {expression}(",
        "    [",
        f'        {{"params": decay, "weight_decay": {weight_decay!r}}},',
        '        {"params": keep, "weight_decay": 0.0},',
        "    ],",
    ]
    if kwargs:
        lines.append(f"    {kwargs},")
    lines.append(")")
    return "\n".join(lines)


def _modules_of(names: list[str]) -> list[str]:
    return list(dict.fromkeys(n.rpartition(".")[0] or "model" for n in names))


def optimizer_findings(optimizer: Any, model: nn.Module | None = None) -> list[Finding]:
    """``weight-decay`` findings for ``optimizer`` (whose parameters belong to ``model``)."""
    base = base_optimizer(optimizer)
    kind = type(base).__name__
    groups = group_decays(base, model)
    findings: list[Finding] = []

    flipping = [g for g in groups if g.mode != "none" and g.eta_lambda >= DECAY_ERROR]
    if flipping:
        worst = max(flipping, key=lambda g: g.eta_lambda)
        safe = 0.1 / worst.lr if worst.lr > 0 else 0.0
        findings.append(
            Finding(
                code="weight-decay",
                severity=Severity.ERROR,
                layers=[],
                message=(
                    f"{kind} group {worst.index}: lr·weight_decay = ηλ = {worst.eta_lambda:.3g} ≥ 1, so each step "
                    f"multiplies the weights by 1 − ηλ = {worst.decay_factor:.3g}: they flip sign"
                    + (" and grow" if worst.eta_lambda > 2 else "")
                    + " instead of decaying"
                ),
                evidence={
                    "groups": [g.to_dict() for g in flipping],
                    "threshold_eta_lambda": DECAY_ERROR,
                    "formula": "θ ← (1 − ηλ)·θ − η·∂ℓ/∂θ",
                },
                fix=Fix(
                    f"keep ηλ well below 1: with lr={worst.lr:g}, weight_decay ≤ {safe:.3g} gives ηλ ≤ 0.1 "
                    f"(typical ηλ is 1e-5 to 1e-3)",
                    f"for group in optimizer.param_groups:\n    group['weight_decay'] = {safe:.3g}",
                ),
            )
        )

    coupled = [g for g in groups if g.mode == "coupled-l2" and g.adaptive]
    if coupled and model is not None:
        decay = max(g.weight_decay for g in coupled)
        params = [p for g in coupled for p in g.parameters]
        no_decay = [n for n, p in model.named_parameters() if p.requires_grad and no_decay_kind(model, n, p)]
        lr = coupled[0].lr
        snippet = param_group_snippet(model, base, no_decay, ADAMW_DEFAULT_DECAY, "torch.optim.AdamW")
        if kind in ("Adam", "NAdam", "RAdam"):
            alternative = f"or {kind}(..., decoupled_weight_decay=True)"
        else:
            alternative = "decay decoupled from the adaptive step"
        findings.append(
            Finding(
                code="weight-decay",
                severity=Severity.WARNING,
                layers=_modules_of(params),
                message=(
                    f"{kind}(weight_decay={decay:g}) adds L2 to the gradient, where the adaptive step divides it by "
                    "each weight's gradient RMS: weights with large gradients are barely decayed "
                    "(use AdamW's decoupled decay, Loshchilov & Hutter 2019)"
                ),
                evidence={
                    "optimizer": kind,
                    "groups": [g.to_dict() for g in coupled],
                    "applied": "coupled-l2",
                    "source": "Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization",
                },
                fix=Fix(
                    f"switch to torch.optim.AdamW (decoupled decay, {alternative}); AdamW's weight_decay is "
                    f"multiplied by lr (ηλ = {lr:g}·λ), so start from its default {ADAMW_DEFAULT_DECAY}",
                    snippet,
                ),
            )
        )

    if model is not None:
        decayed: dict[str, list[str]] = {"norm": [], "bias": [], "embedding": []}
        by_name = dict(model.named_parameters(remove_duplicate=False))
        decay_of: dict[str, float] = {}
        pulled: list[str] = []  # normalisation parameters whose decay competes with their gradient
        for g in groups:
            if g.mode == "none":
                continue
            for name in g.parameters:
                param = by_name.get(name)
                if param is None:
                    continue
                which = no_decay_kind(model, name, param)
                if which is not None:
                    decayed[which].append(name)
                    decay_of[name] = g.weight_decay
                    if which == "norm" and _pulls_gains_down(g):
                        pulled.append(name)
        listed = decayed["norm"] + decayed["bias"] + decayed["embedding"]
        if listed:
            order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
            listed.sort(key=lambda n: order.get(n, len(order)))
            decay = max(decay_of.values())
            label = {"norm": "normalisation parameter", "bias": "bias", "embedding": "embedding"}
            what = [f"{len(v)} {label[k]}{('es' if k == 'bias' else 's') if len(v) > 1 else ''}"
                    for k, v in decayed.items() if v]  # fmt: skip
            no_decay = [n for n, p in model.named_parameters() if p.requires_grad and no_decay_kind(model, n, p)]
            findings.append(
                Finding(
                    code="weight-decay",
                    severity=Severity.WARNING if pulled else Severity.INFO,
                    layers=listed,
                    message=(
                        f"weight decay ({decay:g}) also applies to {', '.join(what)}: "
                        + (
                            "at this decay it pulls normalisation gains towards 0 as hard as their gradient "
                            "can push them (their neutral value is 1); "
                            if pulled
                            else ""
                        )
                        + "biases, normalisation parameters and embeddings are usually not decayed"
                    ),
                    evidence={
                        "decayed_norm": decayed["norm"],
                        "gains_pulled_down": pulled,
                        "decayed_bias": decayed["bias"],
                        "decayed_embedding": decayed["embedding"],
                        "weight_decay": decay,
                    },
                    fix=Fix(
                        "put them in a parameter group with weight_decay=0 (built from your parameter names)",
                        param_group_snippet(model, base, no_decay, decay),
                    ),
                )
            )
    return findings


def _pulls_gains_down(group: GroupDecay) -> bool:
    """Whether the group's decay competes with the gradient on a normalisation gain
    at its neutral value 1: L2 coupled into an adaptive optimizer (rescaled with a
    gain's small gradient, it dominates the normalised step whatever λ), or
    decoupled decay with λ ≥ NORM_DECAY_WARN under an adaptive optimizer (see there).
    SGD's coupled L2 is weighed against the gradient's own size, unknown here: information."""
    if group.mode == "coupled-l2":
        return group.adaptive
    return group.mode == "decoupled" and group.adaptive and group.weight_decay >= NORM_DECAY_WARN


def optimizer_summary(optimizer: Any, model: nn.Module | None = None) -> dict[str, Any]:
    """The optimizer part of a report's analysis: its class and every group's decay."""
    base = base_optimizer(optimizer)
    groups = group_decays(base, model)
    return {
        "optimizer": type(base).__name__,
        "groups": [g.to_dict() for g in groups],
        "max_eta_lambda": max((g.eta_lambda for g in groups), default=0.0),
    }


def decay_of_parameters(optimizer: Any, model: nn.Module | None) -> dict[str, tuple[float, float, str]]:
    """Parameter name -> (lr, weight_decay, applied) from the optimizer's groups."""
    out = {}
    for g in group_decays(optimizer, model):
        for name in g.parameters:
            out[name] = (g.lr, g.weight_decay, g.mode)
    return out


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def add_optimizer_audit(report: Any, optimizer: Any, model: nn.Module) -> None:
    """Add the ``weight-decay`` findings and ``analysis["optimizer"]`` of ``optimizer`` to an audit report."""
    from gradscope.diagnose import sort_findings

    report.findings = sort_findings(
        [*report.findings, *optimizer_findings(optimizer, model)],
        {layer.name: layer.index for layer in report.record.layers},
    )
    report.analysis = dict(report.analysis) | {"optimizer": optimizer_summary(optimizer, model)}
