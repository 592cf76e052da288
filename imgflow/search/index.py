"""``SearchIndex``: a LanceDB database that follows a sink output.

What it holds, per *space* (one run's rows embedded by one pair of models; a replay with a
new model is a space of its own, so vectors of different models are never compared):

- a table of the images with their two search vectors (``text_vector``, ``image_vector``),
  the columns a results page shows, and ``words`` (description, keywords, read text, the
  full description) under a full-text index;
- per run, a table of the error rows (the dead-lettered images, for the operator).

Which batches are in it: ``meta.json`` lists every Avro key taken in. Only complete batches
are read (the sink writes a batch's ``_index`` object last: the incomplete-batch rule of
``imgflow.results``). Before rows are added their keys are written as ``pending``; a sync
that finds pending keys (a crash mid-append) deletes those rows first, so a batch is never
in twice. One sync at a time (a file lock); readers need none (Lance tables are versioned).

Vectors are searched exactly (a flat scan) below ``search.ann_min_rows`` rows, through an
approximate index above (``search.ann_index_type``; figures in benchmarks/search_index.py).
New rows are searchable at once: Lance searches rows not yet in an index by scanning them,
and ``optimize`` folds them in every ``search.optimize_every_rows`` rows.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from imgflow.results import AVRO, INDEX, LocalOutput, all_keys, fetch_all, open_output, read_avro, sibling_key
from imgflow.s3 import S3Error
from imgflow.search import SearchError
from imgflow.settings import Settings

log = logging.getLogger(__name__)
# Lance's own (Rust) log lines: errors only, unless the user asks for more.
os.environ.setdefault("LANCE_LOG", "error")

META = "meta.json"
VERSION = 2  # 2: full-text index keeps stop words
# The model jobs whose vectors are searched: a space is one run + these models.
SPACE_JOBS = ("embed_text", "embed_image")
SHOWN = ["event_id", "run_id", "image_path", "source_uri", "description", "category", "keywords", "image_text", "timestamp"]


def default_index_dir(out, settings: Settings) -> Path:
    """DATA_DIR/search/<the output as a folder name>: one index per output."""
    if settings.search.index_dir:
        return Path(settings.search.index_dir)
    where = str(out) if str(out).startswith("s3://") else str(Path(out).resolve())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", where).strip("_")[-60:]
    return Path(settings.data_dir) / "search" / f"{slug}-{hashlib.sha1(where.encode()).hexdigest()[:8]}"


def sql_text(value: str) -> str:
    """A string literal for a Lance filter."""
    return "'" + value.replace("'", "''") + "'"


def table_name(kind: str, *parts: str) -> str:
    return f"{kind}_{hashlib.sha1(chr(0).join(parts).encode()).hexdigest()[:16]}"


@dataclass
class Space:
    """One run's rows embedded by one pair of models."""

    name: str
    run_id: str
    models: dict[str, str]
    dims: dict[str, int]
    rows: int = 0
    since_optimize: int = 0
    ann: bool = False
    categories: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return self.__dict__.copy()


@dataclass
class SyncSummary:
    batches: int = 0
    rows: int = 0
    failed: int = 0
    skipped: int = 0  # rows without an error and without vectors (cannot be searched)
    seconds: float = 0.0
    incomplete: int = 0  # Avro batches whose _index is not written yet: not searchable yet


def _words(row: dict) -> str:
    return " ".join(x for x in [row.get("description") or "", " ".join(row.get("keywords") or []), row.get("image_text") or "", row.get("text") or ""] if x)


