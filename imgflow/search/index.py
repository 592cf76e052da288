"""``SearchIndex``: the LanceDB database that follows a sink output, as the commands open it.

Its parts: ``schema.py`` (the tables' columns), ``store.py`` (the folder, its tables and
lookups), ``sync.py`` (taking in the sink's new batches), ``ann.py`` (the approximate
vector index). The long story: docs/search.md.
"""

from __future__ import annotations

from pathlib import Path

from imgflow.search.store import IndexStore
from imgflow.search.sync import IndexSync, OnProgress, SyncSummary
from imgflow.settings import Settings


class SearchIndex(IndexStore):
    """The store's lookups, and ``sync`` / ``rebuild`` to bring it up to date."""

    def __init__(self, out, settings: Settings, index_dir: Path | None = None) -> None:
        super().__init__(out, settings, index_dir)
        self._sync = IndexSync(self)

    def sync(self, progress: OnProgress | None = None) -> SyncSummary:
        """Take in the batches the sink completed since the last sync."""
        return self._sync.sync(progress)

    def rebuild(self, progress: OnProgress | None = None) -> SyncSummary:
        """Drop the index and build it again from the output."""
        return self._sync.rebuild(progress)

    def _write_meta(self) -> None:
        self._sync.write_meta()
