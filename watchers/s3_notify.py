"""A bucket's object-created notifications on a Kafka topic, for the S3 watcher.

SeaweedFS filer protobuf messages or MinIO/AWS-style JSON records name objects to look at now;
the watcher HEADs and publishes them as a poll would (``watchers/s3_watcher.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from urllib.parse import unquote_plus

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from imgflow.kafka import consumer_config, ensure_topics
from imgflow.settings import Settings
from imgflow.topics import TopicSpec

log = logging.getLogger("watchers.s3")


def parse_notification(value: bytes, fmt: str) -> list[tuple[str, str]]:
    """(bucket, key) of the objects a notification says were created or overwritten.

    ``minio``: S3-style JSON event records (MinIO's Kafka target, AWS S3 events): keys are
    URL-encoded. ``seaweedfs``: the filer's protobuf ``EventNotification``; the object is
    ``new_parent_path/new_entry.name`` below ``/buckets/<bucket>/``."""
    if fmt == "minio":
        doc = json.loads(value)
        out = []
        for rec in doc.get("Records", []):
            if not str(rec.get("eventName", "")).removeprefix("s3:").startswith("ObjectCreated"):
                continue
            s3 = rec.get("s3", {})
            out.append((s3["bucket"]["name"], unquote_plus(s3["object"]["key"])))
        return out
    if fmt == "seaweedfs":
        from watchers.seaweedfs_events import created_path

        path = created_path(value)
        if path is None or not path.startswith("/buckets/"):
            return []
        bucket, _, key = path[len("/buckets/") :].partition("/")
        return [(bucket, key)] if key else []
    raise ValueError(f"unknown notification format {fmt!r} (watch.s3_notify: seaweedfs | minio)")


class BucketNotifications:
    """The consumer of the notification topic (``watch.s3_notify_topic``), subscribed on
    creation. Its offsets are committed only after the named objects were published."""

    def __init__(self, settings: Settings, bucket: str, prefix: str) -> None:
        w = settings.watch
        self.bucket, self.prefix, self.format = bucket, prefix, w.s3_notify
        cfg = consumer_config(settings, f"imgflow-s3-notify-{bucket}")
        if w.s3_notify_bootstrap:
            cfg["bootstrap.servers"] = w.s3_notify_bootstrap
        cfg.update({"enable.auto.commit": False, "auto.offset.reset": "earliest"})
        cfg.pop("isolation.level", None)  # stores publish without transactions
        if not w.s3_notify_bootstrap:
            # On the pipeline's own cluster the topic is made here if missing: a Kafka without
            # auto.create.topics.enable would otherwise refuse the store's first events.
            try:
                ensure_topics(settings, [TopicSpec(w.s3_notify_topic, 1, "")])
            except KafkaException as exc:
                log.warning("could not create the notification topic %s (%s): create it, or let the store's Kafka auto-create it", w.s3_notify_topic, exc)
        self.consumer = Consumer(cfg)
        self.consumer.subscribe([w.s3_notify_topic])
        log.info("consuming %s bucket notifications from topic %s", w.s3_notify, w.s3_notify_topic)

    def handle(self, timeout: float, publish_keys: Callable[[list[str]], int]) -> int:
        """Hands ``publish_keys`` the keys under the watched prefix that the notifications
        arriving within ``timeout`` name; returns what it returns."""
        msgs = self.consumer.consume(500, timeout)
        try:
            published = publish_keys(self._named_keys(msgs))
        except BaseException:
            # S3 or the broker failed mid-batch: rewind, so these notifications are handled
            # again after the back-off instead of being left to the next full pass.
            self._rewind(msgs)
            raise
        if any(m.error() is None for m in msgs):
            # Only after the events are acknowledged: a crash re-reads the notifications.
            self.consumer.commit(asynchronous=False)
        return published

    def _named_keys(self, msgs: list[Message]) -> list[str]:
        keys: list[str] = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("notification topic: %s", err)
                continue
            try:
                named = parse_notification(msg.value() or b"", self.format)
            except Exception as exc:  # noqa: BLE001 - a bad message must not stop the watcher
                log.warning("unreadable notification at %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
                continue
            keys += [key for bucket, key in named if bucket == self.bucket and key.startswith(self.prefix)]
        return keys

    def _rewind(self, msgs: list[Message]) -> None:
        first: dict[tuple[str, int], int] = {}
        for m in msgs:
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            if m.error() is None and topic is not None and partition is not None and offset is not None:
                first.setdefault((topic, partition), offset)
        for (topic, partition), offset in first.items():
            self.consumer.seek(TopicPartition(topic, partition, offset))

    def close(self) -> None:
        self.consumer.close()
