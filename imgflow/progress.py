"""The one progress display of the commands that count images (`imgflow run`, `imgflow
backfill`, `imgflow export csv`): a rich bar redrawn in place on a terminal, a line every few
seconds when output is a file or a pipe."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


def clock(seconds: float) -> str:
    """``seconds`` as H:MM:SS."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """A count of ``noun`` towards a ``total`` (None: unknown) with its rate, ETA and a detail text.

    On a terminal (``stream`` a tty) a rich bar, ``transient`` or left on screen when closed;
    our log lines print above it, not into it. Otherwise the caller's line, at most every
    ``every_s`` seconds (none when it gives no line). ``unit`` "": no rate shown."""

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        completed: int = 0,
        noun: str = "images",
        unit: str = "img/s",
        stream: TextIO | None = None,
        transient: bool = False,
        every_s: float = 5.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self._last_line = 0.0
        self._bar: RichProgress | None = None
        self._handlers: list[tuple[logging.StreamHandler, TextIO]] = []
        if not self.tty:
            return
        columns: list[ProgressColumn] = [TextColumn("{task.description}")]
        if total is not None:
            columns += [BarColumn(bar_width=24), TextColumn("{task.completed}/{task.total}")]
        else:
            columns += [TextColumn(f"{{task.completed}} {noun}")]
        columns += [TextColumn(f"{{task.fields[rate]}} {unit}")] if unit else []
        columns += [TimeElapsedColumn()]
        if total is not None:
            columns += [TextColumn("ETA {task.fields[eta]}")]
        columns += [TextColumn("{task.fields[info]}")]
        self._bar = RichProgress(*columns, console=Console(file=self.stream), transient=transient, refresh_per_second=4)
        self._task = self._bar.add_task(label, total=total, completed=completed, rate="-", eta="-", info="")
        self._bar.start()
        for handler in logging.getLogger().handlers:  # sys.stderr is now the bar's proxy
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
                earlier = handler.setStream(sys.stderr)
                if earlier is not None:
                    self._handlers.append((handler, earlier))

    def update(
        self,
        completed: int,
        *,
        total: int | None = None,
        rate: str = "-",
        eta: str = "-",
        info: str = "",
        line: Callable[[], str] | None = None,
        now: bool = False,
    ) -> None:
        """Show ``completed``; ``line`` makes the line printed off a terminal, ``now``
        prints it whatever the time since the last one."""
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, rate=rate, eta=eta, info=info, total=total)  # None: unchanged
        elif line is not None and (now or time.monotonic() - self._last_line >= self.every_s):
            print(line(), file=self.stream, flush=True)
            self._last_line = time.monotonic()

    def close(self) -> None:
        if self._bar is not None:
            for handler, stream in self._handlers:
                handler.setStream(stream)
            self._bar.stop()
            self._bar = None
