"""Process plumbing shared by every engine of the embedded stack: free ports, child
processes that die with their supervisor, log tails, atomic state files."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger("infra.embedded")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class StartupError(RuntimeError):
    """The stack could not be started; the message says why."""


class Stopping(Exception):
    """Raised inside waits when a stop was requested (signal or parent gone)."""


def port_is_free(host: str, port: int) -> bool:
    """True when a listener could bind ``host:port`` now (SO_REUSEADDR, as the brokers use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free right now (held open together while chosen)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return f"(no log at {path})"
    data = _ANSI.sub("", data)
    return "\n".join(data.splitlines()[-lines:])


def write_json_atomic(path: Path, data: dict, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_libc = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _child_preexec() -> None:  # runs in the forked child, before exec
    # Own session: a Ctrl-C in the terminal reaches only the supervisor, which stops the
    # children in order.
    os.setsid()
    # If the supervisor is killed outright, the kernel sends SIGTERM to the child.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


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
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, preexec_fn=_child_preexec)


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
