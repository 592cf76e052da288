"""The one consume -> transform -> produce -> commit loop every Kafka-to-Kafka stage runs.

A stage is a small ``Transform`` (vision, enrich). This module owns everything about
Kafka transactions; nothing else writes them.

Exactly once, and why it holds on a broker that does not filter aborted records
---------------------------------------------------------------------------------
* One transactional producer per *input partition*, with a stable id
  ``<group>.<topic>.<partition>``. Whoever is assigned the partition next (a restarted
  process, or another instance after a rebalance) calls ``init_transactions`` with the
  same id, which fences the old owner and aborts its open transaction. A broker that
  never times out a dead producer's transaction (tansu) is unblocked this way.
* The outputs of a batch and the input offsets commit in one transaction (steps below).
* Every record is keyed by its ``event_id``; a stage drops event_ids it has already
  handled, and the sink drops those already written, so records of aborted
  transactions that a broker still delivers never make a second result.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from imgflow import metrics
from imgflow.errors import BadInput
from imgflow.kafka import consumer_config, fetch_schemas, producer_config, publish_schemas
from imgflow.settings import Settings
from schemas.codec import Codec, SchemaError, get_codec

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


@dataclass
class Output:
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

    def setup(self) -> None:
        """Load or check models before the first message is consumed."""

    @abstractmethod
    def process(self, records: list[InputRecord]) -> list[list[Output] | BaseException]: ...

    def event_of(self, value: dict) -> dict | None:
        """The ImageEvent inside an input value (for dead letters)."""
        return value

    def vision_of(self, value: dict) -> dict | None:
        """The VisionResult inside an input value, kept in dead letters of later stages."""
        return None

    def event_id_of(self, value: dict) -> str:
        event = self.event_of(value)
        return event["event_id"] if event else ""


class CrashPoints:
    """Deterministic crash injection for tests: ``IMGFLOW_CRASH_AT=stage:point[:n]`` kills
    this process with SIGKILL the n-th time (default 1st) it reaches ``point``."""

    def __init__(self, stage: str, spec: str | None = None) -> None:
        spec = spec if spec is not None else os.environ.get("IMGFLOW_CRASH_AT", "")
        self.point, self.remaining = None, 0
        parts = spec.split(":") if spec else []
        if len(parts) >= 2 and parts[0] == stage:
            self.point, self.remaining = parts[1], int(parts[2]) if len(parts) > 2 else 1

    def reach(self, point: str) -> None:
        if point == self.point:
            self.remaining -= 1
            if self.remaining <= 0:
                log.warning("crash point %s reached: SIGKILL", point)
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)


class HandledIds:
    """Bounded memory of event_ids this process has committed (oldest forgotten first)."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.capacity = capacity

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


def decode_messages(msgs: list[Message], transform: Transform, codec: Codec, settings: Settings) -> list[InputRecord]:
    records: list[InputRecord] = []
    refreshed = False
    for msg in msgs:
        raw, key = msg.value(), msg.key()
        key_id = key.decode("utf-8", "replace") if key else ""
        try:
            try:
                value = codec.decode(transform.input_schema, raw)
            except SchemaError:
                # Maybe written with a newer schema: fetch the schema topic once per batch.
                if refreshed or not raw or raw[:2] != b"\xc3\x01" or codec.known(raw[2:10]):
                    raise
                refreshed = True
                fetch_schemas(settings, codec)
                value = codec.decode(transform.input_schema, raw)
            event_id = transform.event_id_of(value) or key_id
            records.append(InputRecord(msg.topic(), msg.partition(), msg.offset(), event_id, value, raw))
        except SchemaError as exc:
            event_id = key_id or f"malformed-{msg.topic()}-{msg.partition()}-{msg.offset()}"
            records.append(InputRecord(msg.topic(), msg.partition(), msg.offset(), event_id, None, raw, str(exc)))
    return records


