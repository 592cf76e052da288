"""`imgflow run`'s supervision: its stage processes and the embedded broker, each restarted
when it dies, under one give-up rule (``RestartBudget``)."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from imgflow.app.stack import EmbeddedStack
from imgflow.app.stack_processes import StackError, wait_for_earlier_stack, wait_gone
from imgflow.process import own_session_dying_with_parent

log = logging.getLogger(__name__)

ROLES = ["sink", "enrich", "vision", "watcher"]  # started in this order, stopped in reverse


class RestartBudget:
    """A process that died is started again, unless it has been restarted more than
    ``limit`` times in the last ``window_s`` seconds: a crash loop, which ends the run."""

    def __init__(self, limit: int = 5, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self.times: list[float] = []

    def allows_another(self) -> bool:
        """Count a restart now; False when it is one too many."""
        now = time.monotonic()
        self.times = [t for t in self.times if now - t < self.window_s] + [now]
        return len(self.times) <= self.limit


@dataclass
class Child:
    role: str
    argv: list[str]
    log_path: Path
    env: dict
    proc: subprocess.Popen | None = None
    restarts: RestartBudget = field(default_factory=RestartBudget)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            # Own session: a Ctrl-C in the terminal reaches only us; we stop children in order.
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, preexec_fn=own_session_dying_with_parent)

    def running(self) -> subprocess.Popen | None:
        """The process while it runs; None once it has exited (or before it started)."""
        return self.proc if self.proc is not None and self.proc.poll() is None else None


class Children:
    """The stage processes of a run, by role."""

    def __init__(self) -> None:
        self.by_role: dict[str, Child] = {}

    def start(self, child: Child) -> None:
        child.start()
        self.by_role[child.role] = child

    def restart_dead(self) -> bool:
        """Start again every child that died; False: one keeps failing, give up."""
        for child in self.by_role.values():
            if child.running() is not None:
                continue
            code = child.proc.returncode if child.proc else None
            if not child.restarts.allows_another():
                print(f"\n{child.role} keeps failing (exit {code}); see {child.log_path}", flush=True)
                return False
            log.warning("%s exited with %s: restarting", child.role, code)
            print(f"\n{child.role} exited ({code}): restarting it (log: {child.log_path})", flush=True)
            child.start()
        return True

    def stop(self, timeout: float = 60, together: bool = False) -> None:
        """Stop every stage: one after the other, watcher first and sink last, so the sink
        drains what the others commit while they stop; or, ``together``, all at once."""
        waves = [list(reversed(ROLES))] if together else [[role] for role in reversed(ROLES)]
        for roles in waves:
            stopping = [(child, proc) for child in map(self.by_role.get, roles) if child is not None and (proc := child.running()) is not None]
            for _, proc in stopping:
                proc.send_signal(signal.SIGTERM)
            for child, proc in stopping:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.error("%s did not stop in %ss: killing it", child.role, timeout)
                    proc.kill()
                    proc.wait()


def restart_stack(stack: EmbeddedStack, restarts: RestartBudget) -> bool:
    """The embedded broker's runner, which died, started again on the same address and data
    (the stages wait for it, then carry on from their committed offsets). False: give up."""
    code = stack.proc.returncode if stack.proc is not None else None
    if not restarts.allows_another():
        print(f"\nthe embedded broker keeps failing (exit {code}); see {stack.log_file}", flush=True)
        return False
    log.warning("the embedded broker's runner exited with %s: restarting it", code)
    print(f"\nthe embedded broker exited ({code}): restarting it at {stack.bootstrap} (log: {stack.log_file})", flush=True)
    processes = stack.engine_pids()  # the engine's, stopping now that their runner is gone
    stack.stop()
    wait_gone(processes, 60)
    try:
        wait_for_earlier_stack(stack.data_dir)
        stack.start()
    except StackError as exc:
        print(f"the embedded broker did not start again: {exc}", flush=True)
        return True  # tried again next round, counted
    print(f"broker back at {stack.bootstrap}", flush=True)
    return True


def accepts(bootstrap: str) -> bool:
    """Whether anything of ``bootstrap`` (HOST:PORT,...) accepts a connection now."""
    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), 1.0):
                return True
        except (OSError, ValueError):
            continue
    return False
