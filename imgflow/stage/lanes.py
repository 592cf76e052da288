"""The priority lanes: the first input topic (images.new.high) is taken before the others."""

from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from imgflow.settings import Settings
from imgflow.stage.ranges import TP, RangeTracker
from imgflow.stage.records import Transform

log = logging.getLogger(__name__)


def usable(msg: Message) -> bool:
    err = msg.error()
    if err is not None:
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consume error: %s", err)
        return False
    return True


class PriorityLanes:
    """Takes each batch from the consumer, the first of ``topics`` first."""

    def __init__(self, transform: Transform, settings: Settings, topics: list[str], range_: RangeTracker | None) -> None:
        self.transform = transform
        self.settings = settings
        self.topics = topics
        self.range = range_  # a bounded run (replay), else None
        self._first_start: dict[TP, int] = {}  # committed offsets of first-topic partitions
        self._lower_paused = False  # the lower lanes are paused (see consume)
        self._first_start_retry = 0.0  # monotonic time to ask for those committed offsets again

    def assigned(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._first_start.pop((tp.topic, tp.partition), None)

    def consume(self, consumer: Consumer) -> list[Message]:
        """The next batch, the first input topic (images.new.high) first. One queue holds the
        fetched records of every partition in arrival order, so a high-priority record would
        wait behind a prefetched backlog of the others: they are paused while the first topic
        is looked at (pausing also drops what was prefetched of them) and resumed, to refetch
        from their position, only when it has nothing."""
        size, wait = self.transform.batch_size(self.settings), self.settings.stage.max_wait_s
        if len(self.topics) < 2:
            return consumer.consume(size, wait)
        finished = self.range.finished if self.range is not None else set()
        lower = [tp for tp in consumer.assignment() if tp.topic != self.topics[0] and (tp.topic, tp.partition) not in finished]
        if not lower:
            return consumer.consume(size, wait)
        drained = self.first_topic_drained(consumer)
        if drained:
            if self._lower_paused:  # left paused by a batch taken from the first topic
                consumer.resume(lower)
                self._lower_paused = False
            return consumer.consume(size, wait)
        consumer.pause(lower)
        self._lower_paused = True
        # Nothing known of the first topic yet (just assigned: no fetch answered): wait for
        # its first fetch instead of a zero-wait look that would find it empty, so an image
        # waiting there before the stage started is taken first, not one batch later.
        first = consumer.consume(size, wait if drained is None else 0)
        if any(not m.error() for m in first):
            return first
        consumer.resume(lower)
        self._lower_paused = False
        return first + consumer.consume(size, wait)

    def first_topic_drained(self, consumer: Consumer) -> bool | None:
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

        On tansu the high watermark may be too low (docs/brokers.md, the tansu workarounds); a
        record there can then wait a batch or two longer. On Kafka it is right as of the last fetch."""
        if self.range is not None:
            return False
        high = [tp for tp in consumer.assignment() if tp.topic == self.topics[0]]
        if not high:
            return True
        try:
            positions = consumer.position(high)
            missing = [tp for tp in positions if tp.offset < 0 and (tp.topic, tp.partition) not in self._first_start]
            if missing:  # nothing taken from it since it was assigned: it starts at the committed offset
                if time.monotonic() < self._first_start_retry:
                    return False
                try:
                    for tp in consumer.committed(missing, timeout=2):
                        self._first_start[(tp.topic, tp.partition)] = tp.offset
                except KafkaException:
                    self._first_start_retry = time.monotonic() + 30  # not a 2 s wait every batch
                    return False
            for tp in positions:
                low, high_mark = consumer.get_watermark_offsets(tp, cached=True)
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