def _timestamp_ms(text: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    except (TypeError, ValueError):
        return 0


class SearchIndex:
    def __init__(self, out, settings: Settings, index_dir: Path | None = None) -> None:
        self.out = out
        self.settings = settings
        self.dir = Path(index_dir) if index_dir else default_index_dir(out, settings)
        self._db = None
        self._tables: dict[str, object] = {}
        self.meta = self._read_meta()

    # -- state
    def _read_meta(self) -> dict:
        try:
            meta = json.loads((self.dir / META).read_text())
        except FileNotFoundError:
            return {"version": VERSION, "output": str(self.out), "batches": {}, "pending": [], "spaces": {}, "failed": {}}
        except ValueError as exc:
            raise SearchError(f"search index {self.dir} is damaged ({META}: {exc}); rebuild it: imgflow index --rebuild") from None
        if meta.get("version") != VERSION:
            raise SearchError(f"search index {self.dir} was made by another version; rebuild it: imgflow index --rebuild")
        return meta

    def _write_meta(self) -> None:
        LocalOutput(self.dir).put(META, json.dumps(self.meta).encode())

    def reload(self) -> None:
        self.meta = self._read_meta()
        self._tables.clear()

    @property
    def db(self):
        if self._db is None:
            import lancedb

            self.dir.mkdir(parents=True, exist_ok=True)
            self._db = lancedb.connect(str(self.dir / "lance"))
        return self._db

    def table(self, name: str):
        if name not in self._tables:
            self._tables[name] = self.db.open_table(name)
        return self._tables[name]

    @property
    def spaces(self) -> list[Space]:
        return [Space(**s) for s in self.meta["spaces"].values()]

    def runs(self) -> list[str]:
        return sorted({s.run_id for s in self.spaces} | set(self.meta["failed"]))

    def spaces_of(self, run_id: str) -> list[Space]:
        return [s for s in self.spaces if s.run_id == run_id]

    def failed_table(self, run_id: str):
        name = self.meta["failed"].get(run_id)
        return self.table(name) if name else None

    def count(self, run_id: str | None = None) -> int:
        return sum(s.rows for s in self.spaces if run_id is None or s.run_id == run_id)

    def failed_count(self, run_id: str | None = None) -> int:
        return sum(int(n) for r, n in self.meta.get("failed_rows", {}).items() if run_id is None or r == run_id)

    def categories(self, run_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.spaces_of(run_id):
            for cat, n in s.categories.items():
                counts[cat] = counts.get(cat, 0) + n
        return dict(sorted(counts.items()))

    # -- lookups
    def find(self, ref: str, run_id: str | None = None, by_id_only: bool = False) -> tuple[Space, dict] | None:
        """The row of an event_id, an image path or a source URI (the newest if several)."""
        ref = ref.strip()
        conds = [f"event_id = {sql_text(ref)}"]
        if not by_id_only:
            conds += [f"image_path = {sql_text(ref)}", f"source_uri = {sql_text(ref)}"]
        if not by_id_only and not ref.startswith("s3://") and "/" in ref:
            with contextlib.suppress(OSError, ValueError):
                conds.append(f"image_path = {sql_text(str(Path(ref).resolve()))}")
        where = " OR ".join(conds)
        best: tuple[Space, dict] | None = None
        for space in self.spaces:
            if run_id is not None and space.run_id != run_id:
                continue
            rows = self.table(space.name).search().where(where).limit(1).to_list()
            if rows and (best is None or rows[0]["timestamp"] > best[1]["timestamp"]):
                best = (space, rows[0])
        return best

    def failed_rows(self, run_id: str, limit: int = 100, offset: int = 0) -> list[dict]:
        table = self.failed_table(run_id)
        if table is None:
            return []
        total = table.count_rows()  # the newest last (appended as batches complete): read from the end
        start = max(0, total - offset - limit)
        rows = table.search().offset(start).limit(max(0, total - offset - start)).to_list()
        return rows[::-1]

    # -- building
    def rebuild(self, progress: Callable[[int, int], None] | None = None) -> SyncSummary:
        """Drop the index and build it again from the output."""
        with self._locked():
            shutil.rmtree(self.dir / "lance", ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (self.dir / META).unlink()
            self._db = None
            self.reload()
        return self.sync(progress)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "sync.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _complete_batches(self) -> tuple[list[str], int]:
        output = open_output(self.out, self.settings)
        if not output.is_s3:
            if not output.root.is_dir():
                raise SearchError(f"no sink output at {output.root}: no such folder (--out, or sink.out_dir / IMGFLOW_SINK__OUT_DIR)")
        else:
            try:
                output.check()
            except S3Error as exc:
                raise SearchError(str(exc)) from None
        try:
            avro = list(all_keys(output, AVRO))
            complete = set(all_keys(output, INDEX))
        except S3Error as exc:
            raise SearchError(str(exc)) from None
        ready = [k for k in avro if sibling_key(k, INDEX) in complete]
        if not avro and not output.is_s3 and (output.root / "results.csv").exists():
            raise SearchError(f"{output.root} has a results.csv but no Avro files: the index is made from the Avro files (sink.avro = true, the default)")
        return sorted(ready), len(avro) - len(ready)

    def sync(self, progress: Callable[[int, int], None] | None = None) -> SyncSummary:
        """Take in the batches the sink completed since the last sync."""
        t0 = time.monotonic()
        with self._locked():
            self.reload()
            summary = SyncSummary()
            ready, summary.incomplete = self._complete_batches()
            if self.meta["pending"]:
                self._drop_batches(self.meta["pending"])
            new = [k for k in ready if k not in self.meta["batches"]]
            output = open_output(self.out, self.settings)
            chunk_size = 50  # Avro files read and appended together (bounded memory)
            for start in range(0, len(new), chunk_size):
                chunk = new[start : start + chunk_size]
                rows_of: dict[str, list[dict]] = {}
                for key, data in fetch_all(output, chunk):
                    rows_of[key] = read_avro(data) if data is not None else []
                self.meta["pending"] = chunk
                self._write_meta()
                self._append(rows_of, summary)
                for key in chunk:
                    self.meta["batches"][key] = len(rows_of.get(key, []))
                self.meta["pending"] = []
                self._write_meta()
                summary.batches += len(chunk)
                if progress is not None:
                    progress(start + len(chunk), len(new))
            self._maintain()
            self._write_meta()
        summary.seconds = time.monotonic() - t0
        if summary.batches:
            log.info(
                "search index %s: %d batch(es), %d row(s) added, %d error row(s), in %.1f s",
                self.dir,
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
        existing = set(self.db.list_tables().tables) if names else set()
        for name in names:
            if name in existing:
                self.table(name).delete(where)
        self._recount()
        self.meta["pending"] = []
        self._write_meta()

    def _recount(self) -> None:
        for s in self.meta["spaces"].values():
            table = self.table(s["name"])
            s["rows"] = table.count_rows()
            cats = table.search().select(["category"]).limit(max(1, s["rows"])).to_arrow()["category"]
            s["categories"] = {c: int(n) for c, n in zip(*np.unique(np.asarray(cats.to_pylist(), dtype=object), return_counts=True))} if s["rows"] else {}
        self.meta["failed_rows"] = {run: self.table(name).count_rows() for run, name in self.meta["failed"].items()}

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
            space = next(s for s in self.meta["spaces"].values() if s["name"] == name)
            self._add(name, self._image_table(rows, space["dims"]), fts=True)
            space["rows"] += len(rows)
            space["since_optimize"] += len(rows)
            for row in rows:
                cat = (row.get("categories") or [""])[0]
                space["categories"][cat] = space["categories"].get(cat, 0) + 1
            summary.rows += len(rows)
        for run_id, rows in failed.items():
            name = self.meta["failed"].setdefault(run_id, table_name("failed", run_id))
            self._add(name, self._failed_table(rows), fts=False)
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

    def _add(self, name: str, data: pa.Table, fts: bool) -> None:
        if name in self.db.list_tables().tables:
            self.table(name).add(data)
            return
        table = self.db.create_table(name, data)
        self._tables[name] = table
        from lancedb.index import FTS, BTree

        table.create_index("event_id", config=BTree())  # find() and --like by event_id
        if fts:
            # Stop words kept: a word printed on an image ("THE", "OPEN") is often one, and
            # dropping them lost those hits (search quality benchmark: distinctive words 98 % -> 100 %).
            table.create_index("words", config=FTS(remove_stop_words=False))

    @staticmethod
    def _row_columns(rows: list[dict]) -> dict:
        """The columns an image's row and a failed image's row both have: who, where from, when."""
        return {
            "event_id": [r["event_id"] for r in rows],
            "run_id": [r["run_id"] for r in rows],
            "image_path": [r["image_path"] for r in rows],
            "source_uri": [r["source_uri"] for r in rows],
            "timestamp": pa.array([_timestamp_ms(r["timestamp"]) for r in rows], pa.timestamp("ms", tz="UTC")),
            "models": [json.dumps(r.get("models") or {}) for r in rows],
            "source_topic": [r["source_topic"] for r in rows],
            "source_partition": pa.array([r["source_partition"] for r in rows], pa.int32()),
            "source_offset": pa.array([r["source_offset"] for r in rows], pa.int64()),
            "batch": [r["batch"] for r in rows],
        }

    @classmethod
    def _image_table(cls, rows: list[dict], dims: dict[str, int]) -> pa.Table:
        def vectors(column: str, dim: int) -> pa.Array:
            flat = np.zeros((len(rows), dim), np.float32)
            for i, row in enumerate(rows):
                v = row[column]
                flat[i, : min(dim, len(v))] = v[:dim]  # a model's dimension is fixed; guard anyway
            return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), dim)

        return pa.table(
            {
                **cls._row_columns(rows),
                "description": [r.get("description") or "" for r in rows],
                "text": [r.get("text") or "" for r in rows],
                "category": [(r.get("categories") or [""])[0] for r in rows],
                "categories": pa.array([list(r.get("categories") or []) for r in rows], pa.list_(pa.string())),
                "keywords": pa.array([list(r.get("keywords") or []) for r in rows], pa.list_(pa.string())),
                "image_text": [r.get("image_text") or "" for r in rows],
                "words": [_words(r) for r in rows],
                "llama_extracted": [r.get("llama_extracted") or "" for r in rows],
                "word2vec_vector": pa.array([list(r.get("word2vec_vector") or []) for r in rows], pa.list_(pa.float32())),
                "text_vector": vectors("text_vector", dims["text"]),
                "image_vector": vectors("image_vector", dims["image"]),
            }
        )

    @classmethod
    def _failed_table(cls, rows: list[dict]) -> pa.Table:
        return pa.table(
            {
                **cls._row_columns(rows),
                "error": [r.get("error") or "" for r in rows],
                "failed_stage": [r.get("failed_stage") or "" for r in rows],
            }
        )

    def _maintain(self) -> None:
        """Approximate vector indexes once a space is large; fold new rows in now and then."""
        s = self.settings.search
        for space in self.meta["spaces"].values():
            if space["since_optimize"] < s.optimize_every_rows and (space["ann"] or space["rows"] < s.ann_min_rows):
                continue
            table = self.table(space["name"])
            if not space["ann"] and space["rows"] >= s.ann_min_rows:
                for column, dim in (("text_vector", space["dims"]["text"]), ("image_vector", space["dims"]["image"])):
                    create_vector_index(table, column, dim, space["rows"], self.settings)
                space["ann"] = True
            else:
                table.optimize()
            space["since_optimize"] = 0


def create_vector_index(table, column: str, dim: int, rows: int, settings: Settings) -> None:
    """The approximate index of one vector column (cosine). Partitions ~ sqrt(rows), as
    LanceDB advises for IVF; PQ sub-vectors of 16 dimensions (8 for dimensions not divisible)."""
    s = settings.search
    partitions = max(1, int(rows**0.5))
    t0 = time.monotonic()
    if s.ann_index_type == "IVF_PQ":
        sub = dim // 16 if dim % 16 == 0 else (dim // 8 if dim % 8 == 0 else 1)
        table.create_index(metric="cosine", vector_column_name=column, index_type="IVF_PQ", num_partitions=partitions, num_sub_vectors=sub, replace=True)
    else:
        table.create_index(metric="cosine", vector_column_name=column, index_type="IVF_HNSW_SQ", num_partitions=max(1, rows // 100_000), replace=True)
    log.info("search index: %s index on %s (%d rows, %d-d) in %.1f s", s.ann_index_type, column, rows, dim, time.monotonic() - t0)


def vector_query(table, column: str, vector, limit: int, where: str | None, settings: Settings, ann: bool):
    """A cosine nearest-neighbour query, filtered before the search (so a filter never
    empties a page of hits), exact below the ANN threshold."""
    q = table.search(np.asarray(vector, np.float32), vector_column_name=column).distance_type("cosine")
    if ann:
        q = q.nprobes(settings.search.ann_nprobes)
        if settings.search.ann_refine_factor > 1:  # re-rank refine x limit candidates on the full vectors
            q = q.refine_factor(settings.search.ann_refine_factor)
    else:
        q = q.bypass_vector_index()
    if where:
        q = q.where(where, prefilter=True)
    return q.limit(limit)
