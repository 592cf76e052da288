"""``IndexSync``: the index follows a sink output; the output's complete Avro batches are the
source of truth, the index is rebuildable and never more.

Only complete batches are read (the sink writes a batch's ``_index`` object last: the
incomplete-batch rule of ``imgflow.output.layout``). Before rows are added their keys are written
to ``meta.json`` as ``pending``; a sync that finds pending keys (a crash mid-append) deletes
those rows first, so a batch is never in twice. One sync at a time (a file lock).

This is the one module of the search that reads the sink's output (``imgflow.output``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from imgflow.output.formats import read_avro
from imgflow.output.layout import AVRO, INDEX, all_keys, sibling_key
from imgflow.output.storage import LocalStorage, fetch_all, open_storage
from imgflow.s3 import S3Error
from imgflow.search import SearchError
from imgflow.search.ann import maintain
from imgflow.search.schema import SPACE_JOBS, failed_table, image_table, sql_text, table_name
from imgflow.search.store import META, IndexStore, Space

log = logging.getLogger(__name__)

CHUNK = 50  # Avro files read and appended together (bounded memory)

OnProgress = Callable[[int, int], None]


@dataclass
class SyncSummary:
    batches: int = 0
    rows: int = 0
    failed: int = 0
    skipped: int = 0  # rows without an error and without vectors (cannot be searched)
    seconds: float = 0.0
    incomplete: int = 0  # Avro batches whose _index is not written yet: not searchable yet


class IndexSync:
    """Takes a sink output's new batches into a store, and writes its ``meta.json``."""

    def __init__(self, store: IndexStore) -> None:
        self.store = store

    @property
    def meta(self) -> dict:
        return self.store.meta

    def write_meta(self) -> None:
        LocalStorage(self.store.dir).put(META, json.dumps(self.meta).encode())

    def rebuild(self, progress: OnProgress | None = None) -> SyncSummary:
        """Drop the index and build it again from the output."""
        with self._locked():
            self.store.clear()
        return self.sync(progress)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.store.dir.mkdir(parents=True, exist_ok=True)
        with open(self.store.dir / "sync.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _complete_batches(self) -> tuple[list[str], int]:
        storage = open_storage(self.store.out, self.store.settings)
        if isinstance(storage, LocalStorage):
            if not storage.root.is_dir():
                raise SearchError(f"no sink output at {storage.root}: no such folder (--out, or sink.out_dir / IMGFLOW_SINK__OUT_DIR)")
        else:
            try:
                storage.check()
            except S3Error as exc:
                raise SearchError(str(exc)) from None
        try:
            avro = list(all_keys(storage, AVRO))
            complete = set(all_keys(storage, INDEX))
        except S3Error as exc:
            raise SearchError(str(exc)) from None
        ready = [k for k in avro if sibling_key(k, INDEX) in complete]
        if not avro and isinstance(storage, LocalStorage) and (storage.root / "results.csv").exists():
            raise SearchError(f"{storage.root} has a results.csv but no Avro files: the index is made from the Avro files (sink.avro = true, the default)")
        return sorted(ready), len(avro) - len(ready)

    def sync(self, progress: OnProgress | None = None) -> SyncSummary:
        """Take in the batches the sink completed since the last sync."""
        t0 = time.monotonic()
        with self._locked():
            self.store.reload()
            summary = SyncSummary()
            ready, summary.incomplete = self._complete_batches()
            if self.meta["pending"]:
                self._drop_batches(self.meta["pending"])
            new = [k for k in ready if k not in self.meta["batches"]]
            storage = open_storage(self.store.out, self.store.settings)
            for start in range(0, len(new), CHUNK):
                chunk = new[start : start + CHUNK]
                rows_of: dict[str, list[dict]] = {}
                for key, data in fetch_all(storage, chunk):
                    rows_of[key] = read_avro(data) if data is not None else []
                self.meta["pending"] = chunk
                self.write_meta()
                self._append(rows_of, summary)
                for key in chunk:
                    self.meta["batches"][key] = len(rows_of.get(key, []))
                self.meta["pending"] = []
                self.write_meta()
                summary.batches += len(chunk)
                if progress is not None:
                    progress(start + len(chunk), len(new))
            maintain(self.store)
            self.write_meta()
        summary.seconds = time.monotonic() - t0
        if summary.batches:
            log.info(
                "search index %s: %d batch(es), %d row(s) added, %d error row(s), in %.1f s",
                self.store.dir,
                summary.batches,
                summary.rows,
                summary.failed,
                summary.seconds,
            )
        return summary

    def _drop_batches(self, keys: list[str]) -> None:
        """Rows of batches whose append may have been cut short (a crash): out, before again."""
        where = "batch IN (" + ", ".join(sql_text(k) for k in keys) + ")"
        names = [s["name"] for s in self.meta["spaces"].values()] + list(self.meta["failed"].values())
        existing = self.store.table_names() if names else set()
        for name in names:
            if name in existing:
                self.store.table(name).delete(where)
        self._recount()
        self.meta["pending"] = []
        self.write_meta()

    def _recount(self) -> None:
        for s in self.meta["spaces"].values():
            table = self.store.table(s["name"])
            s["rows"] = table.count_rows()
            cats = table.search().select(["category"]).limit(max(1, s["rows"])).to_arrow()["category"]
            s["categories"] = {c: int(n) for c, n in zip(*np.unique(np.asarray(cats.to_pylist(), dtype=object), return_counts=True))} if s["rows"] else {}
        self.meta["failed_rows"] = {run: self.store.table(name).count_rows() for run, name in self.meta["failed"].items()}

    def _append(self, rows_of: dict[str, list[dict]], summary: SyncSummary) -> None:
        images: dict[str, list[dict]] = {}
        failed: dict[str, list[dict]] = {}
        for key, rows in rows_of.items():
            for row in rows:
                row = {**row, "batch": key}
                if row.get("error"):
                    failed.setdefault(row["run_id"], []).append(row)
                elif row.get("text_vector") and row.get("image_vector"):
                    space = self._space_for(row)
                    images.setdefault(space["name"], []).append(row)
                else:
                    summary.skipped += 1
        for name, rows in images.items():
            space = self.meta["spaces"][name]
            self.store.add(name, image_table(rows, space["dims"]), fts=True)
            space["rows"] += len(rows)
            space["since_optimize"] += len(rows)
            for row in rows:
                cat = (row.get("categories") or [""])[0]
                space["categories"][cat] = space["categories"].get(cat, 0) + 1
            summary.rows += len(rows)
        for run_id, rows in failed.items():
            name = self.meta["failed"].setdefault(run_id, table_name("failed", run_id))
            self.store.add(name, failed_table(rows), fts=False)
            counts = self.meta.setdefault("failed_rows", {})
            counts[run_id] = counts.get(run_id, 0) + len(rows)
            summary.failed += len(rows)

    def _space_for(self, row: dict) -> dict:
        models = {job: (row.get("models") or {}).get(job, "") for job in SPACE_JOBS}
        name = table_name("images", row["run_id"], *models.values())
        space = self.meta["spaces"].get(name)
        if space is None:
            space = Space(name=name, run_id=row["run_id"], models=models, dims={"text": len(row["text_vector"]), "image": len(row["image_vector"])}).to_json()
            self.meta["spaces"][name] = space
        return space
