"""Heatmap images drawn off the training thread.

Drawing a heatmap takes tens of milliseconds: too long for a training step, so a
background thread draws it.  The training thread only hands over a snapshot of
the history (``RunHistory.to_dict``, plain lists) when a drawing is due:

- at a bounded cadence: a new request is accepted when at least ``min_interval``
  seconds have passed and drawing stays under ``budget`` of the wall time (the
  last drawing's duration / ``budget``), so with the GIL shared it never shows
  in the step time;
- always (``force``) at the run's first bad step and at close.

The hand-over is one slot: a new request replaces one not drawn yet (a stale
picture is worth nothing), and the training thread never waits for the worker.
``close`` draws what is pending and joins the thread.  A drawing that fails is
logged once and never raised into training.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("gradscope")

# 2 % of wall time at most; at most one drawing per 5 s otherwise.
BUDGET = 0.02
MIN_INTERVAL_SECONDS = 5.0
JOIN_SECONDS = 60.0

# (tag, PNG bytes, width, height, step) -> written to the run's events file
ImageSink = Callable[[str, bytes, int, int, int], None]


def encode(history: dict[str, Any], quantity: str) -> tuple[bytes, int, int]:
    """A history's heatmap as PNG bytes, with its size."""
    from gradscope.render.heatmap import heatmap_image

    image, _ = heatmap_image(history, quantity)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)  # fast: the image is small either way
    return out.getvalue(), image.width, image.height


class HeatmapWorker:
    """The background drawer (see the module docstring)."""

    def __init__(
        self,
        sink: ImageSink,
        tags: dict[str, str],
        *,
        budget: float = BUDGET,
        min_interval: float = MIN_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.tags = dict(tags)  # quantity -> image tag
        self.budget = budget
        self.min_interval = min_interval
        self.clock = clock
        self.drawn: list[int] = []  # steps drawn, in order
        self.draw_threads: set[int] = set()  # idents of the threads that drew (tests: never the caller's)
        self.last_seconds = 0.0
        self._last_request: float | None = None
        self._last_drawn: tuple[int, int] | None = None  # (step, steps in the history) of the last request
        self._pending: tuple[dict[str, Any], int] | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._failed = False

    # -- training thread ------------------------------------------------------
    def due(self, force: bool = False) -> bool:
        """Whether a request now would be accepted (ask before building the snapshot)."""
        if self._closing:
            return False
        if force or self._last_request is None:
            return True
        wait = max(self.min_interval, self.last_seconds / self.budget)
        return self.clock() - self._last_request >= wait

    def request(self, history: dict[str, Any], step: int, force: bool = False) -> bool:
        """Hand over a snapshot to draw; returns whether it was accepted."""
        if not self.due(force):
            return False
        drawn = (step, len(history.get("steps") or ()))
        if drawn == self._last_drawn:
            return True  # the same steps at the same step (the first bad step was the last): one image
        self._last_drawn = drawn
        self._last_request = self.clock()
        with self._cond:
            self._pending = (history, step)  # replaces a stale request not drawn yet
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gradscope-heatmaps", daemon=True)
            self._thread.start()
        return True

    def close(self, timeout: float = JOIN_SECONDS) -> None:
        """Draw what is pending, then stop and join the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():  # pragma: no cover - a drawing stuck for a minute
                logger.warning("gradscope: the heatmap thread did not finish within %.0f s", timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- worker thread --------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                job, self._pending = self._pending, None
                if job is None:
                    return  # closing, nothing left
            self._draw(*job)

    def _draw(self, history: dict[str, Any], step: int) -> None:
        start = time.perf_counter()
        try:
            for quantity, tag in self.tags.items():
                png, width, height = encode(history, quantity)
                self.sink(tag, png, width, height, step)
        except Exception as exc:  # never into training: the dashboards are a by-product
            if not self._failed:
                self._failed = True
                logger.warning("gradscope: drawing the heatmap failed (%s: %s)", type(exc).__name__, exc)
            return
        finally:
            self.last_seconds = time.perf_counter() - start
        self.draw_threads.add(threading.get_ident())
        self.drawn.append(step)
