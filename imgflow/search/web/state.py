"""``WebState``: what the app serves from — the requests' index and searcher, the sync
thread that follows the output, the query models, the images.

The thread syncs its own ``SearchIndex`` every ``search.sync_interval_s`` and, when the index
changed (this sync or another process's), the requests' index is reloaded under the one lock
that requests hold.
"""

from __future__ import annotations

import logging
import re
import threading
import time

from imgflow.search import SearchError
from imgflow.search.index import SearchIndex
from imgflow.search.query import Searcher
from imgflow.search.web.images import ServedImages

log = logging.getLogger(__name__)

# event_ids are hex digests (imgflow.events.event_id_for: 32 characters); anything else
# in /thumb/ or /image/ is refused before any lookup.
EVENT_ID = re.compile(r"[0-9a-f]{16,64}")


class WebState:
    def __init__(self, out: str, settings) -> None:
        self.out = out
        self.settings = settings
        self.index = SearchIndex(out, settings)  # the requests' view, reloaded after syncs
        self._syncer = SearchIndex(out, settings)  # the sync thread's own
        self.searcher = Searcher(self.index, settings)
        self.lock = threading.RLock()  # requests vs. reload
        self.model_lock = threading.Lock()  # the query models load once
        self.images = ServedImages(settings, self.index.dir / "thumbs")
        self.sync_error: str | None = None
        self.synced_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warming = False

    # -- following the output
    def sync(self) -> None:
        """One sync; the requests see its result (and any other process's) from now on."""
        self._syncer.sync()
        self.synced_at = time.time()
        self.sync_error = None
        if self._syncer.meta != self.index.meta:
            with self.lock:
                self.index.reload()
        if self._thread is not None:
            self._warm_if_needed()

    def _follow(self) -> None:
        while not self._stop.wait(self.settings.search.sync_interval_s):
            try:
                self.sync()
            except SearchError as exc:
                self.sync_error = str(exc)
                log.warning("search index: %s (trying again in %.0f s)", exc, self.settings.search.sync_interval_s)
            except Exception as exc:  # noqa: BLE001 - logged, never fatal: the page serves what it has
                self.sync_error = f"{type(exc).__name__}: {exc}"
                log.exception("search index: sync failed (trying again in %.0f s)", self.settings.search.sync_interval_s)

    def start(self) -> None:
        self._warm_if_needed()
        self._thread = threading.Thread(target=self._follow, name="index-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # -- the query models
    def _warm_if_needed(self) -> None:
        """Once there is something to search (an empty output loads no model until it fills)."""
        if not self._warming and self.index.spaces:
            self._warming = True
            threading.Thread(target=self.warm_up, name="warm-up", daemon=True).start()

    def warm_up(self) -> None:
        """Load the query models now, so the first search does not wait for them."""
        try:
            self.models()
        except Exception as exc:  # noqa: BLE001 - a search will say it again, with the reason
            log.warning("could not load the query models: %s", exc)

    def models(self) -> None:
        """The query models, loaded once; a model that cannot load is a SearchError (a page
        that says why, not a 500)."""
        with self.model_lock:
            try:
                self.searcher.text_model  # noqa: B018 - loads it
                self.searcher.image_model  # noqa: B018
            except Exception as exc:  # noqa: BLE001 - ModelError, a missing file...: said on the page
                raise SearchError(f"the query models could not be loaded: {exc} (imgflow models)") from None

    def model_error(self, q: str | None) -> SearchError | None:
        """The query models loaded for a text query; what went wrong if they cannot be."""
        if not (q or "").strip():
            return None
        try:
            self.models()
        except SearchError as exc:
            return exc
        return None

    # -- lookups for the routes
    def default_run(self, runs: list[str]) -> str:
        """The configured run, or else the one with the most images."""
        if self.settings.run_id in runs or not runs:
            return self.settings.run_id
        return max(runs, key=lambda r: (self.index.count(r), r))

    def source_uri(self, event_id: str) -> str | None:
        """The source URI of an indexed row (image or error row), None if there is none."""
        if not EVENT_ID.fullmatch(event_id):
            return None
        with self.lock:
            found = self.index.find(event_id)
            if found is not None:
                return found[1]["source_uri"] if found[1]["event_id"] == event_id else None
            row = self.index.find_failed(event_id, ["source_uri"])
        return row["source_uri"] if row is not None else None
