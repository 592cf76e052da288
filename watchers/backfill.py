"""`imgflow backfill`: one ImageEvent per image of a folder or S3 prefix, published in bulk.

* Images are listed in a fixed order (sorted walk of a folder; S3 lists keys in order),
  non-image names skipped, sub-folders included.
* Unless ``--force``, images that already have a result in the output (the sink's result
  index) are skipped; the rest are published in chunks, one Kafka transaction per chunk.
* The job's progress — the last image handled, counts — is written to the compacted topic
  ``imgflow.backfills`` *in the same transaction* as the chunk's events, so the events and
  the record that they were published become visible together or not at all. The same
  command is the same job (its id derives from the source and flags unless ``--run-id``
  names it): run again, it resumes after the last committed chunk, or says it is complete;
  nothing is published twice. A later pass over the same source is a new ``--run-id``.
  (The events are flushed before the progress record: on a broker that shows records of
  aborted transactions, an unfinished chunk's events can be visible but then its record
  is not, so it is published again and the stages drop the repeats by dedupe key.)
* ``--force`` makes the job a run of its own: its events carry the job's id as run_id and
  ``force=true``, so the stages and the sink, which dedupe per (event_id, run_id), process
  them again and the CSV gets new rows with that run_id. Without it, events carry the live
  run_id: an image the watcher also published is one event, processed once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import KafkaException, Producer

from imgflow import metrics
from imgflow.errors import ImgflowError
from imgflow.events import local_image_event, s3_image_event
from imgflow.kafka import producer_config, publish_schemas
from imgflow.progress import ProgressBar, clock
from imgflow.registry_topic import RegistryTopic
from imgflow.s3 import S3Error, explain, is_s3_uri, parse_s3_uri, s3_client
from imgflow.settings import Settings
from imgflow.stage import CrashPoints
from schemas.codec import get_codec
from watchers.local import scan_images
from watchers.s3 import is_image_key, iter_objects

log = logging.getLogger(__name__)

REGISTRY_TOPIC = "imgflow.backfills"


class BackfillError(ImgflowError, RuntimeError):
    """A backfill that cannot run: the message says what to change."""


@dataclass
class BackfillJob:
    job_id: str
    source: str
    force: bool
    high: bool
    run_id: str  # carried by the events: the live run, or the job itself with --force
    cursor: str | None = None  # the last image handled (relative path or key), in listing order
    published: int = 0
    skipped: int = 0
    status: str = "running"  # running | done
    started_at: str = ""
    updated_at: str = ""


@dataclass
class Candidate:
    cursor: str  # position in the listing order
    event: dict


# ---- what a source holds, in a fixed order ----------------------------------------------------


class FolderSource:
    """Images below a folder, in the order of a sorted walk (the files of a folder, then its
    sub-folders): a cursor compares as (folder parts, name)."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = root.resolve()
        if not self.root.is_dir():
            raise BackfillError(f"source folder does not exist: {root}")
        self.extensions = settings.watch.extensions

    @staticmethod
    def _order(rel: str) -> tuple[tuple[str, ...], str]:
        path = Path(rel)
        return path.parent.parts, path.name

    def candidates(self, after: str | None, settings: Settings, run_id: str, priority: str, force: bool) -> Iterator[Candidate]:
        after_key = self._order(after) if after is not None else None
        skip = len(str(self.root)) + 1
        for path, st in scan_images(self.root, self.extensions):
            rel = str(path)[skip:]  # relative to the root (the walk's paths start with it)
            if after_key is not None and self._order(rel) <= after_key:
                continue
            # The root is resolved and the walk follows no folder links: only the file itself
            # can be a link.
            yield Candidate(
                rel, local_image_event(path, st, source="backfill", run_id=run_id, priority=priority, force=force, canonical=not os.path.islink(path))
            )

    def count(self) -> int:
        return sum(1 for _ in scan_images(self.root, self.extensions))


