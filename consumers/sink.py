"""Sink stage: final records -> ``OUT/results.csv`` (the original script's columns first)
and Avro container files under ``OUT/avro/``.

The sink writes to files, not to Kafka, so its exactly-once rests on the output itself
(as Kafka Connect's S3/HDFS sinks do): every row is keyed by ``event_id``, the Avro files
have deterministic names ``<topic>+<partition>+<first offset>.avro`` and are written
atomically, and on start the output is reconciled (see ``ResultStore.recover``) so a
crash at any instruction leaves each event exactly once in both the CSV and the Avro files.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import fastavro
from confluent_kafka import Consumer, KafkaException, TopicPartition

from imgflow import metrics
from imgflow.kafka import consumer_config
from imgflow.settings import Settings
from imgflow.stage import CrashPoints
from schemas.codec import SchemaError, get_codec

log = logging.getLogger(__name__)

SEED_COLUMNS = [
    "image_path", "text", "description", "categories", "keywords", "image_text",
    "text_vector", "word2vec_vector", "image_vector", "timestamp", "error", "llama_extracted",
]
EXTRA_COLUMNS = ["event_id", "run_id", "source_uri", "failed_stage", "models", "source_topic",
                 "source_partition", "source_offset"]
CSV_COLUMNS = SEED_COLUMNS + EXTRA_COLUMNS
LIST_COLUMNS = {"categories", "keywords", "text_vector", "word2vec_vector", "image_vector"}
VECTOR_COLUMNS = {"text_vector", "word2vec_vector", "image_vector"}

csv.field_size_limit(sys.maxsize)


class SinkLockedError(RuntimeError):
    pass


def _iso(ts) -> str:
    if isinstance(ts, datetime):
        return ts.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return datetime.fromtimestamp(ts / 1000, timezone.utc).isoformat(timespec="milliseconds")


def row_from_enriched(e: dict, topic: str, partition: int, offset: int) -> dict:
    vision, event = e["vision"], e["vision"]["event"]
    return {
        "image_path": event["image_path"],
        "text": vision["text"],
        "description": e["description"],
        "categories": [e["category"]] if e["category"] else [],
        "keywords": list(e["keywords"]),
        "image_text": e["image_text"],
        "text_vector": vision["text_vector"],
        "word2vec_vector": vision["word2vec_vector"],
        "image_vector": vision["image_vector"],
        "timestamp": _iso(e["processed_at"]),
        "error": None,
        "llama_extracted": e["llama_extracted"],
        "event_id": event["event_id"],
        "run_id": event["run_id"],
        "source_uri": event["uri"],
        "failed_stage": None,
        "models": {**vision["models"], **e["models"]},
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
    }


def row_from_dead_letter(d: dict, topic: str, partition: int, offset: int) -> dict:
    event, vision = d.get("event"), d.get("vision")
    return {
        "image_path": event["image_path"] if event else "",
        "text": vision["text"] if vision else None,
        "description": None,
        "categories": [],
        "keywords": [],
        "image_text": vision["image_text"] if vision else None,
        "text_vector": vision["text_vector"] if vision else None,
        "word2vec_vector": vision["word2vec_vector"] if vision else None,
        "image_vector": vision["image_vector"] if vision else None,
        "timestamp": _iso(d["failed_at"]),
        "error": f"{d['stage']}: {d['error']}",
        "llama_extracted": None,
        "event_id": d["event_id"],
        "run_id": event["run_id"] if event else "",
        "source_uri": event["uri"] if event else "",
        "failed_stage": d["stage"],
        "models": dict(vision["models"]) if vision else {},
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
    }


def csv_cell(column: str, value) -> str:
    if value is None:
        return ""
    if column in VECTOR_COLUMNS:
        return "[" + ",".join(f"{x:.7g}" for x in value) + "]"
    if column in LIST_COLUMNS or column == "models":
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def read_csv_rows(path: Path, limit: int | None = None):
    """Complete rows of a results CSV as dicts, up to byte ``limit``."""
    if not path.exists():
        return
    with path.open("rb") as f:
        data = f.read(limit) if limit is not None else f.read()
    reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
    yield from reader


@dataclass
class PendingRow:
    topic: str
    partition: int
    offset: int
    row: dict


class ResultStore:
    """The sink's output directory: results.csv, its committed length, avro/*.avro."""

    def __init__(self, out_dir: Path, write_csv: bool = True, write_avro: bool = True) -> None:
        self.out = Path(out_dir)
        self.csv_path = self.out / "results.csv"
        self.length_path = self.out / ".results.csv.committed"
        self.avro_dir = self.out / "avro"
        self.write_csv, self.write_avro = write_csv, write_avro
        self.known: set[str] = set()
        self.schema = get_codec().schema("ResultRow")
        self._lock_file = None

    # ---- start-up -------------------------------------------------------------------------
    def lock(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.avro_dir.mkdir(exist_ok=True)
        self._lock_file = open(self.out / ".sink.lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise SinkLockedError(f"another sink is writing to {self.out}") from exc

    def committed_length(self) -> int:
        try:
            return int(self.length_path.read_text())
        except (FileNotFoundError, ValueError):
            return self.csv_path.stat().st_size if self.csv_path.exists() else 0

    def recover(self) -> int:
        """Make the CSV and the Avro files agree after whatever stopped the last run:
        1. delete half-written Avro temp files (never renamed: their rows are redelivered);
        2. cut the CSV back to its last committed length (drops a half-written batch);
        3. append to the CSV every row that is in an Avro file but not in the CSV
           (a crash between writing the Avro file and the CSV).
        Returns the number of rows restored in step 3."""
        for tmp in self.avro_dir.glob("*.tmp"):
            tmp.unlink()
        committed = self.committed_length()
        if self.csv_path.exists() and self.csv_path.stat().st_size > committed:
            log.warning("results.csv: cutting an unfinished write (%d -> %d bytes)",
                        self.csv_path.stat().st_size, committed)
            with self.csv_path.open("r+b") as f:
                f.truncate(committed)
        in_csv = {row["event_id"] for row in read_csv_rows(self.csv_path)} if self.write_csv else set()
        missing: list[dict] = []
        in_avro: set[str] = set()
        for path in sorted(self.avro_dir.glob("*.avro")):
            with path.open("rb") as f:
                for row in fastavro.reader(f):
                    in_avro.add(row["event_id"])
                    if self.write_csv and row["event_id"] not in in_csv:
                        missing.append(row)
        if missing:
            log.warning("results.csv: restoring %d rows found only in Avro files", len(missing))
            self._append_csv(missing)
        self.known = in_csv | in_avro
        return len(missing)

    # ---- one batch --------------------------------------------------------------------------
    def write(self, pending: list[PendingRow], crash: CrashPoints) -> list[PendingRow]:
        """Write the rows whose event_id is new; returns those written."""
        fresh, seen = [], set()
        for p in pending:
            eid = p.row["event_id"]
            if eid in self.known or eid in seen:
                metrics.DUPLICATES_DROPPED.labels("sink").inc()
                continue
            seen.add(eid)
            fresh.append(p)
        if not fresh:
            return []
        # Step 1. Avro first, atomically, named by topic/partition/first offset written:
        # after a crash the file is either absent (rows redelivered) or whole (rows
        # restored into the CSV by recover()).
        if self.write_avro:
            by_tp: dict[tuple[str, int], list[PendingRow]] = defaultdict(list)
            for p in fresh:
                by_tp[(p.topic, p.partition)].append(p)
            for (topic, partition), rows in by_tp.items():
                self._write_avro(topic, partition, rows)
        crash.reach("after_avro")
        # Step 2. Append to the CSV, then Step 3 record its new committed length: a crash
        # between them only makes recover() cut and restore the same rows again.
        if self.write_csv:
            self._append_csv([p.row for p in fresh], crash)
        for p in fresh:
            self.known.add(p.row["event_id"])
        return fresh

    def _write_avro(self, topic: str, partition: int, rows: list[PendingRow]) -> Path:
        final = self.avro_dir / f"{topic}+{partition}+{rows[0].offset:019d}.avro"
        tmp = final.with_suffix(".avro.tmp")
        with tmp.open("wb") as f:
            fastavro.writer(f, self.schema, [p.row for p in rows], codec="deflate")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.avro_dir)
        metrics.SINK_ROWS.labels("avro").inc(len(rows))
        return final

    def _append_csv(self, rows: list[dict], crash: CrashPoints | None = None) -> None:
        new_file = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with self.csv_path.open("a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new_file:
                # The header gets its own committed length, so that even the first batch
                # can be cut back if it is only half written.
                writer.writerow(CSV_COLUMNS)
                f.flush()
                os.fsync(f.fileno())
                self._set_committed_length(f.tell())
            for i, row in enumerate(rows):
                writer.writerow([csv_cell(c, row.get(c)) for c in CSV_COLUMNS])
                if crash is not None and i == len(rows) // 2:
                    f.flush()
                    crash.reach("mid_csv")
            f.flush()
            os.fsync(f.fileno())
            length = f.tell()
        if crash is not None:
            crash.reach("after_csv")
        self._set_committed_length(length)
        metrics.SINK_ROWS.labels("csv").inc(len(rows))

    def _set_committed_length(self, length: int) -> None:
        tmp = self.length_path.with_suffix(".tmp")
        tmp.write_text(str(length))
        os.replace(tmp, self.length_path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SinkRunner:
    name = "sink"

    def __init__(self, settings: Settings, group_id: str = "imgflow-sink") -> None:
        self.settings = settings
        self.group_id = group_id
        self.codec = get_codec()
        self.store = ResultStore(settings.sink.out_dir, settings.sink.csv, settings.sink.avro)
        self.crash = CrashPoints("sink")
        self.stopping = False

    def request_stop(self, *_) -> None:
        self.stopping = True

    def _to_pending(self, msg) -> PendingRow | None:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        try:
            if topic == self.settings.topics.dlq:
                row = row_from_dead_letter(self.codec.decode("DeadLetter", msg.value()), topic, partition, offset)
            else:
                row = row_from_enriched(self.codec.decode("EnrichedRecord", msg.value()), topic, partition, offset)
        except SchemaError as exc:
            # A malformed final record still accounts for its image: an error row.
            key = msg.key().decode("utf-8", "replace") if msg.key() else f"malformed-{topic}-{partition}-{offset}"
            log.error("undecodable record on %s[%d]@%d: %s", topic, partition, offset, exc)
            row = {"image_path": "", "categories": [], "keywords": [], "timestamp": _iso(int(time.time() * 1000)),
                   "error": f"sink: malformed record: {exc}", "event_id": key, "failed_stage": "sink",
                   "models": {}, "source_topic": topic, "source_partition": partition, "source_offset": offset,
                   "run_id": "", "source_uri": ""}
        return PendingRow(topic, partition, offset, row)

    def run(self) -> None:
        self.store.lock()
        restored = self.store.recover()
        log.info("sink writing to %s (%d results known, %d restored from Avro)",
                 self.store.out, len(self.store.known), restored)
        consumer = Consumer(consumer_config(self.settings, self.group_id))
        consumer.subscribe([self.settings.topics.enriched, self.settings.topics.dlq])
        try:
            while not self.stopping:
                msgs = [m for m in consumer.consume(500, 1.0) if not m.error()]
                if not msgs:
                    continue
                pending = [self._to_pending(m) for m in msgs]
                written = self.store.write(pending, self.crash)
                for p in written:
                    extra = {"event_id": p.row["event_id"], "stage": "sink"}
                    log.info("wrote %s%s", p.row["image_path"], " (error row)" if p.row["error"] else "", extra=extra)
                # Step 4. Only now move the group's offsets; redelivered records would be
                # dropped as known anyway, so a failed commit costs time, not correctness.
                offsets: dict[tuple[str, int], int] = {}
                for m in msgs:
                    offsets[(m.topic(), m.partition())] = max(offsets.get((m.topic(), m.partition()), -1), m.offset())
                try:
                    consumer.commit(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in offsets.items()],
                                    asynchronous=False)
                except KafkaException as exc:
                    log.warning("offset commit failed (records will be redelivered and dropped): %s", exc)
                self.crash.reach("after_commit")
        finally:
            consumer.close()
            log.info("sink stopped")
