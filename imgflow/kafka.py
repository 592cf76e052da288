"""Kafka client configuration and the few admin helpers, in one place.

Only standard Kafka APIs through confluent-kafka: the same code runs on the embedded
tansu broker and on Apache Kafka in production.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from imgflow.settings import Settings
from imgflow.topics import SCHEMA_TOPIC, TopicSpec, all_topic_specs
from schemas.codec import Codec

log = logging.getLogger(__name__)


_last_logged: dict[str, float] = {}


def _log_error(err: KafkaError) -> None:
    """librdkafka reports transient connection trouble here and reconnects by itself; every
    client of a process reports the same outage, so each message is logged once a minute."""
    text = err.str()
    now = time.monotonic()
    if now - _last_logged.get(text, -1e9) >= 60:
        _last_logged[text] = now
        log.warning("kafka: %s", text)


def consumer_config(settings: Settings, group_id: str, **extra) -> dict:
    conf = {
        "bootstrap.servers": settings.kafka.bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # Not every broker filters aborted records (tansu does not): consumers also
        # drop event_ids they have handled. read_committed still matters on Kafka.
        "isolation.level": "read_committed",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": settings.kafka.session_timeout_ms,
        "heartbeat.interval.ms": settings.kafka.heartbeat_interval_ms,
        "max.poll.interval.ms": 900_000,  # a slow LLM batch must not look like a dead member
        "enable.partition.eof": False,
        "error_cb": _log_error,
    }
    conf.update(extra)
    return conf


def producer_config(settings: Settings, transactional_id: str | None = None, **extra) -> dict:
    conf = {
        "bootstrap.servers": settings.kafka.bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "none",
        "message.max.bytes": 16 * 1024 * 1024,
        "error_cb": _log_error,
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = settings.kafka.transaction_timeout_ms
    conf.update(extra)
    return conf


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka.bootstrap, "error_cb": _log_error})


def ensure_topics(settings: Settings, specs: list[TopicSpec] | None = None, timeout: float = 30) -> None:
    """Create the topics that do not exist yet (idempotent)."""
    admin = admin_client(settings)
    specs = specs if specs is not None else all_topic_specs(settings)
    existing = set(admin.list_topics(timeout=timeout).topics)
    new = [NewTopic(s.name, num_partitions=s.partitions, replication_factor=1) for s in specs if s.name not in existing]
    if not new:
        return
    for name, fut in admin.create_topics(new, operation_timeout=timeout).items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        log.info("created topic %s", name)


def publish_schemas(settings: Settings, codec: Codec, names: list[str]) -> None:
    """Publish the writer schemas this process uses, so any reader can resolve them."""
    producer = Producer(producer_config(settings))
    for name in names:
        producer.produce(SCHEMA_TOPIC.name, key=codec.fingerprint_of(name).hex(), value=codec.schema_json(name))
    remaining = producer.flush(30)
    if remaining:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"could not publish {remaining} schemas"))


def fetch_schemas(settings: Settings, codec: Codec, timeout: float = 20) -> int:
    """Read the whole schema topic and register every writer schema in it."""
    consumer = Consumer(consumer_config(settings, "imgflow-schema-reader", **{"enable.partition.eof": True,
                                                                             "isolation.level": "read_uncommitted"}))
    try:
        consumer.assign([TopicPartition(SCHEMA_TOPIC.name, 0, 0)])
        count, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    break
                raise KafkaException(msg.error())
            codec.register_writer_schema(msg.value().decode())
            count += 1
        return count
    finally:
        consumer.close()


def ensure_compacted_topic(settings: Settings, topic: str, timeout: float = 15) -> None:
    """A one-partition compacted topic for small records kept by key (run and backfill
    registries): durable wherever the broker is."""
    admin = admin_client(settings)
    if topic in admin.list_topics(timeout=timeout).topics:
        return
    new = NewTopic(topic, num_partitions=1, replication_factor=1, config={"cleanup.policy": "compact"})
    try:
        admin.create_topics([new], operation_timeout=timeout)[topic].result(timeout)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            # A broker that refuses the compaction setting still keeps the records.
            ensure_topics(settings, [TopicSpec(topic, 1, "")])


def read_latest_by_key(settings: Settings, topic: str, timeout: float = 30) -> dict[str, bytes]:
    """The latest value of every key of a one-partition topic, read to its end
    (PARTITION_EOF: the end a broker reports may be wrong), committed records only."""
    consumer = Consumer(consumer_config(settings, "imgflow-registry-reader", **{"enable.partition.eof": True,
                                                                              "fetch.wait.max.ms": 10}))
    latest: dict[str, bytes] = {}
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(10_000, 0.05):
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        return latest
                    raise KafkaException(msg.error())
                latest[msg.key().decode()] = msg.value()
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"could not read {topic} to its end in {timeout:.0f}s"))
    finally:
        consumer.close()
