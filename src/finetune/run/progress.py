"""Progress of the long passes a person waits for (feature extraction, image verification, the drift pass).

On a terminal: a rich progress bar, the library behind the run's own RichProgressBar, with count, rate and ETA.
Without one (a log file, a SLURM job, CI): one log line every 10%, so a log shows the pass is alive and when it ends.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta

log = logging.getLogger(__name__)


def _eta(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class Progress:
    """`with Progress("extracting train features", total=n) as bar: bar.advance(k)`; silent when not `enabled`."""

    def __init__(self, description: str, total: int, unit: str = "rows", enabled: bool = True,
                 terminal: bool | None = None):
        self.description, self.total, self.unit, self.enabled = description, max(int(total), 0), unit, enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.done, self._next_tenth, self._bar = 0, 1, None

    def __enter__(self) -> "Progress":
        self.start = time.perf_counter()
        if self.enabled and self.terminal and self.total:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TaskProgressColumn,
                                       TextColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TaskProgressColumn(), TextColumn(f"{{task.speed:>8,.0f}} {self.unit}/s"),
                                     TextColumn("ETA"), TimeRemainingColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, count: int) -> None:
        self.done += int(count)
        if not self.enabled or not self.total:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=count)
            return
        while self._next_tenth <= 10 and self.done * 10 >= self._next_tenth * self.total:
            elapsed = time.perf_counter() - self.start
            rate = self.done / elapsed if elapsed > 0 else float("inf")
            remaining = (self.total - self.done) / rate if rate > 0 else 0.0
            log.info("%s: %d%% (%s of %s %s, %s %s/s, ETA %s)", self.description, 10 * self._next_tenth,
                     f"{self.done:,}", f"{self.total:,}", self.unit, f"{rate:,.0f}", self.unit, _eta(remaining))
            self._next_tenth += 1

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
            if exc[0] is None:
                elapsed = time.perf_counter() - self.start
                log.info("%s: %s %s in %.1fs", self.description, f"{self.done:,}", self.unit, elapsed)
