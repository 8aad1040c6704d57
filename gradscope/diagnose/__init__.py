"""Diagnosis: small independent rules that turn a Record into Findings with Fixes.

``diagnose(report, model=None)`` fills ``report.findings`` (sorted: severity
first, then the first layer's position) and ``report.analysis`` (the depth
profile, the init analysis, the loss scale and the clipping threshold).
``diagnose_record`` does the same for a bare Record (used by ``watch``).

Each rule is a function ``Context -> list[Finding]`` in its own module; every
threshold lives in ``thresholds.py`` with its source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradscope.record import Record
    from gradscope.report import Finding, Report

__all__ = ["diagnose", "diagnose_record"]


def _analysis(ctx: Any) -> dict[str, Any]:
    from gradscope import advice
    from gradscope.diagnose.depth import depth_rows, first_unhealthy, structure
    from gradscope.diagnose.init import analyse_init

    layers = ctx.layers
    grads = [s for x in layers for r in ("gradient", "weight_grad") if (s := x.stats.get(r)) is not None]
    loss_scale = advice.loss_scale_from_stats(grads, "fp16") if "fp16" in ctx.formats else None
    # One merged norm is no distribution: a threshold taken from it would be a guess
    # presented as a measurement.  Audits name the clipping, watch derives the
    # threshold from the run's norms (AutoClip); the norm itself is reported.
    norm = advice.global_grad_norm((x.weight_grad for x in layers if x.weight_grad is not None), ctx.steps)
    clip = None
    first_f, first_b = first_unhealthy(ctx)
    found = structure(ctx)
    return {
        "head_boundary": found.head_boundary,
        "zero_init": {"layers": found.zero_layers, "parameters": found.zero_parameters},
        "layer_scale": dict(found.layer_scales),
        "depth": depth_rows(ctx),
        "first_unhealthy_forward": first_f,
        "first_unhealthy_backward": first_b,
        "init": analyse_init(ctx),
        "loss_scale": loss_scale,
        "clip": clip,
        "global_grad_norm": norm,
    }


def diagnose_record(
    record: Record,
    *,
    formats: Sequence[str] = ("fp16",),
    model: Any = None,
    steps: int | None = None,
    during_training: bool = False,
    run: Mapping[str, Any] | None = None,
) -> tuple[list[Finding], dict[str, Any]]:
    """Findings (sorted) and the analysis dict for a Record.

    Args:
        record: what the recorder saw.
        formats: low-precision formats to check (fp16, bf16, fp8_e4m3, fp8_e5m2).
        model: the module, when at hand (used only to read details such as a
            LeakyReLU's slope; the diagnosis never runs it).
        steps: how many passes the statistics merge (default ``record.steps``),
            to turn merged gradient sums into a per-step norm.
        during_training: the record comes from a run in progress (``watch``):
            no finding advises re-initialising weights that are being trained.
        run: the audit's ``Report.run``: its loss entries (``loss_classes``,
            ``loss_logits``, ``loss_value``) when gradscope built the loss, and the
            attention scores it measured (``attention_scores``).
    """
    from gradscope.diagnose.attention import rule_attention_scores
    from gradscope.diagnose.depth import rule_activations, rule_gradient
    from gradscope.diagnose.experts import rule_expert_init, rule_expert_routing
    from gradscope.diagnose.gates import rule_saturated_gates
    from gradscope.diagnose.init import rule_poor_init
    from gradscope.diagnose.layers import Context
    from gradscope.diagnose.nonfinite import rule_nonfinite
    from gradscope.diagnose.precedence import drop_explained
    from gradscope.diagnose.precision import rule_precision
    from gradscope.diagnose.recurrent import rule_through_time
    from gradscope.diagnose.recurrent_culprit import attribute_to_recurrent
    from gradscope.diagnose.regularisation import rule_dropout
    from gradscope.diagnose.stream import rule_stream_scale
    from gradscope.diagnose.units import rule_dead_units, rule_saturated_units
    from gradscope.diagnose.zeroinit import rule_zero_init
    from gradscope.formats import FORMAT_NAMES, format_for_dtype

    # A tensor that already is low-precision (autocast to bf16, a model in
    # fp16) is checked against its own format too, whatever the run asked.
    own = [f for layer in record.layers if (f := format_for_dtype(f"torch.{layer.output_dtype}")) is not None]
    formats = tuple(dict.fromkeys([*formats, *own]))
    unknown = [f for f in formats if f not in FORMAT_NAMES]
    if unknown:
        from gradscope.errors import InputError

        raise InputError(f"unknown format {unknown[0]!r}; choose among {', '.join(FORMAT_NAMES)}")
    ctx = Context(record, tuple(formats), model, steps if steps is not None else max(record.steps, 1))
    ctx.during_training = during_training
    run = run or {}
    ctx.loss_classes, ctx.loss_logits, ctx.loss_value = (
        run.get("loss_classes"),
        run.get("loss_logits"),
        run.get("loss_value"),
    )
    ctx.attention_scores = run.get("attention_scores")
    ctx.mode = run.get("mode")
    ctx.experts = run.get("experts")
    ctx.analysis = _analysis(ctx)
    findings: list[Finding] = []
    # poor-init runs last: its severity depends on what the depth rules found.
    for rule in (
        rule_nonfinite,
        rule_gradient,
        rule_activations,
        rule_precision,
        rule_attention_scores,
        rule_dead_units,
        rule_expert_routing,
        rule_saturated_units,
        rule_saturated_gates,
        rule_through_time,
        rule_zero_init,
        rule_dropout,
        rule_expert_init,
        rule_poor_init,
        rule_stream_scale,
    ):
        found = rule(ctx)
        ctx.found.update(f.code for f in found)
        findings.extend(found)
    # A depth change that happens inside a recurrent layer names that layer and its fix.
    attribute_to_recurrent(ctx, findings)
    findings = drop_explained(findings)  # the one precedence between rules (diagnose.precedence)
    return sort_findings(findings, ctx.position), ctx.analysis


def sort_findings(findings: list[Finding], position: dict[str, int]) -> list[Finding]:
    """Severity descending, then the position of the finding's first layer."""
    from gradscope.report import Severity

    def key(f: Finding) -> tuple[int, int]:
        first = min((position.get(name, 1 << 30) for name in f.layers), default=1 << 30)
        return (-Severity(f.severity).rank, first)

    return sorted(findings, key=key)


