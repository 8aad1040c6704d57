"""Which steps of a watched run were non-finite, episode by episode.

A non-finite step opens an *episode*; the episode lasts until a sampled step is
searched whole and found finite (``clear``).  Two ways out of an episode are
common, and the watch must tell them apart:

* the run diverged: the weights are NaN/inf after ``optimizer.step()`` and every
  later step is non-finite too: the episode never clears, and every number from
  its first step on stays out of the aggregates (the old "diverged" run);
* the user caught gradscope's error at the bad step, skipped that batch
  (``optimizer.zero_grad()``, no ``optimizer.step()``) and trained on (README
  "first bad step"): the next sampled step is finite, the episode clears there,
  and watching resumes with all its signals.  Only the bad steps themselves are
  left out.

The parts that keep run-level state from a step's statistics (the aggregate, the
alerts of the other rules, the regularisation watch) ask ``excludes`` whether a
step's numbers may enter them; the per-step numbers (global norm, loss, update
ratio: the norm history, spikes, the learning-rate rules) ask ``is_bad`` and
leave out non-finite values themselves.  Memory is bounded: the recent bad
steps (their update ratios arrive one flush later) and the first cleared
episodes are kept, the rest counted.
"""

from __future__ import annotations

from collections import deque
from typing import Any

# Bad steps remembered after their episode cleared: an update ratio of a bad step
# (0 when the batch was skipped) arrives at the flush after it, so a few flushes'
# worth is enough; bounded like the spike window (gradscope.watching.norms.SPIKE_WINDOW).
RECENT_BAD_STEPS = 64
# Cleared episodes listed in the report (all are counted), like NonfiniteEpisodes.MAX_LATER.
MAX_CLEARED = 20


class NonfiniteSpans:
    """The open non-finite episode of a run, its recent bad steps, and the cleared episodes."""

    def __init__(self) -> None:
        self.first: int | None = None  # the run's first non-finite step
        self.open_since: int | None = None  # the first step of the episode still open
        self.cleared: list[tuple[int, int]] = []  # (first bad step, first finite step after it)
        self.cleared_count = 0
        self._bad: deque[int] = deque(maxlen=RECENT_BAD_STEPS)

    @property
    def diverged_at(self) -> int | None:
        """The first step of the episode still open: the run is non-finite since then."""
        return self.open_since

    def mark(self, step: int) -> None:
        """``step`` was found non-finite (its record located the first NaN/Inf)."""
        if step not in self._bad:
            self._bad.append(step)
        if self.first is None or step < self.first:
            self.first = step
        if self.cleared and step < self.cleared[-1][1]:
            return  # read late, after a finite step already ended its episode: a bad step only
        if self.open_since is None or step < self.open_since:
            self.open_since = step

    def clear(self, step: int) -> bool:
        """A sampled ``step`` searched whole was finite: the open episode (if it began
        before ``step``) ends here.  Returns whether one ended."""
        if self.open_since is None or step <= self.open_since:
            return False
        self.cleared_count += 1
        if len(self.cleared) < MAX_CLEARED:
            self.cleared.append((self.open_since, step))
        self.open_since = None
        return True

    def excludes(self, step: int | None) -> bool:
        """Whether the numbers of ``step`` stay out of the run's aggregates: a bad step,
        or any step of the episode still open (None: a flush of no step, kept)."""
        if step is None:
            return False
        return (self.open_since is not None and step >= self.open_since) or step in self._bad

    def is_bad(self, step: int) -> bool:
        """Whether ``step`` itself was found non-finite (recently: RECENT_BAD_STEPS).
        The per-step numbers of the ring (norm, loss, update ratio) are each a
        step's own: a finite one within an open episode is a real sample, so they
        are left out by this test (and by their own finiteness), not ``excludes``."""
        return step in self._bad

    def summary(self) -> dict[str, Any]:
        """The episodes that cleared (``report.run["statistics"]``)."""
        out: dict[str, Any] = {"cleared_episodes": [list(span) for span in self.cleared]}
        if self.cleared_count > len(self.cleared):
            out["cleared_episode_count"] = self.cleared_count
        return out
