"""The formats of an output: CSV rows (``results.csv`` appended locally, one CSV part per
batch on S3), Avro container files, and the ``_index`` object of a batch."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fastavro

from imgflow import metrics
from imgflow.output.layout import CHECKPOINT, COMMITTED_LENGTH, CSV_PARTS, RESULTS_CSV, data_key
from imgflow.output.rows import CSV_COLUMNS, LIST_COLUMNS, VECTOR_COLUMNS
from schemas.codec import get_codec

if TYPE_CHECKING:
    from imgflow.output.storage import Storage
    from imgflow.stage import CrashPoints

log = logging.getLogger(__name__)

csv.field_size_limit(sys.maxsize)


# ---- CSV --------------------------------------------------------------------------------------
def csv_cell(column: str, value: Any) -> str:
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
        parts: list[str] = []
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


def read_csv_rows(path: Path, limit: int | None = None, start: int = 0) -> Iterator[dict[str, str]]:
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


def committed_csv_length(root: Path) -> int:
    """The length of the part of a local results.csv that is complete."""
    try:
        return int((Path(root) / COMMITTED_LENGTH).read_text())
    except (FileNotFoundError, ValueError):
        csv_path = Path(root) / RESULTS_CSV
        return csv_path.stat().st_size if csv_path.exists() else 0


# ---- Avro and the index ----------------------------------------------------------------------
def avro_bytes(rows: list[dict], schema: str = "ResultRow", codec: str = "deflate") -> bytes:
    """An Avro container file of result rows (``codec``: deflate or null, sink.avro_codec)."""
    return get_codec().container(schema, rows, codec)


def read_avro(data: bytes) -> list[dict]:
    return [r for r in fastavro.reader(io.BytesIO(data)) if isinstance(r, dict)]


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


# ---- the sink's CSV writers ------------------------------------------------------------------
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

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def write(self, groups: list[list[dict]], crash: CrashPoints | None = None) -> None:
        for i, rows in enumerate(groups):
            if crash is not None and i == len(groups) // 2:
                crash.reach("mid_csv")
            first = rows[0]
            self.storage.put(data_key(CSV_PARTS, first["source_topic"], first["source_partition"], first["source_offset"]), csv_bytes(rows, header=True))
        if crash is not None:
            crash.reach("after_csv")
        metrics.SINK_ROWS.labels("csv").inc(sum(len(g) for g in groups))

    def checkpoint(self) -> None:
        pass
