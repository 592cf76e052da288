"""Sink stage: final records -> Avro files and the CSV, in a local folder or ``s3://`` prefix
(layout and formats: ``imgflow/results.py``).

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
  ``read_committed``, ENVIRONMENT.md): the sink may have written an aborted copy of an event
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
  checks the output with ``imgflow.results.ResultIndex`` unless forced).

Locally ``results.csv`` is one file: a half-written tail is cut back to the committed length,
and the rows of a file without index are appended unless they are already among the rows
written since the last offset commit (read from ``.sink-checkpoint``'s position: bounded).
"""

from __future__ import annotations

import csv
import fcntl
import logging
import os
import socket
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, TopicPartition

from imgflow import metrics
from imgflow.errors import ImgflowError
from imgflow.events import dedupe_key
from imgflow.kafka import consumer_config
from imgflow.lag import LagReader
from imgflow.rescan import IdleRescan
from imgflow.results import (  # noqa: F401 - CSV_COLUMNS, read_csv_rows, row_from_enriched re-exported
    AVRO,
    COMMITTED_LENGTH,
    CSV_COLUMNS,
    CSV_PARTS,
    INDEX,
    RESULTS_CSV,
    CsvLines,
    Output,
    avro_bytes,
    committed_csv_length,
    csv_bytes,
    csv_cell,
    data_key,
    fetch_all,
    file_stem,
    index_bytes,
    iso_time,
    open_output,
    parse_index,
    parse_key,
    partition_prefix,
    partitions,
    read_avro,
    read_csv_rows,
    retry_s3,
    row_from_dead_letter,
    row_from_enriched,
)
from imgflow.settings import Settings
from imgflow.stage import CrashPoints, RangeBounds, RangeTracker
from schemas.codec import SchemaError, get_codec

log = logging.getLogger(__name__)

CHECKPOINT = ".sink-checkpoint"


class SinkLockedError(ImgflowError, RuntimeError):
    """Another sink writes this output (or took over its lease): the message names both."""


LEASE_KEY = "_sink.lease"  # on S3, the object whose conditional writes make one sink per prefix


@dataclass
class PendingRow:
    topic: str
    partition: int
    offset: int
    row: dict
    published_at: object = None  # the image event's publication time (output lag metric)


