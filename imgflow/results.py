"""The results output, shared by the sink (writes it), ``imgflow export csv`` and the
backfill skip check (read it), and ``imgflow run``'s progress.

An output is a local folder or an ``s3://BUCKET/PREFIX/``; both hold the same keys, the
Kafka Connect S3 sink's layout::

    avro/<topic>/partition=<p>/<topic>+<p>+<first offset>.avro   the rows of one sink batch
    _index/<topic>/partition=<p>/<same name>.ids                   their event_ids (JSON, small)
    results.csv (+ .results.csv.committed)                         local: one CSV, appended
    csv/<topic>/partition=<p>/<same name>.csv                      S3: one CSV part per Avro file

Every object is written whole (local: temp file + rename; S3: one PUT) under a
deterministic name, so a retried write overwrites the same key. The ``_index`` object of a
batch is written last: it marks the batch complete (its Avro file and CSV rows are all
there). The leading ``_`` makes Spark/Hive-style readers skip it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import fastavro

from imgflow.s3 import S3Error, explain, is_s3_uri, parse_s3_uri, s3_client, s3_uri
from imgflow.settings import Settings
from schemas.codec import get_codec

log = logging.getLogger(__name__)

SEED_COLUMNS = [
    "image_path",
    "text",
    "description",
    "categories",
    "keywords",
    "image_text",
    "text_vector",
    "word2vec_vector",
    "image_vector",
    "timestamp",
    "error",
    "llama_extracted",
]
EXTRA_COLUMNS = ["event_id", "run_id", "source_uri", "failed_stage", "models", "source_topic", "source_partition", "source_offset"]
CSV_COLUMNS = SEED_COLUMNS + EXTRA_COLUMNS
LIST_COLUMNS = {"categories", "keywords", "text_vector", "word2vec_vector", "image_vector"}
VECTOR_COLUMNS = {"text_vector", "word2vec_vector", "image_vector"}

AVRO, CSV_PARTS, INDEX = "avro", "csv", "_index"
EXTENSIONS = {AVRO: ".avro", CSV_PARTS: ".csv", INDEX: ".ids"}
RESULTS_CSV = "results.csv"
COMMITTED_LENGTH = ".results.csv.committed"

csv.field_size_limit(sys.maxsize)


# ---- rows -------------------------------------------------------------------------------------
def iso_time(ts) -> str:
    if isinstance(ts, datetime):
        return ts.astimezone(UTC).isoformat(timespec="milliseconds")
    return datetime.fromtimestamp(ts / 1000, UTC).isoformat(timespec="milliseconds")


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
        "timestamp": iso_time(e["processed_at"]),
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
        "timestamp": iso_time(d["failed_at"]),
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
        # One %-format for the whole vector: the same text as f"{x:.7g}" per item, built in
        # one C call (this was a third of the sink's time per row).
        return "[" + ("%.7g," * len(value) % tuple(value))[:-1] + "]" if len(value) else "[]"
    if column in LIST_COLUMNS or column == "models":
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# CSV_COLUMNS as runs of (is a vector column, first, end): the csv module scans a cell a
# character at a time to decide on quoting, as long as formatting a vector took; a vector's
# text (digits, signs, '.', 'e', 'nan', 'inf', ',', brackets) needs quotes only for its commas.
_RUNS: list[tuple[bool, int, int]] = []
for _i, _c in enumerate(CSV_COLUMNS):
    if _RUNS and _RUNS[-1][0] == (_c in VECTOR_COLUMNS):
        _RUNS[-1] = (_RUNS[-1][0], _RUNS[-1][1], _i + 1)
    else:
        _RUNS.append((_c in VECTOR_COLUMNS, _i, _i + 1))


class CsvLines:
    """Rows as CSV text, exactly what ``csv.writer`` (excel dialect) writes for
    ``[csv_cell(c, row.get(c)) for c in CSV_COLUMNS]``, with the vector cells quoted here."""

    def __init__(self) -> None:
        self._buf = io.StringIO(newline="")
        self._writer = csv.writer(self._buf)

    def _plain(self, cells: list[str]) -> str:
        if len(cells) == 1 and cells[0] == "":
            return ""  # the csv module writes a lone empty field as '""', in a longer row as nothing
        self._buf.seek(0)
        self._buf.truncate()
        self._writer.writerow(cells)
        return self._buf.getvalue()[:-2]  # less the "\r\n"

    def line(self, row: dict) -> str:
        cells = [csv_cell(c, row.get(c)) for c in CSV_COLUMNS]
        parts = []
        for vector, start, end in _RUNS:
            if vector:
                parts.extend(f'"{s}"' if "," in s else s for s in cells[start:end])
            else:
                parts.append(self._plain(cells[start:end]))
        return ",".join(parts) + "\r\n"


def csv_bytes(rows: Iterable[dict], header: bool) -> bytes:
    buf = io.StringIO(newline="")
    if header:
        csv.writer(buf).writerow(CSV_COLUMNS)
    lines = CsvLines()
    for row in rows:
        buf.write(lines.line(row))
    return buf.getvalue().encode("utf-8")


def read_csv_rows(path: Path, limit: int | None = None, start: int = 0):
    """Complete rows of a results CSV as dicts, up to byte ``limit``; ``start`` (a row
    boundary) skips the rows before it (the header is still read from the file's start)."""
    path = Path(path)
    if not path.exists():
        return
    with path.open("rb") as f:
        header = next(csv.reader(io.StringIO(f.readline().decode("utf-8"), newline="")), None)
        if header is None:
            return
        f.seek(max(start, f.tell()))
        data = f.read(max(0, limit - f.tell())) if limit is not None else f.read()
    reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""), fieldnames=header)
    yield from reader