def diagnose(report: Report, model: Any = None) -> None:
    """Fill ``report.findings`` and ``report.analysis`` from ``report.record``."""
    formats = report.run.get("formats") or ("fp16",)
    batches = report.run.get("batches")
    findings, analysis = diagnose_record(
        report.record,
        formats=tuple(formats),
        model=model,
        steps=int(batches) if batches else None,
        run=report.run,
    )
    report.findings = findings
    report.analysis = analysis
    reasons = unassessed(report.record)
    if reasons:
        report.analysis["inconclusive"] = reasons


def unassessed(record: Record) -> list[str]:
    """Why the audit's depth analysis could not run on this record, one reason each.

    The per-layer ∂ℓ/∂h and activations are what the depth, init and unit rules
    judge: a TorchScript model (no hooks on its submodules), a loss that reached
    no layer, or a record with no statistics leaves them unassessed.
    """

    def seen(stats: Any) -> bool:
        return stats is not None and stats.count > 0

    layers = record.layers
    if not layers or not any(seen(s) for x in layers for s in x.stats.values()):
        return ["no statistics were recorded: nothing was assessed"]
    reasons: list[str] = []
    parametrised = [x for x in layers if x.fan_in is not None]
    if parametrised and not any(seen(x.gradient) or seen(x.activation) for x in parametrised):
        reasons.append(
            "per-layer activations and ∂ℓ/∂h could not be recorded (the model's submodules take no hooks, "
            "as in TorchScript): the depth, init and unit analyses did not run"
        )
    grads = [s for x in layers for s in (x.gradient, x.weight_grad) if s is not None and seen(s)]
    if not grads or all(s.moments_valid and s.rms == 0.0 for s in grads):
        reasons.append("no gradient reached any layer: the backward pass was not assessed")
    return reasons
