"""How many cores the LLM may take on a machine it shares with the vision stage."""

from __future__ import annotations

import os
import time


class IdleCores:
    """How many of this machine's cores other processes left idle, measured between calls
    from /proc/stat (all processes' busy time) minus this process's own CPU time.

    On a machine shared with the vision stage the LLM takes half the cores; when the other
    stages wait (the pipeline's start and tail, a backlog only the LLM has), it may take
    them all. llama.cpp's threads spin while they wait, so taking a busy core is far worse
    than leaving an idle one: any other process using more than ``busy`` of a core gives
    it back at the next check (a fair share of a contended core is ~0.5 of it)."""

    def __init__(self, interval_s: float = 0.5, busy: float = 0.3) -> None:
        self._clock = time.monotonic
        self.interval_s, self.busy = interval_s, busy
        self.cores = len(os.sched_getaffinity(0))
        self._tick = os.sysconf("SC_CLK_TCK")
        self._last = self._sample()
        self.others = float(self.cores)  # until measured: assume busy

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / self._tick  # all but idle, iowait
        t = os.times()
        return self._clock(), busy, t.user + t.system

    def others_busy(self) -> float:
        """Cores' worth of CPU the other processes used over the last interval (re-measured
        at most every ``interval_s``)."""
        now = self._sample()
        if now is None or self._last is None:
            return float(self.cores)
        if now[0] - self._last[0] >= self.interval_s:
            wall = now[0] - self._last[0]
            self.others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
            self._last = now
        return self.others

    def threads(self, base: int, most: int) -> int:
        """``base`` threads, or up to ``most`` while the other cores stay idle."""
        if most <= base:
            return base
        free = self.cores - self.others_busy()
        return max(base, min(most, int(free + 0.5))) if self.others <= self.busy else base
