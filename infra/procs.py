"""Process plumbing shared by every engine of the embedded stack: starting, stopping and
restarting children, atomic state files (ports, pre-exec and log tails: ``imgflow.process``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from imgflow.process import own_session_dying_with_parent, tail

log = logging.getLogger("infra.embedded")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class StartupError(RuntimeError):
    """The stack could not be started; the message says why."""


class Stopping(Exception):
    """Raised inside waits when a stop was requested (signal or parent gone)."""


def write_json_atomic(path: Path, data: dict, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def child_env(drop: tuple[str, ...], **values: str) -> dict:
    """This process's environment without ``drop`` (so a developer's own AWS profile or a
    stray setting never leaks into a child), plus ``values``."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(values)
    return env


def reopen_log(out, path: Path, name: str):
    """The append-mode log file a child writes to (kept open across restarts), with a marker."""
    if out is None or out.closed:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = open(path, "ab")  # noqa: SIM115 - kept open across restarts of the child
    out.write(f"\n--- {name} start {time.strftime('%Y-%m-%dT%H:%M:%S')} ---\n".encode())
    out.flush()
    return out


def spawn_child(cmd: list[str], out, env: dict, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, preexec_fn=own_session_dying_with_parent)


def raise_if_exited(proc: subprocess.Popen | None, name: str, log_path: Path) -> None:
    """During start-up: a child that is gone fails the start with the tail of its log."""
    if proc is None or proc.poll() is not None:
        raise StartupError(f"{name} exited with code {proc.returncode if proc else '?'}; log tail ({log_path}):\n{tail(log_path)}")


def stop_process(proc: subprocess.Popen | None, name: str, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    log.info("stopping %s (pid %d)", name, proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, timeout)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def back_off_if_crash_looping(restarts: list[float], name: str, log_path: Path, check) -> list[float]:
    """Before restarting ``name``: its restart times of the last 30 s with this one added.
    More than 5: a crash loop, logged with the tail of its log and slowed down a little so the
    supervisor does not spin (``check`` may then raise Stopping)."""
    now = time.monotonic()
    recent = [t for t in restarts if now - t < 30] + [now]
    if len(recent) > 5:
        log.error("%s keeps dying (%d restarts in 30 s); log tail:\n%s", name, len(recent), tail(log_path, 15))
        time.sleep(min(5.0, 0.5 * len(recent)))
        check()
    return recent
