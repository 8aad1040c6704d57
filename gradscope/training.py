"""Training rules: findings that only a watched run can make.

* ``gradient-spike``: the global gradient norm far above its recent history
  (rule and thresholds in ``gradscope.watching.norms``), with AutoClip's clip
  threshold (Seetharaman et al. 2020: the 10th percentile of all past norms)
  and the median of past norms as the gentler alternative.
* ``update-ratio`` and ``learning-rate-too-high``: in ``gradscope.learning_rate``
  (one update-ratio finding per run, judged per optimizer family).
* ``nonfinite``: the first NaN/Inf of the run (activation, ∂ℓ/∂h, weight
  gradient, weight or loss), where it was produced or received.
* ``fp16-overflow`` with a GradScaler: too many steps skipped by the scaler
  after it calibrated its scale, or every step skipped (``ScalerSteps``).

Each builder is a pure function of what the Scope accumulated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from gradscope.numbers import significant
from gradscope.report import Finding, Fix, Severity
from gradscope.watching.norms import AUTOCLIP_PERCENTILE, PERCENTILE_RELATIVE_ERROR, NormHistogram, Spike

# torch.amp.GradScaler (backoff_factor 0.5, growth_factor 2, growth_interval 2000)
# skips the step and halves its scale whenever the scaled gradients hold an inf or
# a NaN, and doubles it after 2000 consecutive clean steps.  So:
# * calibration: a scale that starts too high (the default 2^16, or the user's
#   init_scale) overflows on every step until it is low enough, log2(initial /
#   needed) consecutive skips from the first step, a streak that ends with the
#   first step that runs.  That is the scaler doing its job, never a finding.  A
#   skip at a scale of 1 or below is no calibration: the gradients overflow fp16
#   unscaled, which no loss scale cures.
# * afterwards a healthy scaler skips about one step per growth, 1 in 2001
#   (0.05 %).  Skipping more than 1 % of the steps after calibration (20x that)
#   means the scale keeps hitting the fp16 ceiling ...
SKIPPED_STEPS_WARNING = 0.01
# ... judged on at least 5 skips after calibration, never on one or two: at the
# healthy rate, 5 skips in the <= 500 steps where 5 are more than 1 % have a
# Poisson probability below 1e-5 (lambda <= 0.25: lambda^5/5! ~ 8e-6), and each
# skip halves the scale, so 5 leave it 2^5 = 32x below where calibration left it:
# more than the early drift of a healthy gradient norm, which costs a skip or two
# (a 300-step run whose default 2^16 overflows once at step 7 is healthy).
SKIPPED_STEPS_MIN = 5


def clip_advice(history: NormHistogram) -> dict[str, Any] | None:
    """AutoClip's threshold and the median alternative, from all past norms."""
    p10 = history.percentile(AUTOCLIP_PERCENTILE)
    if p10 is None:
        return None
    return {
        "method": "autoclip",
        "percentile": AUTOCLIP_PERCENTILE,
        "threshold": p10,
        "median_threshold": history.percentile(50.0),
        "norms_seen": history.count,
        "relative_error": PERCENTILE_RELATIVE_ERROR,
        "source": "Seetharaman et al. 2020, AutoClip: the 10th percentile of all past global norms",
    }


def with_run_clip(findings: list[Finding], clip: dict[str, Any] | None, diverged_at: int | None) -> list[Finding]:
    """The diagnosis' clipping snippet (the course's typical threshold, for an audit
    that saw one norm) replaced by this run's AutoClip threshold, which a watched
    run has; unchanged when it has too few norms."""
    from gradscope.advice import CLIP_PLACEHOLDER_CODE

    if clip is None:
        return findings
    before = f" before step {diverged_at}" if diverged_at is not None else ""
    code = (
        f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={clip['threshold']:.4g})  "
        "# AutoClip, from this run's norms"
    )
    out = []
    for finding in findings:
        if finding.fix is not None and CLIP_PLACEHOLDER_CODE in finding.fix.code:
            fix = Fix(finding.fix.summary, finding.fix.code.replace(CLIP_PLACEHOLDER_CODE, code))
            finding = dataclasses.replace(finding, fix=fix)
        elif finding.code == "learning-rate-too-high" and finding.fix is not None:
            finding = _lr_finding_with_run_clip(finding, clip, code, before)
        out.append(finding)
    return out


