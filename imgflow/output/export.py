"""``imgflow export csv``: one CSV with the seed's header from an output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from imgflow.output.formats import committed_csv_length, csv_bytes
from imgflow.output.layout import AVRO, CSV_PARTS, RESULTS_CSV, all_keys, lacking
from imgflow.output.storage import LocalStorage, fetch_all, open_storage
from imgflow.settings import Settings


@dataclass
class ExportSummary:
    rows_files: int = 0
    incomplete: int = 0  # Avro files whose CSV part is not written yet


def _copy_committed(root: Path, dest: BinaryIO, summary: ExportSummary) -> ExportSummary:
    if not root.is_dir():
        raise ValueError(f"no sink output at {root}: no such folder")
    length = committed_csv_length(root)
    path = root / RESULTS_CSV
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


def export_csv(out: str | Path, settings: Settings, dest: BinaryIO, progress: Callable[[int, int], object] | None = None) -> ExportSummary:
    """Write one CSV with the seed's header: the CSV parts of an S3 output merged in
    (topic, partition, offset) order, or the committed part of a local results.csv.
    ``dest``: a binary file object. ``progress(done, total)`` is called as parts are read."""
    storage = open_storage(out, settings)
    summary = ExportSummary()
    if isinstance(storage, LocalStorage):
        return _copy_committed(storage.root, dest, summary)
    storage.check()
    parts = list(all_keys(storage, CSV_PARTS))
    summary.incomplete = len(lacking(all_keys(storage, AVRO), set(parts), CSV_PARTS))
    dest.write(csv_bytes([], header=True))
    for n, (_, data) in enumerate(fetch_all(storage, parts), 1):
        if data is None:
            continue
        # Each part starts with the header line (no newline inside it): skip it.
        body = data.split(b"\n", 1)[1] if b"\n" in data else b""
        dest.write(body)
        summary.rows_files += 1
        if progress is not None:
            progress(n, len(parts))
    return summary
