"""Consumer lag per partition, without trusting the broker's end offsets.

The embedded broker (tansu) reports wrong end offsets (high watermark, ListOffsets latest;
see docs/brokers.md), so ``end - committed`` would be wrong there. And on Apache Kafka a
transactional topic ends with a commit marker, so ``end - committed`` stays at 1 for a
stage that is done. Instead a small reader consumer, assigned (never subscribed, never
committing) to every partition of a stage's input topics, reads each partition to its end
(``PARTITION_EOF``) and remembers the offsets of the data records after the group's
committed offset: the lag is how many of them there are. It reads incrementally from the
committed offset it first saw, so a round costs only the records that arrived since the
last one, and its memory is bounded by the lag itself.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from array import array

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from imgflow import metrics
from imgflow.kafka import consumer_config
from imgflow.settings import Settings

log = logging.getLogger(__name__)

TP = tuple[str, int]


class LagReader:
    def __init__(self, settings: Settings, stage: str, group_id: str, topics: list[str], interval_s: float = 5.0, round_timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.stage = stage
        self.group_id = group_id
        self.topics = topics
        self.interval_s = interval_s
        self.round_timeout_s = round_timeout_s
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        small = {
            "enable.partition.eof": True,
            "queued.max.messages.kbytes": 8192,
            "fetch.max.bytes": 8 << 20,
            "fetch.wait.max.ms": 100,
        }  # a round waits for the end of each partition: short polls
        # Reads the records (its own group id: it only assigns, never joins or commits).
        self.reader = Consumer(consumer_config(settings, f"{group_id}.lag-reader", **small))
        # Asks the stage's group for its committed offsets (never subscribes or commits).
        self.offsets = Consumer(consumer_config(settings, group_id))
        self.pending: dict[TP, array] = {}  # data-record offsets at or after the committed one
        self.start_offset: dict[TP, int] = {}  # where reading began (a committed offset)
        self.at_end: dict[TP, bool] = {}
        self.position: dict[TP, int] = {}  # next offset to read (after the last record read)
        self.known: set[TP] = set()  # partitions read to their end at least once
        self.lag: dict[TP, int] = {}

    # ---- one round ------------------------------------------------------------------------------
    def read_once(self) -> dict[TP, int]:
        """Read every partition to its end, fetch the group's committed offsets, and return
        (and export) the lag of every partition known so far."""
        parts = self._partitions()
        committed = self._committed(parts)
        self._assign(parts, committed)
        self._read_to_end()
        # Between rounds the reader fetches nothing (librdkafka would keep polling the broker).
        self.reader.pause([TopicPartition(t, p) for t, p in self.start_offset])
        for tp in self.known:
            offsets = self.pending[tp]
            done = committed.get(tp, -1)
            cut = bisect.bisect_left(offsets, done) if done >= 0 else 0
            if cut:
                del offsets[:cut]
            self.lag[tp] = len(offsets)
            metrics.CONSUMER_LAG.labels(self.stage, tp[0], str(tp[1])).set(len(offsets))
        return dict(self.lag)

    def _partitions(self) -> list[TP]:
        md = self.reader.list_topics(timeout=10)
        parts = []
        for topic in self.topics:
            meta = md.topics.get(topic)
            if meta is not None and meta.error is None:
                parts += [(topic, p) for p in sorted(meta.partitions)]
        return parts

    def _committed(self, parts: list[TP]) -> dict[TP, int]:
        if not parts:
            return {}
        found = self.offsets.committed([TopicPartition(t, p) for t, p in parts], timeout=10)
        return {(tp.topic, tp.partition): tp.offset for tp in found if tp.error is None}

    def _assign(self, parts: list[TP], committed: dict[TP, int]) -> None:
        if self.start_offset:
            self.reader.resume([TopicPartition(t, p) for t, p in self.start_offset])
        new = []
        for tp in parts:
            done = committed.get(tp, -1)
            start = self.start_offset.get(tp)
            if start is None or (0 <= done < start):  # new partition, or the group was moved back
                if start is not None:
                    self.reader.incremental_unassign([TopicPartition(*tp)])
                self.start_offset[tp] = max(done, 0)
                self.pending[tp] = array("q")
                self.at_end[tp] = False
                self.known.discard(tp)
                self.position.pop(tp, None)
                new.append(TopicPartition(tp[0], tp[1], done if done >= 0 else OFFSET_BEGINNING))
            elif tp in self.position:
                # End-of-partition is reported once per reaching it: seeking to where we are
                # makes the reader report it again, after any records that came meanwhile.
                self.reader.seek(TopicPartition(tp[0], tp[1], self.position[tp]))
                self.at_end[tp] = False
        if new:
            self.reader.incremental_assign(new)

    def _read_to_end(self) -> None:
        deadline = time.monotonic() + self.round_timeout_s
        while time.monotonic() < deadline and not all(self.at_end.values()):
            for msg in self.reader.consume(1000, 0.2):
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                if topic is None or partition is None or (topic, partition) not in self.pending:
                    continue
                tp = (topic, partition)
                err = msg.error()
                if err is None and offset is not None:  # a record always has its offset
                    self.pending[tp].append(offset)
                    self.position[tp] = offset + 1
                    self.at_end[tp] = False
                elif err is not None and err.code() == KafkaError._PARTITION_EOF:
                    if offset is not None:
                        self.position.setdefault(tp, offset)
                    self.at_end[tp] = True
                    self.known.add(tp)
                else:
                    log.debug("lag reader: %s", err)

    # ---- in the background ------------------------------------------------------------------------
    def start(self) -> LagReader:
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"lag-{self.stage}")
        self._thread.start()
        return self

    def _loop(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                self.read_once()
                failures = 0
            except Exception as exc:  # the broker restarting, say: try again next round
                metrics.LAG_READ_ERRORS.labels(self.stage).inc()
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("lag reader of %s: %s: %s", self.stage, type(exc).__name__, exc)
            self.stopping.wait(self.interval_s)

    def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(self.round_timeout_s + 15)
        for consumer in (self.reader, self.offsets):
            try:
                consumer.close()
            except RuntimeError:  # already closed
                pass