def _lr_finding_with_run_clip(finding: Finding, clip: dict[str, Any], code: str, before: str) -> Finding:
    """``learning-rate-too-high`` takes its clip threshold from the norms before the
    norm grew (``gradscope.learning_rate``): in the final report, the run's AutoClip
    threshold instead, so that one report recommends one threshold."""
    assert finding.fix is not None
    old = finding.evidence.get("clip")
    summary, lines = finding.fix.summary, finding.fix.code.splitlines()
    phrase = f", and clip the global gradient norm at {clip['threshold']:.3g} (AutoClip: p10 of the norms{before})"
    if isinstance(old, dict) and old.get("threshold") is not None:
        summary = summary.replace(
            f", and clip the global gradient norm at {old['threshold']:.3g} (from the norms before it diverged)", phrase
        )
        lines = [code if line == old.get("code") else line for line in lines]
    else:
        summary = summary.replace(
            ", and clip the global gradient norm (too few norms before the divergence to derive a threshold)", phrase
        )
        lines.append(code)
    evidence = dict(finding.evidence)
    evidence["clip"] = {
        "threshold": clip["threshold"],
        "method": f"AutoClip: p10 of the {clip['norms_seen']} global norms{before}",
        "norms_observed": clip["norms_seen"],
        "code": code,
    }
    return dataclasses.replace(finding, evidence=evidence, fix=Fix(summary, "\n".join(lines)))


def clip_snippet(threshold: float) -> str:
    return (
        "loss.backward()\n"
        f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={threshold:.4g})\n"
        "optimizer.step()"
    )


@dataclass
class SpikeSummary:
    """Running summary of the spikes of a run (bounded)."""

    count: int = 0
    first: Spike | None = None
    worst: Spike | None = None
    steps: list[int] = field(default_factory=list)  # the first MAX_STEPS spike steps
    # The largest per-parameter gradient norms at spikes on sampled steps: those of
    # the first MAX_STEPS spikes, plus the worst spike's (kept whenever it changes),
    # so the final report's worst spike has them however many spikes came before.
    parameter_norms: dict[int, dict[str, float]] = field(default_factory=dict)

    MAX_STEPS = 20
    TOP_PARAMETERS = 5

    def add_parameter_norms(self, step: int, norms: dict[str, float]) -> dict[str, float]:
        """The TOP_PARAMETERS largest of ``norms`` (returned whether or not the
        bounded map keeps them: callers must not index the map afterwards)."""
        ranked = sorted(norms.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else math.inf, reverse=True)
        top = dict(ranked[: self.TOP_PARAMETERS])
        is_worst = self.worst is not None and self.worst.step == step
        if len(self.parameter_norms) < self.MAX_STEPS or is_worst:
            self.parameter_norms[step] = top
        # At most MAX_STEPS + 1 entries: the first MAX_STEPS and the current worst.
        kept = set(sorted(self.parameter_norms)[: self.MAX_STEPS])
        if self.worst is not None:
            kept.add(self.worst.step)
        for old in [s for s in self.parameter_norms if s not in kept]:
            del self.parameter_norms[old]
        return top

    def add(self, spike: Spike) -> None:
        self.count += 1
        if self.first is None:
            self.first = spike
        if self.worst is None or spike.ratio > self.worst.ratio:
            self.worst = spike
        if len(self.steps) < self.MAX_STEPS:
            self.steps.append(spike.step)