class RecentIds:
    """The dedupe keys (``dedupe_key(event_id, run_id)``: one row per image event and run)
    written from the last ``window`` offsets of each partition."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._count: dict[str, int] = {}
        self._by_tp: dict[tuple[str, int], deque[tuple[int, str]]] = defaultdict(deque)
        self._high: dict[tuple[str, int], int] = {}

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._count

    def __len__(self) -> int:
        return len(self._count)

    def add(self, tp: tuple[str, int], offset: int, event_id: str) -> None:
        ids = self._by_tp[tp]
        ids.append((offset, event_id))
        self._count[event_id] = self._count.get(event_id, 0) + 1
        high = self._high[tp] = max(offset, self._high.get(tp, offset))
        while ids and ids[0][0] < high - self.window:
            _, old = ids.popleft()
            self._count[old] -= 1
            if not self._count[old]:
                del self._count[old]


class LocalCsv:
    """``results.csv``, appended, with the length of its complete part in
    ``.results.csv.committed`` (a reader reads up to it)."""

    def __init__(self, root: Path) -> None:
        self.path = root / RESULTS_CSV
        self.length_path = root / COMMITTED_LENGTH
        self.checkpoint_path = root / CHECKPOINT

    def committed_length(self) -> int:
        return committed_csv_length(self.path.parent)

    def cut_unfinished(self) -> None:
        committed = self.committed_length()
        if self.path.exists() and self.path.stat().st_size > committed:
            log.warning("results.csv: cutting an unfinished write (%d -> %d bytes)", self.path.stat().st_size, committed)
            with self.path.open("r+b") as f:
                f.truncate(committed)

    def checkpointed(self) -> int:
        """Where the rows written since the last offset commit begin (0: not known)."""
        try:
            return min(int(self.checkpoint_path.read_text()), self.committed_length())
        except (FileNotFoundError, ValueError):
            return 0

    def write(self, groups: list[list[dict]], crash: CrashPoints | None = None) -> None:
        rows = [r for g in groups for r in g]
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new_file:
                # The header gets its own committed length, so that even the first batch
                # can be cut back if it is only half written.
                writer.writerow(CSV_COLUMNS)
                f.flush()
                os.fsync(f.fileno())
                self._set(self.length_path, f.tell())
            lines = CsvLines()
            for i, row in enumerate(rows):
                f.write(lines.line(row))
                if crash is not None and i == len(rows) // 2:
                    f.flush()
                    crash.reach("mid_csv")
            f.flush()
            os.fsync(f.fileno())
            length = f.tell()
        if crash is not None:
            crash.reach("after_csv")
        self._set(self.length_path, length)
        metrics.SINK_ROWS.labels("csv").inc(len(rows))

    def checkpoint(self) -> None:
        """After an offset commit: rows before this length are never needed at start-up."""
        self._set(self.checkpoint_path, self.committed_length(), durable=False)

    @staticmethod
    def _set(path: Path, value: int, durable: bool = True) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            f.write(str(value))
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)


class CsvParts:
    """S3: one CSV part (header + rows) per Avro file, under ``csv/``; ``imgflow export csv``
    merges them into one file."""

    def __init__(self, output: Output) -> None:
        self.output = output

    def write(self, groups: list[list[dict]], crash: CrashPoints | None = None) -> None:
        for i, rows in enumerate(groups):
            if crash is not None and i == len(groups) // 2:
                crash.reach("mid_csv")
            first = rows[0]
            self.output.put(data_key(CSV_PARTS, first["source_topic"], first["source_partition"], first["source_offset"]), csv_bytes(rows, header=True))
        if crash is not None:
            crash.reach("after_csv")
        metrics.SINK_ROWS.labels("csv").inc(sum(len(g) for g in groups))

    def checkpoint(self) -> None:
        pass


class ResultStore:
    """The sink's output: a local folder or an ``s3://`` prefix (see the module docstring)."""

    def __init__(self, out, write_csv: bool = True, write_avro: bool = True, settings: Settings | None = None, dedupe_window: int | None = None) -> None:
        self.settings = settings or Settings()
        self.output = open_output(out, self.settings)
        if self.output.is_s3 and not write_avro:
            raise ValueError("sink.avro = false needs a local output: on S3 the Avro files are what start-up completes interrupted batches from")
        self.out = out if self.output.is_s3 else Path(out)
        self.write_csv, self.write_avro = write_csv, write_avro
        window = dedupe_window if dedupe_window is not None else self.settings.sink.dedupe_window
        self.known = RecentIds(window)
        self.csv = CsvParts(self.output) if self.output.is_s3 else LocalCsv(Path(out))
        self._lock_file = None
        self.lease = None

    # ---- start-up -------------------------------------------------------------------------
    def lock(self, owner: str = "a sink", stopping=lambda: False) -> None:
        """One sink per output. Locally a flock on ``.sink.lock``; on S3 a lease object under
        the prefix (``_sink.lease``, imgflow/s3lease.py), renewed while the sink runs. Held by a
        sink of another group: SinkLockedError at once, naming the prefix and the holder; by
        one of the same ``owner`` (its predecessor, most likely): wait for it to stop or for
        its lease to expire (sink.lease_ttl_s)."""
        self.output.check()
        if self.output.is_s3:
            from imgflow.s3lease import LeaseHeld, S3Lease

            lease = S3Lease(self.output.client, self.output.bucket, self.output.prefix + LEASE_KEY, owner, self.settings.sink.lease_ttl_s)
            try:
                lease.acquire(wait_for=lambda holder: holder.owner == owner, stopping=stopping)
            except LeaseHeld as exc:
                raise SinkLockedError(f"another sink is writing to {self.output}: {exc}") from None
            lease.start_renewing()
            self.lease = lease
            return
        self._lock_file = open(self.out / ".sink.lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip()
            raise SinkLockedError(f"another sink is writing to {self.out}" + (f": {holder}" if holder else "")) from exc
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"{owner} (pid {os.getpid()} on {socket.gethostname()})\n")
        self._lock_file.flush()

    def unlock(self) -> None:
        """Release the output (the S3 lease is deleted, so the next sink need not wait)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def committed_length(self) -> int:
        return committed_csv_length(self.out) if not self.output.is_s3 else 0

    def recover(self, committed: dict[tuple[str, int], int | None] | None = None) -> int:
        """Complete what the last run left unfinished and learn the recent event_ids, reading
        only the files named at or past ``committed[tp] - window`` (see the module
        docstring). ``committed``: the group's committed offset (None: none) of each
        partition the sink consumes; without it, every partition in the output is read
        whole. Returns the number of CSV rows restored."""
        if committed is None:
            committed = {tp: None for tp in set(partitions(self.output, AVRO)) | set(partitions(self.output, INDEX))}
        self.output.remove_temp_files()
        tail_ids: set[str] | None = None
        if not self.output.is_s3:
            self._move_old_layout()
            if self.write_csv:
                self.csv.cut_unfinished()
                # Rows written since the last offset commit; their batches may lack an index.
                tail = list(read_csv_rows(self.csv.path, self.csv.committed_length(), start=self.csv.checkpointed()))
                tail_ids = {dedupe_key(r["event_id"], r["run_id"]) for r in tail}
                for r in tail:
                    self.known.add((r["source_topic"], int(r["source_partition"])), int(r["source_offset"]), dedupe_key(r["event_id"], r["run_id"]))
        restored = 0
        for (topic, partition), offset in sorted(committed.items()):
            tp = (topic, partition)
            start = max(0, offset - self.known.window) if offset is not None else 0
            after = {kind: partition_prefix(kind, topic, partition) + file_stem(topic, partition, start) if start else "" for kind in (AVRO, INDEX)}
            indexed = set()
            index_keys = list(self.output.list(partition_prefix(INDEX, topic, partition), after[INDEX]))
            for key, data in fetch_all(self.output, index_keys):  # in parallel on S3
                indexed.add(parse_key(key)[2])
                for e in parse_index(data or b'{"rows": []}'):
                    self.known.add(tp, e.offset, dedupe_key(e.event_id, e.run_id))
            for key in self.output.list(partition_prefix(AVRO, topic, partition), after[AVRO]):
                first = parse_key(key)[2]
                if first in indexed:
                    continue
                # No index: the batch was cut short after its Avro file was written.
                rows = read_avro(self.output.get(key) or b"")
                if self.write_csv:
                    missing = rows if tail_ids is None else [r for r in rows if dedupe_key(r["event_id"], r["run_id"]) not in tail_ids]
                    if missing:
                        self.csv.write([missing])
                        restored += len(missing)
                self.output.put(data_key(INDEX, topic, partition, first), index_bytes(rows))
                for r in rows:
                    self.known.add(tp, r["source_offset"], dedupe_key(r["event_id"], r["run_id"]))
        if restored:
            log.warning("restored %d CSV rows found only in Avro files", restored)
        return restored

    def _move_old_layout(self) -> None:
        """Avro files of the earlier flat layout (``avro/<topic>+<p>+<offset>.avro``) move to
        the partitioned one (a rename each; a crash mid-way just moves the rest next time)."""
        folder = self.out / AVRO
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.avro")):
            topic, partition, offset = parse_key(path.name)
            target = self.out / data_key(AVRO, topic, partition, offset)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)

    # ---- one batch --------------------------------------------------------------------------
    def write(self, pending: list[PendingRow], crash: CrashPoints | None = None) -> list[PendingRow]:
        """Write the rows whose event_id is new; returns those written."""
        crash = crash or CrashPoints("sink", "")
        if self.lease is not None:  # still the one sink of this prefix (S3Error: the store is down)
            from imgflow.s3lease import LeaseLost

            try:
                self.lease.ensure()
            except LeaseLost as exc:
                raise SinkLockedError(str(exc)) from None
        fresh, seen = [], set()
        for p in pending:
            eid = dedupe_key(p.row["event_id"], p.row["run_id"])
            if eid in self.known or eid in seen:
                metrics.DUPLICATES_DROPPED.labels("sink").inc()
                continue
            seen.add(eid)
            fresh.append(p)
        if not fresh:
            return []
        by_tp: dict[tuple[str, int], list[PendingRow]] = defaultdict(list)
        for p in fresh:
            by_tp[(p.topic, p.partition)].append(p)
        groups = [[p.row for p in rows] for rows in by_tp.values()]
        # Step 1. Avro files, whole, named by topic/partition/first offset: after a crash a
        # file is absent (rows redelivered) or whole (batch completed by recover()).
        if self.write_avro:
            for (topic, partition), rows in by_tp.items():
                self._write_avro(topic, partition, rows)
        crash.reach("after_avro")
        # Step 2. CSV rows; a crash in the middle is undone or completed by recover().
        if self.write_csv:
            self.csv.write(groups, crash)
        # Step 3. The index marks each batch whole: recover() completes files without one.
        for (topic, partition), rows in by_tp.items():
            self.output.put(data_key(INDEX, topic, partition, rows[0].offset), index_bytes([p.row for p in rows]))
        crash.reach("after_index")
        for p in fresh:
            self.known.add((p.topic, p.partition), p.offset, dedupe_key(p.row["event_id"], p.row["run_id"]))
        return fresh

    def _write_avro(self, topic: str, partition: int, rows: list[PendingRow]) -> str:
        key = data_key(AVRO, topic, partition, rows[0].offset)
        self.output.put(key, avro_bytes([p.row for p in rows], codec=self.settings.sink.avro_codec))
        metrics.SINK_ROWS.labels("avro").inc(len(rows))
        return key

    def checkpoint(self) -> None:
        """Called after the group's offsets are committed."""
        if self.write_csv:
            self.csv.checkpoint()


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
            # A malformed final record still accounts for its image: an error row.
            key = msg.key().decode("utf-8", "replace") if msg.key() else f"malformed-{topic}-{partition}-{offset}"
            log.error("undecodable record on %s[%d]@%d: %s", topic, partition, offset, exc, extra={"event_id": key, "stage": "sink"})
            row = {
                "image_path": "",
                "categories": [],
                "keywords": [],
                "timestamp": iso_time(int(time.time() * 1000)),
                "error": f"sink: malformed record: {exc}",
                "event_id": key,
                "failed_stage": "sink",
                "models": {},
                "source_topic": topic,
                "source_partition": partition,
                "source_offset": offset,
                "run_id": "",
                "source_uri": "",
            }
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
            self.store.output,
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
                written = retry_s3(f"sink: writing {len(pending)} rows", lambda: self.store.write(pending, self.crash), stopping=lambda: self.stopping)
                if written is None:
                    break  # stopped before the batch was written: it is redelivered next time
                metrics.sink_wrote([p.published_at for p in written])
                for p in written:
                    extra = {"event_id": p.row["event_id"], "stage": "sink"}
                    log.info("wrote %s%s", p.row["image_path"], " (error row)" if p.row["error"] else "", extra=extra)
                # Step 4. Only now move the group's offsets; redelivered records would be
                # dropped as known anyway, so a failed commit costs time, not correctness.
                offsets: dict[tuple[str, int], int] = {}
                for m in msgs:
                    offsets[(m.topic(), m.partition())] = max(offsets.get((m.topic(), m.partition()), -1), m.offset())
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