class BucketSource:
    """Image objects under an S3 prefix, in key order (the listing's own order), one
    listing page at a time."""

    def __init__(self, uri: str, settings: Settings) -> None:
        self.location = parse_s3_uri(uri)
        self.client = s3_client(settings)
        self.extensions = settings.watch.extensions

    def _objects(self, after: str | None):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            # A zero-byte image object is published like any other: its row says why it failed.
            for obj in iter_objects(self.client, self.location.bucket, self.location.key, start_after=after):
                if is_image_key(obj.key, self.extensions):
                    yield obj
        except (BotoCoreError, ClientError) as exc:
            raise BackfillError(str(explain(exc, self.location.uri))) from None

    def candidates(self, after: str | None, settings: Settings, run_id: str, priority: str, force: bool) -> Iterator[Candidate]:
        for obj in self._objects(after):
            yield Candidate(
                obj.key, s3_image_event(self.location.bucket, obj.key, obj.etag, obj.size, source="backfill", run_id=run_id, priority=priority, force=force)
            )

    def count(self) -> int:
        return sum(1 for _ in self._objects(None))


def open_source(source: str, settings: Settings):
    return BucketSource(source, settings) if is_s3_uri(source) else FolderSource(Path(source), settings)


# ---- the job registry ---------------------------------------------------------------------------


def job_registry(settings: Settings) -> RegistryTopic[BackfillJob]:
    return RegistryTopic(settings, REGISTRY_TOPIC, BackfillJob, key="job_id", what="backfill", error=BackfillError)


def load_jobs(settings: Settings) -> dict[str, BackfillJob]:
    registry = job_registry(settings)
    registry.ensure()
    return registry.all()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_job_id(source: str, force: bool, high: bool) -> str:
    """The same command is the same job: running it again resumes it, or reports it done."""
    return "bf-" + hashlib.sha256(f"{source}\n{force}\n{high}".encode()).hexdigest()[:10]


def pick_job(settings: Settings, source: str, force: bool, high: bool, job_id: str | None) -> tuple[BackfillJob, bool]:
    """The job of this command (named by --run-id, or derived from the source and flags):
    resumed where it stopped, or new. Returns (job, resumed)."""
    source = source if is_s3_uri(source) else str(Path(source).resolve())
    job_id = job_id or default_job_id(source, force, high)
    job = load_jobs(settings).get(job_id)
    if job is not None:
        if (job.source, job.force, job.high) != (source, force, high):
            raise BackfillError(f"backfill {job_id} exists for {job.source} (force={job.force}, high={job.high}); pick another --run-id")
        return job, True
    return BackfillJob(job_id, source, force, high, run_id=job_id if force else settings.run_id, started_at=_now(), updated_at=_now()), False


# ---- publishing -------------------------------------------------------------------------------