def spike_finding(spike: Spike, summary: SpikeSummary, clip: dict[str, Any] | None) -> Finding:
    """The ``gradient-spike`` finding for the latest (or worst) spike."""
    evidence: dict[str, Any] = {
        "step": spike.step,
        "global_norm": spike.norm,
        "recent_median": spike.median,
        "ratio_to_median": spike.ratio,
        "robust_z": spike.z,
        "spikes": summary.count,
        "spike_steps": list(summary.steps),
    }
    whose = ""
    if spike.optimizer is not None:
        evidence["optimizer"] = spike.optimizer
        whose = f" (optimizer {spike.optimizer})"
    if spike.step in summary.parameter_norms:
        evidence["largest_parameter_norms"] = summary.parameter_norms[spike.step]
    if summary.worst is not None:
        evidence["worst_ratio"] = summary.worst.ratio
        evidence["worst_step"] = summary.worst.step
    fix = None
    if clip is not None:
        evidence["clip_threshold"] = clip["threshold"]
        evidence["clip_threshold_median"] = clip["median_threshold"]
        evidence["clip_method"] = (
            f"AutoClip: 10th percentile of all {clip['norms_seen']} past global norms "
            f"(within {clip['relative_error']:.1%}); the median is the gentler alternative"
        )
        fix = Fix(
            f"clip the global gradient norm at {clip['threshold']:.3g} (AutoClip, p10 of past norms); "
            f"a gentler choice is the median, {clip['median_threshold']:.3g}",
            clip_snippet(clip["threshold"]),
        )
    return Finding(
        code="gradient-spike",
        severity=Severity.WARNING,
        layers=[],
        message=(
            f"step {spike.step}: the global gradient norm{whose} jumped to {significant(spike.norm)}, "
            f"{significant(spike.ratio)}x its recent median {significant(spike.median)}"
        ),
        evidence=evidence,
        fix=fix,
    )


def nonfinite_finding(record: dict[str, Any], clip: dict[str, Any] | None) -> Finding:
    """The ``nonfinite`` error for the first NaN/Inf of the run."""
    role = record.get("role")
    layer = record.get("layer")
    where = f"in {layer} " if layer else ""
    names = {
        "activation": "activation",
        "gradient": "gradient ∂ℓ/∂h",
        "weight_grad": "weight gradient",
        "weight": "weight",
        "loss": "loss",
    }
    dtype = f" ({record['dtype']})" if record.get("dtype") else ""
    origin = record.get("origin", "")
    source = record.get("source")
    how = f", {origin} ({'from' if origin == 'received' else 'by'} {source})" if source else ""
    label = names.get(role, role) if role is not None else "value"
    message = f"step {record['step']}: first non-finite {label} {where}{dtype}{how}".replace("  ", " ").replace(
        " ,", ","
    )
    if clip is not None:
        fix = Fix(
            "lower the learning rate, and clip the global gradient norm at "
            f"{clip['threshold']:.3g} (AutoClip, from the norms seen before the failure)",
            clip_snippet(clip["threshold"]),
        )
    elif role == "activation":
        fix = Fix("run this layer in float32 or bf16, or rescale its input", "")
    else:
        fix = Fix("lower the learning rate and clip the global gradient norm", clip_snippet(1.0))
    return Finding(
        code="nonfinite",
        severity=Severity.ERROR,
        layers=[layer] if layer else [],
        message=message,
        evidence=dict(record),
        fix=fix,
    )


@dataclass
class ScalerSteps:
    """The GradScaler's scale step by step (a few numbers, whatever the run length):
    which steps it skipped (its scale fell at the next step), and how many of the
    skips were its calibration (see SKIPPED_STEPS_WARNING).

    A step whose scale was read is skipped when the next step's scale is lower;
    the last step read has no verdict yet.
    """

    initial_scale: float | None = None
    last_scale: float | None = None
    last_step: int | None = None
    reads: int = 0  # steps whose scale was read
    skipped: int = 0
    calibration: int = 0  # skips of the opening streak, at a scale above 1
    calibrating: bool = True  # no step has run yet (every step with a verdict was skipped)
    ran: int = 0  # steps with a verdict that ran
    # Skipped steps whose update ratio has not arrived yet: the update-ratio rule
    # leaves them out (their ratio is 0 because optimizer.step() did not run).
    # Forgotten at each flush once its ratios are read (``forget_before``), so
    # at most one flush's steps (``every``) are kept.
    recent: set[int] = field(default_factory=set)

    @property
    def seen(self) -> bool:
        return self.reads > 0

    def observe(self, step: int, scale: float) -> None:
        """The scale ``step`` ran with (read before its ``scaler.update()``)."""
        if not math.isfinite(scale) or scale <= 0.0:
            return  # no scale a GradScaler holds
        self.reads += 1
        if self.initial_scale is None:
            self.initial_scale = scale
        previous, before = self.last_scale, self.last_step
        if previous is not None and before is not None:
            if scale < previous:
                self.skipped += 1
                if self.calibrating and previous > 1.0:
                    self.calibration += 1
                self.recent.add(before)
            else:
                self.calibrating = False
                self.ran += 1
        self.last_scale, self.last_step = scale, step

    def was_skipped(self, step: int) -> bool:
        return step in self.recent

    def forget_before(self, step: int) -> None:
        self.recent = {s for s in self.recent if s >= step}

    def after_calibration(self) -> int:
        return self.skipped - self.calibration