def avro_bytes(rows: list[dict], schema: str = "ResultRow", codec: str = "deflate") -> bytes:
    """An Avro container file of result rows (``codec``: deflate or null, sink.avro_codec)."""
    return get_codec().container(schema, rows, codec)


def index_bytes(rows: list[dict]) -> bytes:
    """The ``_index`` object of a batch: what dedupe and the backfill check need, small."""
    return json.dumps(
        {"rows": [[r["source_offset"], r["event_id"], r.get("run_id") or "", bool(r.get("error"))] for r in rows]}, ensure_ascii=False, separators=(",", ":")
    ).encode("utf-8")


@dataclass(frozen=True)
class IndexEntry:
    offset: int
    event_id: str
    run_id: str
    error: bool


def parse_index(data: bytes) -> list[IndexEntry]:
    return [IndexEntry(*r) for r in json.loads(data)["rows"]]


# ---- keys ------------------------------------------------------------------------------------
def file_stem(topic: str, partition: int, offset: int) -> str:
    # 19 digits: any Kafka offset, and names sort in offset order (listing can start after one).
    return f"{topic}+{partition}+{offset:019d}"


def partition_prefix(kind: str, topic: str, partition: int) -> str:
    return f"{kind}/{topic}/partition={partition}/"


def data_key(kind: str, topic: str, partition: int, offset: int) -> str:
    return partition_prefix(kind, topic, partition) + file_stem(topic, partition, offset) + EXTENSIONS[kind]


def parse_key(key: str) -> tuple[str, int, int]:
    """``.../<topic>+<p>+<offset>.<ext>`` -> (topic, partition, first offset)."""
    stem = key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    topic, partition, offset = stem.rsplit("+", 2)
    return topic, int(partition), int(offset)


def sibling_key(key: str, kind: str) -> str:
    topic, partition, offset = parse_key(key)
    return data_key(kind, topic, partition, offset)


# ---- storage ---------------------------------------------------------------------------------
def is_s3_output(out) -> bool:
    return is_s3_uri(out if isinstance(out, str) else str(out) if out is not None else "")