class Backfill:
    def __init__(self, settings: Settings, job: BackfillJob, results_out, *, chunk: int = 5000, skip_batch: int = 50_000) -> None:
        self.settings = settings
        self.job = job
        self.results_out = results_out
        self.chunk = chunk
        self.skip_batch = skip_batch
        self.codec = get_codec()
        self.topic = settings.topics.new_high if job.high else settings.topics.new
        self.stopping = False
        self.crash = CrashPoints("backfill")

    def request_stop(self, *_) -> None:
        self.stopping = True

    def _with_results(self, event_ids: list[str]) -> set[str]:
        if self.job.force or not event_ids:
            return set()
        from imgflow.output.reader import ResultReader

        try:
            return ResultReader(self.results_out, self.settings).existing(event_ids)
        except (S3Error, OSError) as exc:  # S3Error names the setting to fix
            raise BackfillError(f"cannot read the results in {self.results_out} for the skip check: {exc}") from None

    def _batches(self, source) -> Iterator[list[Candidate]]:
        """Candidates in listing order, in skip-check batches (one pass over the result index
        per batch; memory bounded by the batch)."""
        batch: list[Candidate] = []
        priority = "HIGH" if self.job.high else "NORMAL"
        for cand in source.candidates(self.job.cursor, self.settings, self.job.run_id, priority, self.job.force):
            batch.append(cand)
            if len(batch) >= self.skip_batch:
                yield batch
                batch = []
        if batch:
            yield batch

    def plan(self, source) -> Iterator[tuple[list[Candidate], list[Candidate], int]]:
        """(the chunk, its images to publish, how many skipped) per chunk, in listing order."""
        for batch in self._batches(source):
            done = self._with_results([c.event["event_id"] for c in batch])
            for i in range(0, len(batch), self.chunk):
                part = batch[i : i + self.chunk]
                todo = [c for c in part if c.event["event_id"] not in done]
                yield part, todo, len(part) - len(todo)

    def run(self, source, progress, dry_run: bool = False) -> BackfillJob:
        job = self.job
        if job.status == "done":
            return job
        producer: Producer | None = None  # None: a dry run
        if not dry_run:
            publish_schemas(self.settings, self.codec, ["ImageEvent"])
            producer = Producer(producer_config(self.settings, f"imgflow-backfill.{job.job_id}", **{"linger.ms": 20, "batch.num.messages": 10_000}))
            # Fences an earlier process of this job and aborts what it left open.
            producer.init_transactions(60)
            if job.cursor is None and job.published == 0:
                self._save()  # a re-run finds the job (and its run_id) even before a chunk commits
        for part, todo, skipped in self.plan(source):
            if self.stopping:
                break
            if producer is not None:
                self._publish(producer, todo, part[-1].cursor, skipped)
            else:
                job.published += len(todo)
                job.skipped += skipped
                job.cursor = part[-1].cursor
            progress(len(part), job)
        if not self.stopping:
            job.status = "done"
            if not dry_run:
                self._save()
        return job

    def _publish(self, producer: Producer, todo: list[Candidate], cursor: str, skipped: int) -> None:
        job = self.job
        for attempt in range(5):
            try:
                producer.begin_transaction()
                for cand in todo:
                    event = cand.event
                    producer.produce(self.topic, key=event["event_id"], value=self.codec.encode("ImageEvent", event))
                    producer.poll(0)
                producer.flush(60)
                updated = BackfillJob(
                    **{**asdict(job), "cursor": cursor, "published": job.published + len(todo), "skipped": job.skipped + skipped, "updated_at": _now()}
                )
                producer.produce(REGISTRY_TOPIC, key=job.job_id, value=RegistryTopic.value_of(updated))
                producer.commit_transaction(60)
                self.crash.reach("after_commit")
                break
            except KafkaException as exc:
                err = exc.args[0]
                if err.fatal() or attempt == 4:
                    raise
                log.warning("backfill chunk failed (%s): retrying", err)
                if err.txn_requires_abort():
                    producer.abort_transaction(30)
                time.sleep(1 + attempt)
        job.cursor, job.published, job.skipped = cursor, updated.published, updated.skipped
        metrics.WATCHER_PUBLISHED.labels("backfill").inc(len(todo))

    def _save(self) -> None:
        """The job's record outside a chunk (its start, its end)."""
        self.job.updated_at = _now()
        job_registry(self.settings).save(self.job)


class BackfillProgress:
    """The images handled of the total, their rate since this process started, the ETA."""

    def __init__(self, total: int | None, already: int) -> None:
        self.total = total
        self.done = already
        self.counted_from = already
        self.started = time.monotonic()
        self.bar = ProgressBar("backfill", total, completed=already, stream=sys.stderr)

    def __call__(self, n: int, job: BackfillJob) -> None:
        self.done += n
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.counted_from) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate and self.total is not None else 0.0
        info = f"published {job.published}, skipped {job.skipped}"
        total = f"/{self.total}" if self.total is not None else ""
        self.bar.update(
            self.done,
            rate=f"{rate:,.0f}",
            eta=clock(eta),
            info=info,
            line=lambda: f"backfill: {self.done}{total} images, {rate:,.0f} img/s, ETA {eta:.0f}s, {info}",
            now=self.total is not None and self.done >= self.total,
        )

    def close(self) -> None:
        self.bar.close()
