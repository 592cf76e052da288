"""The transform contract and the records it sees: what a stage (vision, enrich) writes."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass

from confluent_kafka import Message

from imgflow import metrics
from imgflow.events import dedupe_key
from imgflow.kafka import fetch_schemas, position
from imgflow.settings import Settings
from schemas.codec import MAGIC, Codec, SchemaError

log = logging.getLogger(__name__)


@dataclass
class InputRecord:
    topic: str
    partition: int
    offset: int
    event_id: str
    value: dict | None  # None when the value could not be decoded
    raw: bytes | None
    error: str | None = None  # why the value could not be decoded
    run_id: str = ""  # the run this record belongs to (its event's run_id)

    @property
    def decoded(self) -> dict:
        """The value, for a transform: the loop dead-letters records that did not decode
        before ``process`` sees a batch."""
        assert self.value is not None, f"{self.topic}[{self.partition}]@{self.offset} did not decode"
        return self.value

    @property
    def dedupe_key(self) -> str:
        """Its dedupe key: one result per (image event, run)."""
        return dedupe_key(self.event_id, self.run_id)


@dataclass
class OutputRecord:
    topic: str
    schema: str
    value: dict
    key: str  # the event_id: keeps one image on one partition downstream


class Transform(ABC):
    """What makes a stage a stage. ``process`` gets a batch and returns one entry per
    input, in order: the outputs to produce, or the exception that input raised.
    Raising from ``process`` itself fails the whole batch: the loop halves it and tries
    again (how an out-of-memory model backs off), down to single records."""

    name: str = ""
    input_schema: str = ""
    output_schemas: list[str] = []

    @abstractmethod
    def input_topics(self, settings: Settings) -> list[str]:
        """Topics to consume, highest priority first."""

    def setup(self) -> None:  # noqa: B027 - an optional hook, not every transform loads models
        """Load or check models before the first message is consumed."""

    def batch_size(self, settings: Settings) -> int:
        """Most records per ``process`` call (a stage whose model decodes many at once asks
        for more)."""
        return settings.stage.batch_size

    @abstractmethod
    def process(self, records: list[InputRecord]) -> list[list[OutputRecord] | BaseException]: ...

    def event_of(self, value: dict) -> dict | None:
        """The ImageEvent inside an input value (for dead letters)."""
        return value

    def vision_of(self, value: dict) -> dict | None:
        """The VisionResult inside an input value, kept in dead letters of later stages."""
        return None

    def event_id_of(self, value: dict) -> str:
        event = self.event_of(value)
        return event["event_id"] if event else ""


class HandledIds:
    """Bounded memory of the dedupe keys (event_id, run) this process has committed (oldest
    forgotten first)."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.capacity = capacity

    def __contains__(self, key: str) -> bool:
        return key in self._ids

    def add(self, key: str) -> None:
        self._ids[key] = None
        self._ids.move_to_end(key)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


def decode_messages(msgs: list[Message], transform: Transform, codec: Codec, settings: Settings) -> list[InputRecord]:
    records: list[InputRecord] = []
    refreshed = False
    for msg in msgs:
        topic, partition, offset = position(msg)
        raw, key = msg.value(), msg.key()
        key_id = key.decode("utf-8", "replace") if key else ""
        try:
            try:
                value = codec.decode(transform.input_schema, raw)
            except SchemaError:
                # Maybe written with a newer schema: fetch the schema topic once per batch.
                if refreshed or not raw or raw[:2] != MAGIC or codec.known(raw[2:10]):
                    raise
                refreshed = True
                fetch_schemas(settings, codec)
                value = codec.decode(transform.input_schema, raw)
            event_id = transform.event_id_of(value) or key_id
            records.append(InputRecord(topic, partition, offset, event_id, value, raw))
        except SchemaError as exc:
            event_id = key_id or f"malformed-{topic}-{partition}-{offset}"
            records.append(InputRecord(topic, partition, offset, event_id, None, raw, str(exc)))
    return records


def scope_to_run(rec: InputRecord, transform: Transform, run_id: str | None) -> None:
    """The record's run: its event's run_id, or ``run_id`` for a replay (stamped on the
    event, so every output and dead letter of the replay carries it)."""
    event = transform.event_of(rec.value) if rec.value is not None else None
    if run_id is not None:
        if event is not None:
            event["run_id"] = run_id
        rec.run_id = run_id
    elif event is not None:
        rec.run_id = event.get("run_id", "")


def drop_handled(records: list[InputRecord], handled: HandledIds, reread: set[tuple[str, int, int]], stage: str) -> tuple[list[InputRecord], list[InputRecord]]:
    """(to transform, to commit) of a batch: a record already handled (by this process, or
    earlier in the batch) is committed without a result; one ``reread`` at an idle point
    (topic, partition, offset) and handled, or undecodable, is left out altogether."""
    todo, seen, kept = [], set(), []
    for rec in records:
        again = (rec.topic, rec.partition, rec.offset) in reread
        if rec.error is None and (rec.dedupe_key in handled or rec.dedupe_key in seen):
            if again:  # read again at an idle point, and handled: not a duplicate event
                continue
            metrics.DUPLICATES_DROPPED.labels(stage).inc()
            log.info("duplicate dropped", extra={"event_id": rec.event_id, "stage": stage})
        elif again and rec.error is not None:
            continue  # an undecodable record read again: it was dead-lettered the first time
        else:
            if again:
                log.warning(
                    "a record first stepped over was found when read again: %s[%d]@%d",
                    rec.topic,
                    rec.partition,
                    rec.offset,
                    extra={"event_id": rec.event_id, "stage": stage},
                )
            seen.add(rec.dedupe_key)
            todo.append(rec)
        kept.append(rec)
    return todo, kept
