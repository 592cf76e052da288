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
* Every record is keyed by its ``event_id``; a stage drops (event_id, run_id) pairs it
  has already handled, and the sink drops those already written, so records of aborted
  transactions that a broker still delivers never make a second result.

Runs: live, replays, forced backfills
-------------------------------------
Exactly once is per (image event, run) (``imgflow.events.dedupe_key``): a replay or a
forced backfill is a run of its own and is never dropped as already handled. A replay
(``imgflow.replay``) runs this same loop with a ``run_id`` (stamped on every event it
reads, so its outputs and rows carry it), its own group and topics, and ``RangeBounds``:
start at given offsets, stop before given ends, exit when every partition is done.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from imgflow import metrics
from imgflow.errors import BadInput
from imgflow.events import dedupe_key
from imgflow.kafka import consumer_config, fetch_schemas, producer_config, publish_schemas
from imgflow.lag import LagReader
from imgflow.rescan import IdleRescan
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
    run_id: str = ""  # the run this record belongs to (its event's run_id)

    @property
    def dedupe_key(self) -> str:
        """Its dedupe key: one result per (image event, run)."""
        return dedupe_key(self.event_id, self.run_id)


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

    def batch_size(self, settings: Settings) -> int:
        """Most records per ``process`` call (a stage whose model decodes many at once asks
        for more)."""
        return settings.stage.batch_size

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


TP = tuple[str, int]
RESCAN_LIMIT = 5_000  # offsets per partition re-read at an idle point (within HandledIds' memory)
# A record the broker refuses for its size (its message.max.bytes, the topic's
# max.message.bytes) or librdkafka for ours: that image becomes a dead letter.
TOO_LARGE = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)


@dataclass
class RangeBounds:
    """A bounded run over input partitions: ``start`` is where a group with no committed
    offset begins, ``end`` the offset to stop before (exclusive). Partitions left out are
    not read at all."""

    start: dict[TP, int]
    end: dict[TP, int]

    def assignment(self, consumer: Consumer) -> list[TopicPartition]:
        """The range's partitions, each from the group's committed offset, else the start.
        A bounded run assigns them itself (one process per stage of a run: no group join to
        wait for); its transactional producers fence an earlier process as after a rebalance."""
        committed = consumer.committed([TopicPartition(t, p) for t, p in self.end], timeout=30)
        return [TopicPartition(tp.topic, tp.partition,
                               tp.offset if tp.offset >= 0 else self.start[(tp.topic, tp.partition)])
                for tp in committed]


