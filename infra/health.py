"""Health of a broker, the same for every engine: a topic can be created and described
(tansu says "ready" even when its storage is broken; a Kafka node listens before it has
joined its quorum)."""

from __future__ import annotations

import logging
import socket
import time

from imgflow.kafka import ensure_topics
from imgflow.process import tail
from imgflow.settings import Settings
from imgflow.topics import TopicSpec
from infra.procs import StartupError, raise_if_exited

log = logging.getLogger("infra.embedded")

HEALTH_TOPIC = "__imgflow_health"


def admin_client(bootstrap: str):
    from confluent_kafka.admin import AdminClient

    return AdminClient(
        {
            "bootstrap.servers": bootstrap,
            "socket.timeout.ms": 5000,
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 500,
            "logger": logging.getLogger("infra.embedded.kafka"),  # type: ignore[dict-item]  # librdkafka logs through it; the stubs allow scalars only
        }
    )


def loopback_settings(bootstrap: str, topics: dict | None = None) -> Settings:
    """The settings to create topics with through the plain loopback listener, whatever
    security the clients are set up for; ``topics``: topics settings that override the others."""
    kafka = {"bootstrap": bootstrap, "security_protocol": "PLAINTEXT", "sasl_mechanism": "", "ssl_ca_location": ""}
    return Settings(kafka=kafka, topics=topics) if topics else Settings(kafka=kafka)


def check_broker_health(bootstrap: str, deadline: float, check, name: str, procs: list) -> None:
    """Create and describe a topic: proves the broker and its storage work. ``procs``: the
    (proc, log path) pairs whose exit fails the start at once, the first one's log quoted."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    last: Exception | None = None
    admin = None
    log_path = procs[0][1]
    # One replica and no configs, whatever the pipeline's topics ask for: the probe proves that
    # a broker and its storage answer, not that every node of a cluster has joined yet.
    probe = loopback_settings(bootstrap, topics={"replication_factor": 1, "min_insync_replicas": 0})
    while time.monotonic() < deadline:
        check()
        for proc, path in procs:
            raise_if_exited(proc, name, path)
        if admin is None:
            # connect only once the broker accepts, so librdkafka does not log refused connections
            try:
                with socket.create_connection((host, int(port)), timeout=1.0):
                    pass
            except OSError as e:
                last = e
                time.sleep(0.05)
                continue
            admin = admin_client(bootstrap)
        try:
            remaining = max(1.0, min(10.0, deadline - time.monotonic()))
            ensure_topics(probe, [TopicSpec(HEALTH_TOPIC, 1, "")], timeout=remaining, admin=admin)
            md = admin.list_topics(topic=HEALTH_TOPIC, timeout=remaining)
            t = md.topics.get(HEALTH_TOPIC)
            if t is not None and t.error is None and len(t.partitions) >= 1:
                return
            last = RuntimeError(f"topic {HEALTH_TOPIC} not described: {t and t.error}")
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(0.2)
    raise StartupError(
        f"{name} at {bootstrap} did not pass the health check (create + describe {HEALTH_TOPIC}): {last!r}; log tail ({log_path}):\n{tail(log_path)}"
    )
