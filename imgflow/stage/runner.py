"""The one consume -> transform -> produce -> commit loop every Kafka-to-Kafka stage runs.

A stage is a small ``Transform`` (vision, enrich); the loop around it is here, its parts
beside it: the priority lanes (``lanes``), retries and dead letters (``failures``), the
exactly-once commit (``commit``), bounded runs for replays (``ranges``).

Exactly once is per (image event, run) (``imgflow.events.dedupe_key``): a replay or a
forced backfill is a run of its own and is never dropped as already handled. See
docs/design.md#exactly-once."""

from __future__ import annotations

import logging
import signal
from collections import Counter, defaultdict
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from imgflow import metrics
from imgflow.kafka import consumer_config, position, publish_schemas
from imgflow.lag import LagReader
from imgflow.rescan import IdleRescan
from imgflow.settings import Settings
from imgflow.stage.commit import Outcome, TransactionalCommit
from imgflow.stage.crash import CrashPoints
from imgflow.stage.failures import Failures
from imgflow.stage.lanes import PriorityLanes, usable
from imgflow.stage.ranges import TP, RangeBounds, RangeTracker
from imgflow.stage.records import (
    HandledIds,
    InputRecord,
    OutputRecord,
    Transform,
    decode_messages,
    drop_handled,
    scope_to_run,
)
from schemas.codec import get_codec

log = logging.getLogger(__name__)

RESCAN_LIMIT = 5_000  # offsets per partition re-read at an idle point (within HandledIds' memory)


class StageRunner:
    def __init__(
        self, transform: Transform, settings: Settings, group_id: str | None = None, run_id: str | None = None, bounds: RangeBounds | None = None
    ) -> None:
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
        self.handled = HandledIds()
        self.stopping = False
        self.consumer: Consumer | None = None
        self.lanes = PriorityLanes(transform, settings, self.topics, self.range)
        self.failures = Failures(transform, settings)
        self.commits = TransactionalCommit(
            settings, self.group_id, transform.name, self.codec, CrashPoints(transform.name), self.handled, self.failures.dead_letter
        )
        # A live stage reads again, once idle, what it consumed since it was last idle
        # (imgflow.rescan: tansu was seen to step over a committed transaction; on Kafka only
        # a safety net). Re-read records it has handled are dropped without a trace.
        self.rescan = IdleRescan(RESCAN_LIMIT) if bounds is None else None

    # ---- partition ownership ------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.lanes.assigned(partitions)
        self.commits.assign(partitions)
        if self.rescan is not None and partitions:
            # Where the idle re-read of each partition may go back to. Asked after the fencing
            # above: Kafka holds back a committed offset while a dead owner's transaction
            # with offsets in it is open.
            try:
                committed = consumer.committed(partitions, timeout=10)
                self.rescan.assigned({(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else None for tp in committed})
            except KafkaException as exc:
                log.warning("committed offsets of the new partitions not read (%s): the idle re-read starts where consuming does", exc)
        log.info("assigned %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.commits.revoke(partitions)
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
        self.commits.watch(lambda: self.stopping)
        publish_schemas(self.settings, self.codec, self.transform.output_schemas + ["DeadLetter"])
        # With a priority lane the lower lanes are resumed before most batches (see lanes):
        # their fetch must not wait behind a long poll of the idle high lane.
        extra = {"fetch.wait.max.ms": 20} if len(self.topics) > 1 else {}
        if self.bounds is None:
            self.consumer = Consumer(consumer_config(self.settings, self.group_id, **extra))
            self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke)
        else:
            self.consumer = Consumer(consumer_config(self.settings, self.group_id, **extra, **{"enable.partition.eof": True}))
            partitions = self.bounds.assignment(self.consumer)
            self._on_assign(self.consumer, partitions)
            self.consumer.assign(partitions)
        log.info("stage %s consuming %s as group %s", self.transform.name, self.topics, self.group_id)
        lag = LagReader(self.settings, self.transform.name, self.group_id, self.topics).start() if metrics.serving() else None
        batches = 0
        try:
            while not self.stopping and (max_batches is None or batches < max_batches):
                if self.range is not None and self.range.done():
                    log.info("stage %s: every partition of the range is done", self.transform.name)
                    break
                raw = self._consume()
                msgs = [m for m in raw if usable(m)]
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
            self.commits.close()
            log.info("stage %s stopped", self.transform.name)

    def _active_consumer(self) -> Consumer:
        assert self.consumer is not None, "the consumer exists from run() on"
        return self.consumer

    def _consume(self) -> list[Message]:
        return self.lanes.consume(self._active_consumer())

    def _handle_batch(self, msgs: list[Message]) -> None:
        fresh = self.rescan.saw(msgs) if self.rescan is not None else msgs
        fresh_ids = {id(m) for m in fresh}
        reread = {position(m) for m in msgs if id(m) not in fresh_ids}
        for topic, n in Counter(m.topic() for m in fresh).items():  # a count per batch, not per record
            metrics.MESSAGES_IN.labels(self.transform.name, topic).inc(n)
        records = decode_messages(msgs, self.transform, self.codec, self.settings)
        for rec in records:
            scope_to_run(rec, self.transform, self.run_id)
        todo, kept = drop_handled(records, self.handled, reread, self.transform.name)
        outputs = self.failures.outputs(todo)
        by_partition: dict[TP, list[InputRecord]] = defaultdict(list)
        for rec in kept:
            by_partition[(rec.topic, rec.partition)].append(rec)
        # Highest-priority topic first.
        for tp in sorted(by_partition, key=lambda t: (self.topics.index(t[0]), t[1])):
            self._commit_partition(tp, by_partition[tp], outputs)

    def _commit_partition(self, tp: TP, records: list[InputRecord], outputs: dict[int, list[OutputRecord]]) -> None:
        consumer = self._active_consumer()
        outcome = self.commits.commit(consumer, tp, records, outputs)
        if outcome is Outcome.ABORTED:
            # Redo these records: rewind to the first offset of the batch.
            consumer.seek(TopicPartition(tp[0], tp[1], records[0].offset))
            if self.rescan is not None:
                self.rescan.rewound(tp, records[0].offset)
            if self.range is not None:
                self.range.rewound(tp)
        elif outcome is Outcome.COMMITTED and self.range is not None:
            self.range.reached(tp, records[-1].offset + 1)


def install_signal_handlers(runner: StageRunner | Any) -> None:
    signal.signal(signal.SIGTERM, runner.request_stop)
    signal.signal(signal.SIGINT, runner.request_stop)
