"""The embedded stack's supervisor, the same for every engine: start the engine, prove the
broker healthy, create the pipeline's topics, write ``DIR/stack.json``, print one ``ready``
line, then restart whatever of the engine dies until a stop is asked for (a signal, or the
parent process gone)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from imgflow.kafka import ensure_topics
from infra.health import check_broker_health, loopback_settings
from infra.procs import Stopping, write_json_atomic

log = logging.getLogger("infra.embedded")


class Supervisor:
    def __init__(self, engine, data_dir: Path, parent_pid: int | None, start_timeout: float) -> None:
        self.engine = engine
        self.data_dir = data_dir
        self.parent_pid = parent_pid
        self.parent_is_direct = parent_pid is not None and os.getppid() == parent_pid
        self.start_timeout = start_timeout
        self.stack_file = data_dir / "stack.json"
        self.stop_reason: str | None = None

    # -- stop requests
    def request_stop(self, signum, _frame) -> None:
        self.stop_reason = signal.Signals(signum).name

    def parent_gone(self) -> bool:
        if self.parent_pid is None:
            return False
        if self.parent_is_direct:
            return os.getppid() != self.parent_pid
        try:
            os.kill(self.parent_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def check(self) -> None:
        if self.stop_reason is None and self.parent_gone():
            self.stop_reason = f"parent process {self.parent_pid} is gone"
        if self.stop_reason is not None:
            raise Stopping(self.stop_reason)

    def write_stack_file(self) -> None:
        write_json_atomic(self.stack_file, {**self.engine.info(), "pid": os.getpid()})

    def start(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout
        self.engine.start(deadline, self.check)
        t_spawned = time.monotonic()
        check_broker_health(self.engine.bootstrap, deadline, self.check, self.engine.name, self.engine.procs())
        t_broker = time.monotonic()
        # The pipeline's topics, as the code defines them (imgflow.topics: the one place).
        ensure_topics(loopback_settings(self.engine.bootstrap))
        self.write_stack_file()
        log.info(
            "%s stack ready in %.2f s (processes %.2f s, broker healthy %.2f s, topics %.2f s)",
            self.engine.name,
            time.monotonic() - t0,
            t_spawned - t0,
            t_broker - t_spawned,
            time.monotonic() - t_broker,
        )
        print(f"ready bootstrap={self.engine.bootstrap}", flush=True)

    def supervise(self) -> None:
        while True:
            self.check()
            if self.engine.restart_dead(self.check):
                self.write_stack_file()
            time.sleep(0.1)

    def shutdown(self) -> None:
        # stop any further signals from interrupting the orderly stop
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        self.engine.stop()
        with contextlib.suppress(FileNotFoundError):
            self.stack_file.unlink()
        log.info("stack stopped")
