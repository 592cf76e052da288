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
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_plus

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from imgflow import metrics
from imgflow.events import s3_image_event
from imgflow.kafka import consumer_config, ensure_topics, producer_config, publish_schemas
from imgflow.s3 import S3Error, S3Location, check_location, explain, s3_client
from imgflow.settings import Settings
from imgflow.topics import TopicSpec
from schemas.codec import get_codec
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


# ---------------------------------------------------------------------------------------------
# notifications


def parse_notification(value: bytes, fmt: str) -> list[tuple[str, str]]:
    """(bucket, key) of the objects a notification says were created or overwritten.

    ``minio``: S3-style JSON event records (MinIO's Kafka target, AWS S3 events): keys are
    URL-encoded. ``seaweedfs``: the filer's protobuf ``EventNotification``; the object is
    ``new_parent_path/new_entry.name`` below ``/buckets/<bucket>/``."""
    if fmt == "minio":
        doc = json.loads(value)
        out = []
        for rec in doc.get("Records", []):
            if not str(rec.get("eventName", "")).removeprefix("s3:").startswith("ObjectCreated"):
                continue
            s3 = rec.get("s3", {})
            out.append((s3["bucket"]["name"], unquote_plus(s3["object"]["key"])))
        return out
    if fmt == "seaweedfs":
        from watchers.seaweedfs_events import created_path

        path = created_path(value)
        if path is None or not path.startswith("/buckets/"):
            return []
        bucket, _, key = path[len("/buckets/") :].partition("/")
        return [(bucket, key)] if key else []
    raise ValueError(f"unknown notification format {fmt!r} (watch.s3_notify: seaweedfs | minio)")


# ---------------------------------------------------------------------------------------------
# the watcher


