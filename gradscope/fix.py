"""``gradscope.fix.apply_init``: apply an init fix to a model, in place.

Schemes:

* ``"kaiming"`` — He et al. 2015, ``kaiming_normal_(w, nonlinearity="relu")``
  (std ``sqrt(2 / fan_in)``), biases zeroed.
* ``"xavier"`` — Glorot & Bengio 2010, ``xavier_normal_(w)`` (std
  ``sqrt(2 / (fan_in + fan_out))``), biases zeroed.
* ``"auto"`` — audits the model and re-initialises exactly the layers its
  ``poor-init`` warning names (chained layers whose predicted gains compound
  outside the healthy band, confirmed by the measured signal), per layer with
  what the diagnosis recommends (Kaiming before the ReLU family, Xavier before
  tanh/sigmoid or nothing), and an output layer whose logits are too large for
  the softmax at the std the finding gives (``gradscope.diagnose.logits``).
  A healthy model, or one whose small branch gains residuals and
  normalisation rescue, is left untouched; ask for ``"kaiming"``
  or ``"xavier"`` to change every layer.  Fused mixture-of-experts weights
  (``(E, out, in)`` parameters of a ``*Experts`` module, ``gradscope.experts``)
  that the ``poor-init`` finding names are drawn from N(0, std²) with the std
  computed from one expert's fan-in (``diagnose.experts``): ``torch.nn.init``'s
  fans of a 3-D tensor are not one expert's.
* ``"lsuv"`` — Mishkin & Matas 2016, layer-sequential unit variance:
  orthonormal pre-init, then in execution order rescale each layer's weight by
  ``1/sqrt(Var(out))`` until ``|Var(out) - 1| < 0.1``, at most 10 tries.

* ``"recurrent"`` — every nn.RNN/nn.GRU/nn.LSTM (``gradscope.recurrent_init``):
  orthogonal ``weight_hh`` per gate block (Saxe et al. 2014; the identity for
  a ReLU nn.RNN, Le et al. 2015), Xavier ``weight_ih`` per gate block, zero
  biases and an LSTM forget-gate bias of 1 (Gers et al. 2000; Jozefowicz et
  al. 2015).  ``"auto"`` applies it to the recurrent layers its findings name
  (growth or decay through time, saturated gates).

Otherwise only Linear and Conv1d/2d/3d layers (and, with "auto", the fused expert
weights named above) are changed.  No hook stays attached and
the model's modes, buffers, gradients and the global RNG state are restored
(only the weights and biases of the changed layers differ afterwards).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradscope.errors import GradscopeError, InputError
from gradscope.own_hooks import OwnHook
from gradscope.proximal import soft_threshold_  # noqa: F401  (L1's proximal step, re-exported)
from gradscope.recurrent_init import init_recurrent, is_recurrent, recurrent_fix_layers, recurrent_std

SCHEMES = ("auto", "kaiming", "xavier", "lsuv", "recurrent")
# Mishkin & Matas 2016, Algorithm 1: tolerance on the output variance, and the
# maximum number of rescaling iterations per layer.
LSUV_TOLERANCE = 0.1
LSUV_MAX_TRIES = 10


def _eligible(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _selected(name: str, layers: Sequence[str] | None) -> bool:
    return layers is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in layers)


def _get(model: nn.Module, name: str) -> nn.Module:
    return model if name in ("", "model") else model.get_submodule(name)


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)  # _eligible modules always have one
    return weight


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def _std(module: nn.Module) -> float:
    return float(_weight(module).detach().float().std())


def _init_layer(
    module: nn.Module, scheme: str, nonlinearity: str = "relu", negative_slope: float = 0.01, std: float | None = None
) -> None:
    weight = _weight(module)
    with torch.no_grad():
        if scheme == "normal" and std is not None:  # a std the diagnosis computed (the logits' layer)
            nn.init.normal_(weight, std=std)
        elif scheme == "kaiming":
            if nonlinearity == "leaky_relu":
                nn.init.kaiming_normal_(weight, a=negative_slope, nonlinearity="leaky_relu")
            else:
                nn.init.kaiming_normal_(weight, nonlinearity="relu" if nonlinearity == "relu" else "linear")
        elif scheme == "xavier":
            nn.init.xavier_normal_(weight)
        elif scheme == "orthogonal":
            nn.init.orthogonal_(weight)
        else:  # pragma: no cover - guarded by apply_init
            raise ValueError(scheme)
        bias = _bias(module)
        if bias is not None:
            nn.init.zeros_(bias)


def apply_init(
    model: nn.Module,
    scheme: str = "auto",
    layers: Sequence[str] | None = None,
    inputs: Any = None,
    **audit_kwargs: Any,
) -> list[dict[str, Any]]:
    """Re-initialise the model's Linear/Conv layers in place.

    Args:
        model: the module to fix.
        scheme: "auto", "kaiming", "xavier" or "lsuv" (see the module docstring).
        layers: qualified names (fnmatch patterns allowed) of the layers to
            change; default all eligible layers.
        inputs: a batch for "auto" (audited) and "lsuv" (propagated); when
            None, a synthetic batch is drawn as ``gradscope.audit`` does.
        **audit_kwargs: passed to ``gradscope.auditing.audit`` for "auto"
            (input_shape, input_dtype, vocab, loss, seed...); "lsuv" uses the
            input ones (input_shape, input_dtype, vocab, seed, mode).

    Returns:
        One dict per changed layer: ``layer``, ``scheme``, ``old_std``,
        ``new_std`` (and, for LSUV, ``output_std`` and ``tries``).

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> [c["layer"] for c in apply_init(model, "kaiming")]
        ['0', '2']
    """
    if scheme not in SCHEMES:
        raise InputError(f"unknown init scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "lsuv":
        return lsuv(model, inputs, layers=layers, **audit_kwargs)
    if scheme == "recurrent":
        return _apply_recurrent(model, [n or "model" for n, m in model.named_modules() if is_recurrent(m)], layers)
    fused: list[tuple[str, str, float]] = []
    recurrent: list[str] = []
    if scheme == "auto":
        targets, fused, recurrent = _auto_targets(model, inputs, layers, audit_kwargs)
    else:
        targets = [
            (name, scheme, "relu", 0.01, None)
            for name, module in model.named_modules()
            if _eligible(module) and _selected(name or "model", layers)
        ]
    changes = []
    for name, chosen, nonlinearity, slope, std in _once_per_weight(model, targets):
        module = _get(model, name)
        old = _std(module)
        _init_layer(module, chosen, nonlinearity, slope, std)
        changes.append({"layer": name or "model", "scheme": chosen, "old_std": old, "new_std": _std(module)})
    for name, pname, std in fused:
        param = getattr(_get(model, name), pname)
        old = float(param.detach().float().std())
        with torch.no_grad():
            nn.init.normal_(param, std=std)  # i.i.d. entries: the same std for every expert's matrix
        changes.append(
            {
                "layer": f"{name}.{pname}",
                "scheme": "normal",
                "old_std": old,
                "new_std": float(param.detach().float().std()),
            }
        )
    return changes + _apply_recurrent(model, recurrent, layers)


def _apply_recurrent(model: nn.Module, names: list[str], layers: Sequence[str] | None) -> list[dict[str, Any]]:
    changes = []
    for name in dict.fromkeys(names):
        module = _get(model, name)
        if not is_recurrent(module) or not _selected(name, layers):
            continue
        old = recurrent_std(module)
        init_recurrent(module)
        changes.append({"layer": name, "scheme": "recurrent", "old_std": old, "new_std": recurrent_std(module)})
    return changes


def _once_per_weight(
    model: nn.Module, targets: list[tuple[str, str, str, float, float | None]]
) -> list[tuple[str, str, str, float, float | None]]:
    """One target per weight tensor: modules that share a weight (a head tied to an
    embedding, a layer reused under two names) get the advised init once, not a
    second draw over the first.  The last target of a weight wins (the logit-scale
    std ``_auto_targets`` appends after the layer's init row)."""
    last: dict[int, int] = {id(_weight(_get(model, t[0]))): index for index, t in enumerate(targets)}
    return [t for index, t in enumerate(targets) if last[id(_weight(_get(model, t[0])))] == index]


def _auto_targets(
    model: nn.Module, inputs: Any, layers: Sequence[str] | None, audit_kwargs: dict[str, Any]
) -> tuple[list[tuple[str, str, str, float, float | None]], list[tuple[str, str, float]], list[str]]:
    """The layers to re-initialise (module, scheme, nonlinearity, slope, std), the
    fused expert weights (module, parameter, std) and the recurrent modules that the
    audit's findings name."""
    from gradscope.auditing import audit

    report = audit(model, inputs, **audit_kwargs)
    targets: list[tuple[str, str, str, float, float | None]] = []
    for row in report.analysis.get("init") or []:
        layer = report.record.layer(row["name"])
        if row.get("flag") != "poor-init" or not _selected(layer.module, layers):
            continue
        if not _eligible(_get(model, layer.module)):
            continue
        targets.append((layer.module, row["scheme"], row["nonlinearity"], row["negative_slope"] or 0.01, None))
    # The output layer whose logits are too large (gradscope.diagnose.logits): the
    # std the finding computed; a head tied to an embedding changes the table too.
    for finding in report.findings:
        head = finding.evidence.get("logits", finding.evidence) if finding.code == "poor-init" else {}
        if "recommended_std" not in head or head.get("cause") != "logit-scale":
            continue
        module = report.record.layer(head["logits_layer"]).module
        if _selected(module, layers) and _eligible(_get(model, module)):
            targets.append((module, "normal", "linear", 0.01, float(head["recommended_std"])))
    fused = [
        (p["module"], p["parameter"], float(p["recommended_std"]))
        for finding in report.findings
        if finding.code == "poor-init" and finding.evidence.get("cause") == "fused-experts"
        for p in finding.evidence["parameters"]
        if _selected(p["module"], layers)
    ]
    recurrent = [
        report.record.layer(name).module for f in report.findings for name in recurrent_fix_layers(f.to_dict())
    ]
    return targets, fused, recurrent


# -- LSUV ---------------------------------------------------------------------------


class _Stop(Exception):
    """Raised from a forward hook once the layer of interest has run: the rest of
    the forward is not needed."""


def _make_batch(
    model: nn.Module,
    inputs: Any,
    input_shape: Sequence[int] | None = None,
    input_dtype: Any = torch.float32,
    vocab: int | None = None,
    seed: int = 0,
    **_: Any,
) -> Any:
    from gradscope.auditing import _to_device, model_device
    from gradscope.inputs import resolve_spec, synthetic_input

    device = model_device(model)
    if inputs is not None:
        return _to_device(inputs, device)
    spec = resolve_spec(model, input_shape, input_dtype, vocab)
    return synthetic_input(spec, torch.Generator().manual_seed(seed), device)


def _run(model: nn.Module, batch: Any) -> None:
    from gradscope.auditing import _call_model

    try:
        _call_model(model, batch)
    except _Stop:
        pass
    except (GradscopeError, KeyboardInterrupt):
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise InputError(
            f"the model's forward raised during LSUV: {type(exc).__name__}: {text[0] if text else ''}"
        ) from exc


def _execution_order(model: nn.Module, batch: Any, names: list[str]) -> list[str]:
    order: list[str] = []
    handles = []
    try:
        for name in names:
            module = _get(model, name)

            def hook(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
                if name not in order:
                    order.append(name)

            handles.append(module.register_forward_hook(OwnHook(hook)))  # not a copy's (gradscope.own_hooks)
        _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _output_var(model: nn.Module, module: nn.Module, batch: Any) -> float | None:
    seen: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            seen.append(out.detach().float().var())
        raise _Stop

    handle = module.register_forward_hook(OwnHook(hook))  # not a copy's (gradscope.own_hooks)
    try:
        _run(model, batch)
    finally:
        handle.remove()
    if not seen:
        return None
    value = float(seen[0])
    return value if math.isfinite(value) else None


def lsuv(
    model: nn.Module,
    inputs: Any = None,
    *,
    layers: Sequence[str] | None = None,
    tolerance: float = LSUV_TOLERANCE,
    max_tries: int = LSUV_MAX_TRIES,
    mode: str = "train",
    **input_kwargs: Any,
) -> list[dict[str, Any]]:
    """Layer-sequential unit-variance init (Mishkin & Matas 2016), in place.

    Orthonormal pre-init of every selected layer (biases zeroed), then, in
    execution order, ``W <- W / sqrt(Var(out))`` until ``|Var(out) - 1| <
    tolerance`` or ``max_tries`` rescalings.  Layers that never run are left
    orthonormal.  Returns the changes as ``apply_init`` does.
    """
    from gradscope.auditing import preserved_state

    names = [n or "model" for n, m in model.named_modules() if _eligible(m) and _selected(n or "model", layers)]
    # A weight shared by two layers is initialised and rescaled once, at its first layer.
    first = {id(_weight(_get(model, name))): name for name in reversed(names)}
    names = [name for name in names if first[id(_weight(_get(model, name)))] == name]
    if not names:
        return []
    batch = _make_batch(model, inputs, **input_kwargs)
    old = {name: _std(_get(model, name)) for name in names}
    changes: list[dict[str, Any]] = []
    with preserved_state(model), torch.no_grad():
        model.train(mode == "train")
        for name in names:
            _init_layer(_get(model, name), "orthogonal")
        order = _execution_order(model, batch, names)
        order += [n for n in names if n not in order]
        for name in order:
            module = _get(model, name)
            var = _output_var(model, module, batch)
            tries = 0
            while var is not None and var > 0 and abs(var - 1.0) >= tolerance and tries < max_tries:
                _weight(module).div_(math.sqrt(var))
                tries += 1
                var = _output_var(model, module, batch)
            changes.append(
                {
                    "layer": name,
                    "scheme": "lsuv",
                    "old_std": old[name],
                    "new_std": _std(module),
                    "output_std": math.sqrt(var) if var is not None else None,
                    "tries": tries,
                }
            )
    return changes
