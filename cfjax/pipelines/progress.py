"""Progress bars for long work (training, chunked generation), built on ``rich``.

On a terminal: a live bar with ETA and the latest metrics. Elsewhere (CI, logs, pipes): a plain
line every 10% of the work or 30 seconds, whichever comes first.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any


class _Bar:
    def __init__(self, total: int, description: str, disable: bool):
        self.total = max(int(total), 1)
        self.description = description
        self.disable = disable
        self.done = 0
        self.fields: dict = {}
        self._live: Any = None  # rich Progress / TaskID while a live bar is shown
        self._task: Any = None
        self._t0 = time.perf_counter()
        self._last_print = -1
        self._start = 0
        self._last_time = time.perf_counter()
        self.every_s = 30.0

    def _fmt_fields(self) -> str:
        parts = []
        for k, v in self.fields.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        return "  ".join(parts)

    def advance(self, n: int = 1) -> None:
        """Mark ``n`` units done without counting them towards the rate (e.g. resumed work)."""
        self._start += n
        self.update(self.done + n)

    def update(self, done: int, **fields) -> None:
        self.done = int(done)
        self.fields.update(fields)
        if self.disable:
            return
        if self._live is not None:
            self._live.update(self._task, completed=self.done, info=self._fmt_fields())
            return
        decile = int(10 * self.done / self.total)
        now = time.perf_counter()
        due = decile != self._last_print or now - self._last_time >= self.every_s
        if due and (fields or self.done >= self.total):
            self._last_print, self._last_time = decile, now
            el = now - self._t0
            eta = el / max(self.done - self._start, 1) * (self.total - self.done) if self.done > self._start else float("nan")
            print(f"{self.description}: {self.done}/{self.total} ({el:.0f}s, eta {eta:.0f}s)  {self._fmt_fields()}", file=sys.stderr, flush=True)


@contextmanager
def progress_bar(total: int, description: str, disable: bool = False):
    """Context manager yielding a bar with ``update(done, **fields)`` and ``advance(n)``."""
    bar = _Bar(total, description, disable)
    if not disable and sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        ) as live:
            bar._live = live
            bar._task = live.add_task(description, total=bar.total, info="")
            yield bar
    else:
        yield bar


def reporter(bar, on_batch=None, **fields):
    """An ``on_chunk(done, m)`` for :func:`cfjax.batching.map_chunks`: moves ``bar`` to ``done``
    (with ``fields``) and passes each chunk's size m on to ``on_batch``."""

    def on_chunk(done: int, m: int) -> None:
        bar.update(done, **fields)
        if on_batch is not None:
            on_batch(m)

    return on_chunk
