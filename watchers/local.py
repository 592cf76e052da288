"""Local-folder watcher: publishes one ImageEvent per new image version.

Polling (works on every file system, network mounts included). A file is published only
once its size and mtime have stayed the same for ``settle_s`` (no half-written files).
A SQLite state file remembers every published event_id, so a restart publishes nothing
twice; it is written after the broker acknowledged the event, so a crash in between
re-publishes at most those events, which the stages drop by event_id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from confluent_kafka import Producer

from imgflow import metrics
from imgflow.events import UNSTATABLE, local_image_event
from imgflow.kafka import producer_config, publish_schemas
from imgflow.settings import Settings
from schemas.codec import get_codec

log = logging.getLogger(__name__)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection):
    """One explicit transaction (the connections are in autocommit mode, where ``with db:``
    alone would commit — and fsync — every row on its own)."""
    db.execute("BEGIN")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class WatcherState:
    """event_ids already published, in ``<data_dir>/watcher-state.sqlite``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS published (event_id TEXT PRIMARY KEY, uri TEXT, at REAL)")

    def has(self, event_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM published WHERE event_id=?", (event_id,)).fetchone() is not None

    def add_many(self, events: list[dict]) -> None:
        with transaction(self.db):
            self.db.executemany("INSERT OR IGNORE INTO published VALUES (?, ?, ?)", [(e["event_id"], e["uri"], time.time()) for e in events])

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM published").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def scan_images(root: Path, extensions: list[str]) -> Iterator[tuple[Path, os.stat_result | None]]:
    """Every file below ``root`` with an image extension (hidden entries skipped), with its
    stat — or None when it cannot be stat'ed (a dangling symlink, a symlink loop, no
    permission): such a file still gets its event, and so its error row, never a silent skip.
    Files that are not regular (a FIFO named x.jpg) are yielded too; the vision stage refuses
    them with a reason."""
    exts = {e.lower() for e in extensions}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=_unreadable_folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in exts:
                continue
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except FileNotFoundError:
                if not os.path.lexists(path):
                    continue  # vanished between listing and stat
                st = None  # a dangling symlink
            except OSError:
                st = None
            yield path, st


def _unreadable_folder(exc: OSError) -> None:
    # Files in a folder that cannot be listed cannot be named, so they cannot have rows:
    # say so instead of skipping it silently.
    log.error("cannot list folder %s: %s (its images are not seen)", exc.filename, exc.strerror)


def current_event_ids(root: Path, settings: Settings) -> set[str]:
    """The event_ids of the images under ``root`` now (what `run --once` waits for)."""
    return {local_image_event(p, st, source="local", run_id=settings.run_id)["event_id"] for p, st in scan_images(root, settings.watch.extensions)}


class LocalWatcher:
    def __init__(self, root: Path, settings: Settings, state_path: Path | None = None, priority: str = "NORMAL") -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"watch folder does not exist or is not a folder: {root}")
        self.settings = settings
        self.priority = priority
        self.topic = settings.topics.new_high if priority == "HIGH" else settings.topics.new
        self.state = WatcherState(state_path or settings.data_dir / "watcher-state.sqlite")
        self.codec = get_codec()
        self.producer = Producer(producer_config(settings))
        self.pending: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, first seen unchanged)
        self.stopping = False

    def request_stop(self, *_) -> None:
        self.stopping = True

    def poll_once(self) -> int:
        """One scan; publishes the files that are new and settled. Returns how many."""
        now = time.monotonic()
        ready: list[tuple[Path, dict]] = []
        seen: set[Path] = set()
        for path, st in scan_images(self.root, self.settings.watch.extensions):
            seen.add(path)
            event = local_image_event(path, st, source="local", run_id=self.settings.run_id, priority=self.priority)
            if self.state.has(event["event_id"]):
                continue
            sig = (st.st_size, st.st_mtime_ns) if st is not None else (-1, -1)
            prev = self.pending.get(path)
            if prev is None or prev[:2] != sig:
                self.pending[path] = (*sig, now)
                # A file untouched for settle_s already (e.g. present at start) is ready now;
                # one that cannot be stat'ed must stay so for settle_s (it may be appearing).
                if st is None or time.time() - st.st_mtime < self.settings.watch.settle_s:
                    continue
            elif now - prev[2] < self.settings.watch.settle_s:
                continue
            ready.append((path, event))
        for gone in set(self.pending) - seen:
            del self.pending[gone]
        if ready:
            metrics.WATCHER_SEEN.labels("local").inc(len(ready))
            self._publish([event for _, event in ready])
            for path, _ in ready:
                self.pending.pop(path, None)
        return len(ready)

    def _publish(self, events: list[dict]) -> None:
        for event in events:
            self.producer.produce(self.topic, key=event["event_id"], value=self.codec.encode("ImageEvent", event))
            self.producer.poll(0)
        remaining = self.producer.flush(60)
        if remaining:
            raise RuntimeError(f"broker did not acknowledge {remaining} events; they will be retried")
        # Only acknowledged events are remembered as published.
        self.state.add_many(events)
        for event in events:
            log.info(
                "published %s%s",
                event["image_path"],
                " (cannot be stat'ed: it will be an error row)" if event["version"] == UNSTATABLE else "",
                extra={"event_id": event["event_id"], "stage": "watcher"},
            )
        metrics.WATCHER_PUBLISHED.labels("local").inc(len(events))

    def run(self) -> None:
        publish_schemas(self.settings, self.codec, ["ImageEvent"])
        metrics.init_watcher("local")
        log.info("watching %s (every %.1fs, %d published before)", self.root, self.settings.watch.poll_interval_s, self.state.count())
        while not self.stopping:
            try:
                self.poll_once()
            except RuntimeError as exc:
                metrics.WATCHER_ERRORS.labels("local").inc()
                log.warning("%s", exc)
            deadline = time.monotonic() + self.settings.watch.poll_interval_s
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.1)
        self.producer.flush(30)
        self.state.close()
