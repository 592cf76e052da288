"""The kafka engine: Apache Kafka 4.x in KRaft mode, from its Maven Central jars, on loopback.

* The jars and Java: ``infra/kafka_jars.py``; one node and the SASL_SSL listener:
  ``infra/kafka_node.py``.
* Ports are chosen once and kept in ``DIR/kafka/ports.json``, so a restarted node comes back
  where its clients and peers expect it; records and group offsets survive a kill -9 (Kafka
  recovers its logs).
* One node is a single-node cluster (replication 1); three make a real cluster whose
  defaults are replication 3 and ``min.insync.replicas`` 2.
* A node whose ``DIR/kafka/node-N/hold`` file exists is not restarted when it dies (failure
  tests keep a broker down on purpose).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from imgflow.process import free_ports, port_is_free
from infra.kafka_jars import java_binary, kafka_libs
from infra.kafka_node import KafkaNode, SaslSsl, new_cluster_id, redact
from infra.procs import StartupError, back_off_if_crash_looping, write_json_atomic

log = logging.getLogger("infra.embedded")


class KafkaEngine:
    """``nodes`` combined KRaft nodes on loopback, supervised: a dead node is restarted at once
    on its ports and data (unless held). ``sasl_ssl``: a SASL_SSL client listener on every
    node besides the PLAINTEXT one; ``props`` override the broker's (and the listener's)."""

    name = "kafka"

    def __init__(self, data_dir: Path, host: str, port: int, nodes: int = 1, props: dict[str, str] | None = None, sasl_ssl: SaslSsl | None = None) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "kafka"
        self.host, self.port, self.count = host, port, nodes
        self.listeners = [sasl_ssl.listener] if sasl_ssl else []
        self.extra_props = {**(sasl_ssl.props if sasl_ssl else {}), **(props or {})}
        self.format_args = sasl_ssl.format_args if sasl_ssl else []
        # Never in a log line or an error (the format args hold them).
        self.secrets = [x for x in (sasl_ssl.secrets if sasl_ssl else []) if x]
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

    def _ports(self) -> dict[str, list[int]]:
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

    def start(self, deadline: float, check: Callable[[], None]) -> None:
        libs = kafka_libs()
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

    def restart_dead(self, check: Callable[[], None]) -> bool:
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
            if node.proc is not None and node.alive():
                with contextlib.suppress(ProcessLookupError):
                    node.proc.terminate()
        for node in self.nodes:
            node.stop()
