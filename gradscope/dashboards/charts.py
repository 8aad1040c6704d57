"""Which charts the dashboards show, in which order, and the tags behind them.

Laid out from the questions a person asks of a run, in the order they ask them:
is training going wrong (loss, global gradient norm against the clip
threshold)? which layer, when, how bad (the heatmaps, then ∂ℓ/∂h and weight
gradients per layer)? are the activations in scale? will fp16 hold (headroom,
then overflow and underflow apart)? are the updates and weights sane?

What TensorBoard does shapes the tags and runs (read in its ``custom_scalar``
plugin, ``tf-custom-scalar-helpers.ts``, and its runs list):

- a line's colour is its *run*'s (``DataSeriesColorScale`` parses the run out of
  the series name); the series of one run differ only by marker.  So the lines
  of one chart are written to different runs: ``training``, ``validation``,
  ``clip …`` for the training charts; five slot runs ``worst 1`` … ``worst 5``,
  ``median`` and ``reference`` for a per-layer chart;
- runs get colours from a 7-colour palette in the order of the runs list,
  which is sorted by each run's first event: the writer creates every run at
  start, in ``RUN_ORDER``, so the 7 runs of a per-layer chart take 7 different
  colours and the training charts' runs differ too;
- a per-layer series is named by its tag, ``<chart tag>/<layer>``: the legend
  and tooltip say which layer;
- the first path component of a tag is its group in the Scalars and Time Series
  tabs, so groups are numbered in question order (``gradscope 1 training`` …).

Quantities spanning decades are written as log10 values (the tag says
``log10``): TensorBoard's default linear axis then shows decades, and a spike of
1e6 is 6 units, not a flat line under its own peak.  Headroom is written in
binades on a linear axis, with a reference line at 0 where the format
overflows, so crossing 0 shows.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

# log10 of the smallest positive float32 subnormal (2^-149 ~ 1.4e-45): where a
# log10 of exactly 0 is drawn (a dead layer), since -inf cannot be.
LOG10_FLOOR = math.log10(2.0**-149)

TRAINING = "gradscope 1 training"
GRADIENTS = "gradscope 2 gradients"
ACTIVATIONS = "gradscope 3 activations"
UPDATES = "gradscope 5 updates"
WEIGHTS = "gradscope 6 weights"
HEATMAPS = "gradscope 0 heatmaps"  # images: sorted first in the Images and Time Series tabs
EXPONENTS = "gradscope 7 exponents"  # histograms: after the scalars, not before them


def range_group(fmt: str) -> str:
    return f"gradscope 4 {fmt} range"


# How many layers a per-layer chart names: with its median and reference line,
# 7 lines, the number of colours in TensorBoard's run palette.
WORST_SERIES = 5

# Runs (TensorBoard colours by run; see the module docstring), in creation order.
TRAINING_RUN = "training"
VALIDATION_RUN = "validation"
CLIP_RUN = "clip AutoClip p10"
CLIP_MEDIAN_RUN = "clip median"
SLOT_RUNS = tuple(f"worst {k}" for k in range(1, WORST_SERIES + 1))
MEDIAN_RUN = "median"
REFERENCE_RUN = "reference"
RUN_ORDER = (TRAINING_RUN, VALIDATION_RUN, CLIP_RUN, CLIP_MEDIAN_RUN, *SLOT_RUNS, MEDIAN_RUN, REFERENCE_RUN)

# Tag suffixes of a chart's median and reference lines: PyTorch's layer names have
# no spaces.  No parentheses anywhere in a tag: TensorBoard reads a series' run out
# of "tag (run)" with a greedy /\((.*)\)$/, which a "(" in the tag would derail.
MEDIAN_SERIES = "median of all"
REFERENCE_SERIES = "reference line"


@dataclass(frozen=True)
class Chart:
    """One custom-scalars chart: its category, title and tag.

    ``series`` is "runs" (the one tag ``tag``, written by fixed runs), or
    "layers" / "parameters": the ``WORST_SERIES`` worst by ``rank``, each as
    ``<tag>/<name>`` in a slot run, plus ``<tag>/(median)`` over all of them.
    ``rank`` says what "worst" means for this chart's own measure: "spread"
    (farthest from the median of all layers, either way), "high", "low", or
    "far" (farthest from ``target``).  A newcomer replaces a named series only
    when worse by ``margin`` (in the chart's units), so lines do not flap.
    ``reference`` draws a constant line (run ``reference``) at that value.
    """

    category: str
    title: str
    tag: str
    series: str = "runs"
    rank: str = "spread"
    target: float = 0.0
    margin: float = 0.0
    reference: float | None = None

    @property
    def per_series(self) -> bool:
        return self.series != "runs"

    def series_tag(self, name: str) -> str:
        return f"{self.tag}/{name.replace('(', '[').replace(')', ']')}"

    @property
    def regex(self) -> str:
        """The custom-scalars regex: the tag itself, or every series under it."""
        return f"^{_escape(self.tag)}/" if self.per_series else f"^{_escape(self.tag)}$"

    def badness(self, value: float, median: float) -> float:
        """How bad one series' latest value is by this chart's measure (non-finite: worst)."""
        if not math.isfinite(value):
            return math.inf
        if self.rank == "high":
            return value
        if self.rank == "low":
            return -value
        if self.rank == "far":
            return abs(value - self.target)
        return abs(value - median) if math.isfinite(median) else 0.0


def finite_median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def tag(group: str, name: str) -> str:
    return f"{group}/{name}"


LOSS = tag(TRAINING, "loss")
GRAD_NORM = tag(TRAINING, "grad_norm_log10")
GAP = tag(TRAINING, "train_validation_gap")
LOSS_SCALE = tag(TRAINING, "loss_scale_log2")
SKIPPED = tag(TRAINING, "skipped_steps")
GRAD_RMS = tag(GRADIENTS, "dloss_dh_rms_log10")
WEIGHT_GRAD = tag(GRADIENTS, "weight_grad_norm_log10")
ACT_STD = tag(ACTIVATIONS, "std_log10")
UPDATE_RATIO = tag(UPDATES, "update_ratio_log10")
WEIGHT_NORM = tag(WEIGHTS, "norm_log10")
DECAY_SHARE = tag(WEIGHTS, "decay_share")
NEAR_ZERO = tag(WEIGHTS, "near_zero_frac")
HEATMAP_GRADIENT = tag(HEATMAPS, "dloss_dh_rms_log10")
HEATMAP_ACTIVATION = tag(HEATMAPS, "activation_rms_log10")


def headroom_tag(fmt: str) -> str:
    return tag(range_group(fmt), "headroom_binades")


def overflow_tag(fmt: str) -> str:
    return tag(range_group(fmt), "overflow_frac")


def underflow_tag(fmt: str) -> str:
    return tag(range_group(fmt), "underflow_frac")


def charts(formats: tuple[str, ...] = ("fp16",)) -> list[Chart]:
    """Every chart, in display order."""
    training = "1 · training: loss, global gradient norm, clip threshold"
    flow = "2 · which layer: gradients (the 5 worst layers, the median)"
    act = "3 · activations (the 5 worst layers, the median)"
    updates = "5 · updates and weights (the 5 worst, the median)"
    optional = "6 · validation and GradScaler (when used)"
    out = [
        Chart(training, "loss (training, validation)", LOSS),
        Chart(training, "global gradient norm, log10, and the AutoClip clip threshold", GRAD_NORM),
        # log10 units: a layer must be a decade worse to displace a named one
        Chart(flow, "∂ℓ/∂h RMS per layer, log10 (farthest from the median)", GRAD_RMS, "layers", "spread", margin=1.0),
        Chart(flow, "weight-gradient norm per layer, log10", WEIGHT_GRAD, "layers", "spread", margin=1.0),
        Chart(act, "activation std per layer, log10 (farthest from 1)", ACT_STD, "layers", "far", 0.0, 1.0),
    ]
    for fmt in formats:
        group = f"4 · {fmt} range (the 5 worst layers, the median)"
        out += [
            # binades: 1 binade = a factor of 2 closer to the format's maximum
            Chart(group, f"{fmt} headroom per layer, binades (below 0: overflow)", headroom_tag(fmt), "layers",
                  "low", margin=1.0, reference=0.0),
            Chart(group, f"{fmt} overflow: fraction of values above its max", overflow_tag(fmt), "layers", "high",
                  margin=0.01),
            Chart(group, f"{fmt} underflow: fraction of ∂ℓ/∂h flushed to zero", underflow_tag(fmt), "layers",
                  "high", margin=0.01),
        ]  # fmt: skip
    out += [
        # ~1e-3 per step is the usual healthy update size (Karpathy's rule of thumb; gradscope.learning_rate)
        Chart(updates, "update ratio ‖Δw‖/‖w‖ per layer, log10 (reference: 1e-3)", UPDATE_RATIO, "layers", "far",
              -3.0, 1.0, reference=-3.0),
        Chart(updates, "weight norm per parameter, log10", WEIGHT_NORM, "parameters", "spread", margin=1.0),
        Chart(updates, "weight decay's share of the update", DECAY_SHARE, "parameters", "high", margin=0.05),
        Chart(updates, "fraction of weights near zero (L1 without the proximal step)", NEAR_ZERO, "parameters",
              "high", margin=0.05),
        # last: empty unless the run has scope.validation or a GradScaler
        Chart(optional, "validation − training loss", GAP),
        Chart(optional, "GradScaler scale, log2", LOSS_SCALE),
        Chart(optional, "steps skipped by the GradScaler", SKIPPED),
    ]  # fmt: skip
    return out


def layout(formats: tuple[str, ...] = ("fp16",)) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout (``SummaryWriter.add_custom_scalars``'s argument):
    categories in question order, one chart per tag, each matching that tag exactly."""
    out: dict[str, dict[str, list[Any]]] = {}
    for chart in charts(formats):
        out.setdefault(chart.category, {})[chart.title] = ["Multiline", [chart.regex]]
    return out


def _escape(text: str) -> str:
    """A regex matching ``text`` literally; spaces stay spaces (``re.escape`` escapes
    them, which TensorBoard's regexes accept but a reader of the layout need not see)."""
    special = set(r".^$*+?{}[]\|()")
    return "".join("\\" + c if c in special else c for c in text)