class RangeTracker:
    """Which partitions of a bounded run are done. A partition is done once this process
    has committed up to its end, or met a record at or past the end, or reached the end of
    the partition (PARTITION_EOF) at or past it: the last offsets of a range may be
    transaction markers that are never delivered, so the committed offset alone can stop
    short of the end."""

    def __init__(self, bounds: RangeBounds) -> None:
        self.bounds = bounds
        self.finished: set[TP] = {tp for tp, end in bounds.end.items() if bounds.start.get(tp, 0) >= end}

    def take(self, consumer: Consumer, msgs: list[Message]) -> list[Message]:
        """The records of ``msgs`` inside the range (other errors are the caller's). A
        PARTITION_EOF event or a record past the end marks its partition; a partition past
        its end is paused, so nothing more of it is fetched."""
        kept, past = [], set()
        for msg in msgs:
            tp = (msg.topic(), msg.partition())
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    self.reached(tp, msg.offset())
                continue
            end = self.bounds.end.get(tp)
            if end is None or msg.offset() >= end:
                self.finished.add(tp)
                past.add(tp)
            else:
                kept.append(msg)
        if past:
            consumer.pause([TopicPartition(t, p) for t, p in past])
        return kept

    def reached(self, tp: TP, next_offset: int) -> None:
        """Committed up to, or found the partition's end at, ``next_offset``."""
        if tp in self.bounds.end and next_offset >= self.bounds.end[tp]:
            self.finished.add(tp)

    def rewound(self, tp: TP) -> None:
        self.finished.discard(tp)

    def done(self) -> bool:
        return self.finished >= set(self.bounds.end)


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
                 run_id: str | None = None, bounds: RangeBounds | None = None) -> None:
        self.transform = transform
        self.settings = settings
        self.group_id = group_id or f"{settings.kafka.group_prefix}-{transform.name}"
        # None: the live pipeline, records keep their own run_id (a forced backfill's events
        # carry theirs). A replay stamps its run_id on every event it reads.
        self.run_id = run_id
        self.bounds = bounds
        self.range = RangeTracker(bounds) if bounds is not None else None
        self.codec = get_codec()
        self.topics = transform.input_topics(settings)
        self.producers: dict[tuple[str, int], Producer] = {}
        self.handled = HandledIds()
        self.crash = CrashPoints(transform.name)
        self.stopping = False
        self.consumer: Consumer | None = None
        self.txn_started: float | None = None  # monotonic time the open transaction began
        self._first_start: dict[tuple[str, int], int] = {}  # committed offsets of first-topic partitions
        self._lower_paused = False  # the lower lanes are paused (see _consume)
        self._first_start_retry = 0.0  # monotonic time to ask for those committed offsets again
        # A live stage reads again, once idle, what it consumed since it was last idle
        # (imgflow.rescan: tansu was seen to step over a committed transaction; on Kafka only
        # a safety net). Re-read records it has handled are dropped without a trace.
        self.rescan = IdleRescan(RESCAN_LIMIT) if bounds is None else None
        self._committed_next: dict[tuple[str, int], int] = {}  # offsets this process committed

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
            self._first_start.pop((tp.topic, tp.partition), None)
            self._committed_next.pop((tp.topic, tp.partition), None)
            txn_id = f"{self.group_id}.{tp.topic}.{tp.partition}"
            producer = Producer(producer_config(self.settings, txn_id,
                                                **{"linger.ms": self.settings.kafka.txn_linger_ms}))
            # Fences the previous owner of this partition and aborts its open transaction.
            producer.init_transactions(60)
            self.producers[(tp.topic, tp.partition)] = producer
        if self.rescan is not None and partitions:
            # Where the idle re-read of each partition may go back to. Asked after the fencing
            # above: Kafka holds back a committed offset while a dead owner's transaction
            # with offsets in it is open.
            try:
                committed = consumer.committed(partitions, timeout=10)
                self.rescan.assigned({(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else None
                                      for tp in committed})
            except KafkaException as exc:
                log.warning("committed offsets of the new partitions not read (%s): the idle re-read "
                            "starts where consuming does", exc)
        log.info("assigned %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Called from inside consume(): no transaction is open between batches.
        for tp in partitions:
            producer = self.producers.pop((tp.topic, tp.partition), None)
            if producer is not None:
                producer.flush(5)
        log.info("revoked %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])

    # ---- the loop -------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        if not self.stopping:
            log.info("stop requested: finishing the current batch")
        self.stopping = True

    def run(self, max_batches: int | None = None) -> None:
        # Series at 0 before the models load: a counter's first step is then seen as one.
        metrics.init_stage(self.transform.name, self.topics)
        self.transform.setup()
        threading.Thread(target=self._watch_transactions, daemon=True, name="txn-watchdog").start()
        publish_schemas(self.settings, self.codec, self.transform.output_schemas + ["DeadLetter"])
        # With a priority lane the lower lanes are resumed before most batches (see _consume):
        # their fetch must not wait behind a long poll of the idle high lane.
        extra = {"fetch.wait.max.ms": 20} if len(self.topics) > 1 else {}
        if self.bounds is None:
            self.consumer = Consumer(consumer_config(self.settings, self.group_id, **extra))
            self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                    on_lost=self._on_revoke)
        else:
            self.consumer = Consumer(consumer_config(self.settings, self.group_id, **extra,
                                                     **{"enable.partition.eof": True}))
            partitions = self.bounds.assignment(self.consumer)
            self._on_assign(self.consumer, partitions)
            self.consumer.assign(partitions)
        log.info("stage %s consuming %s as group %s", self.transform.name, self.topics, self.group_id)
        lag = LagReader(self.settings, self.transform.name, self.group_id, self.topics).start() \
            if metrics.serving() else None
        batches = 0
        try:
            while not self.stopping and (max_batches is None or batches < max_batches):
                if self.range is not None and self.range.done():
                    log.info("stage %s: every partition of the range is done", self.transform.name)
                    break
                raw = self._consume()
                msgs = [m for m in raw if self._usable(m)]
                if self.range is not None:
                    msgs = self.range.take(self.consumer, raw)
                if not msgs:
                    if self.rescan is not None:
                        self.rescan.maybe(self.consumer)
                    continue
                self._handle_batch(msgs)
                batches += 1
        finally:
            if lag is not None:
                lag.stop()
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

    def _consume(self) -> list[Message]:
        """The next batch, the first input topic (images.new.high) first. One queue holds the
        fetched records of every partition in arrival order, so a high-priority record would
        wait behind a prefetched backlog of the others: they are paused while the first topic
        is looked at (pausing also drops what was prefetched of them) and resumed, to refetch
        from their position, only when it has nothing."""
        size, wait = self.transform.batch_size(self.settings), self.settings.stage.max_wait_s
        if len(self.topics) < 2:
            return self.consumer.consume(size, wait)
        finished = self.range.finished if self.range is not None else set()
        lower = [tp for tp in self.consumer.assignment()
                 if tp.topic != self.topics[0] and (tp.topic, tp.partition) not in finished]
        if not lower:
            return self.consumer.consume(size, wait)
        drained = self._first_topic_drained()
        if drained:
            if self._lower_paused:  # left paused by a batch taken from the first topic
                self.consumer.resume(lower)
                self._lower_paused = False
            return self.consumer.consume(size, wait)
        self.consumer.pause(lower)
        self._lower_paused = True
        # Nothing known of the first topic yet (just assigned: no fetch answered): wait for
        # its first fetch instead of a zero-wait look that would find it empty, so an image
        # waiting there before the stage started is taken first, not one batch later.
        first = self.consumer.consume(size, wait if drained is None else 0)
        if any(not m.error() for m in first):
            return first
        self.consumer.resume(lower)
        self._lower_paused = False
        return first + self.consumer.consume(size, wait)

    def _first_topic_drained(self) -> bool | None:
        """True when every assigned partition of the first topic is known to hold nothing past
        what this consumer has taken (its high watermark as of the last fetch response, which
        covers every assigned partition, at most its next offset): then a batch can be taken
        from the shared queue without pausing the lower lanes. Pausing drops their
        prefetched records, which are then fetched again: a second read of every record
        from the broker's storage, the vision stage's largest cost on the broker path.
        Anything unknown (no fetch yet, no position, a bounded run) counts as not drained.
        A record arriving in the first topic after the last fetch waits one batch, as one
        arriving just after the paused look does. None: a partition of the first topic has
        no fetch answered yet (its high watermark is unknown).

        On tansu the high watermark may be too low (ENVIRONMENT.md); a record there can
        then wait a batch or two longer. On Kafka it is right as of the last fetch."""
        if self.bounds is not None:
            return False
        high = [tp for tp in self.consumer.assignment() if tp.topic == self.topics[0]]
        if not high:
            return True
        try:
            positions = self.consumer.position(high)
            missing = [tp for tp in positions if tp.offset < 0 and (tp.topic, tp.partition) not in self._first_start]
            if missing:  # nothing taken from it since it was assigned: it starts at the committed offset
                if time.monotonic() < self._first_start_retry:
                    return False
                try:
                    for tp in self.consumer.committed(missing, timeout=2):
                        self._first_start[(tp.topic, tp.partition)] = tp.offset
                except KafkaException:
                    self._first_start_retry = time.monotonic() + 30  # not a 2 s wait every batch
                    return False
            for tp in positions:
                low, high_mark = self.consumer.get_watermark_offsets(tp, cached=True)
                nxt = tp.offset if tp.offset >= 0 else self._first_start[(tp.topic, tp.partition)]
                if nxt < 0:  # no committed offset: auto.offset.reset=earliest starts at the low mark
                    nxt = low
                if high_mark < 0:
                    return None
                if nxt < 0 or high_mark > nxt:
                    return False
        except KafkaException:
            return False
        return True

    def _handle_batch(self, msgs: list[Message]) -> None:
        fresh = self.rescan.saw(msgs) if self.rescan is not None else msgs
        fresh_ids = {id(m) for m in fresh}
        reread = {(m.topic(), m.partition(), m.offset()) for m in msgs if id(m) not in fresh_ids}
        for topic, n in Counter(m.topic() for m in fresh).items():  # a count per batch, not per record
            metrics.MESSAGES_IN.labels(self.transform.name, topic).inc(n)
        records = decode_messages(msgs, self.transform, self.codec, self.settings)
        for rec in records:
            self._scope_to_run(rec)
        todo, seen, kept = [], set(), []
        for rec in records:
            again = (rec.topic, rec.partition, rec.offset) in reread
            if rec.error is None and (rec.dedupe_key in self.handled or rec.dedupe_key in seen):
                if again:  # read again at an idle point, and handled: not a duplicate event
                    continue
                metrics.DUPLICATES_DROPPED.labels(self.transform.name).inc()
                log.info("duplicate dropped", extra={"event_id": rec.event_id, "stage": self.transform.name})
            elif again and rec.error is not None:
                continue  # an undecodable record read again: it was dead-lettered the first time
            else:
                if again:
                    log.warning("a record first stepped over was found when read again: %s[%d]@%d", rec.topic,
                                rec.partition, rec.offset, extra={"event_id": rec.event_id,
                                                                  "stage": self.transform.name})
                seen.add(rec.dedupe_key)
                todo.append(rec)
            kept.append(rec)
        outputs = self._transform(todo)
        by_partition: dict[tuple[str, int], list[InputRecord]] = defaultdict(list)
        for rec in kept:
            by_partition[(rec.topic, rec.partition)].append(rec)
        # Highest-priority topic first.
        for tp in sorted(by_partition, key=lambda t: (self.topics.index(t[0]), t[1])):
            self._commit_partition(tp, by_partition[tp], outputs)

    def _scope_to_run(self, rec: InputRecord) -> None:
        """The record's run: its event's run_id, or this runner's for a replay (stamped on the
        event, so every output and dead letter of the replay carries it)."""
        event = self.transform.event_of(rec.value) if rec.value is not None else None
        if self.run_id is not None:
            if event is not None:
                event["run_id"] = self.run_id
            rec.run_id = self.run_id
        elif event is not None:
            rec.run_id = event.get("run_id", "")

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

    def _dead_letter(self, rec: InputRecord, error: str, attempts: int, keep_vision: bool = True) -> Output:
        metrics.MESSAGES_FAILED.labels(self.transform.name).inc()
        # The one log line of a dead letter says exactly what the dead letter says.
        log.error("dead-lettered after %d attempt(s): %s", attempts, error,
                  extra={"event_id": rec.event_id, "stage": self.transform.name})
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
            "vision": self.transform.vision_of(rec.value) if rec.value and keep_vision else None,
            "raw_value": rec.raw if rec.value is None else None,
        }
        return Output(self.settings.topics.dlq, "DeadLetter", value, rec.event_id)

    # ---- the commit, written once ----------------------------------------------------------
    def _commit_partition(self, tp: tuple[str, int], records: list[InputRecord],
                          outputs: dict[int, list[Output]], oversize_retry: bool = True) -> None:
        producer = self.producers.get(tp)
        if producer is None:  # revoked while we worked: the new owner redoes these records
            log.warning("partition %s[%d] no longer ours: batch dropped, the new owner redoes it", *tp)
            return
        self.txn_started = time.monotonic()
        oversized: dict[int, str] = {}  # id(record) -> why its output was refused for its size
        try:
            # Step 1. Begin: everything until step 4 becomes visible together or not at all.
            producer.begin_transaction()
            # Step 2. Produce results and dead letters, keyed by event_id.
            produced: Counter[str] = Counter()
            for rec in records:
                for out in outputs.get(id(rec), []):
                    value = self.codec.encode(out.schema, out.value)
                    try:
                        producer.produce(out.topic, key=out.key, value=value,
                                         on_delivery=_size_watch(rec, out, len(value), oversized))
                    except KafkaException as exc:
                        if exc.args[0].code() in TOO_LARGE:
                            oversized[id(rec)] = _too_large(out, len(value), exc.args[0])
                        raise
                    produced[out.topic] += 1
            self.crash.reach("after_produce")
            # Step 3. Add the input offsets to the same transaction: the progress is
            # committed only together with the outputs it stands for. The group metadata
            # lets the broker refuse it if we lost the partition meanwhile. Never behind
            # what this process committed already (a batch read again at an idle point).
            next_offset = max(records[-1].offset + 1, self._committed_next.get(tp, -1))
            offsets = [TopicPartition(tp[0], tp[1], next_offset)]
            producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 60)
            self.crash.reach("after_offsets")
            # Step 4. Commit, retrying while the error is retriable (e.g. broker restarting).
            self._commit_with_retry(producer)
            self._committed_next[tp] = next_offset
            metrics.TRANSACTIONS.labels(self.transform.name, "committed").inc()
            for topic, n in produced.items():  # counted once committed: an aborted batch is redone
                metrics.MESSAGES_OUT.labels(self.transform.name, topic).inc(n)
            metrics.COMMIT_SECONDS.labels(self.transform.name).observe(time.monotonic() - self.txn_started)
            self.crash.reach("after_commit")
        except KafkaException as exc:
            err = exc.args[0]
            metrics.TRANSACTIONS.labels(self.transform.name, "aborted").inc()
            log.error("transaction for %s[%d] failed: %s", tp[0], tp[1], err)
            if err.fatal():
                # Fenced: another owner has this partition now. Restarting is the safe way out.
                raise
            producer.poll(0)  # delivery reports not served yet (a size refused by the broker)
            try:
                producer.abort_transaction(30)
            except KafkaException as abort_exc:
                log.error("abort failed: %s", abort_exc)
            if oversized and oversize_retry:
                # Those images become dead letters (without the refused result), and the
                # batch commits again at once: nothing else about it changed.
                for rec in records:
                    if id(rec) in oversized:
                        outputs[id(rec)] = [self._dead_letter(rec, oversized[id(rec)], 1, keep_vision=False)]
                self.txn_started = None
                self._commit_partition(tp, records, outputs, oversize_retry=False)
                return
            # Redo these records: rewind to the first offset of the batch.
            self.consumer.seek(TopicPartition(tp[0], tp[1], records[0].offset))
            if self.rescan is not None:
                self.rescan.rewound(tp, records[0].offset)
            if self.range is not None:
                self.range.rewound(tp)
            return
        finally:
            self.txn_started = None
        # Step 5. Only now remember the dedupe keys: an aborted batch must be redone.
        for rec in records:
            self.handled.add(rec.dedupe_key)
            # One line per image and stage: `grep <event_id>` over the logs shows its path.
            log.info("committed %s[%d]@%d -> %s", rec.topic, rec.partition, rec.offset,
                     ", ".join(out.topic for out in outputs.get(id(rec), [])) or "nothing (duplicate)",
                     extra={"event_id": rec.event_id, "stage": self.transform.name})
        if self.range is not None:
            self.range.reached(tp, records[-1].offset + 1)

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


def _too_large(out: Output, size: int, err: KafkaError) -> str:
    return (f"its {out.schema} record for {out.topic} is {size:,} bytes, more than Kafka accepts "
            f"(the producer's or the broker's message.max.bytes, or the topic's max.message.bytes): {err.str()}")


def _size_watch(rec: InputRecord, out: Output, size: int, oversized: dict[int, str]):
    """A delivery callback noting an output the broker refused for its size (the commit then
    fails as a whole; the caller turns that image into a dead letter and commits again)."""
    def on_delivery(err: KafkaError | None, _msg) -> None:
        if err is not None and err.code() in TOO_LARGE:
            oversized[id(rec)] = _too_large(out, size, err)
    return on_delivery


def install_signal_handlers(runner: StageRunner | Any) -> None:
    signal.signal(signal.SIGTERM, runner.request_stop)
    signal.signal(signal.SIGINT, runner.request_stop)
