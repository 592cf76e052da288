"""A registry of JSON records in a compacted topic (key: the record's id, value: its latest
state): durable wherever the broker is. Replay runs (``imgflow.runs``) and backfill jobs
(``imgflow.backfills``) are kept this way."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from confluent_kafka import Producer

from imgflow.kafka import ensure_compacted_topic, producer_config, read_latest_by_key
from imgflow.settings import Settings

log = logging.getLogger(__name__)

Record = TypeVar("Record")


@dataclass
class RegistryTopic(Generic[Record]):
    """Dataclass records of one type in ``topic``, named by their ``key`` field. ``what``
    names a record in messages ("run", "job"); ``error`` is raised when a write fails."""

    settings: Settings
    topic: str
    record_type: Callable[..., Record]
    key: str
    what: str
    error: type[Exception]

    def ensure(self) -> None:
        ensure_compacted_topic(self.settings, self.topic)

    def all(self) -> dict[str, Record]:
        records: dict[str, Record] = {}
        for key, value in read_latest_by_key(self.settings, self.topic).items():
            try:
                records[key] = self.record_type(**json.loads(value))
            except (TypeError, ValueError) as exc:
                log.warning("%s: unreadable record of %s %s skipped: %s", self.topic, self.what, key, exc)
        return records

    def get(self, key: str) -> Record | None:
        return self.all().get(key)

    def key_of(self, record: Record) -> str:
        return str(getattr(record, self.key))

    @staticmethod
    def value_of(record: Any) -> str:
        """The record as the topic holds it (for a write inside a transaction of the caller's)."""
        return json.dumps(asdict(record))

    def save(self, record: Record) -> None:
        """Write ``record`` on its own (no transaction) and wait for the broker to have it."""
        producer = Producer(producer_config(self.settings))
        producer.produce(self.topic, key=self.key_of(record), value=self.value_of(record))
        if producer.flush(30):
            raise self.error(f"could not write {self.what} {self.key_of(record)} to {self.topic}")
