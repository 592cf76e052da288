"""Bounded runs over input partitions (replays): where each partition starts and stops.

A replay (``imgflow.app.replay``) runs the stage loop with a ``run_id`` (stamped on every event
it reads), its own group and topics, and ``RangeBounds``: start at given offsets, stop before
given ends, exit when every partition is done. See docs/backfill-replay-priority.md."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from imgflow.kafka import position

TP = tuple[str, int]


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
        return [TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else self.start[(tp.topic, tp.partition)]) for tp in committed]


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
            topic, partition, offset = position(msg)
            tp = (topic, partition)
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.reached(tp, offset)
                continue
            end = self.bounds.end.get(tp)
            if end is None or offset >= end:
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
