"""nonfinite: the first layer where NaN or inf appears, and whether it produced or received it.

Forward values appear in execution order, so the first activation to go
non-finite is the first in that order.  Gradients appear in *reverse* order
(backprop starts at the loss), so the first gradient to go non-finite is the
one closest to the loss.  A layer *produced* a non-finite output when its
input was finite (its recorded ``input``, else the previous layer's output,
else the model's input); it *received* it otherwise.
"""

from __future__ import annotations

from gradscope import advice
from gradscope.diagnose.layers import Context
from gradscope.record import LayerRecord
from gradscope.report import Finding, Fix, Severity
from gradscope.stats import Stats


def _bad(stats: Stats | None) -> bool:
    return stats is not None and stats.nonfinite_count > 0


def _counts(stats: Stats) -> dict[str, int | bool]:
    return {
        "nonfinite_count": stats.nonfinite_count,
        "count": stats.count,
        "has_nan": stats.has_nan,
        "has_inf": stats.has_inf,
    }


def _forward_source(ctx: Context, layer: LayerRecord) -> tuple[str, Stats | None]:
    if layer.input is not None:
        return f"the input of '{layer.name}'", layer.input
    prev = ctx.previous(layer)
    if prev is not None:
        return f"the output of '{prev.name}'", prev.activation
    return "model input", ctx.record.input


def _forward(ctx: Context) -> Finding | None:
    first = next((x for x in ctx.layers if _bad(x.activation)), None)
    if first is None:
        if _bad(ctx.record.input):
            return Finding(
                code="nonfinite",
                severity=Severity.ERROR,
                layers=[ctx.layers[0].name] if ctx.layers else [],
                message="The model's input already holds NaN/inf: every layer receives it.",
                evidence={"where": "model input", **_counts(ctx.record.input)},  # type: ignore[arg-type]
                fix=Fix(
                    "Clean the data: find the NaN/inf rows before they reach the model.",
                    "assert torch.isfinite(batch).all(), 'non-finite values in the batch'",
                ),
            )
        return None
    source_name, source = _forward_source(ctx, first)
    # Missing statistics are no evidence either way (under Lightning the model
    # itself is never called, so its input is not recorded): not "received".
    produced = source is None or not _bad(source)
    stats = first.activation
    assert stats is not None
    target = advice.module_expression(first.module)
    if produced:
        verb = "produces" if source is not None else "likely produces"
        fix = Fix(
            f"'{first.name}' ({first.type}) turns finite inputs into NaN/inf: guard its arithmetic "
            "(clamp before log/sqrt/exp, add an epsilon to divisions), or run it in fp32.",
            f"# find the exact operation inside {target}:\n"
            "with torch.autograd.detect_anomaly():\n"
            "    loss = loss_fn(model(batch), target)\n"
            "    loss.backward()",
        )
    else:
        verb = "receives"
        fix = Fix(
            f"The NaN/inf comes from before '{first.name}': check the model's input and any operation "
            "that is not a module (functional calls in forward).",
            "assert torch.isfinite(batch).all(), 'non-finite values in the batch'",
        )
    later = [x.name for x in ctx.layers if _bad(x.activation) and x is not first]
    return Finding(
        code="nonfinite",
        severity=Severity.ERROR,
        layers=[first.name],
        message=(
            f"Forward: '{first.name}' ({first.type}) is the first layer whose output holds NaN/inf, "
            f"and it {verb} it ({source_name} was "
            f"{'not observed' if source is None else 'finite' if produced else 'already non-finite'})."
        ),
        evidence={
            "pass": "forward",
            "first_layer": first.name,
            "produced": produced,
            "compared_with": source_name,
            **_counts(stats),
            "later_layers": len(later),
        },
        fix=fix,
    )


