"""Reading again, once idle, what arrived since the last idle point: the same safety net for
every consumer of the pipeline (the stage loop and the sink).

Why: on tansu, a read_committed consumer was seen to step over a whole committed transaction
(8 records at the start of a partition, in a pipeline just started); the records reached the
sink only when it restarted, and a stage that stepped over them would never have processed
them. Re-reading at each idle point turns that into a delay of seconds. Records that were
handled are known to the reader's dedupe (the sink's recent ids, a stage's handled keys) and
dropped without a trace; one that was stepped over is handled now.

On Apache Kafka, which delivers every committed record, it is only a safety net: it costs
one read of the records since the last idle point, and writes nothing twice (every re-read
record is known). At most ``limit`` offsets per partition are re-read, which the caller
keeps within its dedupe memory; nothing is re-read while records keep coming.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer, KafkaException, TopicPartition

log = logging.getLogger(__name__)

TP = tuple[str, int]


class IdleRescan:
    def __init__(self, limit: int, committed: dict[TP, int | None] | None = None, idle_s: float = 5.0) -> None:
        self.limit = max(0, limit)
        self.idle_s = idle_s
        # Position at the last idle point; a partition starts at its committed offset (a
        # transaction stepped over at the very start must be re-read too).
        self.mark: dict[TP, int] = {tp: off or 0 for tp, off in (committed or {}).items()}
        self.last = time.monotonic()
        self.consumed = False  # anything consumed since the last idle point
        self.high: dict[TP, int] = {}  # next offset beyond all consumed

    def assigned(self, committed: dict[TP, int | None]) -> None:
        """Partitions (newly) assigned, at their committed offsets (None: none committed)."""
        for tp, off in committed.items():
            self.mark[tp] = off or 0
            self.high.pop(tp, None)

    def rewound(self, tp: TP, offset: int) -> None:
        """The caller seeks back to redo records (an aborted batch): they are not re-reads."""
        if tp in self.high:
            self.high[tp] = min(self.high[tp], offset)

    def saw(self, msgs: list) -> list:
        """Note a batch; returns the records beyond what was consumed before (not re-reads),
        which are what the "messages in" counters count."""
        self.last, self.consumed = time.monotonic(), True
        fresh = []
        for m in msgs:
            key = (m.topic(), m.partition())
            if m.offset() >= self.high.get(key, -1):
                fresh.append(m)
                self.high[key] = m.offset() + 1
        return fresh

    def maybe(self, consumer: Consumer) -> None:
        """At an idle point (nothing consumed for ``idle_s``): seek every assigned partition
        back to where it was at the last idle point (at most ``limit`` back)."""
        if not self.consumed or time.monotonic() - self.last < self.idle_s:
            return
        self.consumed = False
        try:
            positions = consumer.position(consumer.assignment())
        except KafkaException as exc:
            log.debug("idle re-read skipped: %s", exc)
            return
        for tp in positions:
            key = (tp.topic, tp.partition)
            if tp.offset < 0:
                continue
            start = max(self.mark.get(key, 0), tp.offset - self.limit)
            self.mark[key] = tp.offset
            if start < tp.offset:
                consumer.seek(TopicPartition(tp.topic, tp.partition, start))
                log.debug("idle: reading %s[%d] again from %d to %d", tp.topic, tp.partition, start, tp.offset)
