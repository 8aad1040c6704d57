"""A bounded layer x step history of a watched run, for heatmaps and curves.

Each column is one or more consecutive flushes; each row one layer (forward
order).  A cell holds log10 of the RMS of ∂ℓ/∂h (or of the activation) the
flush already brought to the host, plus whether it held a NaN/inf: nothing
here touches a device tensor, so recording costs no host sync.

The number of columns is bounded (``MAX_COLUMNS``).  When the history is full,
neighbouring columns are merged pairwise and every later column covers twice
as many flushes as before (``stride``), so columns stay evenly spaced in
flushes whatever the length of the run.

Merge semantics (one rule per question a reader asks of the heatmap):

- a cell keeps the *largest* log10 RMS of the columns merged: the heatmap
  answers "how bad did it get", and a spike lasting one flush must survive any
  number of merges; a vanishing layer is small at every step, so the max still
  shows it small;
- a cell is non-finite when *any* merged cell was (logical OR): the first bad
  step is never merged away;
- the global gradient norm keeps the largest norm (a spike survives, as above),
  and is non-finite when any was;
- the loss keeps the *later* column's value (the loss is read as a trend, and
  the later value is where training got to), but is non-finite when any merged
  loss was;
- a column's step is its later step: a column covers the steps after the
  previous column's step up to and including its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradscope.dashboards.charts import LOG10_FLOOR

if TYPE_CHECKING:
    from gradscope.record import Record
    from gradscope.stats import Stats

# 240 columns: a heatmap 2-3 px per column fits TensorBoard's image card and an
# HTML report page, and 240 = 2^4 * 15 halves cleanly a few times.
MAX_COLUMNS = 240

# An RMS of exactly zero (a dead layer) is drawn at this floor, log10 of float32's
# smallest subnormal, rather than left blank, which would read as "not measured".

QUANTITIES = ("gradient", "activation")


def log10_rms(stats: Stats | None) -> float | None:
    """log10 of the RMS of the finite values, None when nothing finite was measured."""
    if stats is None or not stats.count or not stats.moments_valid:
        return None
    rms = stats.rms
    if not math.isfinite(rms):
        return None
    return LOG10_FLOOR if rms <= 0.0 else max(LOG10_FLOOR, math.log10(rms))


def _max_or_none(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    if not math.isfinite(a) or not math.isfinite(b):
        return math.inf  # non-finite dominates: kept as non-finite
    return max(a, b)


def _later_loss(earlier: float | None, later: float | None) -> float | None:
    if earlier is not None and not math.isfinite(earlier):
        return earlier  # a non-finite loss in the span marks the column
    return later if later is not None else earlier


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass
class Column:
    """One column: the flushes that ended at optimizer step ``step``."""

    step: int
    flushes: int = 1
    cells: dict[str, dict[str, float]] = field(default_factory=lambda: {q: {} for q in QUANTITIES})
    nonfinite: dict[str, set[str]] = field(default_factory=lambda: {q: set() for q in QUANTITIES})
    loss: float | None = None  # may be non-finite here; None only when not measured
    grad_norm: float | None = None

    def absorb(self, later: Column) -> None:
        """Merge ``later`` (the next column in time) into this one, by the module's rules."""
        for quantity in QUANTITIES:
            mine = self.cells[quantity]
            for layer, value in later.cells[quantity].items():
                mine[layer] = value if layer not in mine else max(mine[layer], value)
            self.nonfinite[quantity] |= later.nonfinite[quantity]
        self.loss = _later_loss(self.loss, later.loss)
        self.grad_norm = _max_or_none(self.grad_norm, later.grad_norm)
        self.step = later.step
        self.flushes += later.flushes


