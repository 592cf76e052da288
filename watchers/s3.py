"""S3 watcher: publishes one ImageEvent per new object version under ``s3://BUCKET/PREFIX``.

Polling works on every S3-compatible store. Listing goes page by page (``list_objects_v2``,
``StartAfter``), so memory stays bounded whatever the bucket holds; what has been published
lives on disk, in SQLite (``<data_dir>/s3-watcher.sqlite``): per object key the ETag last
published, and per watched prefix the listing cursor.

* A *tail pass* lists only keys after the highest key seen so far (cheap; catches names that
  grow, e.g. timestamped uploads).
* A *full pass* lists the whole prefix every ``watch.s3_full_scan_s`` and compares ETags: it
  catches keys that sort before the cursor and overwritten objects (a new ETag is a new
  image). Its position is persisted, so a restart resumes it instead of starting over.
* Notifications (``watch.s3_notify``): a bucket's object-created notifications on a Kafka
  topic — SeaweedFS filer protobuf messages or MinIO/AWS-style JSON records — are treated as
  "look at this key now": the object is HEADed and published exactly as a poll would, so
  polling stays the fallback for whatever a notification missed, and both share the state
  (no double events).

Objects still being uploaded are not listed (a multipart upload is invisible until it
completes); a zero-byte object is published like any other and becomes an error row in the
vision stage ("empty file"). State is written after the broker acknowledged the events, so a
crash in between re-publishes at most those, which the stages drop by event_id.

Here: listing and the state; the watcher is ``watchers/s3_watcher.py``, notifications
``watchers/s3_notify.py``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imgflow.events import s3_image_event
from imgflow.s3 import S3Location, explain, s3_client
from imgflow.settings import Settings
from watchers.local import transaction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Object:
    key: str
    etag: str  # without quotes
    size: int
    version: str | None = None  # version id, where the listing has one


def iter_objects(client, bucket: str, prefix: str = "", start_after: str | None = None, page_size: int = 1000) -> Iterator[S3Object]:
    """Every object under ``prefix`` in key order, after ``start_after``, one listing page at
    a time (only one page is ever held). boto3 errors propagate; wrap them with ``explain``."""
    kwargs: dict = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
    if start_after:
        kwargs["StartAfter"] = start_after
    while True:
        page = client.list_objects_v2(**kwargs)
        for obj in page.get("Contents", []):
            yield S3Object(obj["Key"], str(obj.get("ETag", "")).strip('"'), int(obj.get("Size", 0)), obj.get("VersionId"))
        if not page.get("IsTruncated"):
            return
        if page.get("NextContinuationToken"):
            kwargs.pop("StartAfter", None)
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
        else:  # stores that truncate without a token: continue after the last key
            kwargs["StartAfter"] = page["Contents"][-1]["Key"]


def is_image_key(key: str, extensions: list[str]) -> bool:
    """Objects whose name says they are images (folder markers and hidden names excluded)."""
    name = key.rsplit("/", 1)[-1]
    if not name or name.startswith("."):
        return False
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in {e.lower() for e in extensions}


class S3WatcherState:
    """What has been published, on disk: ``objects`` (bucket, key) -> ETag, and ``cursors``
    per watched location (highest key seen; position and start time of the full pass)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS objects (bucket TEXT, key TEXT, etag TEXT, event_id TEXT, at REAL, PRIMARY KEY (bucket, key))")
        self.db.execute("CREATE TABLE IF NOT EXISTS cursors (location TEXT PRIMARY KEY, high_key TEXT, full_after TEXT, full_started REAL)")

    def published_etags(self, bucket: str, keys: list[str]) -> dict[str, str]:
        """The ETags last published for ``keys`` (one listing page at a time)."""
        out: dict[str, str] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows = self.db.execute(f"SELECT key, etag FROM objects WHERE bucket=? AND key IN ({','.join('?' * len(chunk))})", (bucket, *chunk))
            out.update(rows.fetchall())
        return out

    def record(self, bucket: str, events: list[tuple[str, str, str]]) -> None:
        """(key, etag, event_id) published and acknowledged."""
        with transaction(self.db):
            self.db.executemany("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?)", [(bucket, k, e, i, time.time()) for k, e, i in events])

    def cursor(self, location: str) -> tuple[str, str | None, float]:
        row = self.db.execute("SELECT high_key, full_after, full_started FROM cursors WHERE location=?", (location,)).fetchone()
        return (row[0] or "", row[1], row[2] or 0.0) if row else ("", None, 0.0)

    def set_cursor(self, location: str, high_key: str, full_after: str | None, full_started: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?, ?, ?)", (location, high_key, full_after, full_started))

    def count(self, bucket: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM objects WHERE bucket=?", (bucket,)).fetchone()[0]

    def close(self) -> None:
        self.db.close()


def current_event_ids(location: S3Location, settings: Settings, client=None) -> set[str]:
    """The event_ids of the images under ``location`` now (what `run --once` waits for)."""
    client = client or s3_client(settings)
    try:
        return {
            s3_image_event(location.bucket, o.key, o.etag, o.size, source="s3", run_id=settings.run_id)["event_id"]
            for o in iter_objects(client, location.bucket, location.key)
            if is_image_key(o.key, settings.watch.extensions)
        }
    except Exception as exc:  # noqa: BLE001 - reported with the setting to fix
        raise explain(exc, location.uri) from None
