"""The S3 watcher: tail and full listing passes, notifications, the loop; see ``watchers/s3.py``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

from confluent_kafka import Producer

from imgflow import metrics
from imgflow.events import s3_image_event
from imgflow.kafka import producer_config, publish_schemas
from imgflow.s3 import S3Error, S3Location, check_location, explain, s3_client
from imgflow.settings import Settings
from schemas.codec import get_codec
from watchers.s3 import S3Object, S3WatcherState, is_image_key, iter_objects
from watchers.s3_notify import BucketNotifications

log = logging.getLogger("watchers.s3")  # one logger for the S3 watcher's modules


class S3EventPublisher:
    """Publishes an ImageEvent for each object whose ETag differs from the one published
    before, and records it in the state once the broker acknowledged it."""

    def __init__(self, settings: Settings, bucket: str, priority: str, state: S3WatcherState) -> None:
        self.settings, self.bucket, self.priority, self.state = settings, bucket, priority, state
        self.topic = settings.topics.new_high if priority == "HIGH" else settings.topics.new
        self.codec = get_codec()
        self.producer = Producer(producer_config(settings))

    def publish(self, objects: list[S3Object], via: str = "s3") -> int:
        """``via``: the metrics label, "s3" for polling, "notification"."""
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


class S3Watcher:
    """Watches ``s3://BUCKET/PREFIX``: tail and full listing passes, and the bucket's
    notifications where ``watch.s3_notify`` is set, all publishing through one publisher."""

    def __init__(self, location: S3Location, settings: Settings, state_path: Path | None = None, priority: str = "NORMAL", client=None) -> None:
        self.location = location
        self.bucket, self.prefix = location.bucket, location.key
        self.settings = settings
        self.client = client or s3_client(settings)
        self.state = S3WatcherState(state_path or settings.data_dir / "s3-watcher.sqlite")
        self.publisher = S3EventPublisher(settings, self.bucket, priority, self.state)
        self.stopping = False
        self.notifications: BucketNotifications | None = None
        self._next_full = 0.0
        self._failures = 0
        self._last_error = ""

    def request_stop(self, *_) -> None:
        self.stopping = True

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
            published += self.publisher.publish(page)
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
            published += self.publisher.publish(page)
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
        self.notifications = BucketNotifications(self.settings, self.bucket, self.prefix)

    def handle_notifications(self, timeout: float) -> int:
        """Publishes the objects the notifications that arrived within ``timeout`` name."""
        assert self.notifications is not None
        return self.notifications.handle(timeout, self._publish_keys)

    def _publish_keys(self, keys: list[str]) -> int:
        objects = [obj for obj in map(self._head, keys) if obj is not None]
        return self.publisher.publish(objects, via="notification") if objects else 0

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
        publish_schemas(self.settings, self.publisher.codec, ["ImageEvent"])
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
            self.publisher.producer.flush(30)
            self.state.close()