class StageRunner:
    def __init__(self, transform: Transform, settings: Settings, group_id: str | None = None,
                 run_id: str | None = None) -> None:
        self.transform = transform
        self.settings = settings
        self.group_id = group_id or f"imgflow-{transform.name}"
        self.run_id = run_id or settings.run_id
        self.codec = get_codec()
        self.topics = transform.input_topics(settings)
        self.producers: dict[tuple[str, int], Producer] = {}
        self.handled = HandledIds()
        self.crash = CrashPoints(transform.name)
        self.stopping = False
        self.paused: list[TopicPartition] = []
        self.consumer: Consumer | None = None
        self.txn_started: float | None = None  # monotonic time the open transaction began

    def _watch_transactions(self) -> None:
        """Exit the process if one transaction hangs: a crash is always safe here (that is
        the point of the design), and the restarted process reconnects and fences."""
        limit = self.settings.kafka.transaction_stall_s
        while limit and not self.stopping:
            started = self.txn_started
            if started is not None and time.monotonic() - started > limit:
                log.error("a transaction has hung for %.0fs: exiting so that a restart recovers", limit)
                logging.shutdown()
                os._exit(75)
            time.sleep(1)

    # ---- partition ownership ------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            txn_id = f"{self.group_id}.{tp.topic}.{tp.partition}"
            producer = Producer(producer_config(self.settings, txn_id))
            # Fences the previous owner of this partition and aborts its open transaction.
            producer.init_transactions(60)
            self.producers[(tp.topic, tp.partition)] = producer
        log.info("assigned %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Called from inside consume(): no transaction is open between batches.
        for tp in partitions:
            producer = self.producers.pop((tp.topic, tp.partition), None)
            if producer is not None:
                producer.flush(5)
        self.paused = [p for p in self.paused if (p.topic, p.partition) not in {(t.topic, t.partition) for t in partitions}]
        log.info("revoked %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])

    # ---- the loop -------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        if not self.stopping:
            log.info("stop requested: finishing the current batch")
        self.stopping = True

    def run(self, max_batches: int | None = None) -> None:
        self.transform.setup()
        threading.Thread(target=self._watch_transactions, daemon=True, name="txn-watchdog").start()
        publish_schemas(self.settings, self.codec, self.transform.output_schemas + ["DeadLetter"])
        self.consumer = Consumer(consumer_config(self.settings, self.group_id))
        self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        log.info("stage %s consuming %s as group %s", self.transform.name, self.topics, self.group_id)
        batches = 0
        try:
            while not self.stopping and (max_batches is None or batches < max_batches):
                msgs = self.consumer.consume(self.settings.stage.batch_size, self.settings.stage.max_wait_s)
                msgs = [m for m in msgs if self._usable(m)]
                if not msgs:
                    self._prioritise(False)
                    continue
                self._prioritise(any(m.topic() == self.topics[0] for m in msgs))
                self._handle_batch(msgs)
                batches += 1
        finally:
            self.consumer.close()  # leaves the group now: its partitions move at once
            for producer in self.producers.values():
                producer.flush(5)
            log.info("stage %s stopped", self.transform.name)

    @staticmethod
    def _usable(msg: Message) -> bool:
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("consume error: %s", msg.error())
            return False
        return True

    def _prioritise(self, high_seen: bool) -> None:
        """While the first input topic (e.g. images.new.high) yields records, pause the others."""
        if len(self.topics) < 2 or self.consumer is None:
            return
        if high_seen and not self.paused:
            self.paused = [tp for tp in self.consumer.assignment() if tp.topic != self.topics[0]]
            if self.paused:
                self.consumer.pause(self.paused)
        elif not high_seen and self.paused:
            self.consumer.resume(self.paused)
            self.paused = []

    def _handle_batch(self, msgs: list[Message]) -> None:
        records = decode_messages(msgs, self.transform, self.codec, self.settings)
        for rec in records:
            metrics.MESSAGES_IN.labels(self.transform.name, rec.topic).inc()
        todo, seen = [], set()
        for rec in records:
            if rec.error is None and (rec.event_id in self.handled or rec.event_id in seen):
                metrics.DUPLICATES_DROPPED.labels(self.transform.name).inc()
                log.info("duplicate dropped", extra={"event_id": rec.event_id, "stage": self.transform.name})
                continue
            seen.add(rec.event_id)
            todo.append(rec)
        outputs = self._transform(todo)
        by_partition: dict[tuple[str, int], list[InputRecord]] = defaultdict(list)
        for rec in records:
            by_partition[(rec.topic, rec.partition)].append(rec)
        # Highest-priority topic first.
        for tp in sorted(by_partition, key=lambda t: (self.topics.index(t[0]), t[1])):
            self._commit_partition(tp, by_partition[tp], outputs)

    # ---- transform with retries and batch halving --------------------------------------------
    def _transform(self, records: list[InputRecord]) -> dict[int, list[Output]]:
        """Outputs for every record (keyed by id(record)): results, or a dead letter."""
        outputs: dict[int, list[Output]] = {}
        decodable = []
        for rec in records:
            if rec.error is not None:
                outputs[id(rec)] = [self._dead_letter(rec, f"malformed input value: {rec.error}", 1)]
            else:
                decodable.append(rec)
        for rec, result in self._process_halving(decodable):
            attempts = 1
            while isinstance(result, BaseException) and not isinstance(result, BadInput) \
                    and attempts < self.settings.stage.max_attempts:
                metrics.RETRIES.labels(self.transform.name).inc()
                log.warning("attempt %d failed, retrying: %s: %s", attempts, type(result).__name__, result,
                            extra={"event_id": rec.event_id, "stage": self.transform.name})
                time.sleep(self.settings.stage.retry_backoff_s * 2 ** (attempts - 1))
                attempts += 1
                result = self._process_one(rec)
            if isinstance(result, BaseException):
                message = f"{type(result).__name__}: {result}" if not isinstance(result, BadInput) else str(result)
                log.error("failed after %d attempt(s): %s", attempts, message,
                          extra={"event_id": rec.event_id, "stage": self.transform.name})
                outputs[id(rec)] = [self._dead_letter(rec, message, attempts)]
            else:
                outputs[id(rec)] = result
        return outputs

    def _process_one(self, rec: InputRecord) -> list[Output] | BaseException:
        try:
            return self.transform.process([rec])[0]
        except Exception as exc:  # the transform's own failure for this one record
            return exc

    def _process_halving(self, records: list[InputRecord]):
        if not records:
            return
        start = time.monotonic()
        try:
            results = self.transform.process(records)
        except Exception as exc:
            if len(records) == 1:
                yield records[0], exc
                return
            half = len(records) // 2
            log.warning("batch of %d failed (%s: %s): halving", len(records), type(exc).__name__, exc,
                        extra={"stage": self.transform.name})
            yield from self._process_halving(records[:half])
            yield from self._process_halving(records[half:])
            return
        seconds = time.monotonic() - start
        metrics.BATCH_SIZE.labels(self.transform.name).observe(len(records))
        metrics.STAGE_SECONDS.labels(self.transform.name).observe(seconds)
        log.info("transformed %d record(s) in %.2fs (%.2fs each)", len(records), seconds, seconds / len(records),
                 extra={"stage": self.transform.name})
        yield from zip(records, results)

    def _dead_letter(self, rec: InputRecord, error: str, attempts: int) -> Output:
        metrics.MESSAGES_FAILED.labels(self.transform.name).inc()
        value = {
            "event_id": rec.event_id,
            "stage": self.transform.name,
            "error": error,
            "attempts": attempts,
            "failed_at": int(time.time() * 1000),
            "input_topic": rec.topic,
            "input_partition": rec.partition,
            "input_offset": rec.offset,
            "event": self.transform.event_of(rec.value) if rec.value else None,
            "vision": self.transform.vision_of(rec.value) if rec.value else None,
            "raw_value": rec.raw if rec.value is None else None,
        }
        return Output(self.settings.topics.dlq, "DeadLetter", value, rec.event_id)

    # ---- the commit, written once ----------------------------------------------------------
    def _commit_partition(self, tp: tuple[str, int], records: list[InputRecord],
                          outputs: dict[int, list[Output]]) -> None:
        producer = self.producers.get(tp)
        if producer is None:  # revoked while we worked: the new owner redoes these records
            log.warning("partition %s[%d] no longer ours: batch dropped, the new owner redoes it", *tp)
            return
        self.txn_started = time.monotonic()
        try:
            # Step 1. Begin: everything until step 4 becomes visible together or not at all.
            producer.begin_transaction()
            # Step 2. Produce results and dead letters, keyed by event_id.
            for rec in records:
                for out in outputs.get(id(rec), []):
                    producer.produce(out.topic, key=out.key, value=self.codec.encode(out.schema, out.value))
                    metrics.MESSAGES_OUT.labels(self.transform.name, out.topic).inc()
            self.crash.reach("after_produce")
            # Step 3. Add the input offsets to the same transaction: the progress is
            # committed only together with the outputs it stands for. The group metadata
            # lets the broker refuse it if we lost the partition meanwhile.
            offsets = [TopicPartition(tp[0], tp[1], records[-1].offset + 1)]
            producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 60)
            self.crash.reach("after_offsets")
            # Step 4. Commit, retrying while the error is retriable (e.g. broker restarting).
            self._commit_with_retry(producer)
            metrics.TRANSACTIONS.labels(self.transform.name, "committed").inc()
            self.crash.reach("after_commit")
        except KafkaException as exc:
            err = exc.args[0]
            metrics.TRANSACTIONS.labels(self.transform.name, "aborted").inc()
            log.error("transaction for %s[%d] failed: %s", tp[0], tp[1], err)
            if err.fatal():
                # Fenced: another owner has this partition now. Restarting is the safe way out.
                raise
            try:
                producer.abort_transaction(30)
            except KafkaException as abort_exc:
                log.error("abort failed: %s", abort_exc)
            # Redo these records: rewind to the first offset of the batch.
            self.consumer.seek(TopicPartition(tp[0], tp[1], records[0].offset))
            return
        finally:
            self.txn_started = None
        # Step 5. Only now remember the event_ids: an aborted batch must be redone.
        for rec in records:
            self.handled.add(rec.event_id)

    @staticmethod
    def _commit_with_retry(producer: Producer, attempts: int = 30) -> None:
        for attempt in range(attempts):
            try:
                producer.commit_transaction(60)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not err.retriable() or attempt == attempts - 1:
                    raise
                log.warning("commit retry %d: %s", attempt + 1, err)
                time.sleep(1)


def install_signal_handlers(runner: StageRunner | Any) -> None:
    signal.signal(signal.SIGTERM, runner.request_stop)
    signal.signal(signal.SIGINT, runner.request_stop)
