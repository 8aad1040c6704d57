"""One event writer per TensorBoard run of a dashboard directory.

TensorBoard colours a chart's lines by run, so each series gradscope wants told
apart (a layer, the median, a clip threshold) is a run: a sub-directory of the
log directory with its own events file, opened the first time it is written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("gradscope")

# Each run is an events file and a writer thread: gradscope's layout needs 11;
# the bound keeps a caller's mistake from opening thousands.
MAX_RUNS = 32


def run_directory(name: str) -> str:
    """A run name as a relative directory: path separators inside a layer name
    (none in PyTorch's dotted names, but a custom name may have one) are replaced."""
    parts = name.split("/")
    safe = [p.replace(os.sep, "_").replace("\\", "_") or "_" for p in parts]
    return "/".join("_" if p in (".", "..") else p for p in safe)


class RunWriters:
    """Lazily opened ``SummaryWriter`` per run under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._writers: dict[str, Any] = {}
        self._refused = False

    @property
    def names(self) -> list[str]:
        return list(self._writers)

    def open(self, runs: tuple[str, ...]) -> None:
        """Create ``runs`` now, in this order: TensorBoard lists runs by their first
        event's time and colours them in list order (``gradscope.dashboards.charts``)."""
        for run in runs:
            self._get(run)

    def scalar(self, run: str, tag: str, value: float, step: int) -> None:
        writer = self._get(run)
        if writer is not None:
            writer.add_scalar(tag, value, step)

    def _get(self, run: str) -> Any:
        writer = self._writers.get(run)
        if writer is not None:
            return writer
        if len(self._writers) >= MAX_RUNS:
            if not self._refused:
                self._refused = True
                logger.warning("gradscope: TensorBoard: more than %d runs; later series are not written", MAX_RUNS)
            return None
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.root / run_directory(run)))
        self._writers[run] = writer
        return writer

    def close(self) -> None:
        writers, self._writers = self._writers, {}
        for writer in writers.values():
            writer.flush()
            writer.close()