def _backward(ctx: Context) -> Finding | None:
    ordered = list(reversed(ctx.layers))  # the order gradients are computed in
    for i, layer in enumerate(ordered):
        if not _bad(layer.gradient):
            continue
        after = next((x for x in reversed(ordered[:i]) if x.gradient is not None), None)  # the layer just after
        produced_by = "the loss" if after is None else f"'{after.name}'"
        produced = after is None or not _bad(after.gradient)
        stats = layer.gradient
        assert stats is not None
        return Finding(
            code="nonfinite",
            severity=Severity.ERROR,
            layers=[layer.name],
            message=(
                f"Backward: ∂ℓ/∂h of '{layer.name}' ({layer.type}) is the first gradient to hold NaN/inf "
                + (
                    f"(the backward of {produced_by} produced it from a finite gradient)."
                    if produced
                    else "(it came in from later layers)."
                )
            ),
            evidence={
                "pass": "backward",
                "first_layer": layer.name,
                "produced_by": "the loss" if after is None else after.name,
                "produced": produced,
                **_counts(stats),
            },
            fix=Fix(
                "A backward formula overflows or divides by zero (sqrt/log/pow near 0, exp of large values): "
                "clamp the input of that operation, or clip gradients.",
                "with torch.autograd.detect_anomaly():\n"
                "    loss = loss_fn(model(batch), target)\n"
                "    loss.backward()\n"
                "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)",
            ),
        )
    return None


def _nonfinite_parameters(ctx: Context) -> list[str]:
    """Parameters that hold NaN/inf before anything runs: every one of the model
    when it is at hand in an audit (a check per parameter, outside any hook), else
    the recorded layers' weights (a report read from JSON, a watched run)."""
    named = getattr(ctx.model, "named_parameters", None)
    # During training the diagnosis reads no device value (the flush carried the
    # weights' statistics), and the watch names non-finite weights itself.
    params = list(named()) if callable(named) and not ctx.during_training else []
    # Sharded parameters (DTensor, FSDP1 flat) differ per rank: the record's weights,
    # reduced over the ranks, give every rank the same answer.
    if params and not any(hasattr(p, "to_local") or hasattr(p, "_shard_param_infos") for _, p in params):
        import torch

        bad = []
        with torch.no_grad():
            for name, param in params:
                if param.is_floating_point() and param.numel() and not bool(torch.isfinite(param).all()):
                    bad.append(name)
        return bad
    return [f"{x.module}.{x.weight_name or 'weight'}" for x in ctx.layers if x.call == 1 and _bad(x.weight)]


def _corrupt_weights(ctx: Context) -> Finding | None:
    """A model whose parameters already hold NaN/inf (a corrupted checkpoint, an
    update that overflowed): named as such, not as the first layer whose output
    went non-finite, whose arithmetic is not at fault (a fused expert's inf weight
    was blamed on the activation after it, with a 'clamp before log/sqrt' fix)."""
    bad = _nonfinite_parameters(ctx)
    if not bad:
        return None
    owners = list(dict.fromkeys(name.rpartition(".")[0] or "model" for name in bad))
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return Finding(
        code="nonfinite",
        severity=Severity.ERROR,
        layers=owners,
        message=(
            f"Parameters hold NaN/inf before any computation: {shown}. Every output computed from them "
            "is non-finite: the weights were saved or loaded corrupted, or an optimizer update overflowed."
        ),
        evidence={"pass": "parameters", "parameters": bad, "first_layer": owners[0]},
        fix=Fix(
            "Load the weights from a checkpoint saved before they went non-finite; to find the update that "
            "breaks them, train under gradscope.watch, which stops at that step and names the parameter.",
            "bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]\n"
            "print(bad)  # restore these from a good checkpoint",
        ),
    )


def rule_nonfinite(ctx: Context) -> list[Finding]:
    """One finding for the forward pass; one for the backward pass only when the
    forward was finite (a NaN in the forward always poisons the backward).  Non-finite
    parameters come first: they are where a forward's NaN/inf starts."""
    corrupt = _corrupt_weights(ctx)
    if corrupt is not None:
        return [corrupt]
    forward = _forward(ctx)
    if forward is not None:
        return [forward]
    backward = _backward(ctx)
    return [backward] if backward is not None else []
