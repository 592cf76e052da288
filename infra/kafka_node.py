"""One node of the kafka engine, and the SASL_SSL client listener every node may carry.

Each node is a combined broker + controller (``process.roles=broker,controller``) with a static
voter set, its data in ``DIR/kafka/node-N/data``, formatted once; see ``infra/kafka_broker.py``.
"""

from __future__ import annotations

import base64
import logging
import re
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from infra.kafka_jars import java_cmd
from infra.procs import StartupError, child_env, reopen_log, spawn_child, stop_process

log = logging.getLogger("infra.embedded")

KAFKA_STOP_TIMEOUT = 30.0  # a controlled shutdown of a node moves its leaderships first


def new_cluster_id() -> str:
    """A Kafka cluster id (what ``kafka-storage random-uuid`` prints), without starting a JVM."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


# --------------------------------------------------------------------------------------------
# one node


@dataclass
class Listener:
    """An extra client listener of every node (e.g. SASL_SSL), beside the PLAINTEXT one."""

    name: str  # listener name, e.g. SECURE
    protocol: str  # SASL_SSL, SSL, SASL_PLAINTEXT
    ports: list[int] = field(default_factory=list)  # one per node


@dataclass
class KafkaNode:
    root: Path  # the engine's folder: the node's is root/node-N
    log_dir: Path
    node_id: int
    host: str
    port: int
    controller_port: int
    voters: str  # controller.quorum.voters, the same on every node
    libs: Path
    props: dict[str, str]
    listeners: list[Listener]
    proc: subprocess.Popen | None = field(default=None, init=False)
    _out: IO[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.dir = self.root / f"node-{self.node_id}"
        self.data = self.dir / "data"
        self.config = self.dir / "server.properties"
        self.hold_file = self.dir / "hold"
        self.log_path = self.log_dir / f"kafka-{self.node_id}.log"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def server_properties(self) -> dict[str, str]:
        idx = self.node_id - 1
        listeners = [f"PLAINTEXT://{self.host}:{self.port}", f"CONTROLLER://{self.host}:{self.controller_port}"]
        advertised = [f"PLAINTEXT://{self.host}:{self.port}"]
        protocols = ["CONTROLLER:PLAINTEXT", "PLAINTEXT:PLAINTEXT"]
        for extra in self.listeners:
            listeners.append(f"{extra.name}://{self.host}:{extra.ports[idx]}")
            advertised.append(f"{extra.name}://{self.host}:{extra.ports[idx]}")
            protocols.append(f"{extra.name}:{extra.protocol}")
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters,
            "listeners": ",".join(listeners),
            "advertised.listeners": ",".join(advertised),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": ",".join(protocols),
            "log.dirs": str(self.data),
        }
        props.update(self.props)
        return props

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{k}={v}\n" for k, v in self.server_properties().items())
        self.config.write_text(text)

    @property
    def formatted(self) -> bool:
        return (self.data / "meta.properties").exists()

    def format(self, cluster_id: str, extra_args: list[str]) -> None:
        """Format the node's storage once (``kafka-storage.sh format``); a formatted node is kept."""
        if self.formatted:
            return
        self.write_config()
        cmd = java_cmd(self.libs, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.config), *extra_args)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise StartupError(f"formatting Kafka node {self.node_id} failed:\n" + "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:]))
        log.info("formatted Kafka node %d storage in %s", self.node_id, self.data)

    def spawn(self) -> None:
        self.write_config()
        env = child_env(("KAFKA_OPTS", "KAFKA_HEAP_OPTS", "CLASSPATH", "JAVA_TOOL_OPTIONS"))
        self._out = reopen_log(self._out, self.log_path, f"kafka node {self.node_id}")
        self.proc = spawn_child(java_cmd(self.libs, "kafka.Kafka", str(self.config)), self._out, env, cwd=self.dir)
        log.info("started Kafka node %d (pid %d) on %s", self.node_id, self.proc.pid, self.bootstrap)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc, f"Kafka node {self.node_id}", KAFKA_STOP_TIMEOUT)


# --------------------------------------------------------------------------------------------
# a SASL_SSL listener (SCRAM users, TLS from PEM files)

SASL_SSL_LISTENER = "SASL_SSL"
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
_SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
_SCRAM_FORBIDDEN = re.compile(r'[\s,\[\]="\\]')


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


@dataclass
class SaslSsl:
    """What a SASL_SSL client listener adds to every node: the listener, its server.properties
    (SCRAM-SHA-256 and -512; TLS keystore ``TLSDIR/broker.pem``: the broker's PKCS#8 private
    key, unencrypted, then its certificate chain; with client authentication the clients'
    CA ``TLSDIR/ca.pem``) and the ``StorageTool format`` arguments that create the SCRAM users
    (the users exist from the first start; a formatted node keeps those it was formatted with)."""

    listener: Listener
    props: dict[str, str]
    format_args: list[str]
    secrets: list[str]


def sasl_ssl_listener(tls_dir: Path, users: dict[str, str], client_auth: str = "none") -> SaslSsl:
    tls_dir = Path(tls_dir).expanduser().resolve()
    keystore, truststore = tls_dir / "broker.pem", tls_dir / "ca.pem"
    if not keystore.is_file():
        raise StartupError(f"--sasl-ssl {tls_dir}: no broker.pem there (the broker's PKCS#8 private key, unencrypted, then its certificate chain, PEM)")
    if client_auth not in ("none", "requested", "required"):
        raise StartupError(f"ssl client auth {client_auth!r}: expected none, requested or required")
    if client_auth != "none" and not truststore.is_file():
        raise StartupError(f"--sasl-ssl {tls_dir}: client authentication needs ca.pem there (the CA of the clients' certificates)")
    if not users:
        raise StartupError("a SASL_SSL listener needs at least one SCRAM user")
    for name, password in users.items():
        if not name or not password or _SCRAM_FORBIDDEN.search(name) or _SCRAM_FORBIDDEN.search(password):
            raise StartupError(
                f"SCRAM user {name!r}: name and password must be non-empty, without spaces, "
                f"commas, brackets, '=', quotes or backslashes (the password is not shown)"
            )
    prefix = f"listener.name.{SASL_SSL_LISTENER.lower()}."
    props = {
        prefix + "sasl.enabled.mechanisms": ",".join(SCRAM_MECHANISMS),
        **{f"{prefix}{m.lower()}.sasl.jaas.config": _SCRAM_MODULE for m in SCRAM_MECHANISMS},
        prefix + "ssl.keystore.type": "PEM",
        prefix + "ssl.keystore.location": str(keystore),
        prefix + "ssl.client.auth": client_auth,
    }
    if truststore.is_file():
        props[prefix + "ssl.truststore.type"] = "PEM"
        props[prefix + "ssl.truststore.location"] = str(truststore)
    format_args = [arg for name, password in users.items() for m in SCRAM_MECHANISMS for arg in ("--add-scram", f"{m}=[name={name},password={password}]")]
    return SaslSsl(Listener(SASL_SSL_LISTENER, "SASL_SSL"), props, format_args, list(users.values()))
