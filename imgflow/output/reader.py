"""The one reader of what an output holds: the sink's start-up (the batches past a
partition's committed offset, the CSV rows since the last commit), the backfill skip check
(which events have a row) and ``imgflow run``'s progress (the rows written so far, read
incrementally)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from imgflow.output.formats import IndexEntry, committed_csv_length, parse_index, read_avro, read_csv_rows
from imgflow.output.layout import AVRO, COMMITTED_LENGTH, INDEX, RESULTS_CSV, all_keys, file_stem, lacking, parse_key, partition_prefix, partitions
from imgflow.output.storage import LocalStorage, Storage, fetch_all, open_storage
from imgflow.settings import Settings


@dataclass
class Batch:
    """One batch of a partition: complete (``entries`` from its ``_index`` object) or cut
    short after its Avro file was written (``rows``: the Avro file's, no index yet)."""

    first_offset: int
    entries: list[IndexEntry]
    rows: list[dict] | None = None


def _lines(f: BinaryIO, start: int, length: int) -> Iterator[str]:
    """Bytes start..length of ``f`` (positioned at start), a line at a time (a quoted CSV
    field may span lines)."""
    pos = start
    while pos < length:
        line = f.readline(length - pos)
        if not line:
            return
        pos += len(line)
        yield line.decode("utf-8")


class ResultReader:
    """What an output (a location, or the ``Storage`` a writer holds) has written.

    Incremental counts (``refresh``): ``rows``, ``errors``, and of the event_ids ``wanted``
    those not written yet (``missing``). Local: results.csv up to its committed length,
    each refresh reading only the rows appended since the last, a row at a time; S3: the
    ``_index`` objects (each marks a complete batch) listed after the last one read. Memory
    does not grow with the rows: only ``wanted`` is held (``keep_ids`` keeps every event_id,
    in ``done``)."""

    def __init__(self, out: str | Path | Storage, settings: Settings | None = None, wanted: set[str] | None = None, keep_ids: bool = False) -> None:
        self.storage = out if isinstance(out, Storage) else open_storage(out, settings if settings is not None else Settings())
        self.wanted = set(wanted or ())
        self.missing: set[str] = set(self.wanted)
        self.keep_ids = keep_ids
        self.done: set[str] = set()  # only with keep_ids
        self.rows = 0
        self.errors = 0
        self._last: dict[str, str] = {}  # S3: the last index key read, per partition folder
        self._read_upto = -1  # local: the byte offset read up to (-1: nothing read yet)
        self._columns: tuple[int, int] | None = None  # local: where event_id and error are

    def _root(self) -> Path | None:
        return self.storage.root if isinstance(self.storage, LocalStorage) else None

    # ---- the local results.csv --------------------------------------------------------------
    def committed_length(self) -> int:
        """The length of the complete part of a local results.csv (0 on S3)."""
        root = self._root()
        return committed_csv_length(root) if root is not None else 0

    def csv_rows(self, start: int = 0) -> Iterator[dict[str, str]]:
        """The complete rows of a local results.csv from byte ``start`` (a row boundary)."""
        root = self._root()
        if root is not None:
            yield from read_csv_rows(root / RESULTS_CSV, committed_csv_length(root), start=start)

    # ---- the sink's start-up ----------------------------------------------------------------
    def batches_since(self, topic: str, partition: int, start: int) -> Iterator[Batch]:
        """The batches of a partition named at or past offset ``start``: the complete ones
        first (their ``_index`` objects, fetched in parallel on S3), then the incomplete."""
        after = {kind: partition_prefix(kind, topic, partition) + file_stem(topic, partition, start) if start else "" for kind in (AVRO, INDEX)}
        index_keys = list(self.storage.list(partition_prefix(INDEX, topic, partition), after[INDEX]))
        indexed = set(index_keys)
        for key, data in fetch_all(self.storage, index_keys):
            yield Batch(parse_key(key)[2], parse_index(data or b'{"rows": []}'))
        for key in lacking(self.storage.list(partition_prefix(AVRO, topic, partition), after[AVRO]), indexed, INDEX):
            yield Batch(parse_key(key)[2], [], read_avro(self.storage.get(key) or b""))

    # ---- the backfill skip check ------------------------------------------------------------
    def _all_rows(self) -> Iterator[list]:
        """[offset, event_id, run_id, error] of every row in the output: the ``_index``
        objects streamed, and the Avro files that have none (a batch whose index is not
        written yet, or an output of an older version; for a local output without any,
        ``results.csv``)."""
        avro_keys = list(all_keys(self.storage, AVRO))
        index_keys = set(all_keys(self.storage, INDEX))
        for _, data in fetch_all(self.storage, sorted(index_keys)):
            if data is not None:
                yield from json.loads(data)["rows"]
        for _, data in fetch_all(self.storage, lacking(avro_keys, index_keys, INDEX)):
            for row in read_avro(data) if data is not None else []:
                yield [row["source_offset"], row["event_id"], row["run_id"], bool(row["error"])]
        if not avro_keys:
            for csv_row in self.csv_rows():
                yield [int(csv_row["source_offset"] or -1), csv_row["event_id"], csv_row.get("run_id", ""), bool(csv_row["error"])]

    def existing(self, event_ids: Iterable[str], run_id: str | None = None) -> set[str]:
        """The subset of ``event_ids`` that has a row (a result or an error row), of any run
        or of ``run_id``'s. Memory: the ids asked about."""
        wanted = set(event_ids)
        found: set[str] = set()
        for _, event_id, row_run, _ in self._all_rows():
            if event_id in wanted and (run_id is None or row_run == run_id):
                found.add(event_id)
        return found

    # ---- incremental counts -----------------------------------------------------------------
    def _saw(self, event_id: str, error: bool) -> None:
        self.rows += 1
        self.errors += error
        self.missing.discard(event_id)
        if self.keep_ids:
            self.done.add(event_id)

    def refresh(self) -> None:
        root = self._root()
        if root is None:
            self._refresh_index()
        else:
            self._refresh_csv(root)

    def _refresh_index(self) -> None:
        # Per partition, index keys appear in offset order: list only after the last one seen.
        new: list[str] = []
        for topic, partition in partitions(self.storage, INDEX):
            prefix = partition_prefix(INDEX, topic, partition)
            new += self.storage.list(prefix, self._last.get(prefix, ""))
        for key, data in fetch_all(self.storage, new):
            prefix = key.rsplit("/", 1)[0] + "/"
            self._last[prefix] = max(self._last.get(prefix, ""), key)
            for entry in parse_index(data) if data is not None else []:
                self._saw(entry.event_id, bool(entry.error))

    def _refresh_csv(self, root: Path) -> None:
        length = committed_csv_length(root) if (root / COMMITTED_LENGTH).exists() else -1
        if length < 0 or length == self._read_upto:
            return
        if length < self._read_upto:  # a new results.csv (the old one removed): count it afresh
            self.missing, self.done, self.rows, self.errors = set(self.wanted), set(), 0, 0
            self._read_upto, self._columns = -1, None
        with (root / RESULTS_CSV).open("rb") as f:
            header = f.readline()
            if self._columns is None:
                names = next(csv.reader([header.decode("utf-8")]), [])
                if "event_id" not in names or "error" not in names:
                    return  # not even the header is committed yet
                self._columns = (names.index("event_id"), names.index("error"))
            start = max(self._read_upto, f.tell())
            f.seek(start)
            id_at, error_at = self._columns
            for row in csv.reader(_lines(f, start, length)):
                if len(row) > max(id_at, error_at):
                    self._saw(row[id_at], bool(row[error_at]))
        self._read_upto = length