class LocalOutput:
    """An output folder. ``put`` is atomic and durable (temp file, fsync, rename, fsync dir)."""

    is_s3 = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, data: bytes) -> None:
        final = self.root / key
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def list(self, prefix: str, start_after: str = "") -> Iterator[str]:
        """Keys under a folder-like ``prefix`` (one level), in name order, after ``start_after``."""
        folder = self.root / prefix
        try:
            names = sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.endswith(".tmp"))
        except FileNotFoundError:
            return
        for name in names:
            key = prefix + name
            if key > start_after:
                yield key

    def subfolders(self, prefix: str) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.root / prefix) if e.is_dir())
        except FileNotFoundError:
            return []

    def remove_temp_files(self) -> int:
        """Half-written objects of a crashed writer (never renamed: their rows are redelivered)."""
        count = 0
        for kind in (AVRO, CSV_PARTS, INDEX):
            for tmp in (self.root / kind).rglob("*.tmp"):
                tmp.unlink()
                count += 1
        return count


class S3Output:
    """An ``s3://BUCKET/PREFIX/``. Errors are ``S3Error`` (naming the setting, never a secret)."""

    is_s3 = True

    def __init__(self, uri: str, settings: Settings) -> None:
        loc = parse_s3_uri(uri)
        self.bucket = loc.bucket
        self.prefix = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"
        self.uri = s3_uri(self.bucket, self.prefix)
        self.client = s3_client(settings)

    def __str__(self) -> str:
        return self.uri

    def _fail(self, exc: BaseException, key: str = "") -> S3Error:
        err = explain(exc, s3_uri(self.bucket, self.prefix + key))
        if err.code == "NoSuchBucket" or (err.code == "NoSuchKey" and not key):
            return S3Error(
                f"{self.uri}: the bucket {self.bucket!r} does not exist: create it, or fix the output (--out / sink.out_dir, IMGFLOW_SINK__OUT_DIR)",
                code="NoSuchBucket",
            )
        return err

    def check(self) -> None:
        """One cheap request that fails clearly on a missing bucket, bad credentials or endpoint."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an S3Error
            raise self._fail(exc) from None

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, key) from None

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except Exception as exc:  # noqa: BLE001
            err = self._fail(exc, key)
            if err.code == "NoSuchKey":
                return None
            raise err from None

    def list(self, prefix: str, start_after: str = "") -> Iterator[str]:
        kwargs = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if start_after:
            kwargs["StartAfter"] = self.prefix + start_after
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self.prefix) :]
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, prefix) from None

    def subfolders(self, prefix: str) -> list[str]:
        names = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix, Delimiter="/"):
                names += [p["Prefix"][len(self.prefix + prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, prefix) from None
        return sorted(names)

    def remove_temp_files(self) -> int:
        return 0  # a PUT is atomic: an interrupted one leaves nothing


Output = LocalOutput | S3Output


def open_output(out, settings: Settings) -> Output:
    return S3Output(str(out), settings) if is_s3_output(out) else LocalOutput(Path(out))


def partitions(output: Output, kind: str = AVRO) -> list[tuple[str, int]]:
    """(topic, partition) pairs that have files of ``kind``."""
    found = []
    for topic in output.subfolders(kind + "/"):
        for folder in output.subfolders(f"{kind}/{topic}/"):
            if folder.startswith("partition="):
                found.append((topic, int(folder.split("=", 1)[1])))
    return found


def all_keys(output: Output, kind: str) -> Iterator[str]:
    for topic, partition in partitions(output, kind):
        yield from output.list(partition_prefix(kind, topic, partition))


def read_avro(data: bytes) -> list[dict]:
    return list(fastavro.reader(io.BytesIO(data)))


def fetch_all(output: Output, keys: list[str], threads: int = 10) -> Iterator[tuple[str, bytes | None]]:
    """(key, bytes) in order; S3 GETs run in parallel (latency, not bandwidth, bounds them;
    10 threads: the size of boto3's connection pool)."""
    if not output.is_s3:
        for key in keys:
            yield key, output.get(key)
        return
    with ThreadPoolExecutor(threads) as pool:
        for i in range(0, len(keys), 100):  # a bounded number of objects in memory at once
            chunk = keys[i : i + 100]
            yield from zip(chunk, pool.map(output.get, chunk))


# ---- readers ---------------------------------------------------------------------------------
class ResultIndex:
    """Which events already have a result row in an output (the backfill skip check).

    ``ResultIndex(out, settings).existing(event_ids)`` -> the subset that has a row (a result
    or an error row). Streams the ``_index`` objects (memory: the ids asked about), and reads
    the Avro files that have none (a batch whose index is not written yet, or an output of an
    older version; for a local output without any, ``results.csv``)."""

    def __init__(self, out, settings: Settings) -> None:
        self.output = open_output(out, settings)

    def _rows(self) -> Iterator[list]:
        """[offset, event_id, run_id, error] of every row in the output."""
        avro_keys = list(all_keys(self.output, AVRO))
        index_keys = set(all_keys(self.output, INDEX))
        for _, data in fetch_all(self.output, sorted(index_keys)):
            if data is not None:
                yield from json.loads(data)["rows"]
        missing = [k for k in avro_keys if sibling_key(k, INDEX) not in index_keys]
        for _, data in fetch_all(self.output, missing):
            for row in read_avro(data) if data is not None else []:
                yield [row["source_offset"], row["event_id"], row["run_id"], bool(row["error"])]
        if not avro_keys and not self.output.is_s3:
            for row in read_csv_rows(self.output.root / RESULTS_CSV, committed_csv_length(self.output.root)):
                yield [int(row["source_offset"] or -1), row["event_id"], row.get("run_id", ""), bool(row["error"])]

    def entries(self) -> Iterator[IndexEntry]:
        return (IndexEntry(*r) for r in self._rows())

    def existing(self, event_ids: Iterable[str], run_id: str | None = None) -> set[str]:
        wanted = set(event_ids)
        found: set[str] = set()
        for _, event_id, row_run, _ in self._rows():
            if event_id in wanted and (run_id is None or row_run == run_id):
                found.add(event_id)
        return found


def committed_csv_length(root: Path) -> int:
    """The length of the part of a local results.csv that is complete."""
    try:
        return int((Path(root) / COMMITTED_LENGTH).read_text())
    except (FileNotFoundError, ValueError):
        csv_path = Path(root) / RESULTS_CSV
        return csv_path.stat().st_size if csv_path.exists() else 0


class CommittedResults:
    """The rows an output holds so far, refreshed incrementally (``imgflow run``'s progress):
    ``rows``, ``errors``, and of the event_ids ``wanted`` those not written yet
    (``missing``). Local: results.csv up to its committed length, each refresh reading only
    the rows appended since the last, a row at a time; S3: the ``_index`` objects (each
    marks a complete batch) listed after the last one read. Memory does not grow with the
    rows: only ``wanted`` is held (``keep_ids`` keeps every event_id, in ``done``)."""

    def __init__(self, out, settings: Settings, wanted: set[str] | None = None, keep_ids: bool = False) -> None:
        self.output = open_output(out, settings)
        self.wanted = set(wanted or ())
        self.missing: set[str] = set(self.wanted)
        self.keep_ids = keep_ids
        self.done: set[str] = set()  # only with keep_ids
        self.rows = 0
        self.errors = 0
        self._last: dict[str, str] = {}  # S3: the last index key read, per partition folder
        self._read_upto = -1  # local: the byte offset read up to (-1: nothing read yet)
        self._columns: tuple[int, int] | None = None  # local: where event_id and error are

    def _saw(self, event_id: str, error: bool) -> None:
        self.rows += 1
        self.errors += error
        self.missing.discard(event_id)
        if self.keep_ids:
            self.done.add(event_id)

    def refresh(self) -> None:
        if self.output.is_s3:
            # Per partition, index keys appear in offset order: list only after the last one seen.
            new = []
            for topic, partition in partitions(self.output, INDEX):
                prefix = partition_prefix(INDEX, topic, partition)
                new += self.output.list(prefix, self._last.get(prefix, ""))
            for key, data in fetch_all(self.output, new):
                prefix = key.rsplit("/", 1)[0] + "/"
                self._last[prefix] = max(self._last.get(prefix, ""), key)
                for entry in parse_index(data) if data is not None else []:
                    self._saw(entry.event_id, bool(entry.error))
            return
        length = committed_csv_length(self.output.root) if (self.output.root / COMMITTED_LENGTH).exists() else -1
        if length < 0 or length == self._read_upto:
            return
        if length < self._read_upto:  # a new results.csv (the old one removed): count it afresh
            self.missing, self.done, self.rows, self.errors = set(self.wanted), set(), 0, 0
            self._read_upto, self._columns = -1, None
        with (self.output.root / RESULTS_CSV).open("rb") as f:
            header = f.readline()
            if self._columns is None:
                names = next(csv.reader([header.decode("utf-8")]), [])
                if "event_id" not in names or "error" not in names:
                    return  # not even the header is committed yet
                self._columns = (names.index("event_id"), names.index("error"))
            start = max(self._read_upto, f.tell())
            f.seek(start)

            def lines():  # bytes start..length, a line at a time (a quoted field may span lines)
                pos = start
                while pos < length:
                    line = f.readline(length - pos)
                    if not line:
                        return
                    pos += len(line)
                    yield line.decode("utf-8")

            id_at, error_at = self._columns
            for row in csv.reader(lines()):
                if len(row) > max(id_at, error_at):
                    self._saw(row[id_at], bool(row[error_at]))
        self._read_upto = length


# ---- export ----------------------------------------------------------------------------------
@dataclass
class ExportSummary:
    rows_files: int = 0
    incomplete: int = 0  # Avro files whose CSV part is not written yet


def export_csv(out, settings: Settings, dest, progress=None) -> ExportSummary:
    """Write one CSV with the seed's header: the CSV parts of an S3 output merged in
    (topic, partition, offset) order, or the committed part of a local results.csv.
    ``dest``: a binary file object. ``progress(done, total)`` is called as parts are read."""
    output = open_output(out, settings)
    summary = ExportSummary()
    if not output.is_s3:
        if not output.root.is_dir():
            raise ValueError(f"no sink output at {output.root}: no such folder")
        length = committed_csv_length(output.root)
        path = output.root / RESULTS_CSV
        if not path.exists():
            dest.write(csv_bytes([], header=True))
            return summary
        with path.open("rb") as f:
            remaining = length
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                dest.write(chunk)
                remaining -= len(chunk)
        summary.rows_files = 1
        return summary
    output.check()
    parts = list(all_keys(output, CSV_PARTS))
    part_set = set(parts)
    summary.incomplete = sum(1 for k in all_keys(output, AVRO) if sibling_key(k, CSV_PARTS) not in part_set)
    dest.write(csv_bytes([], header=True))
    for n, (key, data) in enumerate(fetch_all(output, parts), 1):
        if data is None:
            continue
        # Each part starts with the header line (no newline inside it): skip it.
        body = data.split(b"\n", 1)[1] if b"\n" in data else b""
        dest.write(body)
        summary.rows_files += 1
        if progress is not None:
            progress(n, len(parts))
    return summary


def retry_s3(what: str, action, stopping=lambda: False, max_backoff_s: float = 30.0, sleep=time.sleep):
    """Run ``action()`` until it succeeds, retrying S3Errors with exponential back-off
    (also the configuration ones: a bucket can be created, credentials fixed, while we wait).
    Returns None if ``stopping()`` becomes true first."""
    delay = 0.5
    while True:
        try:
            return action()
        except S3Error as exc:
            if stopping():
                return None
            log.error("%s failed: %s; retrying in %.1fs", what, exc, delay)
            end = time.monotonic() + delay
            while time.monotonic() < end and not stopping():
                sleep(min(0.2, delay))
            if stopping():
                return None
            delay = min(max_backoff_s, delay * 2)