def skipped_steps_finding(
    skipped: int, steps: int, scale: float | None, scaler: ScalerSteps | None = None, *, final: bool = False
) -> Finding | None:
    """``fp16-overflow`` when the GradScaler skipped too many steps after calibrating
    its scale (SKIPPED_STEPS_WARNING, SKIPPED_STEPS_MIN), or (``final``: at the end
    of the run) skipped every step, so that the model never trained.

    ``steps`` is the run's step count so far.  The judgement needs the scale step
    by step (``scaler``): from the totals alone, a calibration from a high initial
    scale cannot be told from a scale that keeps hitting the fp16 ceiling, so
    without it the answer is None (the watch passes it: ``gradscope.watching.flush``
    during the run, ``LearningRateMonitor.final_findings`` at the end).  The counts
    are the scaler's own (``skipped`` and ``scale``, the caller's totals, are the
    same numbers; ``scale`` stands in only if the scaler holds none).
    """
    if scaler is None or not scaler.seen or steps <= 0:
        return None
    skipped = scaler.skipped
    scale = scaler.last_scale if scaler.last_scale is not None else scale
    evidence: dict[str, Any] = {
        "skipped_steps": skipped,
        "steps": steps,
        "loss_scale": scale,
        "initial_scale": scaler.initial_scale,
        "calibration_skips": scaler.calibration,
        "skipped_after_calibration": scaler.after_calibration(),
        "threshold_frac": SKIPPED_STEPS_WARNING,
        "min_skipped_after_calibration": SKIPPED_STEPS_MIN,
    }
    bf16 = "with torch.autocast(device_type='cuda', dtype=torch.bfloat16):\n    loss = model(x)"
    if final and scaler.calibrating and scaler.ran == 0 and skipped >= SKIPPED_STEPS_MIN:
        # The opening streak never ended: no optimizer step ran in the whole run.
        initial = f" from {significant(scaler.initial_scale)}" if scaler.initial_scale is not None else ""
        last = significant(scale) if scale is not None else "?"
        if scale is not None and scale > 1.0:
            # Still calibrating: every scale tried, down to the last, was too high.
            start = min(2.0**16, 2.0 ** math.floor(math.log2(scale)))
            why = f"its scale fell{initial} to {last} and never got low enough for optimizer.step() to run"
            fix = Fix(
                f"start the loss scale lower (GradScaler(init_scale={start:g})), or train in bf16 "
                "(no loss scaling needed)",
                f"scaler = torch.amp.GradScaler('cuda', init_scale={start:g})\n\n# or\n{bf16}",
            )
        else:
            why = f"even at a scale of {last} (at most 1: the gradients overflow fp16 unscaled, no loss scale cures it)"
            fix = Fix("train in bf16 (no loss scaling needed), or keep the overflowing block in float32", bf16)
        return Finding(
            code="fp16-overflow",
            severity=Severity.WARNING,
            layers=[],
            message=(
                f"the GradScaler skipped every step ({skipped} of {steps}: the last one's outcome shows only at a "
                f"next step) because scaled gradients overflowed fp16, {why}, so the model did not train"
            ),
            evidence=evidence | {"every_step_skipped": True},
            fix=fix,
        )
    excess = scaler.after_calibration()
    after = max(steps - scaler.calibration, 1)
    if excess < SKIPPED_STEPS_MIN or excess / after <= SKIPPED_STEPS_WARNING:
        return None
    if scaler.calibration:
        what = (
            f"skipped {excess} of the {after} steps after calibrating its scale ({skipped} of {steps} in all, "
            f"{scaler.calibration} while its scale fell from {significant(scaler.initial_scale or 0.0)})"
        )
    else:
        what = f"skipped {skipped} of {steps} steps"
    return Finding(
        code="fp16-overflow",
        severity=Severity.WARNING,
        layers=[],
        message=f"the GradScaler {what} because scaled gradients overflowed fp16",
        evidence=evidence | {"steps_after_calibration": after},
        fix=Fix(
            "lower the learning rate or clip gradients; if it persists, train in bf16 (no loss scaling needed)",
            bf16,
        ),
    )
