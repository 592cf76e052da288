"""What the sink writes through: ``ResultStore`` locks an output, completes at start-up what
the last run left unfinished, and writes each batch (Avro files, CSV rows, index) once.
Why this order and what start-up reads: consumers/sink.py's docstring."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from imgflow import metrics
from imgflow.errors import ImgflowError
from imgflow.events import dedupe_key
from imgflow.output.formats import CsvParts, LocalCsv, avro_bytes, index_bytes
from imgflow.output.layout import AVRO, INDEX, LEASE_KEY, data_key, parse_key, partitions
from imgflow.output.reader import ResultReader
from imgflow.output.storage import LocalStorage, S3Storage, open_storage
from imgflow.settings import Settings
from imgflow.stage import CrashPoints

if TYPE_CHECKING:
    from imgflow.s3lease import S3Lease

log = logging.getLogger(__name__)


class SinkLockedError(ImgflowError, RuntimeError):
    """Another sink writes this output (or took over its lease): the message names both."""


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


class ResultStore:
    """The sink's output: a local folder or an ``s3://`` prefix (see consumers/sink.py)."""

    def __init__(
        self, out: str | Path, write_csv: bool = True, write_avro: bool = True, settings: Settings | None = None, dedupe_window: int | None = None
    ) -> None:
        self.settings = settings or Settings()
        self.storage = open_storage(out, self.settings)
        if self.storage.is_s3 and not write_avro:
            raise ValueError("sink.avro = false needs a local output: on S3 the Avro files are what start-up completes interrupted batches from")
        self.reader = ResultReader(self.storage)
        self.write_csv, self.write_avro = write_csv, write_avro
        window = dedupe_window if dedupe_window is not None else self.settings.sink.dedupe_window
        self.known = RecentIds(window)
        self.csv: LocalCsv | CsvParts = LocalCsv(self.storage.root) if isinstance(self.storage, LocalStorage) else CsvParts(self.storage)
        self._lock_file: TextIO | None = None
        self.lease: S3Lease | None = None

    # ---- start-up -------------------------------------------------------------------------
    def lock(self, owner: str = "a sink", stopping: Callable[[], bool] = lambda: False) -> None:
        """One sink per output. Locally a flock on ``.sink.lock``; on S3 a lease object under
        the prefix (``_sink.lease``, imgflow/s3lease.py), renewed while the sink runs. Held by a
        sink of another group: SinkLockedError at once, naming the prefix and the holder; by
        one of the same ``owner`` (its predecessor, most likely): wait for it to stop or for
        its lease to expire (sink.lease_ttl_s)."""
        self.storage.check()
        if isinstance(self.storage, S3Storage):
            self._lease(self.storage, owner, stopping)
            return
        assert isinstance(self.storage, LocalStorage)
        lock_file = self._lock_file = open(self.storage.root / ".sink.lock", "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            lock_file.seek(0)
            holder = lock_file.read().strip()
            raise SinkLockedError(f"another sink is writing to {self.storage}" + (f": {holder}" if holder else "")) from exc
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{owner} (pid {os.getpid()} on {socket.gethostname()})\n")
        lock_file.flush()

    def _lease(self, storage: S3Storage, owner: str, stopping: Callable[[], bool]) -> None:
        from imgflow.s3lease import LeaseHeld, S3Lease

        lease = S3Lease(storage.client, storage.bucket, storage.prefix + LEASE_KEY, owner, self.settings.sink.lease_ttl_s)
        try:
            lease.acquire(wait_for=lambda holder: holder.owner == owner, stopping=stopping)
        except LeaseHeld as exc:
            raise SinkLockedError(f"another sink is writing to {storage}: {exc}") from None
        lease.start_renewing()
        self.lease = lease

    def unlock(self) -> None:
        """Release the output (the S3 lease is deleted, so the next sink need not wait)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def committed_length(self) -> int:
        return self.reader.committed_length()

    def recover(self, committed: dict[tuple[str, int], int | None] | None = None) -> int:
        """Complete what the last run left unfinished and learn the recent event_ids, reading
        only the files named at or past ``committed[tp] - window`` (see consumers/sink.py).
        ``committed``: the group's committed offset (None: none) of each partition the sink
        consumes; without it, every partition in the output is read whole. Returns the
        number of CSV rows restored."""
        if committed is None:
            committed = {tp: None for tp in set(partitions(self.storage, AVRO)) | set(partitions(self.storage, INDEX))}
        self.storage.remove_temp_files()
        tail_ids: set[str] | None = None
        if isinstance(self.csv, LocalCsv):
            self._move_old_layout()
            if self.write_csv:
                self.csv.cut_unfinished()
                # Rows written since the last offset commit; their batches may lack an index.
                tail = list(self.reader.csv_rows(start=self.csv.checkpointed()))
                tail_ids = {dedupe_key(r["event_id"], r["run_id"]) for r in tail}
                for r in tail:
                    self.known.add((r["source_topic"], int(r["source_partition"])), int(r["source_offset"]), dedupe_key(r["event_id"], r["run_id"]))
        restored = 0
        for (topic, partition), offset in sorted(committed.items()):
            tp = (topic, partition)
            start = max(0, offset - self.known.window) if offset is not None else 0
            for batch in self.reader.batches_since(topic, partition, start):
                for e in batch.entries:
                    self.known.add(tp, e.offset, dedupe_key(e.event_id, e.run_id))
                if batch.rows is None:
                    continue
                # No index: the batch was cut short after its Avro file was written.
                rows = batch.rows
                if self.write_csv:
                    missing = rows if tail_ids is None else [r for r in rows if dedupe_key(r["event_id"], r["run_id"]) not in tail_ids]
                    if missing:
                        self.csv.write([missing])
                        restored += len(missing)
                self.storage.put(data_key(INDEX, topic, partition, batch.first_offset), index_bytes(rows))
                for row in rows:
                    self.known.add(tp, row["source_offset"], dedupe_key(row["event_id"], row["run_id"]))
        if restored:
            log.warning("restored %d CSV rows found only in Avro files", restored)
        return restored

    def _move_old_layout(self) -> None:
        """Avro files of the earlier flat layout (``avro/<topic>+<p>+<offset>.avro``) move to
        the partitioned one (a rename each; a crash mid-way just moves the rest next time)."""
        if not isinstance(self.storage, LocalStorage):
            return
        root = self.storage.root
        folder = root / AVRO
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.avro")):
            topic, partition, offset = parse_key(path.name)
            target = root / data_key(AVRO, topic, partition, offset)
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
            self.storage.put(data_key(INDEX, topic, partition, rows[0].offset), index_bytes([p.row for p in rows]))
        crash.reach("after_index")
        for p in fresh:
            self.known.add((p.topic, p.partition), p.offset, dedupe_key(p.row["event_id"], p.row["run_id"]))
        return fresh

    def _write_avro(self, topic: str, partition: int, rows: list[PendingRow]) -> str:
        key = data_key(AVRO, topic, partition, rows[0].offset)
        self.storage.put(key, avro_bytes([p.row for p in rows], codec=self.settings.sink.avro_codec))
        metrics.SINK_ROWS.labels("avro").inc(len(rows))
        return key

    def checkpoint(self) -> None:
        """Called after the group's offsets are committed."""
        if self.write_csv:
            self.csv.checkpoint()
