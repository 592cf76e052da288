"""Test helpers that talk to the real broker."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from imgflow.kafka import consumer_config, producer_config
from imgflow.settings import Settings
from schemas.codec import get_codec


def produce(settings: Settings, topic: str, records: list[tuple[str, bytes]]) -> None:
    producer = Producer(producer_config(settings))
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def produce_events(settings: Settings, events: list[dict], topic: str | None = None) -> None:
    codec = get_codec()
    produce(settings, topic or settings.topics.new, [(e["event_id"], codec.encode("ImageEvent", e)) for e in events])


def read_topic(settings: Settings, topic: str, timeout: float = 30) -> list:
    """Every record on every partition of ``topic`` up to its end (found by PARTITION_EOF:
    tansu's reported watermarks are wrong)."""
    consumer = Consumer(consumer_config(settings, f"reader-{time.monotonic_ns()}", **{"enable.partition.eof": True}))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        at_end: set[int] = set()
        out = []
        deadline = time.monotonic() + timeout
        while len(at_end) < len(parts) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                continue
            at_end.discard(msg.partition())
            out.append(msg)
        return out
    finally:
        consumer.close()


def decoded(settings: Settings, topic: str, schema: str) -> list[dict]:
    codec = get_codec()
    return [codec.decode(schema, m.value()) for m in read_topic(settings, topic)]


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
