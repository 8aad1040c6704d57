"""The whole-run aggregate of a watched run: every flush's per-layer statistics
merged exactly (Chan et al. 1979, see ``gradscope.stats.merge_stats``).

The statistics of a non-finite step, and of every step of a non-finite episode
still open (the run diverged: NaN/inf or the blow-up's numbers), are counted
but not merged (``gradscope.watching.divergence``), so the final diagnosis, loss
scale and table read the run's finite steps: all of them before a divergence,
and again after an episode that cleared (a bad batch caught and skipped).
``coverage`` says which steps that is.

The merged vectors live in one host tensor, one row per (layer, role), and
each flush merges into it with a single stacked ``merge_stats`` call; Stats
objects (which convert their vector to Python floats) are built only when a
report asks for the Record, not once per flush.
"""

from __future__ import annotations

import dataclasses

import torch

from gradscope.record import LayerRecord, Record
from gradscope.stats import SIZE, Stats, merge_stats
from gradscope.watching.divergence import NonfiniteSpans


class RunningRecord:
    """Per-layer statistics merged over flushes, plus the run-level Record fields."""

    def __init__(self, spans: NonfiniteSpans | None = None) -> None:
        self.spans = spans if spans is not None else NonfiniteSpans()
        self.record = Record()  # notes, steps, input; layers are filled by ``materialize``
        self._layers: dict[str, LayerRecord] = {}  # name -> layer template (stats unused)
        self._rows = torch.zeros(0, SIZE, dtype=torch.float64)
        self._index: dict[tuple[str, str], int] = {}  # (layer, role) -> row
        self.excluded_flushes = 0  # flushes with statistics, not merged: non-finite steps

    @property
    def diverged_at(self) -> int | None:
        """The first step of the non-finite episode still open (None while finite)."""
        return self.spans.diverged_at

    def coverage(self) -> dict[str, object]:
        """Which steps the merged statistics cover (``report.run["statistics"]``)."""
        cut = self.spans.diverged_at
        cleared = self.spans.summary()
        if cut is not None:
            steps = f"before step {cut}" + (", finite steps only" if self.spans.cleared else "")
        elif self.spans.cleared or self.excluded_flushes:
            steps = "finite steps"
        else:
            steps = "all"
        return {
            "steps": steps,
            "sampled_steps": self.record.steps,
            "diverged_at": cut,
            "excluded_sampled_steps": self.excluded_flushes,
            **cleared,
        }

    def layer_names(self) -> set[str]:
        """The layers merged so far."""
        return set(self._layers)

    def merge(self, flush: Record, step: int | None = None) -> None:
        """Merge one flush's record (host statistics) of ``step`` into the aggregate:
        nothing of a non-finite step or of an episode still open (a flush read one
        flush late, ``Scope.read_late``, may complete after a later step's check
        found that one: its own step is then kept)."""
        if self.spans.excludes(step) or (step is None and self.spans.diverged_at is not None):
            self.excluded_flushes += bool(flush.layers)
            return
        merge_at: list[int] = []
        merge_new: list[torch.Tensor] = []
        appended: list[torch.Tensor] = []
        for layer in flush.layers:
            if layer.name not in self._layers:
                self._layers[layer.name] = dataclasses.replace(layer, stats={}, time={})
            for role, profile in layer.time.items():  # sequence layers: a few numbers per time bin
                self._layers[layer.name].add_time(role, profile)
            for role, stats in layer.stats.items():
                row = self._index.get((layer.name, role))
                if row is None:
                    self._index[(layer.name, role)] = len(self._rows) + len(appended)
                    appended.append(stats.vector)
                else:
                    merge_at.append(row)
                    merge_new.append(stats.vector)
        if merge_at:
            at = torch.tensor(merge_at)
            self._rows[at] = merge_stats(self._rows[at], torch.stack(merge_new))
        if appended:
            self._rows = torch.cat([self._rows, torch.stack(appended).to(torch.float64)])
        if flush.input is not None:
            agg = self.record.input
            self.record.input = flush.input if agg is None else agg.merge(flush.input)
        if flush.layers:
            self.record.steps += 1

    def materialize(self) -> Record:
        """The aggregate as a Record (layers in first-seen order, Stats built now)."""
        layers = {name: dataclasses.replace(layer, stats={}) for name, layer in self._layers.items()}
        for (name, role), row in self._index.items():
            layers[name].stats[role] = Stats(self._rows[row].clone())
        self.record.layers = list(layers.values())
        return self.record
