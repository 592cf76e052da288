"""Sink stage: final records -> Avro files and the CSV, in a local folder or ``s3://`` prefix
(layout and formats: ``imgflow/output/``; the writer: ``imgflow.output.store.ResultStore``).

Exactly once
------------
The sink writes to files, not to Kafka, so its exactly-once rests on the output itself, as
Kafka Connect's S3 sink does. One batch (the records of one ``consume``) is written as:

1. per (topic, partition), an Avro file named by its first offset, written whole;
2. the CSV rows: local, appended to ``results.csv`` and its committed length recorded;
   on S3, one CSV part per Avro file (an append is impossible on S3, a crash mid-way
   would leave a torn object, and a part per Avro file is deterministic like it);
3. per Avro file, its ``_index`` object (offsets and event_ids): it marks the batch whole;
4. the group's offsets are committed; locally the CSV length at that moment is then noted
   in ``.sink-checkpoint``.

A crash at any instruction leaves every event exactly once: a batch whose Avro file is
missing is redelivered; one whose Avro file exists but whose ``_index`` does not is
completed on start-up (CSV rows restored from the Avro file, index written); rows that are
redelivered although written are dropped by event_id.

Bounded start-up (``ResultStore.recover``)
------------------------------------------
Start-up reads neither the whole CSV nor every Avro file; what it reads depends on the
dedupe window, not on the history:

* Which files can be incomplete? Only files written after the group's last offset commit.
  Every file holds the rows of one batch of one partition, and a batch's commit moves the
  partition's offset past all of them; the records consumed after the last commit all have
  offsets >= the committed one. So an incomplete file's *name* (its first offset) is >= the
  committed offset: listing starts at that key (S3 ``StartAfter``), as Kafka Connect does.
* Which redelivered records can already be written? The ones at or past the committed
  offset, whose rows are in those same files. Their ids are read from the ``_index``
  objects (or the Avro file where there is no index yet).
* The records of aborted transactions (the embedded broker delivers them although we read
  ``read_committed``, docs/brokers.md): the sink may have written an aborted copy of an event
  at offset ``a`` (now committed, so not among the files above), and meets the committed
  copy of the same event later, at offset ``r > a``. Both copies have the same key
  (event_id), hence the same partition, and the committed copy is produced when the
  producer that aborted (or the next owner of its input, which fences it) redoes the batch,
  seconds later: ``r - a`` is the traffic into that partition during a retry or a stage
  restart. So the sink also keeps the event_ids of the last ``sink.dedupe_window`` offsets of
  every partition (the files named at or past ``committed - window``; give or take one file,
  whose rows start before that point) - at start-up read from the ``_index`` objects, at
  run time a sliding window (``RecentIds``). An aborted copy and its committed copy further
  apart than the window would both be written; raise the window if a stage can stay down
  for longer than it covers while others keep writing to the same partition. Dead letters
  are keyed by event_id too, so the same reasoning holds between the results topic and the
  dead-letter topic (the window holds the ids of both).
* A partition the group has no committed offset for is read from its first file.
* Not covered (unlike the unbounded id set this replaced): the same event *published again*
  long after its row was written - beyond the window, e.g. by a watcher whose state was
  deleted - gets a second row. Publishers guard against that (watcher state; ``backfill``
  checks the output with ``imgflow.output.reader.ResultReader`` unless forced).

Locally ``results.csv`` is one file: a half-written tail is cut back to the committed length,
and the rows of a file without index are appended unless they are already among the rows
written since the last offset commit (read from ``.sink-checkpoint``'s position: bounded).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from imgflow import metrics
from imgflow.kafka import consumer_config
from imgflow.lag import LagReader
from imgflow.output.rows import row_from_dead_letter, row_from_enriched, row_from_malformed
from imgflow.output.storage import retry_s3
from imgflow.output.store import PendingRow, ResultStore
from imgflow.rescan import IdleRescan
from imgflow.settings import Settings
from imgflow.stage import CrashPoints, RangeBounds, RangeTracker
from schemas.codec import SchemaError, get_codec

log = logging.getLogger(__name__)


def last_offsets(msgs: list[Message]) -> dict[tuple[str, int], int]:
    """The highest offset of each (topic, partition) among delivered messages."""
    offsets: dict[tuple[str, int], int] = {}
    for m in msgs:
        topic, partition, offset = m.topic(), m.partition(), m.offset()
        assert topic is not None and partition is not None and offset is not None  # set on every delivered message
        offsets[(topic, partition)] = max(offsets.get((topic, partition), -1), offset)
    return offsets


class SinkRunner:
    name = "sink"

    def __init__(self, settings: Settings, group_id: str | None = None, run_id: str | None = None, bounds: RangeBounds | None = None) -> None:
        self.settings = settings
        self.group_id = group_id or f"{settings.kafka.group_prefix}-sink"
        self.run_id = run_id  # a replay of the sink stage itself: its rows carry the replay's run_id
        self.bounds = bounds  # a replay: stop when this range of the input is written
        self.range = RangeTracker(bounds) if bounds is not None else None
        self.codec = get_codec()
        self.store = ResultStore(settings.sink.out_dir, settings.sink.csv, settings.sink.avro, settings=settings)
        self.crash = CrashPoints("sink")
        self.stopping = False
        self.topics = [settings.topics.enriched, settings.topics.dlq]
        self.rescan: IdleRescan | None = None

    def request_stop(self, *_) -> None:
        self.stopping = True

    def _to_pending(self, msg) -> PendingRow:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        published = None
        try:
            if topic == self.settings.topics.dlq:
                value = self.codec.decode("DeadLetter", msg.value())
                row = row_from_dead_letter(value, topic, partition, offset)
                published = value["event"]["published_at"] if value.get("event") else None
            else:
                value = self.codec.decode("EnrichedRecord", msg.value())
                row = row_from_enriched(value, topic, partition, offset)
                published = value["vision"]["event"]["published_at"]
        except SchemaError as exc:
            key = msg.key().decode("utf-8", "replace") if msg.key() else f"malformed-{topic}-{partition}-{offset}"
            log.error("undecodable record on %s[%d]@%d: %s", topic, partition, offset, exc, extra={"event_id": key, "stage": "sink"})
            row = row_from_malformed(key, exc, topic, partition, offset)
        if self.run_id is not None:
            row["run_id"] = self.run_id
        return PendingRow(topic, partition, offset, row, published)

    def committed_offsets(self, consumer: Consumer) -> dict[tuple[str, int], int | None]:
        """The group's committed offset of every partition of the sink's topics."""
        md = consumer.list_topics(timeout=30)
        tps = [TopicPartition(t, p) for t in self.topics if t in md.topics for p in md.topics[t].partitions]
        result = {}
        for tp in consumer.committed(tps, timeout=30):
            result[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else None
        return result

    def start(self, consumer: Consumer) -> bool:
        """Lock and recover the output, retrying S3 errors; False if stopped meanwhile.
        Sets ``self.rescan`` (a live sink's idle re-read, from the committed offsets)."""
        t0 = time.monotonic()
        lock = lambda: self.store.lock(f"sink of group {self.group_id}", stopping=lambda: self.stopping)  # noqa: E731
        if retry_s3("sink start-up", lock, stopping=lambda: self.stopping) is None and self.stopping:
            return False
        while True:  # the broker may be restarting: wait for it (a stop request ends the wait)
            try:
                committed = self.committed_offsets(consumer)
                break
            except KafkaException as exc:
                if self.stopping:
                    return False
                log.warning("sink start-up: cannot read the group's committed offsets yet (%s); retrying", exc)
                time.sleep(1)
        restored = retry_s3("sink start-up", lambda: self.store.recover(committed), stopping=lambda: self.stopping)
        if restored is None:
            return False
        self.rescan = IdleRescan(self.store.known.window // 2, committed) if self.bounds is None else None
        log.info(
            "sink writing to %s (%d recent results known, %d restored from Avro, start-up %.2fs)",
            self.store.storage,
            len(self.store.known),
            restored,
            time.monotonic() - t0,
        )
        return True

    def run(self) -> None:
        extra = {"enable.partition.eof": True} if self.bounds is not None else {}
        consumer = Consumer(consumer_config(self.settings, self.group_id, **extra))
        lag = None
        try:
            if not self.start(consumer):
                return
            if self.bounds is None:
                consumer.subscribe(self.topics)
            else:  # a replay's sink: its range, from its group's committed offsets
                consumer.assign(self.bounds.assignment(consumer))
            metrics.init_stage("sink", self.topics)
            metrics.init_sink()
            lag = LagReader(self.settings, "sink", self.group_id, self.topics).start() if metrics.serving() else None
            while not self.stopping:
                if self.range is not None and self.range.done():
                    log.info("sink: every partition of the range is written")
                    break
                raw = consumer.consume(500, 1.0)
                msgs = [m for m in raw if not m.error()]
                if self.range is not None:
                    msgs = self.range.take(consumer, raw)
                if not msgs:
                    if self.rescan is not None:
                        self.rescan.maybe(consumer)
                    continue
                fresh = self.rescan.saw(msgs) if self.rescan is not None else msgs
                for topic, n in Counter(m.topic() for m in fresh).items():
                    metrics.MESSAGES_IN.labels("sink", topic).inc(n)
                pending = [self._to_pending(m) for m in msgs]
                # An unwritable output (S3 down, bucket missing, credentials wrong) holds the
                # batch and retries with back-off; nothing is committed until it is written.
                write = functools.partial(self.store.write, pending, self.crash)
                written = retry_s3(f"sink: writing {len(pending)} rows", write, stopping=lambda: self.stopping)
                if written is None:
                    break  # stopped before the batch was written: it is redelivered next time
                metrics.sink_wrote([p.published_at for p in written])
                for p in written:
                    log_extra = {"event_id": p.row["event_id"], "stage": "sink"}
                    log.info("wrote %s%s", p.row["image_path"], " (error row)" if p.row["error"] else "", extra=log_extra)
                # Step 4. Only now move the group's offsets; redelivered records would be
                # dropped as known anyway, so a failed commit costs time, not correctness.
                offsets = last_offsets(msgs)
                t0 = time.monotonic()
                try:
                    consumer.commit(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in offsets.items()], asynchronous=False)
                    metrics.COMMIT_SECONDS.labels("sink").observe(time.monotonic() - t0)
                    self.store.checkpoint()
                    if self.range is not None:
                        for tp, last in offsets.items():
                            self.range.reached(tp, last + 1)
                except KafkaException as exc:
                    log.warning("offset commit failed (records will be redelivered and dropped): %s", exc)
                self.crash.reach("after_commit")
        finally:
            if lag is not None:
                lag.stop()
            consumer.close()
            self.store.unlock()
            log.info("sink stopped")
