"""The options of ``gradscope.watch`` that have a fixed set of values or a cadence,
and the check of the arguments (one actionable ``GradscopeError`` each)."""

from __future__ import annotations

from collections.abc import Sequence

from gradscope.errors import GradscopeError
from gradscope.formats import get_format

RAISE_CODES = ("nonfinite", "gradient-spike", "update-ratio", "fp16-overflow", "learning-rate-too-high")
WATCH_SAMPLE = 4096
# The layer diagnosis (depth, init, precision, units) of a flush costs a few
# milliseconds of Python; with every=1 it would run each step.  Its findings
# change over hundreds of steps, so it runs at most once per this many steps,
# and the statistics of weights and weight gradients, which only it reads, are
# taken on those steps only (the per-parameter gradient norms, exact, are taken
# every step).  Non-finite values, spikes and update ratios are still checked
# at every flush.
DIAGNOSE_EVERY_STEPS = 10
# "full": every hooked layer on sampled steps, gradient norms every step.
# "light": only layers that own parameters (Linear, Conv, Embedding, norms,
# attention), and gradient norms on sampled steps only; for models whose steps
# are short next to their size (README "Cost": an MLP of 8 x 1024 at batch 256).
TIERS = ("full", "light")


def check_arguments(every: int, tier: str, formats: Sequence[str], raise_on: Sequence[str]) -> None:
    if int(every) < 1:
        raise GradscopeError(f"every must be a positive number of steps, not {every!r}")
    if tier not in TIERS:
        raise GradscopeError(f"tier: unknown tier {tier!r}; choose among {', '.join(TIERS)}")
    for name in formats:
        get_format(name)  # raises on an unknown format name
    unknown = [code for code in raise_on if code not in RAISE_CODES]
    if unknown:
        raise GradscopeError(f"raise_on: unknown code {unknown[0]!r}; choose among {', '.join(RAISE_CODES)}")
