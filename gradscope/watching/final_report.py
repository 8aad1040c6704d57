"""The report of a watched run, built from the run's aggregate statistics, its
training record (norms, spikes, update ratios, first non-finite step) and the
diagnosis of the whole-run statistics.

A run that went non-finite at step k and never came back is reported from its
statistics before k (``gradscope.watching.divergence``): the steps from k on are
NaN/inf or the blow-up's numbers, and advice fitted to them (a loss scale, a clip
threshold, an init) would fit the blow-up.  A run whose non-finite episodes
cleared (a bad batch caught and skipped) is reported from its finite steps.
``report.run["statistics"]`` and a note say so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradscope.record import Record
from gradscope.recorder import Recorder
from gradscope.report import Finding, Report, Severity
from gradscope.training import nonfinite_finding, spike_finding, with_run_clip

if TYPE_CHECKING:
    from gradscope.watching.scope import Scope


def dedupe(findings: list[Finding]) -> list[Finding]:
    """Keep the first finding of each (code, first layer): the diagnosis may also
    report a nonfinite finding for the same layer."""
    seen: set[tuple[str, str]] = set()
    out = []
    for finding in findings:
        key = (finding.code, finding.layers[0] if finding.layers else "")
        if key in seen:
            continue
        seen.add(key)
        out.append(finding)
    return out


def _one_nonfinite(findings: list[Finding], first: dict[str, Any] | None, scope: Scope) -> list[Finding]:
    """The run's first non-finite step is its nonfinite finding; later episodes (the
    run went finite and non-finite again, after it had diverged) are listed in its
    evidence rather than as findings of their own, and so are the later non-finite
    steps (each one raised with ``raise_on``; NonfiniteEpisodes.later)."""
    if first is None:
        return findings
    ours = [f for f in findings if f.code == "nonfinite" and f.evidence.get("step") == first.get("step")]
    if not ours:
        return findings
    episodes = scope._episodes
    if episodes.later_count:
        ours[0].evidence["later_nonfinite_steps"] = list(episodes.later)
        if episodes.later_count > len(episodes.later):
            ours[0].evidence["later_nonfinite_count"] = episodes.later_count
    later = [f for f in findings if f.code == "nonfinite" and f is not ours[0]]
    if later:
        ours[0].evidence["later_episode_steps"] = sorted({int(f.evidence.get("step") or 0) for f in later})
    return [f for f in findings if f.code != "nonfinite" or f is ours[0]]


def reduction_summary(recorder: Recorder) -> dict[str, Any] | str:
    summary = recorder.reduction_summary()
    if isinstance(summary, dict):
        summary = dict(summary)
        summary["global_grad_norm"] = "global: √(Σ over ranks of local Σg²), replicated parameters once"
        summary["loss"] = "global: the mean of the ranks' losses"
    return summary


def _run_record(scope: Scope) -> Record:
    """The whole run's statistics, with what the recorder knows of the model."""
    recorder = scope._recorder
    record = scope._aggregate.materialize()
    record.reduction = dict(recorder.record.reduction)
    ran = {layer.module for layer in recorder.record.layers}
    present = {id(module) for module in scope.model.modules()}
    # the modules the recorder hooked and the model still holds (one removed mid-run is not "not executed")
    selected = [(name, module) for name, module in recorder._selected if id(module) in present]
    record.not_executed = [name or "model" for name, _ in selected if (name or "model") not in ran]
    for note in recorder.record.notes:
        record.note(note)
    coverage = scope._aggregate.coverage()
    cleared = scope._spans.cleared_count
    if coverage["diverged_at"] is not None:
        record.note(
            f"the run went non-finite at step {coverage['diverged_at']}: from then on it had diverged, so the "
            f"layer statistics, the diagnosis and its advice cover the {coverage['sampled_steps']} sampled "
            f"steps before it ({coverage['excluded_sampled_steps']} non-finite sampled steps excluded)"
            + (f"; {cleared} earlier non-finite episode(s) cleared" if cleared else "")
        )
    elif cleared:
        record.note(
            f"the run went non-finite and recovered ({cleared} episode(s), the first from step "
            f"{scope._spans.cleared[0][0]} to step {scope._spans.cleared[0][1]}): the layer statistics, the "
            f"diagnosis and its advice cover the {coverage['sampled_steps']} finite sampled steps "
            f"({coverage['excluded_sampled_steps']} non-finite sampled steps excluded)"
        )
    return record


def _diagnosed(scope: Scope, record: Record) -> tuple[list[Finding], dict[str, Any]]:
    if not (scope.diagnose and not scope._diagnose_failed and record.layers):
        return [], {}
    try:
        from gradscope.diagnose import diagnose_record

        diag, analysis = diagnose_record(record, formats=scope.formats, model=scope.model, during_training=True)
        return list(diag), dict(analysis)
    except ImportError:
        record.note("gradscope.diagnose.diagnose_record is unavailable: only training rules ran")
        return [], {}


def _training_findings(scope: Scope, diagnosed: list[Finding]) -> tuple[list[Finding], list[Finding]]:
    """The watch's own findings, and the diagnosis' findings it does not replace."""
    training = scope._training
    findings: list[Finding] = []
    clip = training.clip()
    if scope.first_nonfinite is not None:
        # The watch's own record of the first non-finite step wins over the
        # diagnosis of the whole-run statistics, which mixes every step
        # before and after it (and so cannot tell who produced it).
        findings.append(nonfinite_finding(scope.first_nonfinite, clip))
        diagnosed = [f for f in diagnosed if f.code != "nonfinite"]
    if training.spikes.worst is not None:
        worst = training.spikes.worst
        findings.append(spike_finding(worst, training.spikes, training.clip(worst)))
    findings.extend(scope._rates.final_findings())  # the scaler's skipped steps included (ScalerSteps)
    findings.extend(scope._regularisation.final_findings())  # it never read a non-finite step (flush)
    return findings, diagnosed


def final_report(scope: Scope) -> Report:
    record = _run_record(scope)
    diagnosed, analysis = _diagnosed(scope, record)
    findings, diagnosed = _training_findings(scope, diagnosed)
    # One clip threshold in the whole report: the run's AutoClip (before the divergence, if any).
    clip = scope._training.clip()
    findings = with_run_clip(dedupe(findings + diagnosed), clip, scope._aggregate.diverged_at)
    findings = _one_nonfinite(scope._tracker.annotate(findings), scope.first_nonfinite, scope)
    order = {layer.name: layer.index for layer in record.layers}
    findings.sort(key=lambda f: (-Severity(f.severity).rank, order.get(f.layers[0], -1) if f.layers else -1))
    analysis["training"] = scope.training_summary()
    if scope._training.ceiling.clipped:
        record.note(scope._training.ceiling.message())
    analysis["regularisation"] = scope._regularisation.summary()
    parameters = sum(p.numel() for p in scope.model.parameters())
    return Report(
        record=record,
        model={
            "source": type(scope.model).__name__,
            "format": "module",
            "type": type(scope.model).__name__,
            "parameters": parameters,
        },
        run={
            "mode": "watch",
            "steps": scope.steps,
            "every": scope.every,
            "tier": scope.tier,
            "formats": list(scope.formats),
            "gradients": "unscaled (divided by the GradScaler scale)" if scope._norms.scaler_seen else "as computed",
            "gradient_accumulation": "statistics per optimizer step, micro-batches merged",
            "reduction": reduction_summary(scope._recorder),
            "history": scope._layer_history.to_dict(),
            "statistics": scope._aggregate.coverage(),
        },
        findings=findings,
        analysis=analysis,
    )
