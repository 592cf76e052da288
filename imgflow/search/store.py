"""``IndexStore``: the index folder, ``meta.json`` and the LanceDB tables, and the lookups in it.

``meta.json`` lists the spaces (one run's rows embedded by one pair of models: vectors of
different models are never compared), each run's failed table, and every Avro key taken in.
``sync.py`` writes it and adds the rows, under its lock; readers take none (Lance tables are
versioned).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from imgflow.search import SearchError
from imgflow.search.schema import sql_text
from imgflow.settings import Settings

# Lance's own (Rust) log lines: errors only, unless the user asks for more.
os.environ.setdefault("LANCE_LOG", "error")

META = "meta.json"
VERSION = 2  # 2: full-text index keeps stop words


def default_index_dir(out, settings: Settings) -> Path:
    """DATA_DIR/search/<the output as a folder name>: one index per output."""
    if settings.search.index_dir:
        return Path(settings.search.index_dir)
    where = str(out) if str(out).startswith("s3://") else str(Path(out).resolve())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", where).strip("_")[-60:]
    return Path(settings.data_dir) / "search" / f"{slug}-{hashlib.sha1(where.encode()).hexdigest()[:8]}"


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


class IndexStore:
    def __init__(self, out, settings: Settings, index_dir: Path | None = None) -> None:
        self.out = out
        self.settings = settings
        self.dir = Path(index_dir) if index_dir else default_index_dir(out, settings)
        self._db: Any = None
        self._tables: dict[str, Any] = {}
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

    def reload(self) -> None:
        self.meta = self._read_meta()
        self._tables.clear()

    def clear(self) -> None:
        """Delete the tables and ``meta.json`` (the caller holds the sync lock)."""
        shutil.rmtree(self.dir / "lance", ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / META).unlink()
        self._db = None
        self.reload()

    # -- tables
    @property
    def db(self) -> Any:
        if self._db is None:
            import lancedb

            self.dir.mkdir(parents=True, exist_ok=True)
            self._db = lancedb.connect(str(self.dir / "lance"))
        return self._db

    def table(self, name: str) -> Any:
        if name not in self._tables:
            self._tables[name] = self.db.open_table(name)
        return self._tables[name]

    def table_names(self) -> set[str]:
        return set(self.db.list_tables().tables)

    def add(self, name: str, data: pa.Table, fts: bool) -> None:
        """Append ``data`` to a table, creating it (with its indexes) the first time."""
        if name in self.table_names():
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

    # -- what it holds
    @property
    def spaces(self) -> list[Space]:
        return [Space(**s) for s in self.meta["spaces"].values()]

    def runs(self) -> list[str]:
        return sorted({s.run_id for s in self.spaces} | set(self.meta["failed"]))

    def spaces_of(self, run_id: str) -> list[Space]:
        return [s for s in self.spaces if s.run_id == run_id]

    def failed_table(self, run_id: str) -> Any:
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

    def find_failed(self, event_id: str, columns: list[str] | None = None) -> dict | None:
        """The error row of an event_id (its ``columns``, default all), None if there is none."""
        for run in self.runs():
            table = self.failed_table(run)
            if table is None:
                continue
            q = table.search().where(f"event_id = {sql_text(event_id)}")
            rows = (q.select(columns) if columns else q).limit(1).to_list()
            if rows:
                return rows[0]
        return None

    def failed_rows(self, run_id: str, limit: int = 100, offset: int = 0) -> list[dict]:
        table = self.failed_table(run_id)
        if table is None:
            return []
        total = table.count_rows()  # the newest last (appended as batches complete): read from the end
        start = max(0, total - offset - limit)
        rows = table.search().offset(start).limit(max(0, total - offset - start)).to_list()
        return rows[::-1]
