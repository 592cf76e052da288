"""Deterministic crash injection, for the tests that kill a stage at a given instruction."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


class CrashPoints:
    """Deterministic crash injection for tests: ``IMGFLOW_CRASH_AT=stage:point[:n]`` kills
    this process with SIGKILL the n-th time (default 1st) it reaches ``point``."""

    def __init__(self, stage: str, spec: str | None = None) -> None:
        spec = spec if spec is not None else os.environ.get("IMGFLOW_CRASH_AT", "")
        self.point, self.remaining = None, 0
        parts = spec.split(":") if spec else []
        if len(parts) >= 2 and parts[0] == stage:
            self.point, self.remaining = parts[1], int(parts[2]) if len(parts) > 2 else 1

    def reach(self, point: str) -> None:
        if point == self.point:
            self.remaining -= 1
            if self.remaining <= 0:
                log.warning("crash point %s reached: SIGKILL", point)
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)