class S3Watcher:
    def __init__(self, location: S3Location, settings: Settings, state_path: Path | None = None, priority: str = "NORMAL", client=None) -> None:
        self.location = location
        self.bucket, self.prefix = location.bucket, location.key
        self.settings = settings
        self.priority = priority
        self.topic = settings.topics.new_high if priority == "HIGH" else settings.topics.new
        self.client = client or s3_client(settings)
        self.state = S3WatcherState(state_path or settings.data_dir / "s3-watcher.sqlite")
        self.codec = get_codec()
        self.producer = Producer(producer_config(settings))
        self.stopping = False
        self.notifications: Consumer | None = None
        self._next_full = 0.0
        self._failures = 0
        self._last_error = ""

    def request_stop(self, *_) -> None:
        self.stopping = True

    # -- publishing
    def _publish(self, objects: list[S3Object], via: str = "s3") -> int:
        """Publishes the objects whose ETag differs from the one published before (``via``:
        the metrics label, "s3" for polling, "notification")."""
        # One per key (a batch of notifications may name an object twice).
        objects = list({o.key: o for o in objects if is_image_key(o.key, self.settings.watch.extensions)}.values())
        if not objects:
            return 0
        known = self.state.published_etags(self.bucket, [o.key for o in objects])
        todo = [
            (o, s3_image_event(self.bucket, o.key, o.etag, o.size, source="s3", run_id=self.settings.run_id, priority=self.priority))
            for o in objects
            if known.get(o.key) != o.etag
        ]
        if not todo:
            return 0
        metrics.WATCHER_SEEN.labels(via).inc(len(todo))
        for _, event in todo:
            self.producer.produce(self.topic, key=event["event_id"], value=self.codec.encode("ImageEvent", event))
            self.producer.poll(0)
        remaining = self.producer.flush(60)
        if remaining:
            raise RuntimeError(f"broker did not acknowledge {remaining} events; they will be retried")
        # Only acknowledged events are remembered as published.
        self.state.record(self.bucket, [(o.key, o.etag, e["event_id"]) for o, e in todo])
        for o, event in todo:
            log.info("published %s%s", event["image_path"], " (empty object)" if o.size == 0 else "", extra={"event_id": event["event_id"], "stage": "watcher"})
        metrics.WATCHER_PUBLISHED.labels(via).inc(len(todo))
        return len(todo)

    def _pages(self, start_after: str | None) -> Iterator[list[S3Object]]:
        page: list[S3Object] = []
        for obj in iter_objects(self.client, self.bucket, self.prefix, start_after):
            page.append(obj)
            if len(page) >= 1000:
                yield page
                page = []
        if page:
            yield page

    # -- passes
    def tail_pass(self) -> int:
        """Objects whose keys sort after the highest key seen."""
        high, full_after, full_started = self.state.cursor(self.location.uri)
        published = 0
        for page in self._pages(high or None):
            published += self._publish(page)
            high = max(high, page[-1].key)
            self.state.set_cursor(self.location.uri, high, full_after, full_started)
            if self.stopping:
                break
        return published

    def full_pass(self) -> int:
        """Every object under the prefix, ETags compared; resumable across restarts."""
        high, full_after, full_started = self.state.cursor(self.location.uri)
        if full_after is None:  # a new pass
            full_after, full_started = "", time.time()
            self.state.set_cursor(self.location.uri, high, full_after, full_started)
        published = 0
        for page in self._pages(full_after or None):
            published += self._publish(page)
            full_after = page[-1].key
            high = max(high, full_after)
            self.state.set_cursor(self.location.uri, high, full_after, full_started)
            if self.stopping:
                return published
            if self.notifications is not None:  # a long pass must not hold new objects back
                published += self.handle_notifications(0)
        self.state.set_cursor(self.location.uri, high, None, full_started)
        return published

    def poll_once(self) -> int:
        """A tail pass, plus a full pass when one is due (or unfinished). Returns how many
        events were published."""
        high, full_after, _ = self.state.cursor(self.location.uri)
        published = self.tail_pass()
        if not high and full_after is None and not self.stopping:
            # Nothing seen before: that tail pass listed everything, a full pass just now.
            self._next_full = time.monotonic() + self.settings.watch.s3_full_scan_s
        if full_after is not None or time.monotonic() >= self._next_full:
            published += self.full_pass()
            self._next_full = time.monotonic() + self.settings.watch.s3_full_scan_s
        return published

    # -- notifications
    def open_notifications(self) -> None:
        w = self.settings.watch
        cfg = consumer_config(self.settings, f"imgflow-s3-notify-{self.bucket}")
        if w.s3_notify_bootstrap:
            cfg["bootstrap.servers"] = w.s3_notify_bootstrap
        cfg.update({"enable.auto.commit": False, "auto.offset.reset": "earliest"})
        cfg.pop("isolation.level", None)  # stores publish without transactions
        if not w.s3_notify_bootstrap:
            # On the pipeline's own cluster the topic is made here if missing: a Kafka without
            # auto.create.topics.enable would otherwise refuse the store's first events.
            try:
                ensure_topics(self.settings, [TopicSpec(w.s3_notify_topic, 1, "")])
            except KafkaException as exc:
                log.warning("could not create the notification topic %s (%s): create it, or let the store's Kafka auto-create it", w.s3_notify_topic, exc)
        self.notifications = Consumer(cfg)
        self.notifications.subscribe([w.s3_notify_topic])
        log.info("consuming %s bucket notifications from topic %s", w.s3_notify, w.s3_notify_topic)

    def handle_notifications(self, timeout: float) -> int:
        """Publishes the objects the notifications that arrived within ``timeout`` name."""
        assert self.notifications is not None
        msgs = self.notifications.consume(500, timeout)
        try:
            published = self._handle(msgs)
        except BaseException:
            # S3 or the broker failed mid-batch: rewind, so these notifications are handled
            # again after the back-off instead of being left to the next full pass.
            first: dict[tuple[str, int], int] = {}
            for m in msgs:
                if m.error() is None:
                    first.setdefault((m.topic(), m.partition()), m.offset())
            for (topic, partition), offset in first.items():
                self.notifications.seek(TopicPartition(topic, partition, offset))
            raise
        if any(m.error() is None for m in msgs):
            # Only after the events are acknowledged: a crash re-reads the notifications.
            self.notifications.commit(asynchronous=False)
        return published

    def _handle(self, msgs: list) -> int:
        objects: list[S3Object] = []
        for msg in msgs:
            if msg.error() is not None:
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("notification topic: %s", msg.error())
                continue
            try:
                named = parse_notification(msg.value() or b"", self.settings.watch.s3_notify)
            except Exception as exc:  # noqa: BLE001 - a bad message must not stop the watcher
                log.warning("unreadable notification at %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
                continue
            for bucket, key in named:
                if bucket != self.bucket or not key.startswith(self.prefix):
                    continue
                obj = self._head(key)
                if obj is not None:
                    objects.append(obj)
        return self._publish(objects, via="notification") if objects else 0

    def _head(self, key: str) -> S3Object | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            err = explain(exc, f"s3://{self.bucket}/{key}")
            if err.code == "NoSuchKey":
                return None  # deleted since: nothing to process
            raise err from None
        return S3Object(key, str(head.get("ETag", "")).strip('"'), int(head.get("ContentLength", 0)), head.get("VersionId"))

    # -- loop
    def _failed(self, exc: BaseException) -> float:
        """Logs a failure (a repeated one only at debug level) and returns the back-off."""
        err = exc if isinstance(exc, (S3Error, RuntimeError)) else explain(exc, self.location.uri)
        message = str(err)
        self._failures += 1
        metrics.WATCHER_ERRORS.labels("s3").inc()
        if message != self._last_error:
            log.error("%s (retrying with back-off)", message)
            self._last_error = message
        else:
            log.debug("%s (failure %d)", message, self._failures)
        return min(30.0, self.settings.watch.poll_interval_s * 2 ** min(self._failures, 6))

    def check(self) -> None:
        check_location(self.client, self.location)

    def run(self) -> None:
        metrics.init_watcher("s3")
        if self.settings.watch.s3_notify:
            metrics.init_watcher("notification")
        publish_schemas(self.settings, self.codec, ["ImageEvent"])
        if self.settings.watch.s3_notify:
            self.open_notifications()
        log.info(
            "watching %s (every %.1fs, full pass every %.0fs%s; %d objects published before)",
            self.location.uri,
            self.settings.watch.poll_interval_s,
            self.settings.watch.s3_full_scan_s,
            f", notifications: {self.settings.watch.s3_notify}" if self.notifications else "",
            self.state.count(self.bucket),
        )
        next_poll = 0.0
        try:
            while not self.stopping:
                wait = self.settings.watch.poll_interval_s
                try:
                    if self.notifications is not None:
                        self.handle_notifications(0.2)
                    if time.monotonic() >= next_poll:
                        self.poll_once()
                        next_poll = time.monotonic() + wait
                    if self._failures:
                        log.info("S3 watcher recovered after %d failures", self._failures)
                    self._failures, self._last_error = 0, ""
                except Exception as exc:  # noqa: BLE001 - the watcher must outlive S3 and broker outages
                    wait = self._failed(exc)
                    next_poll = time.monotonic() + wait
                deadline = time.monotonic() + (
                    0.0 if self.notifications is not None and not self._failures else min(wait, max(0.0, next_poll - time.monotonic()))
                )
                while not self.stopping and time.monotonic() < deadline:
                    time.sleep(0.1)
        finally:
            if self.notifications is not None:
                self.notifications.close()
            self.producer.flush(30)
            self.state.close()
