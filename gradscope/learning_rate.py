"""Learning-rate findings of a watched run: ``update-ratio`` and ``learning-rate-too-high``.

``update-ratio`` is ONE finding per run, listing the layers whose update ratio
‖Δw‖/‖w‖ is far off, judged with what the optimizer makes of it
(``gradscope.optimizers``: SGD's ratio is η·‖g‖/‖w‖ and falls as training
converges, an Adam-like one is ≈ c·η/rms(w) with c <= 1 and falls with c as
gradients turn to noise).  So:

* too large: a layer's ratio stayed above UPDATE_RATIO_HIGH for
  UPDATE_RATIO_PATIENCE consecutive sampled steps (at the end of the run: for
  most of its samples);
* too small: the *largest* ratio the layer had in the whole run, scaled to the
  schedule's peak learning rate (the ratio is proportional to η), is below
  UPDATE_RATIO_LOW.  A converged run or a decayed schedule had its large
  steps earlier, or at a larger η: they are never "too small";
* normalisation gains and embeddings (small ratios by design: a gain of 1
  moves by ≈ c·η under Adam; only the rows a batch touches move under SGD)
  only when extreme (EXTREME_LOW, EXTREME_HIGH).  Biases are not judged: the
  ratio is of each layer's main weight.

``learning-rate-too-high``: a run diverging because each step is far too large
(the one cause users most need named, issue 11).  The signals gradscope has
anyway: the update ratios of a sampled step (median over the weight layers),
the loss and the global gradient norm against their minimum so far.

Every threshold is here with its reason; nothing in a hook: everything below
runs on host numbers at the flush.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gradscope import advice, optimizers
from gradscope.diagnose.layers import EMBEDDING_TYPES, NORM_TYPES
from gradscope.numbers import significant
from gradscope.report import Finding, Fix, Severity
from gradscope.training import ScalerSteps, skipped_steps_finding

# Karpathy's CS231n notes ("Neural Networks Part 3: ratio of weights:updates"):
# updates of about 1e-3 of the weights' norm per step are healthy.
UPDATE_RATIO_TARGET = 1e-3
# Two decades above the target: at 0.1 per step, ten steps can move a layer by
# its whole norm (it is re-drawn, not trained).  The former one-decade band
# (1e-2) fired on healthy AdamW and SGD runs early in training (issue 11).
UPDATE_RATIO_HIGH = 1e-1
# Two decades below: even the run's largest step, at the schedule's peak
# learning rate, moves the layer by 1e-5 of its norm; 10^4 such steps (a short
# run) change it by at most 10%.
UPDATE_RATIO_LOW = 1e-5
# Normalisation gains and embeddings: only when frozen in effect (10^7 steps
# to move by their norm) or replaced every step.
EXTREME_LOW = 1e-7
EXTREME_HIGH = 1.0
# An update smaller than half an ulp of an fp32 weight (2^-24 relative) rounds away.
FP32_HALF_ULP = 2.0**-24
UPDATE_RATIO_PATIENCE = 10  # consecutive sampled steps (too large), or samples seen (too small)

# learning-rate-too-high: the median weight layer moves by at least a tenth of
# its norm in one step (100x the target) ...
DIVERGING_RATIO = 1e-1
# ... while the loss has at least doubled from its minimum so far, or the global
# gradient norm has grown tenfold from its minimum: the steps are large AND
# making things worse.  A healthy run's loss does not double from its best
# value within the few steps before the next sample.
LOSS_GROWTH = 2.0
NORM_GROWTH = 10.0
# Without any update ratio (none sampled yet): only an unmistakable divergence,
# loss and norm both a hundred times their minimum.
LOSS_GROWTH_ALONE = 1e2
NORM_GROWTH_ALONE = 1e2
# Norms kept from the start of the run for the clip threshold (AutoClip's own
# minimum history, see gradscope.diagnose.thresholds.AUTOCLIP_MIN_HISTORY).
EARLY_NORMS = 20
# Goyal et al. 2017 warm the learning rate up linearly from a small fraction.
WARMUP_START_FACTOR = 0.01
WARMUP_STEPS = 100


def updated(ratio: float, lr: float | None) -> bool:
    """Whether a sampled ratio is an update of the layer: a finite non-zero one, or 0
    at a learning rate > 0 (each update rounded away in the weights' precision).  A
    ratio of 0 without a learning rate is a layer the step did not update: frozen
    (requires_grad False), or without a gradient at that step, which torch's
    optimizers skip even when a param group holds it (``optimizers.updated_by_step``)."""
    return math.isfinite(ratio) and (ratio > 0.0 or (lr is not None and lr > 0))


def growth(value: float, minimum: float | None) -> float | None:
    """``value`` against the minimum so far (inf for a non-finite value; None before any minimum)."""
    if minimum is None:
        return None
    return math.inf if not math.isfinite(value) else value / minimum


def _at(peak_step: int | None, step: int) -> str:
    """ " at step 3" when the worst step of a flush is not the flush's own."""
    return f" at step {peak_step}" if peak_step is not None and peak_step != step else ""


def layer_kind(type_name: str) -> str:
    if type_name in NORM_TYPES:
        return "norm"
    if type_name in EMBEDDING_TYPES:
        return "embedding"
    return "weight"


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _layers(names: list[str]) -> str:
    """ "layer 'a' changes" / "layers 'a', 'b' change"."""
    return f"layer {_quoted(names)} changes" if len(names) == 1 else f"layers {_quoted(names)} change"


def _no_gradient_fix(names: list[str], summary: str, code: str) -> tuple[str, str]:
    """Advice for weights that never get a gradient: find where the graph breaks
    (``torch.autograd.grad(..., allow_unused=True)`` answers None for a weight
    the loss does not depend on), appended to the learning-rate advice if any."""
    root = advice.ROOT
    bare = sorted({n.split("#")[0] for n in names})  # call sites share their module's weights
    layers = "{" + ", ".join(repr(n) for n in bare) + "}"
    first = bare[0]
    check = (
        f"# which weights the loss does not depend on (None: the graph is cut between them and the loss)\n"
        f"named = [(n, p) for n, p in {root}.named_parameters() if n.rpartition('.')[0] in {layers}]\n"
        "grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)\n"
        "print([n for (n, _), g in zip(named, grads) if g is None or not g.any()])"
    )
    text = (
        f"make the output of {_quoted(names)} reach the loss through differentiable operations "
        f"(for a router: weight the experts' outputs by its softmax, not its argmax alone), or freeze "
        f"{'it' if len(names) == 1 else 'them'} ({root}.get_submodule({first!r}).requires_grad_(False)) "
        "if that is intended"
    )
    return (f"{summary}; {text}" if summary else text), (f"{code}\n\n{check}" if code else check)


@dataclass
class LayerRatios:
    """Running summary of one layer's update ratios (a few numbers, whatever the run length)."""

    kind: str = "weight"
    samples: int = 0
    high: int = 0  # samples above the band
    run_high: int = 0  # consecutive samples above the band, up to now
    longest_high: int = 0
    first_high_step: int | None = None
    log_sum: float = 0.0
    nonzero: int = 0  # samples behind log_sum (a ratio that rounded to 0 has no logarithm)
    last: float = math.nan
    max_ratio: float = 0.0
    lr_at_max: float | None = None
    lr_last: float | None = None
    lr_peak: float | None = None  # the largest lr seen, or the schedule's initial lr if larger
    max_at_peak: float = 0.0  # max over samples of ratio x lr_peak / lr at that sample
    small_since: int | None = None  # the step at which the layer was first judged too small
    # Sampled steps whose weight gradient was read (its norm in the flush), and
    # whether any was non-zero: a weight that never gets a gradient does not move
    # whatever the learning rate, which is no learning-rate problem at all.  A
    # non-finite norm is a gradient (an overflowed one, or a still-scaled one whose
    # norm overflowed): a weight the loss does not reach has None or exact zeros.
    gradients_read: int = 0
    gradient_seen: bool = False

    def no_gradient(self) -> bool:
        """No sampled step gave the weight a gradient (None or exactly 0), over as many
        sampled steps as a ratio needs to be judged: whatever moves it (weight decay
        alone, or nothing) is no learning-rate question."""
        return self.gradients_read >= UPDATE_RATIO_PATIENCE and not self.gradient_seen

    def band(self) -> tuple[float, float]:
        if self.kind == "weight":
            return UPDATE_RATIO_LOW, UPDATE_RATIO_HIGH
        return EXTREME_LOW, EXTREME_HIGH

    def add(self, step: int, ratio: float, lr: float | None, initial_lr: float | None) -> None:
        self.last = ratio
        if ratio == 0.0 and lr is not None and lr > 0:
            # A step with lr > 0 that left the weights bit-identical: each update rounded
            # away in the weights' precision.  The layer does not learn: a sample at 0.
            # (Steps a GradScaler skipped never arrive here: LearningRateMonitor.observe
            # leaves them out, optimizer.step() did not run.)
            self.samples += 1
            self.run_high = 0
            if self.small_since is None and self.too_small():
                self.small_since = step
            return
        if not math.isfinite(ratio) or ratio <= 0.0:
            return  # no update (lr 0, a frozen layer) or a zero/non-finite weight
        self.samples += 1
        self.nonzero += 1
        self.log_sum += math.log10(ratio)
        if lr is not None and lr > 0:
            self.lr_last = lr
            self.lr_peak = max(self.lr_peak or 0.0, lr, initial_lr or 0.0)
            self.max_at_peak = max(self.max_at_peak, ratio * self.lr_peak / lr)
        else:
            self.max_at_peak = max(self.max_at_peak, ratio)
        if ratio > self.max_ratio:
            self.max_ratio, self.lr_at_max = ratio, lr
        if ratio > self.band()[1]:
            self.high += 1
            self.run_high += 1
            self.longest_high = max(self.longest_high, self.run_high)
            if self.first_high_step is None:
                self.first_high_step = step
        else:
            self.run_high = 0
        if self.small_since is None and self.too_small():
            self.small_since = step

    @property
    def geometric_mean(self) -> float:
        return 10 ** (self.log_sum / self.nonzero) if self.nonzero else math.nan

    def too_large(self, final: bool) -> bool:
        if final:
            return self.samples >= UPDATE_RATIO_PATIENCE and self.high * 2 > self.samples
        return self.run_high >= UPDATE_RATIO_PATIENCE

    def too_small(self) -> bool:
        return self.samples >= UPDATE_RATIO_PATIENCE and self.max_at_peak < self.band()[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "geometric_mean": self.geometric_mean,
            "last": self.last,
            "max": self.max_ratio,
            "max_at_peak_lr": self.max_at_peak,
            "samples": self.samples,
            "samples_above_band": self.high,
            "longest_run_above_band": self.longest_high,
            "lr_last": self.lr_last,
            "lr_peak": self.lr_peak,
        }


@dataclass
class OptimizerSeen:
    """What the snippets need from the optimizer (strings and numbers: no reference kept)."""

    expression: str = "type(optimizer)"  # until an optimizer is seen: the user's own class, whatever it is
    family: str = optimizers.UNKNOWN
    arguments: str = ""
    known: bool = False

    @classmethod
    def of(cls, optimizer: Any) -> OptimizerSeen:
        return cls(
            optimizers.class_expression(optimizer),
            optimizers.family(optimizer),
            optimizers.constructor_arguments(optimizer),
            True,
        )

    def constructor(self, params: str, lr: float) -> str:
        """``optimizer = torch.optim.SGD(params, lr=..., momentum=0.9)``, in the class the run used."""
        extra = f", {self.arguments}" if self.arguments else ""
        return f"optimizer = {self.expression}({params}, lr={lr:g}{extra})"


@dataclass
class Divergence:
    """Running minimum of the loss and the global norm, the worst growth of the last
    flush's steps, and the first norms of the run.

    Every step's loss and global norm reach the host (the ring of
    ``gradscope.watching.step_norms``), so the rule reads each of them, not only the
    flush's last: each step's value against the minimum up to that step, the worst
    of the flush kept.  At ``every=1`` that is the step itself; at ``every=10`` a loss
    that jumped 7x at step 1 and fell back by step 10 is still seen (reading the last
    step alone missed it), and the growth is the same number at any ``every``."""

    min_loss: float | None = None
    loss_nonpositive: bool = False  # growth ratios mean nothing for a loss that can be <= 0
    min_norm: float | None = None
    last_loss: tuple[int, float] | None = None
    last_norm: tuple[int, float] | None = None
    # (step, growth) of the worst step of the last flush that brought a loss / a norm
    loss_peak: tuple[int, float] | None = None
    norm_peak: tuple[int, float] | None = None
    early_norms: list[float] = field(default_factory=list)
    median_ratio: tuple[int, float] | None = None  # (step, median update ratio of the weight layers)
    found: Finding | None = None  # the run's first finding (the final report's)
    # The finding of the episode going on now: the same object while the condition
    # holds (an alert that persists), a new one with that step's numbers once it
    # held again after clearing (the old one named a step and numbers long past).
    episode: Finding | None = None

    def observe(self, norms: list[tuple[int, float]], losses: list[tuple[int, float]]) -> None:
        """One flush's steps, in step order.  A flush without any (at close) keeps the
        previous flush's peaks, as it kept its last values."""
        if losses:
            self.loss_peak = None
        for step, loss in losses:
            self.last_loss = (step, loss)
            if math.isfinite(loss):
                if loss <= 0:
                    self.loss_nonpositive = True
                self.min_loss = loss if self.min_loss is None else min(self.min_loss, loss)
            self.loss_peak = _worse(self.loss_peak, step, growth(loss, self.min_loss))
        if norms:
            self.norm_peak = None
        for step, norm in norms:
            self.last_norm = (step, norm)
            if math.isfinite(norm) and norm > 0:
                self.min_norm = norm if self.min_norm is None else min(self.min_norm, norm)
                # the norms before any growth: the clip threshold must not learn from the divergence
                if len(self.early_norms) < EARLY_NORMS and norm < NORM_GROWTH * self.min_norm and self.found is None:
                    self.early_norms.append(norm)
            self.norm_peak = _worse(self.norm_peak, step, growth(norm, self.min_norm))

    def loss_growth(self) -> float | None:
        """The worst loss of the last flush's steps against the minimum up to it."""
        if self.loss_peak is None or self.loss_nonpositive:
            return None
        return self.loss_peak[1]

    def norm_growth(self) -> float | None:
        """The worst global norm of the last flush's steps against the minimum up to it."""
        return None if self.norm_peak is None else self.norm_peak[1]


def _worse(peak: tuple[int, float] | None, step: int, value: float | None) -> tuple[int, float] | None:
    """The larger of ``peak`` and (step, value) by value; the earlier step on a tie."""
    if value is None or (peak is not None and not value > peak[1]):
        return peak
    return (step, value)


def _none_excluded(step: int) -> bool:
    return False


class LearningRateMonitor:
    """Update ratios and divergence signals of a run, turned into the two findings."""

    def __init__(self) -> None:
        self.layers: dict[str, LayerRatios] = {}
        self.optimizer = OptimizerSeen()
        self._optimizer_of: dict[str, OptimizerSeen] = {}  # layer -> the optimizer seen updating it
        self._lrs: dict[int, dict[str, tuple[float, float | None]]] = {}  # sampled step -> layer -> lrs
        self._kinds: dict[str, str] = {}
        self.divergence = Divergence()
        # The GradScaler's scale step by step (fed by the flush): a step it skipped
        # left every weight as it was (optimizer.step() did not run), so its update
        # ratio (0) and its non-finite gradient norm are no sample of the learning
        # rate's effect; and its skipped-steps finding at the end of the run.
        self.scaler = ScalerSteps()
        # Whether a step was found non-finite (gradscope.watching.divergence): its
        # numbers are a bad batch's or the diverged run's (inf losses, NaN ratios,
        # the 0 ratio of a skipped batch) and never feed a finding or its advice;
        # nor does any other non-finite norm or loss.
        self.excludes: Callable[[int], bool] = _none_excluded

    # -- inputs -------------------------------------------------------------------
    def observe_gradients(self, norms: dict[str, float]) -> None:
        """A sampled step's gradient norm of each layer's weight (0 where it had none).

        Only 0 means no gradient: an inf or NaN norm is the norm of a gradient that
        reached the weight (overflowed under a GradScaler, or finite but so large,
        still scaled, that its norm overflowed), never of a missing one."""
        for name, norm in norms.items():
            layer = self.layers.get(name)
            if layer is None:
                layer = self.layers[name] = LayerRatios(kind=self._kinds.get(name, "weight"))
            layer.gradients_read += 1
            layer.gradient_seen = layer.gradient_seen or norm != 0.0  # NaN != 0.0 too

    def observe_optimizer(self, step: int, optimizer: Any, weights: dict[str, Any], types: dict[str, str]) -> set[str]:
        """On a step whose update ratios are sampled, before ``optimizer.step()``: the lr
        each layer's update will use.  Returns the layers among ``weights`` the optimizer
        updates (a run may step several, each holding its own layers)."""
        seen = OptimizerSeen.of(optimizer)
        self.optimizer = seen
        lrs = optimizers.layer_learning_rates(optimizer, weights)
        self._lrs[step] = {**self._lrs.get(step, {}), **lrs}
        for name in lrs:
            self._optimizer_of[name] = seen
        for name, type_name in types.items():
            self._kinds.setdefault(name, layer_kind(type_name))
        for old in [s for s in self._lrs if s < step - 64]:  # ratios never resolved (no optimizer step)
            del self._lrs[old]
        return set(lrs)

    def optimizer_of(self, layers: list[str]) -> OptimizerSeen:
        """The optimizer that updates ``layers`` (the snippets rebuild that one), when one
        does them all; else the one seen last."""
        seen = {id(x): x for n in layers if (x := self._optimizer_of.get(n)) is not None}
        return next(iter(seen.values())) if len(seen) == 1 else self.optimizer

    def observe(
        self,
        step: int,
        update_ratios: dict[int, dict[str, float]],
        norms: list[tuple[int, float]],
        losses: list[tuple[int, float]],
    ) -> list[Finding]:
        """One flush's numbers; returns this flush's findings (each code at most once)."""
        excludes = self.excludes
        update_ratios = {s: r for s, r in update_ratios.items() if not excludes(s)}
        norms = [(s, v) for s, v in norms if not excludes(s) and math.isfinite(v)]
        losses = [(s, v) for s, v in losses if not excludes(s) and math.isfinite(v)]
        if self.scaler.seen:
            # A GradScaler skips exactly the steps with an inf/NaN gradient: under one, a
            # non-finite global norm is a skipped step (or a still-scaled norm that
            # overflowed), not a divergence.
            norms = [(s, v) for s, v in norms if math.isfinite(v)]
        for ratio_step in sorted(update_ratios):
            lrs = self._lrs.pop(ratio_step, {})
            if self.scaler.was_skipped(ratio_step):
                continue  # optimizer.step() did not run: no update to judge
            for name, ratio in update_ratios[ratio_step].items():
                layer = self.layers.get(name)
                if layer is None:
                    layer = self.layers[name] = LayerRatios(kind=self._kinds.get(name, "weight"))
                lr, initial = lrs.get(name, (None, None))
                layer.add(ratio_step, ratio, lr, initial)
            # the layers this step updated: a frozen one a param group holds (ratio 0, no
            # lr: ``optimizers.updated_by_step``) would drag the median towards 0
            weights = [
                r
                for n, r in update_ratios[ratio_step].items()
                if self.layers[n].kind == "weight" and updated(r, lrs.get(n, (None, None))[0])
            ]
            if weights:
                self.divergence.median_ratio = (ratio_step, statistics.median(weights))
        self.scaler.forget_before(step)  # the ratios of the steps before this flush have arrived
        self.divergence.observe(norms, losses)
        findings = []
        diverging = self._diverging(step)
        if diverging is not None:
            findings.append(diverging)
        ratio_finding = self.update_ratio_finding(final=False)
        if ratio_finding is not None:
            findings.append(ratio_finding)
        return findings

    # -- learning-rate-too-high ------------------------------------------------------
    def _diverging(self, step: int) -> Finding | None:
        d = self.divergence
        loss_growth, norm_growth = d.loss_growth(), d.norm_growth()
        median = d.median_ratio
        growing = (loss_growth is not None and loss_growth >= LOSS_GROWTH) or (
            norm_growth is not None and norm_growth >= NORM_GROWTH
        )
        if median is not None and median[1] >= DIVERGING_RATIO and growing:
            basis = "update ratio"
        elif (
            median is None
            and loss_growth is not None
            and loss_growth >= LOSS_GROWTH_ALONE
            and norm_growth is not None
            and norm_growth >= NORM_GROWTH_ALONE
        ):
            basis = "loss and gradient norm"
        else:
            d.episode = None
            return None
        if d.episode is None:
            d.episode = self._lr_finding(step, basis, loss_growth, norm_growth)
        if d.found is None:
            d.found = d.episode
        return d.episode

    def _current_lr(self) -> float | None:
        lrs = [x.lr_last for x in self.layers.values() if x.lr_last is not None and x.kind == "weight"]
        lrs = lrs or [x.lr_last for x in self.layers.values() if x.lr_last is not None]
        return statistics.median(lrs) if lrs else None

    def _lr_finding(self, step: int, basis: str, loss_growth: float | None, norm_growth: float | None) -> Finding:
        d = self.divergence
        lr = self._current_lr()
        median = d.median_ratio[1] if d.median_ratio is not None else None
        if lr is not None and median is not None and median > 0:
            new_lr = optimizers.round_lr(lr * UPDATE_RATIO_TARGET / median)
            how = (
                f"{lr:g} x {UPDATE_RATIO_TARGET:g} / {significant(median)}: "
                "the update ratio scales with the learning rate"
            )
        elif lr is not None:
            new_lr = optimizers.round_lr(lr / 10)
            how = "a tenth of the current one (no update ratio sampled yet to derive it from)"
        else:
            new_lr, how = None, ""
        signals = []
        if median is not None:
            signals.append(
                f"the median layer moves by {significant(median)} of its norm per step (about 1e-3 is healthy)"
            )
        loss_step = d.loss_peak[0] if d.loss_peak is not None else None
        norm_step = d.norm_peak[0] if d.norm_peak is not None else None
        if loss_growth is not None and loss_growth >= LOSS_GROWTH:
            signals.append(f"the loss is {significant(loss_growth)}x its minimum so far" + _at(loss_step, step))
        if norm_growth is not None and norm_growth >= NORM_GROWTH:
            signals.append(f"the gradient norm is {significant(norm_growth)}x its minimum" + _at(norm_step, step))
        clip = advice.clip_threshold(d.early_norms) if len(d.early_norms) > 1 else None
        summary = "lower the learning rate"
        lines = []
        if new_lr is not None:
            summary += f" to about {new_lr:g} ({how})"
            params = f"{advice.ROOT}.parameters()"
            lines.append(self.optimizer.constructor(params, new_lr) + (f"  # was {lr:g}" if lr is not None else ""))
        summary += f", warm it up over the first {WARMUP_STEPS} steps (Goyal et al. 2017)"
        lines += [
            f"# warm-up: from {WARMUP_START_FACTOR:g}x to the full rate over {WARMUP_STEPS} steps",
            "scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, "
            f"start_factor={WARMUP_START_FACTOR:g}, total_iters={WARMUP_STEPS})",
            "# each step: loss.backward(); clip; optimizer.step(); scheduler.step()",
        ]
        if clip is not None:
            summary += (
                f", and clip the global gradient norm at {clip['threshold']:.3g} (from the norms before it diverged)"
            )
            lines.append(clip["code"])
        else:
            summary += ", and clip the global gradient norm (too few norms before the divergence to derive a threshold)"
        return Finding(
            code="learning-rate-too-high",
            severity=Severity.ERROR,
            layers=[],
            message=f"step {step}: training is diverging because the learning rate is too high: " + "; ".join(signals),
            evidence={
                "step": step,
                "basis": basis,
                "median_update_ratio": median,
                "median_update_ratio_step": d.median_ratio[0] if d.median_ratio is not None else None,
                "loss_growth": loss_growth,
                "loss_growth_step": loss_step,
                "gradient_norm_growth": norm_growth,
                "gradient_norm_growth_step": norm_step,
                "learning_rate": lr,
                "suggested_learning_rate": new_lr,
                "optimizer": self.optimizer.expression if self.optimizer.known else None,
                "thresholds": {
                    "median_update_ratio": DIVERGING_RATIO,
                    "loss_growth": LOSS_GROWTH,
                    "gradient_norm_growth": NORM_GROWTH,
                },
                "clip": clip,
            },
            fix=Fix(summary, "\n".join(lines)),
        )

    # -- update-ratio -------------------------------------------------------------------
    def update_ratio_finding(self, final: bool) -> Finding | None:
        """The run's one ``update-ratio`` finding, or None."""
        unreached = [n for n, x in self.layers.items() if x.no_gradient()]
        large = [n for n, x in self.layers.items() if x.too_large(final) and n not in unreached]
        small = [n for n, x in self.layers.items() if x.too_small() and n not in large and n not in unreached]
        if not large and not small and not unreached:
            return None
        parts = []
        if large:
            typical = math.prod(self.layers[n].geometric_mean if final else self.layers[n].last for n in large) ** (
                1 / len(large)
            )
            parts.append(
                f"{_layers(large)} by {significant(typical, 2)} of the weights' norm per step (‖Δw‖/‖w‖), too large: "
                "the learning rate is likely too high for them"
            )
        if small:
            best = math.prod(self.layers[n].max_at_peak for n in small) ** (1 / len(small))
            # 0: every update rounded away in the weights' precision (below half an fp32 ulp)
            amount = f"at most {significant(best, 2)}" if best > 0 else f"less than {significant(FP32_HALF_ULP, 2)}"
            parts.append(
                f"{_layers(small)} by {amount} of the weights' norm per step even at the peak "
                "learning rate, too small: they barely learn"
            )
        if unreached:
            one = len(unreached) == 1
            parts.append(
                f"{'layer' if one else 'layers'} {_quoted(unreached)} {'gets' if one else 'get'} no gradient: no "
                f"sampled step gave {'its weight' if one else 'their weights'} one (None or exactly 0; weight "
                "decay alone may still shrink it), "
                f"so {'its' if one else 'their'} output does not reach the loss through a differentiable path "
                "(argmax, .detach(), an integer index, torch.no_grad), is unused, or feeds only dead units; "
                "no learning rate changes that"
            )
        judged = sum(1 for x in self.layers.values() if x.samples)
        seen = self.optimizer_of(large + small + unreached)
        if large or small:
            summary, code = self._ratio_fix(large, small, judged, final, seen)
        else:
            summary, code = "", ""
        if unreached:
            summary, code = _no_gradient_fix(unreached, summary, code)
        layers = large + small + unreached
        first_outside = [
            s
            for n in layers
            if (s := (self.layers[n].first_high_step if n in large else self.layers[n].small_since)) is not None
        ]
        family = {
            optimizers.ADAPTIVE: "Adam-like: the ratio is about c·lr/rms(w), c <= 1 (Kingma & Ba 2015)",
            optimizers.SGD_LIKE: "SGD: the ratio is lr·‖g‖/‖w‖, (1-momentum)^-1 times that for a steady gradient",
        }.get(seen.family, "unknown optimizer family")
        representative = self.layers[layers[0]]
        return Finding(
            code="update-ratio",
            severity=Severity.WARNING,
            layers=layers,
            message="; ".join(parts) + ("; about 1e-3 is healthy" if large or small else ""),
            evidence={
                "update_ratio": representative.geometric_mean,
                "too_large": large,
                "too_small": small,
                "no_gradient": unreached,
                "per_layer": {n: self.layers[n].to_dict() for n in layers},
                "target": UPDATE_RATIO_TARGET,
                "band": [UPDATE_RATIO_LOW, UPDATE_RATIO_HIGH],
                "band_norm_and_embedding": [EXTREME_LOW, EXTREME_HIGH],
                "optimizer": seen.expression if seen.known else None,
                "optimizer_family": family,
                "first_outside_step": min(first_outside) if first_outside else None,
            },
            fix=Fix(summary, code),
        )

    def _ratio_fix(
        self, large: list[str], small: list[str], judged: int, final: bool, seen: OptimizerSeen
    ) -> tuple[str, str]:
        """A learning rate from the observed ratios (the ratio is proportional to it), in the
        user's own optimizer class (``seen``: the one updating these layers); with the rates
        unknown (scope.step() never saw the optimizer), as a factor on the optimizer's
        current rate."""
        groups: list[tuple[str, list[str], float, float | None]] = []  # (label, layers, factor, new lr)
        for label, names in (("too large", large), ("too small", small)):
            if not names:
                continue
            factors, rates = [], []
            for n in names:
                x = self.layers[n]
                if label == "too large":
                    ratio, lr = (x.geometric_mean if final else x.last), x.lr_last
                else:
                    # a ratio that rounded to 0 is below half an fp32 ulp (2^-24) of the weights
                    ratio, lr = max(x.max_at_peak, FP32_HALF_ULP), x.lr_peak
                if ratio > 0 and math.isfinite(ratio):
                    factors.append(UPDATE_RATIO_TARGET / ratio)
                    if lr is not None:
                        rates.append(lr * UPDATE_RATIO_TARGET / ratio)
            factor = optimizers.round_lr(math.prod(factors) ** (1 / len(factors))) if factors else 1.0
            new_lr = optimizers.round_lr(math.prod(rates) ** (1 / len(rates))) if len(rates) == len(names) else None
            groups.append((label, names, factor, new_lr))
        root = advice.ROOT
        if len(groups) == 1 and len(groups[0][1]) * 2 >= max(judged, 1):  # most layers: the whole rate
            _, _, factor, new_lr = groups[0]
            if new_lr is not None:
                return (
                    f"set the learning rate to about {new_lr:g} (the update ratio is proportional to it)",
                    seen.constructor(f"{root}.parameters()", new_lr),
                )
            return (
                f"scale the learning rate by about {factor:g} (the update ratio is proportional to it)",
                f"for group in optimizer.param_groups:\n    group['lr'] *= {factor:g}",
            )
        # parameter names are "<layer>.<weight>": a parameter's layer is what precedes the last dot
        lines = ["def layer_of(name):\n    return name.rpartition('.')[0]\n"]
        in_groups = {n for _, names, _, _ in groups for n in names}
        rest = [x.lr_last for n, x in self.layers.items() if n not in in_groups and x.lr_last is not None]
        current = "optimizer.param_groups[0]['lr']"
        base = f"{statistics.median(rest):g}" if rest else current  # the other layers keep their rate
        params = []
        for i, (label, names, factor, new_lr) in enumerate(groups):
            listed = ", ".join(repr("" if n == advice.ROOT else n.split("#")[0]) for n in names)
            lines.append(f"group_{i} = {{{listed}}}  # layers whose updates are {label}")
            chosen = f"[p for n, p in {root}.named_parameters() if layer_of(n) in group_{i}]"
            rate = f"{new_lr:g}" if new_lr is not None else f"{current} * {factor:g}"
            params.append(f'{{"params": {chosen}, "lr": {rate}}}')
        others = " | ".join(f"group_{i}" for i in range(len(groups)))
        params.insert(0, f'{{"params": [p for n, p in {root}.named_parameters() if layer_of(n) not in {others}]}}')
        extra = f", {seen.arguments}" if seen.arguments else ""
        listing = "[\n    " + ",\n    ".join(params) + ",\n]"
        lines.append(f"optimizer = {seen.expression}({listing}, lr={base}{extra})")
        summary = "give " + " and ".join(
            f"{_quoted(names)} their own learning rate ("
            + (f"{new_lr:g}" if new_lr is not None else f"{factor:g}x the current one")
            + ")"
            for _, names, factor, new_lr in groups
        )
        return (
            summary + " (a parameter group per set; the update ratio is proportional to the learning rate)",
            "\n".join(lines),
        )

    # -- the end of the run -------------------------------------------------------------
    def final_findings(self) -> list[Finding]:
        """The run's learning-rate findings, and the GradScaler's skipped steps judged
        over the whole run (``gradscope.training.skipped_steps_finding``: the scale
        step by step, which the monitor holds for the update ratios, tells its
        calibration from a scale that keeps overflowing)."""
        out = []
        if self.divergence.found is not None:
            out.append(self.divergence.found)
        ratio = self.update_ratio_finding(final=True)
        if ratio is not None:
            out.append(ratio)
        scaler = self.scaler
        if scaler.seen and scaler.last_step is not None:
            skipped = skipped_steps_finding(scaler.skipped, scaler.last_step + 1, scaler.last_scale, scaler, final=True)
            if skipped is not None:
                out.append(skipped)
        return out

    def summary(self) -> dict[str, Any]:
        return {name: x.to_dict() for name, x in self.layers.items()}
