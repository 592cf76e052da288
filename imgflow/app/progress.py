"""`imgflow run`'s progress: how far each stage has got (distinct event ids on its output
topic), the rows written, the rate since the stages began to work, and the ETA."""

from __future__ import annotations

import logging
import os
import time
from collections import deque

from confluent_kafka import Consumer, KafkaError, TopicPartition

from imgflow.kafka import consumer_config
from imgflow.progress import ProgressBar, clock
from imgflow.settings import Settings

log = logging.getLogger(__name__)


class RecentKeys:
    """Distinct keys counted with bounded memory: a key is new unless it is among the last
    ``window`` distinct ones. The repeats a topic holds (an aborted transaction's records
    and their retry, a batch produced again after a crash) lie close together, so the count
    is exact for them, and memory stays the window's whatever the history."""

    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self.count = 0
        self._order: deque[int] = deque()
        self._seen: set[int] = set()

    def add(self, key: bytes) -> None:
        h = hash(key)
        if h in self._seen:
            return
        self.count += 1
        self._seen.add(h)
        self._order.append(h)
        if len(self._order) > self.window:
            self._seen.discard(self._order.popleft())


class TopicCounter:
    """Distinct event_ids (record keys) seen on a topic: how far each stage has got. Reads
    each topic from its start; holds a bounded window of recent keys per topic, and asks
    librdkafka to buffer little (it only needs the keys of records of up to ~1 MB)."""

    BATCH = 500

    def __init__(self, settings: Settings, topics: list[str]) -> None:
        self.consumer = Consumer(
            consumer_config(settings, f"imgflow-progress-{os.getpid()}", **{"queued.max.messages.kbytes": 2048, "fetch.max.bytes": 4 * 1024 * 1024})
        )
        parts = []
        md = self.consumer.list_topics(timeout=10)
        for t in topics:
            for p in md.topics[t].partitions:
                parts.append(TopicPartition(t, p, 0))
        self.consumer.assign(parts)
        self.keys: dict[str, RecentKeys] = {t: RecentKeys() for t in topics}

    def refresh(self, max_batches: int = 20) -> None:
        for _ in range(max_batches):
            msgs = self.consumer.consume(self.BATCH, 0.05)
            for msg in msgs:
                error, key, topic = msg.error(), msg.key(), msg.topic()
                if error is None and key and topic is not None:
                    self.keys[topic].add(key)
                elif error is not None and error.code() != KafkaError._PARTITION_EOF:
                    log.debug("progress: %s", error)
            if len(msgs) < self.BATCH:
                return

    def count(self, topic: str) -> int:
        return self.keys[topic].count

    def close(self) -> None:
        self.consumer.close()


class Progress:
    """Progress of ``imgflow run``: rows written (of how many, with ``--once``), the rate,
    the ETA, and how far each stage has got, on a ``ProgressBar``.

    The rate is that of the last minute, counted from the first vision result (before it the
    models load): ``remaining / rate`` is the ETA."""

    WINDOW_S = 60.0

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.bar = ProgressBar("written", total, noun="rows")
        self._samples: deque[tuple[float, int]] = deque()  # (time, rows written this run)

    @property
    def tty(self) -> bool:
        return self.bar.tty

    def rate(self, now: float, new_rows: int, working: bool = True) -> float:
        """Rows a second over the last minute, counted from when the stages began to work
        (their models loaded: the first vision result)."""
        if not working and not new_rows:
            self._samples.clear()
            return 0.0
        self._samples.append((now, new_rows))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW_S:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return (new_rows - n0) / (now - t0) if now > t0 and new_rows > n0 else 0.0

    def show(
        self,
        *,
        found: int,
        vision: int,
        enriched: int,
        failed: int,
        written: int,
        errors: int,
        new_rows: int,
        elapsed: float,
        now: float | None = None,
        final: bool = False,
    ) -> None:
        """``final``: the last state, printed off a terminal even within a second of the
        line before (lines are otherwise printed every few seconds)."""
        rate = self.rate(time.monotonic() if now is None else now, new_rows, working=vision > 0)
        remaining = self.total - written if self.total is not None else None
        if remaining is not None and rate > 0:
            eta = clock(remaining / rate)
        elif remaining == 0:
            eta = "0:00:00"
        else:
            eta = "-"
        stages = f"found {found} · vision {vision} · enriched {enriched} · failed {failed} · {errors} with errors"
        if not new_rows and vision == 0:
            stages += " · loading models"
        shown_rate = f"{rate:.2f}" if rate > 0 else "-"
        total = f"/{self.total}" if self.total is not None else ""
        eta_text = f" | ETA {eta}" if self.total is not None else ""
        self.bar.update(
            written,
            rate=shown_rate,
            eta=eta,
            info=stages,
            line=lambda: f"written {written}{total} | {shown_rate} img/s{eta_text} | {elapsed:.0f}s | {stages}",
            now=final,
        )

    def finish(self) -> None:
        self.bar.close()
