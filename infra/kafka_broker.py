"""The kafka engine: Apache Kafka 4.x in KRaft mode, from its Maven Central jars, on loopback.

* The jars: ``infra/kafka/pom.xml`` (the broker plus a log4j2 binding, versions pinned) is
  resolved once by Maven into ``~/.cache/imgflow/kafka/<pom hash>/libs`` and reused (Maven's
  own downloads stay in ``~/.m2``). Java 17+ runs the broker; Maven is needed only for that
  first resolve.
* Each node is a combined broker + controller (``process.roles=broker,controller``) with a
  static voter set, its data in ``DIR/kafka/node-N/data``, formatted once. Ports are chosen
  once and kept in ``DIR/kafka/ports.json``, so a restarted node comes back where its clients
  and peers expect it; records and group offsets survive a kill -9 (Kafka recovers its logs).
* One node is a single-node cluster (replication 1); three make a real cluster whose
  defaults are replication 3 and ``min.insync.replicas`` 2.
* A node whose ``DIR/kafka/node-N/hold`` file exists is not restarted when it dies (failure
  tests keep a broker down on purpose).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from imgflow.process import free_ports, port_is_free
from infra.procs import StartupError, back_off_if_crash_looping, child_env, reopen_log, spawn_child, stop_process, write_json_atomic

log = logging.getLogger("infra.embedded")

HERE = Path(__file__).resolve().parent / "kafka"
POM = HERE / "pom.xml"
LOG4J_CONFIG = HERE / "log4j2.properties"
KAFKA_STOP_TIMEOUT = 30.0  # a controlled shutdown of a node moves its leaderships first
NO_JAVA_HINT = "--engine tansu (the default) needs neither Java nor Maven"

# Sized for a 2-core machine beside the models: a small heap, one GC thread, the C1 JIT only
# (the broker starts in ~4 s instead of ~9 s and its steady CPU is the same at this load).
JVM_OPTS = ["-Xms256m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:ActiveProcessorCount=2", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true"]


# --------------------------------------------------------------------------------------------
# Java and the jars


def java_binary() -> str:
    """The ``java`` that runs the broker: ``$JAVA_HOME/bin/java``, else the one on PATH; 17+."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home and (Path(home) / "bin" / "java").is_file() else shutil.which("java")
    if not java:
        raise StartupError(
            f"--engine kafka needs Java 17 or newer, and no `java` was found on PATH "
            f"or in JAVA_HOME (install a JDK, e.g. apt-get install openjdk-17-jre-headless); "
            f"{NO_JAVA_HINT}"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    major = int(match.group(1)) if match else 0
    if major == 1 and match and match.group(2):  # "1.8.0_x"
        major = int(match.group(2))
    if major < 17:
        raise StartupError(
            f"--engine kafka needs Java 17 or newer; {java} is Java {major or '?'} ({(out.stderr or out.stdout).strip().splitlines()[:1]}); {NO_JAVA_HINT}"
        )
    return java


def default_jars_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "imgflow" / "kafka"


def pom_version() -> str:
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    return match.group(1) if match else "?"


def kafka_libs(jars_dir: Path | None = None) -> Path:
    """The folder of the broker's jars, resolved from Maven Central on first use."""
    jars_dir = jars_dir or default_jars_dir()
    key = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    target = jars_dir / f"{pom_version()}-{key}"
    libs = target / "libs"
    if (target / ".complete").exists():
        return libs
    jars_dir.mkdir(parents=True, exist_ok=True)
    with open(jars_dir / ".lock", "a+") as lock:  # several test sessions may start at once
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return libs
        mvn = shutil.which("mvn")
        if not mvn:
            raise StartupError(
                f"--engine kafka resolves Apache Kafka's jars with Maven the first time, "
                f"and `mvn` was not found on PATH (install it, e.g. apt-get install maven); "
                f"{NO_JAVA_HINT}"
            )
        java_binary()  # Maven needs it too: say so as clearly
        tmp = target / "libs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log.info("resolving Apache Kafka %s jars from Maven Central into %s (first start only)", pom_version(), libs)
        t0 = time.monotonic()
        cmd = [mvn, "-B", "-q", "-f", str(POM), "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"]
        # Offline first: with ~/.m2 filled (a second data dir, a cleared cache) no network is needed.
        done = subprocess.run([*cmd[:1], "-o", *cmd[1:]], capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
            output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise StartupError(
                f"Maven could not resolve Apache Kafka {pom_version()} ({POM}); is the Maven "
                f"repository (Maven Central, or the mirror in ~/.m2/settings.xml) reachable? "
                f"{NO_JAVA_HINT}. Maven said:\n{output}"
            )
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        (target / ".complete").write_text(f"{time.time():.0f}\n")
        log.info("Apache Kafka jars resolved in %.1f s (%d jars)", time.monotonic() - t0, len(list(libs.glob("*.jar"))))
    return libs


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


class KafkaNode:
    def __init__(
        self,
        root: Path,
        log_dir: Path,
        node_id: int,
        host: str,
        port: int,
        controller_port: int,
        voters: str,
        libs: Path,
        props: dict[str, str],
        listeners: list[Listener],
    ) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self.controller_port = controller_port
        self.voters = voters
        self.libs = libs
        self.props = props
        self.listeners = listeners
        self.dir = root / f"node-{node_id}"
        self.data = self.dir / "data"
        self.config = self.dir / "server.properties"
        self.hold_file = self.dir / "hold"
        self.log_path = log_dir / f"kafka-{node_id}.log"
        self.proc: subprocess.Popen | None = None
        self._out = None

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

    def java_cmd(self, main: str, *args: str) -> list[str]:
        return [java_binary(), *JVM_OPTS, f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", "-cp", f"{self.libs}/*", main, *args]

    @property
    def formatted(self) -> bool:
        return (self.data / "meta.properties").exists()

    def format(self, cluster_id: str, extra_args: list[str]) -> None:
        """Format the node's storage once (``kafka-storage.sh format``); a formatted node is kept."""
        if self.formatted:
            return
        self.write_config()
        cmd = self.java_cmd("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.config), *extra_args)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise StartupError(f"formatting Kafka node {self.node_id} failed:\n" + "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:]))
        log.info("formatted Kafka node %d storage in %s", self.node_id, self.data)

    def spawn(self) -> None:
        self.write_config()
        env = child_env(("KAFKA_OPTS", "KAFKA_HEAP_OPTS", "CLASSPATH", "JAVA_TOOL_OPTIONS"))
        self._out = reopen_log(self._out, self.log_path, f"kafka node {self.node_id}")
        self.proc = spawn_child(self.java_cmd("kafka.Kafka", str(self.config)), self._out, env, cwd=self.dir)
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


# --------------------------------------------------------------------------------------------
# the engine


class KafkaEngine:
    """``nodes`` combined KRaft nodes on loopback, supervised: a dead node is restarted at once
    on its ports and data (unless held)."""

    name = "kafka"

    def __init__(
        self,
        data_dir: Path,
        host: str,
        port: int,
        nodes: int = 1,
        jars_dir: Path | None = None,
        listeners: list[Listener] | None = None,
        props: dict[str, str] | None = None,
        format_args: list[str] | None = None,
        secrets: list[str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "kafka"
        self.host = host
        self.port = port
        self.count = nodes
        self.jars_dir = jars_dir
        self.listeners = listeners or []
        self.extra_props = props or {}
        self.format_args = format_args or []
        self.secrets = [x for x in (secrets or []) if x]  # never in a log line or an error (format args hold them)
        self.nodes: list[KafkaNode] = []
        self.restarts: dict[int, list[float]] = {}

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    def broker_props(self) -> dict[str, str]:
        n = self.count
        props = {
            # Internal topics replicated as far as the cluster allows (1 on one node).
            "offsets.topic.replication.factor": str(min(3, n)),
            "transaction.state.log.replication.factor": str(min(3, n)),
            "transaction.state.log.min.isr": str(min(2, n)),
            "share.coordinator.state.topic.replication.factor": str(min(3, n)),
            "share.coordinator.state.topic.min.isr": str(min(2, n)),
            # A cluster's defaults for the pipeline's topics (imgflow asks for the broker's
            # default unless topics.replication_factor is set).
            "default.replication.factor": str(min(3, n)),
            "min.insync.replicas": str(min(2, n)),
            "offsets.topic.num.partitions": str(n),
            "transaction.state.log.num.partitions": str(n),
            "group.initial.rebalance.delay.ms": "0",
            # Topics are created by the pipeline with their partitions; a topic made by a typo
            # would hide a bug.
            "auto.create.topics.enable": "false",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "log.cleaner.threads": "1",
        }
        props.update(self.extra_props)
        return props

    def _ports(self) -> dict:
        """Every node's ports: kept from ``ports.json`` when present (a restart keeps its
        address), else chosen free now (the first client port is ``self.port`` unless 0)."""
        path = self.root / "ports.json"
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads(path.read_text())
            if len(saved.get("client", [])) == self.count and all(len(saved.get(ln.name, [])) == self.count for ln in self.listeners):
                if self.port and saved["client"][0] != self.port:
                    saved["client"][0] = self.port
                return saved
        extra = len(self.listeners) * self.count
        chosen = free_ports(2 * self.count + extra, self.host)
        ports = {"client": chosen[: self.count], "controller": chosen[self.count : 2 * self.count]}
        if self.port:
            ports["client"][0] = self.port
        for i, ln in enumerate(self.listeners):
            start = 2 * self.count + i * self.count
            ports[ln.name] = chosen[start : start + self.count]
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, ports)
        return ports

    def start(self, deadline: float, check) -> None:
        libs = kafka_libs(self.jars_dir)
        java_binary()
        check()
        ports = self._ports()
        for name in ("client", "controller"):
            for p in ports[name]:
                if not port_is_free(self.host, p):
                    raise StartupError(f"port {self.host}:{p} of the Kafka engine is already in use")
        for ln in self.listeners:
            ln.ports = ports[ln.name]
        voters = ",".join(f"{i + 1}@{self.host}:{p}" for i, p in enumerate(ports["controller"]))
        props = self.broker_props()
        self.nodes = [
            KafkaNode(self.root, self.data_dir / "logs", i + 1, self.host, ports["client"][i], ports["controller"][i], voters, libs, props, self.listeners)
            for i in range(self.count)
        ]
        id_file = self.root / "cluster_id"
        if not id_file.exists():
            id_file.write_text(new_cluster_id())
        cluster_id = id_file.read_text().strip()
        for node in self.nodes:
            check()
            try:
                node.format(cluster_id, self.format_args)
            except StartupError as exc:
                raise StartupError(redact(str(exc), self.secrets)) from None
        for node in self.nodes:
            with contextlib.suppress(FileNotFoundError):
                node.hold_file.unlink()  # a hold of an earlier run does not outlive it
            node.spawn()

    def procs(self) -> list:
        return [(n.proc, n.log_path) for n in self.nodes]

    def restart_dead(self, check) -> bool:
        changed = False
        for node in self.nodes:
            if node.alive() or node.hold_file.exists():
                continue
            self.restarts[node.node_id] = back_off_if_crash_looping(self.restarts.get(node.node_id, []), f"Kafka node {node.node_id}", node.log_path, check)
            log.warning(
                "Kafka node %d (pid %s) died with code %s; restarting it on %s",
                node.node_id,
                node.proc.pid if node.proc else "?",
                node.proc.returncode if node.proc else "?",
                node.bootstrap,
            )
            node.spawn()
            changed = True
        return changed

    def info(self) -> dict:
        secure = {ln.name: ",".join(f"{self.host}:{p}" for p in ln.ports) for ln in self.listeners}
        return {
            "engine": self.name,
            "bootstrap": self.bootstrap,
            "s3_endpoint": "",
            "broker_pid": self.nodes[0].proc.pid if self.nodes and self.nodes[0].proc else None,
            "broker_hold_file": str(self.nodes[0].hold_file) if self.nodes else "",
            "nodes": [
                {
                    "node_id": n.node_id,
                    "pid": n.proc.pid if n.proc else None,
                    "port": n.port,
                    "controller_port": n.controller_port,
                    "hold_file": str(n.hold_file),
                }
                for n in self.nodes
            ],
            "listeners": secure,
        }

    def stop(self) -> None:
        # Every node at once: one by one, the last ones would wait for their peers' leaderships.
        for node in self.nodes:
            if node.alive():
                with contextlib.suppress(ProcessLookupError):
                    node.proc.terminate()
        for node in self.nodes:
            node.stop()


if __name__ == "__main__":  # resolve the jars alone: `python -m infra.kafka_broker`
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(kafka_libs())
