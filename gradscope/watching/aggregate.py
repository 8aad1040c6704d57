"""The whole-run aggregate of a watched run: every flush's per-layer statistics
merged exactly (Chan et al. 1979, see ``gradscope.stats.merge_stats``).

After the run's first non-finite step the statistics are diverged (NaN/inf, or
the blow-up's numbers): ``diverge(step)`` freezes the aggregate, later flushes
are counted but not merged, so the final diagnosis, loss scale and table read
the run as it was before it broke (``coverage`` says which steps that is).

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


class RunningRecord:
    """Per-layer statistics merged over flushes, plus the run-level Record fields."""

    def __init__(self) -> None:
        self.record = Record()  # notes, steps, input; layers are filled by ``materialize``
        self._layers: dict[str, LayerRecord] = {}  # name -> layer template (stats unused)
        self._rows = torch.zeros(0, SIZE, dtype=torch.float64)
        self._index: dict[tuple[str, str], int] = {}  # (layer, role) -> row
        self.diverged_at: int | None = None  # the run's first non-finite step, once known
        self.excluded_flushes = 0  # flushes with statistics, not merged: from diverged_at on

    def diverge(self, step: int) -> None:
        """The run went non-finite at ``step``: merge nothing from now on (the flush
        of ``step`` itself, whose statistics hold the NaN/inf, included)."""
        if self.diverged_at is None or step < self.diverged_at:
            self.diverged_at = step

    def coverage(self) -> dict[str, object]:
        """Which steps the merged statistics cover (``report.run["statistics"]``)."""
        if self.diverged_at is None:
            return {
                "steps": "all",
                "sampled_steps": self.record.steps,
                "diverged_at": None,
                "excluded_sampled_steps": 0,
            }
        return {
            "steps": f"before step {self.diverged_at}",
            "sampled_steps": self.record.steps,
            "diverged_at": self.diverged_at,
            "excluded_sampled_steps": self.excluded_flushes,
        }

    def layer_names(self) -> set[str]:
        """The layers merged so far."""
        return set(self._layers)

    def merge(self, flush: Record, step: int | None = None) -> None:
        """Merge one flush's record (host statistics) of ``step`` into the aggregate:
        nothing from the first non-finite step on (a flush read one flush late,
        ``Scope.read_late``, may complete after a later step's check found it)."""
        if self.diverged_at is not None and (step is None or step >= self.diverged_at):
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
