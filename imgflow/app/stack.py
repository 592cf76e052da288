"""Client side of the embedded broker stack (``python -m infra.embedded``), either engine:
``tansu`` (on a local SeaweedFS) or ``kafka`` (Apache Kafka, KRaft, one node or a cluster).

Starts the runner as a subprocess by module name (this module never imports ``infra``), waits
for its ``ready bootstrap=HOST:PORT`` line, and stops it again::

    with EmbeddedStack(data_dir, port=0) as stack:
        print(stack.bootstrap, stack.s3_endpoint)

The runner lives in its own session, so a Ctrl-C in the terminal reaches only this process
(which then stops the stack in order); it is given ``--parent-pid`` and shuts itself down if
this process disappears, even by kill -9.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import imgflow
from imgflow.app.stack_processes import StackError, StackProcesses
from imgflow.process import tail

DEFAULT_PORT = 19092
READY_PREFIX = "ready bootstrap="
EXIT_USAGE = 2


def _repo_root() -> Path:
    # infra/ sits next to imgflow/ in the source tree; make it importable for the child.
    return Path(imgflow.__file__).resolve().parent.parent


class EmbeddedStack(StackProcesses):
    """Runs ``python -m infra.embedded`` for the lifetime of this object (a context manager)."""

    def __init__(
        self,
        data_dir: Path,
        port: int = DEFAULT_PORT,
        host: str = "127.0.0.1",
        log_file: Path | None = None,
        engine: str = "tansu",
        nodes: int = 1,
        kafka_config: dict[str, str] | None = None,
        sasl_ssl: Path | None = None,
        scram_users: dict[str, str] | None = None,
        ssl_client_auth: str = "none",
    ) -> None:
        """``sasl_ssl`` (engine kafka): a folder with the broker's TLS ``broker.pem`` (PKCS#8 key,
        then its certificate chain) and, for ``ssl_client_auth`` other than none, ``ca.pem``; adds
        a SASL_SSL listener (``listeners["SASL_SSL"]``) with the SCRAM-SHA-256/512 users
        ``scram_users`` {name: password}, created when the storage is formatted."""
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = port
        self.host = host
        self.engine = engine
        self.nodes = nodes
        self.kafka_config = kafka_config or {}
        self.sasl_ssl = Path(sasl_ssl).expanduser().resolve() if sasl_ssl else None
        self.scram_users = dict(scram_users or {})
        self.ssl_client_auth = ssl_client_auth
        self.listeners: dict[str, str] = {}  # name -> bootstrap of the extra client listeners
        self.log_file = Path(log_file) if log_file else self.data_dir / "logs" / "embedded.log"
        self.bootstrap: str = ""
        self.s3_endpoint: str = ""
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_file, lines)

    # -- lifecycle
    def start(self, timeout: float | None = None) -> EmbeddedStack:
        if self.proc is not None and self.proc.poll() is None:
            return self
        # Kafka's first start resolves its jars from Maven Central (a minute or two on an
        # empty Maven cache) and formats each node's storage.
        timeout = timeout if timeout is not None else (90 if self.engine == "tansu" else 300)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "infra.embedded",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            "--host",
            self.host,
            "--engine",
            self.engine,
            "--nodes",
            str(self.nodes),
            *[arg for k, v in self.kafka_config.items() for arg in ("--kafka-config", f"{k}={v}")],
            *self._sasl_ssl_args(),
            "--parent-pid",
            str(os.getpid()),
            "--start-timeout",
            str(max(5.0, timeout - 2)),
        ]
        env = os.environ.copy()
        root = str(_repo_root())
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("PYTHONUNBUFFERED", "1")
        t0 = time.monotonic()
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=root,
                start_new_session=True,
            )
        self._lines = queue.Queue()
        self._reader = threading.Thread(target=self._read_stdout, args=(self.proc,), name="embedded-stack-stdout", daemon=True)
        self._reader.start()
        deadline = t0 + timeout
        try:
            self._wait_ready(deadline)
        except BaseException:
            self.stop(timeout=20)
            raise
        finally:
            if self.sasl_ssl is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._users_file.unlink()
        self.startup_s = time.monotonic() - t0
        return self

    @property
    def _users_file(self) -> Path:
        return self.data_dir / "scram-users.json"

    def _sasl_ssl_args(self) -> list[str]:
        """The runner's --sasl-ssl arguments; the passwords go in a file only this user can read
        (not on a command line), removed once the runner has started."""
        if self.sasl_ssl is None:
            return []
        fd = os.open(self._users_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.scram_users, f)
        return ["--sasl-ssl", str(self.sasl_ssl), "--scram-users", str(self._users_file), "--ssl-client-auth", self.ssl_client_auth]

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._lines.put(line)
        self._lines.put(None)

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StackError(f"embedded stack did not become ready in time; log tail ({self.log_file}):\n{self.log_tail()}")
            try:
                line = self._lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the runner exited
                code = self.proc.wait()
                what = "refused to start" if code == EXIT_USAGE else f"exited with code {code}"
                raise StackError(f"embedded stack {what}; log tail ({self.log_file}):\n{self.log_tail()}")
            if line.startswith(READY_PREFIX):
                self.bootstrap = line[len(READY_PREFIX) :].strip()
                info = self.info()
                self.s3_endpoint = info.get("s3_endpoint", "")
                self.listeners = dict(info.get("listeners") or {})
                return

    def stop(self, timeout: float = 45) -> None:
        """SIGTERM the runner (it stops the broker, then SeaweedFS), wait, SIGKILL if needed."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # its children get SIGTERM from the kernel (parent-death signal) when it dies
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        if proc.stdout is not None:
            proc.stdout.close()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