class RunHistory:
    """The layer x step history of one watched run (see the module docstring)."""

    def __init__(self, max_columns: int = MAX_COLUMNS) -> None:
        if max_columns < 2:
            raise ValueError("a history needs at least 2 columns")
        self.max_columns = max_columns
        self.columns: list[Column] = []
        self.stride = 1  # flushes per column for new columns; doubles at each halving
        self.clip_threshold: float | None = None
        self._layer_order: dict[str, int] = {}  # layer -> forward index (first seen)
        self.first_bad_step: int | None = None
        self._pending: list[tuple[int, str, str]] = []  # marks waiting for the flush that covers them

    # -- feeding --------------------------------------------------------------
    def add_flush(
        self,
        step: int,
        record: Record,
        global_norms: Iterable[tuple[int, float]] = (),
        losses: Iterable[tuple[int, float]] = (),
        clip: dict[str, Any] | None = None,
    ) -> bool:
        """Add one flush (its host-side record, the norms and losses of the steps it
        covers).  Returns True when this flush is the run's first bad one (a
        non-finite cell, loss or norm), the moment to draw a heatmap."""
        column = Column(step=step)
        for mark in [m for m in self._pending if m[0] <= step]:
            self._pending.remove(mark)
            column.nonfinite[mark[2]].add(mark[1])
        for layer in record.layers:
            self._layer_order.setdefault(layer.name, layer.index)
            for quantity in QUANTITIES:
                stats = layer.gradient if quantity == "gradient" else layer.activation
                value = log10_rms(stats)
                if value is not None:
                    column.cells[quantity][layer.name] = value
                if stats is not None and stats.nonfinite_count > 0:
                    column.nonfinite[quantity].add(layer.name)
        for _, norm in global_norms:
            column.grad_norm = _max_or_none(column.grad_norm, norm)
        for _, loss in losses:
            column.loss = _later_loss(column.loss, loss)
        if clip is not None and clip.get("threshold") is not None:
            self.clip_threshold = float(clip["threshold"])
        bad = self._is_bad(column)
        last = self.columns[-1] if self.columns else None
        if last is not None and step <= last.step:
            # A second flush of the same step (at close, only an update ratio arrived):
            # one column per step, merged by the same rules.
            flushes = last.flushes
            last.absorb(column)
            last.step, last.flushes = max(last.step, step), flushes
        else:
            self._append(column)
        if bad and self.first_bad_step is None:
            self.first_bad_step = step
            return True
        return False

    def mark_nonfinite(self, step: int, layer: str | None, role: str) -> bool:
        """Mark the cell of a non-finite value the per-step check found on an
        unsampled step (which has no statistics): in the column covering ``step``,
        or in the next flush's column.  Roles other than activation/input mark the
        gradient row (weights and weight gradients go bad in the backward and the
        update).  Returns True when this is the run's first bad step."""
        if layer is None:
            return False
        # a layer no flush has recorded yet goes after the known ones
        self._layer_order.setdefault(layer, 1_000_000 + len(self._layer_order))
        quantity = "activation" if role in ("activation", "input") else "gradient"
        column = next((c for c in self.columns if c.step >= step), None)
        if column is not None:
            column.nonfinite[quantity].add(layer)
        else:
            self._pending.append((step, layer, quantity))
        first = self.first_bad_step is None
        if first or step < self.first_bad_step:  # type: ignore[operator]
            self.first_bad_step = step
        return first

    @staticmethod
    def _is_bad(column: Column) -> bool:
        if any(column.nonfinite[q] for q in QUANTITIES):
            return True
        return any(v is not None and not math.isfinite(v) for v in (column.loss, column.grad_norm))

    def _append(self, column: Column) -> None:
        last = self.columns[-1] if self.columns else None
        if last is not None and last.flushes < self.stride:
            last.absorb(column)
            return
        if len(self.columns) >= self.max_columns:
            self._halve()
            last = self.columns[-1]
            if last.flushes < self.stride:
                last.absorb(column)
                return
        self.columns.append(column)

    def _halve(self) -> None:
        """Merge neighbouring columns pairwise; new columns then cover twice the flushes."""
        merged: list[Column] = []
        for i in range(0, len(self.columns), 2):
            first = self.columns[i]
            if i + 1 < len(self.columns):
                first.absorb(self.columns[i + 1])
            merged.append(first)
        self.columns = merged
        self.stride *= 2

    # -- reading --------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return sorted(self._layer_order, key=lambda name: self._layer_order[name])

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable history (``report.run["history"]``, docs/report-schema.md)."""
        layers = self.layers
        index = {name: i for i, name in enumerate(layers)}
        columns = list(self.columns)
        if self._pending:  # marks past the last flush: one column of their own
            extra = Column(step=max(m[0] for m in self._pending))
            for _, layer, quantity in self._pending:
                extra.nonfinite[quantity].add(layer)
            columns.append(extra)
        out: dict[str, Any] = {
            "steps": [c.step for c in columns],
            "layers": layers,
            "nonfinite": {},
            "loss": [_finite_or_none(c.loss) for c in columns],
            "grad_norm": [_finite_or_none(c.grad_norm) for c in columns],
            "clip_threshold": _finite_or_none(self.clip_threshold),
        }
        for quantity in QUANTITIES:
            out[f"{quantity}_rms_log10"] = [[c.cells[quantity].get(name) for c in columns] for name in layers]
            out["nonfinite"][quantity] = sorted(
                [index[name], j] for j, c in enumerate(columns) for name in c.nonfinite[quantity]
            )
        return out
