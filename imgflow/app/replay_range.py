"""A replay's range: its ends as given (an offset, a time, start or end) and as offsets
of each partition, found by reading the records themselves.

``offsets_for_times`` and the high watermark are only hints (the embedded broker answers 0
and a wrong end: docs/brokers.md, "The tansu workarounds"), verified by reading record timestamps and consuming to
PARTITION_EOF. On Apache Kafka the hints are right and the checks read one or two records.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import Consumer, Message, TopicPartition

from imgflow.errors import ImgflowError
from imgflow.kafka import consumer_config, end_of_partition, position
from imgflow.settings import Settings

log = logging.getLogger(__name__)

TP = tuple[str, int]


class ReplayError(ImgflowError, RuntimeError):
    """A replay that cannot start: the message says what to change."""


@dataclass(frozen=True)
class Point:
    """One end of a range: an offset (applied to every partition), a time (ms since the
    epoch, compared with record timestamps), or the beginning/end of each partition."""

    kind: str  # "offset" | "time" | "start" | "end"
    value: int = 0

    def __str__(self) -> str:
        if self.kind == "offset":
            return str(self.value)
        if self.kind == "time":
            return datetime.fromtimestamp(self.value / 1000, UTC).isoformat(timespec="milliseconds")
        return self.kind


def parse_point(text: str, what: str) -> Point:
    """``123`` an offset; ``2026-11-29T01:00:00Z`` (ISO 8601, UTC when no zone) or
    ``@1764378000000`` (epoch ms) a time; ``start`` / ``end``."""
    text = text.strip()
    if text in ("start", "end"):
        return Point(text)
    if re.fullmatch(r"\d+", text):
        return Point("offset", int(text))
    if re.fullmatch(r"@\d+", text):
        return Point("time", int(text[1:]))
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(f"{what} {text!r}: expected an offset (123), a time (2026-11-29T01:00:00Z or @<epoch ms>), 'start' or 'end'") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return Point("time", int(when.timestamp() * 1000))


# Readers that look for the end of a partition: the broker answers an empty fetch at the
# end only after fetch.wait.max.ms, so keep that short.
EOF_READER = {"enable.partition.eof": True, "fetch.wait.max.ms": 10}


class PartitionReader:
    """Reads single records and partition ends with one assign()ed consumer (no group
    offsets are read or written)."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = Consumer(consumer_config(settings, f"imgflow-replay-reader-{uuid.uuid4().hex[:8]}", **EOF_READER))
        self.time_lookups: Counter[str] = Counter()  # how offsets for times were found: broker | scanned

    def close(self) -> None:
        self.consumer.close()

    def partitions(self, topic: str) -> list[int]:
        md = self.consumer.list_topics(topic, timeout=15).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            raise ReplayError(f"topic {topic!r} does not exist (is IMGFLOW_KAFKA__BOOTSTRAP the right broker?)")
        return sorted(md.partitions)

    def _first_from(self, tp: TP, offset: int, timeout: float = 15) -> Message | None:
        """The first record at or after ``offset``, or None at the end of the partition."""
        self.consumer.assign([TopicPartition(tp[0], tp[1], offset)])
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msg = self.consumer.poll(0.5)
                if msg is None:
                    continue
                if end_of_partition(msg):
                    return None
                return msg
            raise ReplayError(f"{tp[0]}[{tp[1]}]: no answer from the broker in {timeout:.0f}s")
        finally:
            self.consumer.unassign()

    def bounds(self, tp: TP) -> tuple[int, int]:
        """(first offset, end offset) of a partition. The watermarks are hints; the end is
        where consuming from the hinted end reaches PARTITION_EOF."""
        low, high = self.consumer.get_watermark_offsets(TopicPartition(*tp), timeout=15)
        low = max(low, 0)
        first = self._first_from(tp, low)
        if first is None:
            return low, self._end_from(tp, low)
        start = position(first)[2]
        return start, self._end_from(tp, max(start, high - 1))

    def _end_from(self, tp: TP, offset: int, timeout: float = 60) -> int:
        self.consumer.assign([TopicPartition(tp[0], tp[1], offset)])
        end, deadline = offset, time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msgs = self.consumer.consume(10_000, 0.05)
                for msg in msgs:
                    if end_of_partition(msg):
                        return max(end, position(msg)[2])
                    end = position(msg)[2] + 1
            raise ReplayError(f"{tp[0]}[{tp[1]}]: did not reach the end of the partition in {timeout:.0f}s")
        finally:
            self.consumer.unassign()

    def offset_for_time(self, tp: TP, ts_ms: int, first: int, end: int) -> int:
        """The first offset whose record timestamp is >= ``ts_ms`` (``end`` if none): the
        meaning of Kafka's offsets_for_times, taken as a hint and checked; when the check
        fails (a broker that cannot look up by time), found by scanning timestamps."""
        hint = self.consumer.offsets_for_times([TopicPartition(tp[0], tp[1], ts_ms)], timeout=15)[0].offset
        if hint < 0:
            hint = end  # Kafka: no record at or after the time
        if first <= hint <= end and self._hint_holds(tp, ts_ms, hint, first, end):
            # Apache Kafka: always this path (its time index); the check read one or two records.
            self.time_lookups["broker"] += 1
            log.info("%s[%d]: offset %d for time %d, from the broker's offsets_for_times", *tp, hint, ts_ms)
            return hint
        # tansu answers 0 for every time: the partition's timestamps are scanned instead.
        self.time_lookups["scanned"] += 1
        log.info("%s[%d]: the broker's offset for time %d (%d) is wrong: scanning timestamps", *tp, ts_ms, hint)
        return self._scan_for_time(tp, ts_ms, first, end)

    def _hint_holds(self, tp: TP, ts_ms: int, hint: int, first: int, end: int) -> bool:
        if hint < end:
            at = self._first_from(tp, hint)
            if at is None or at.timestamp()[1] < ts_ms:
                return False
        if hint > first:
            before = self._first_from(tp, hint - 1)
            # The record just before must be older (it may be a transaction marker: then
            # the next record read is at or past the hint and proves nothing either way).
            if before is not None and position(before)[2] < hint and before.timestamp()[1] >= ts_ms:
                return False
        return True

    def _scan_for_time(self, tp: TP, ts_ms: int, first: int, end: int, timeout: float = 300) -> int:
        self.consumer.assign([TopicPartition(tp[0], tp[1], first)])
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for msg in self.consumer.consume(10_000, 0.05):
                    if end_of_partition(msg) or position(msg)[2] >= end:
                        return end
                    if msg.timestamp()[1] >= ts_ms:
                        return position(msg)[2]
            raise ReplayError(f"{tp[0]}[{tp[1]}]: timestamp scan did not finish in {timeout:.0f}s")
        finally:
            self.consumer.unassign()

    def resolve(self, tp: TP, start: Point, stop: Point) -> tuple[int, int]:
        """[start, end) offsets of ``tp`` for a range, clamped to what the partition holds
        now: a replay covers records that exist when it starts."""
        first, end = self.bounds(tp)

        def at(point: Point) -> int:
            if point.kind == "start":
                return first
            if point.kind == "end":
                return end
            if point.kind == "offset":
                return min(max(point.value, first), end)
            return self.offset_for_time(tp, point.value, first, end)

        lo, hi = at(start), at(stop)
        return lo, max(lo, hi)
