"""`imgflow replay`: re-run a stage, and the stages after it, over a range of its input
topic as a run of its own.

A run never touches the live pipeline:
* its stages consume in their own groups (``imgflow-<stage>.<run_id>``, so transactional
  ids ``imgflow-<stage>.<run_id>.<topic>.<partition>`` too): live offsets never move;
* what they write goes to run topics (``<topic>.run.<run_id>``) and the sink writes to the
  run's own output (default ``<live out>/runs/<run_id>/``): the live stages and the live
  CSV never see a replayed record;
* the run's id is stamped on every event it reads, and every dedupe keys on
  (event_id, run_id): replayed records are never dropped as already handled by the live
  run, and redelivered records of the replay itself are.

The range is resolved to offsets once, when the run is created, and kept with the run in
the registry topic ``imgflow.runs`` (compacted, key = run id), so re-running the same
command after a crash resumes the same run over the same offsets: the stages continue
from their groups' committed offsets and the sink's output drops what it already has.

Range ends are found the standard way, checked against the records themselves:
``offsets_for_times`` and the high watermark are only hints (the embedded broker answers 0
and a wrong end, ENVIRONMENT.md), verified by reading record timestamps and consuming to
PARTITION_EOF. On Apache Kafka the hints are right and the checks read one or two records.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from imgflow.errors import ImgflowError
from imgflow.kafka import consumer_config, ensure_compacted_topic, ensure_topics, producer_config, read_latest_by_key
from imgflow.process import own_session_dying_with_parent
from imgflow.settings import Settings
from imgflow.stage import CrashPoints, RangeBounds
from imgflow.topics import TopicSpec

log = logging.getLogger(__name__)

REGISTRY_TOPIC = "imgflow.runs"
STAGES = ["vision", "enrich", "sink"]
TP = tuple[str, int]


class ReplayError(ImgflowError, RuntimeError):
    """A replay that cannot start: the message says what to change."""


# ---- range points ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One end of a range: an offset (applied to every partition), a time (ms since the
    epoch, compared with record timestamps), or the beginning/end of each partition."""

    kind: str  # "offset" | "time" | "start" | "end"
    value: int = 0

    def __str__(self) -> str:
        if self.kind == "offset":
            return str(self.value)
        if self.kind == "time":
            return datetime.fromtimestamp(self.value / 1000, UTC).isoformat(timespec="milliseconds")
        return self.kind


def parse_point(text: str, what: str) -> Point:
    """``123`` an offset; ``2026-11-29T01:00:00Z`` (ISO 8601, UTC when no zone) or
    ``@1764378000000`` (epoch ms) a time; ``start`` / ``end``."""
    text = text.strip()
    if text in ("start", "end"):
        return Point(text)
    if re.fullmatch(r"\d+", text):
        return Point("offset", int(text))
    if re.fullmatch(r"@\d+", text):
        return Point("time", int(text[1:]))
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(f"{what} {text!r}: expected an offset (123), a time (2026-11-29T01:00:00Z or @<epoch ms>), 'start' or 'end'") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return Point("time", int(when.timestamp() * 1000))


# Readers that look for the end of a partition: the broker answers an empty fetch at the
# end only after fetch.wait.max.ms, so keep that short.
EOF_READER = {"enable.partition.eof": True, "fetch.wait.max.ms": 10}


# ---- finding offsets by reading records ---------------------------------------------------------


class PartitionReader:
    """Reads single records and partition ends with one assign()ed consumer (no group
    offsets are read or written)."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = Consumer(consumer_config(settings, f"imgflow-replay-reader-{uuid.uuid4().hex[:8]}", **EOF_READER))
        self.time_lookups: Counter[str] = Counter()  # how offsets for times were found: broker | scanned

    def close(self) -> None:
        self.consumer.close()

    def partitions(self, topic: str) -> list[int]:
        md = self.consumer.list_topics(topic, timeout=15).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            raise ReplayError(f"topic {topic!r} does not exist (is IMGFLOW_KAFKA__BOOTSTRAP the right broker?)")
        return sorted(md.partitions)

    def _first_from(self, tp: TP, offset: int, timeout: float = 15):
        """The first record at or after ``offset``, or None at the end of the partition."""
        self.consumer.assign([TopicPartition(tp[0], tp[1], offset)])
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msg = self.consumer.poll(0.5)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        return None
                    raise KafkaException(msg.error())
                return msg
            raise ReplayError(f"{tp[0]}[{tp[1]}]: no answer from the broker in {timeout:.0f}s")
        finally:
            self.consumer.unassign()

    def bounds(self, tp: TP) -> tuple[int, int]:
        """(first offset, end offset) of a partition. The watermarks are hints; the end is
        where consuming from the hinted end reaches PARTITION_EOF."""
        low, high = self.consumer.get_watermark_offsets(TopicPartition(*tp), timeout=15)
        low = max(low, 0)
        first = self._first_from(tp, low)
        if first is None:
            return low, self._end_from(tp, low)
        start = first.offset()
        return start, self._end_from(tp, max(start, high - 1))

    def _end_from(self, tp: TP, offset: int, timeout: float = 60) -> int:
        self.consumer.assign([TopicPartition(tp[0], tp[1], offset)])
        end, deadline = offset, time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msgs = self.consumer.consume(10_000, 0.05)
                for msg in msgs:
                    if msg.error():
                        if msg.error().code() == KafkaError._PARTITION_EOF:
                            return max(end, msg.offset())
                        raise KafkaException(msg.error())
                    end = msg.offset() + 1
            raise ReplayError(f"{tp[0]}[{tp[1]}]: did not reach the end of the partition in {timeout:.0f}s")
        finally:
            self.consumer.unassign()

    def offset_for_time(self, tp: TP, ts_ms: int, first: int, end: int) -> int:
        """The first offset whose record timestamp is >= ``ts_ms`` (``end`` if none): the
        meaning of Kafka's offsets_for_times, taken as a hint and checked; when the check
        fails (a broker that cannot look up by time), found by scanning timestamps."""
        hint = self.consumer.offsets_for_times([TopicPartition(tp[0], tp[1], ts_ms)], timeout=15)[0].offset
        if hint < 0:
            hint = end  # Kafka: no record at or after the time
        if first <= hint <= end and self._hint_holds(tp, ts_ms, hint, first, end):
            # Apache Kafka: always this path (its time index); the check read one or two records.
            self.time_lookups["broker"] += 1
            log.info("%s[%d]: offset %d for time %d, from the broker's offsets_for_times", *tp, hint, ts_ms)
            return hint
        # tansu answers 0 for every time: the partition's timestamps are scanned instead.
        self.time_lookups["scanned"] += 1
        log.info("%s[%d]: the broker's offset for time %d (%d) is wrong: scanning timestamps", *tp, ts_ms, hint)
        return self._scan_for_time(tp, ts_ms, first, end)

    def _hint_holds(self, tp: TP, ts_ms: int, hint: int, first: int, end: int) -> bool:
        if hint < end:
            at = self._first_from(tp, hint)
            if at is None or at.timestamp()[1] < ts_ms:
                return False
        if hint > first:
            before = self._first_from(tp, hint - 1)
            # The record just before must be older (it may be a transaction marker: then
            # the next record read is at or past the hint and proves nothing either way).
            if before is not None and before.offset() < hint and before.timestamp()[1] >= ts_ms:
                return False
        return True

    def _scan_for_time(self, tp: TP, ts_ms: int, first: int, end: int, timeout: float = 300) -> int:
        self.consumer.assign([TopicPartition(tp[0], tp[1], first)])
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for msg in self.consumer.consume(10_000, 0.05):
                    if msg.error():
                        if msg.error().code() == KafkaError._PARTITION_EOF:
                            return end
                        raise KafkaException(msg.error())
                    if msg.offset() >= end:
                        return end
                    if msg.timestamp()[1] >= ts_ms:
                        return msg.offset()
            raise ReplayError(f"{tp[0]}[{tp[1]}]: timestamp scan did not finish in {timeout:.0f}s")
        finally:
            self.consumer.unassign()

    def resolve(self, tp: TP, start: Point, stop: Point) -> tuple[int, int]:
        """[start, end) offsets of ``tp`` for a range, clamped to what the partition holds
        now: a replay covers records that exist when it starts."""
        first, end = self.bounds(tp)

        def at(point: Point) -> int:
            if point.kind == "start":
                return first
            if point.kind == "end":
                return end
            if point.kind == "offset":
                return min(max(point.value, first), end)
            return self.offset_for_time(tp, point.value, first, end)

        lo, hi = at(start), at(stop)
        return lo, max(lo, hi)


# ---- the run registry -------------------------------------------------------------------------


@dataclass
class RunRecord:
    run_id: str
    stage: str  # the first stage replayed
    range_from: str
    range_to: str
    out: str
    created_at: str
    ranges: dict[str, list[int]]  # "topic:partition" -> [start, end) of the first stage's input
    status: str = "running"  # running | done
    finished_at: str = ""
    results: int = -1
    errors: int = -1

    def bounds(self) -> RangeBounds:
        parsed = {(k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1])): v for k, v in self.ranges.items()}
        return RangeBounds(start={tp: v[0] for tp, v in parsed.items()}, end={tp: v[1] for tp, v in parsed.items()})

    def records_in_range(self) -> int:
        return sum(end - start for start, end in self.ranges.values())


class RunRegistry:
    """Past and running replays in the compacted topic ``imgflow.runs`` (key: run id, value:
    the latest RunRecord as JSON): durable wherever the broker is."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def ensure(self) -> None:
        ensure_compacted_topic(self.settings, REGISTRY_TOPIC)

    def all(self) -> dict[str, RunRecord]:
        runs: dict[str, RunRecord] = {}
        for run_id, value in read_latest_by_key(self.settings, REGISTRY_TOPIC).items():
            try:
                runs[run_id] = RunRecord(**json.loads(value))
            except (TypeError, ValueError) as exc:
                log.warning("%s: unreadable record of run %s skipped: %s", REGISTRY_TOPIC, run_id, exc)
        return runs

    def get(self, run_id: str) -> RunRecord | None:
        return self.all().get(run_id)

    def save(self, record: RunRecord) -> None:
        producer = Producer(producer_config(self.settings))
        producer.produce(REGISTRY_TOPIC, key=record.run_id, value=json.dumps(asdict(record)))
        if producer.flush(30):
            raise ReplayError(f"could not write run {record.run_id} to {REGISTRY_TOPIC}")


# ---- what each stage of a run reads and writes ------------------------------------------------


def run_topic(topic: str, run_id: str) -> str:
    return f"{topic}.run.{run_id}"


def stages_from(stage: str) -> list[str]:
    return STAGES[STAGES.index(stage) :]


def input_topics(settings: Settings, stage: str) -> list[str]:
    t = settings.topics
    return {"vision": [t.new_high, t.new], "enrich": [t.vision], "sink": [t.enriched, t.dlq]}[stage]


def run_settings(settings: Settings, record: RunRecord) -> Settings:
    """The settings the run's stages use: the outputs of the replayed stage and of those
    after it become run topics; the replayed stage's own input stays the live topic."""
    t = settings.topics
    topics = {}
    if record.stage == "vision":
        topics["vision"] = run_topic(t.vision, record.run_id)
    if record.stage in ("vision", "enrich"):
        topics["enriched"] = run_topic(t.enriched, record.run_id)
        topics["dlq"] = run_topic(t.dlq, record.run_id)
    out = record.out
    return settings.model_copy(
        update={
            "run_id": record.run_id,
            "topics": t.model_copy(update=topics),
            "sink": settings.sink.model_copy(update={"out_dir": out if out.startswith("s3://") else Path(out)}),
        }
    )


def run_topic_specs(settings: Settings, record: RunRecord) -> list[TopicSpec]:
    scoped, live = run_settings(settings, record).topics, settings.topics
    pairs = [("vision", "VisionResult"), ("enriched", "EnrichedRecord"), ("dlq", "DeadLetter")]
    return [
        TopicSpec(getattr(scoped, name), live.partitions, schema, image_topic=True) for name, schema in pairs if getattr(scoped, name) != getattr(live, name)
    ]


@dataclass
class StagePlan:
    """How one stage process of a run is configured."""

    settings: Settings
    group_id: str
    bounds: RangeBounds
    run_id: str


_held_locks: list = []


def _hold_stage_lock(path: Path, timeout: float = 300) -> None:
    """One process per stage of a run, for the life of this process: a replay killed and
    started again must not overlap the old stage process, which finishes its batch after
    its parent died (two members rebalancing one replay group gains nothing, and the
    embedded broker can leave the newcomer unassigned)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "w")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _held_locks.append(lock)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ReplayError(f"another process still runs this stage of the run ({path})") from None
            log.info("waiting for the previous process of this stage to finish (%s)", path)
            time.sleep(0.5)


def group_for(settings: Settings, stage: str, run_id: str) -> str:
    return f"{settings.kafka.group_prefix}-{stage}.{run_id}"


def stage_plan(settings: Settings, stage: str, run_id: str) -> StagePlan:
    """For `imgflow stage NAME --run RUN_ID`. The first stage reads the recorded range of
    the live input; a later stage reads its run topics from the beginning to their end now
    (the run starts a stage only when the one before it has finished its range)."""
    record = RunRegistry(settings).get(run_id)
    if record is None:
        raise ReplayError(f"no run {run_id!r} in {REGISTRY_TOPIC} (see `imgflow replay --list`)")
    if stage not in stages_from(record.stage):
        raise ReplayError(f"run {run_id} replays from {record.stage}: it has no {stage} stage")
    _hold_stage_lock(settings.data_dir / "replay" / f"{run_id}.{stage}.lock")
    scoped = run_settings(settings, record)
    if stage == record.stage:
        bounds = record.bounds()
    else:
        reader = PartitionReader(scoped)
        try:
            spans = {(t, p): reader.bounds((t, p)) for t in input_topics(scoped, stage) for p in reader.partitions(t)}
        finally:
            reader.close()
        bounds = RangeBounds(start={tp: s for tp, (s, _) in spans.items()}, end={tp: e for tp, (_, e) in spans.items()})
    return StagePlan(scoped, group_for(settings, stage, run_id), bounds, run_id)


# ---- the command ---------------------------------------------------------------------------------


def new_run_id(stage: str) -> str:
    return f"{stage}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:4]}"


RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def default_out(settings: Settings, run_id: str) -> str:
    live = str(settings.sink.out_dir)
    if live.startswith("s3://"):
        return live.rstrip("/") + f"/runs/{run_id}/"
    return str(Path(live).resolve() / "runs" / run_id)


def prepare_run(settings: Settings, stage: str, start: Point, stop: Point, run_id: str | None, out: str | None) -> tuple[RunRecord, bool]:
    """The run to work on: the one named, or an unfinished one of the same command (so a
    plain re-run after a crash resumes it), or a new one with its range resolved now.
    Returns (record, resumed)."""
    registry = RunRegistry(settings)
    registry.ensure()
    runs = registry.all()
    if run_id is not None and not RUN_ID_PATTERN.fullmatch(run_id):
        raise ReplayError(f"--run-id {run_id!r}: use letters, digits, '.', '_' or '-' (it names topics and groups)")
    if out is not None and not out.startswith("s3://"):
        out = str(Path(out).resolve())
    same = [
        r
        for r in runs.values()
        if r.stage == stage and r.range_from == str(start) and r.range_to == str(stop) and r.status != "done" and (out is None or r.out == out)
    ]
    existing = runs.get(run_id) if run_id else (same[-1] if same else None)
    if existing is not None:
        if (existing.stage, existing.range_from, existing.range_to) != (stage, str(start), str(stop)):
            raise ReplayError(
                f"run {existing.run_id} exists with another range ({existing.stage} {existing.range_from}..{existing.range_to}); pick another --run-id"
            )
        return existing, True
    run_id = run_id or new_run_id(stage)
    reader = PartitionReader(settings)
    try:
        ranges = {f"{t}:{p}": list(reader.resolve((t, p), start, stop)) for t in input_topics(settings, stage) for p in reader.partitions(t)}
    finally:
        reader.close()
    record = RunRecord(
        run_id=run_id,
        stage=stage,
        range_from=str(start),
        range_to=str(stop),
        out=out or default_out(settings, run_id),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        ranges=ranges,
    )
    ensure_topics(settings, run_topic_specs(settings, record))
    registry.save(record)
    return record, False


def count_results(settings: Settings, out: str) -> tuple[int, int]:
    """(rows, error rows) the run's sink has committed."""
    from imgflow.output.reader import ResultReader

    results = ResultReader(out if out.startswith("s3://") else Path(out), settings)
    results.refresh()
    return results.rows, results.errors


def run_stage_process(stage: str, run_id: str, log_path: Path, stopping, max_failures: int = 8) -> int:
    """`imgflow stage STAGE --run RUN_ID` until it exits 0 (its range is done), restarted
    when it dies (a crashed stage resumes from its committed offsets)."""
    failures = 0
    argv = [sys.executable, "-m", "imgflow.cli", "stage", stage, "--run", run_id]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    while not stopping():
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=own_session_dying_with_parent)
        while proc.poll() is None:
            if stopping():
                proc.terminate()
            time.sleep(0.2)
        if proc.returncode == 0:
            return 0
        if stopping():
            return proc.returncode
        failures += 1
        if failures >= max_failures:
            return proc.returncode
        log.warning("%s of run %s exited with %s: restarting it (log: %s)", stage, run_id, proc.returncode, log_path)
        time.sleep(min(10, 0.5 * 2**failures))
    return 1


def list_runs(settings: Settings) -> list[RunRecord]:
    registry = RunRegistry(settings)
    registry.ensure()
    return sorted(registry.all().values(), key=lambda r: r.created_at)


def execute(settings: Settings, record: RunRecord, logs_dir: Path, stopping, say=print) -> int:
    """Run the run's stages one after the other, each over its whole range, then record
    the number of results. Safe to interrupt at any point and run again."""
    if record.status == "done":
        say(f"run {record.run_id} is already complete: {record.results} results in {record.out}")
        return 0
    say(f"run {record.run_id}: {record.stage} over {record.range_from}..{record.range_to} ({record.records_in_range()} records) -> {record.out}")
    started = time.monotonic()
    crash = CrashPoints("replay")
    for stage in stages_from(record.stage):
        t0 = time.monotonic()
        say(f"  {stage}: running (log: {logs_dir / f'{record.run_id}-{stage}.log'})")
        code = run_stage_process(stage, record.run_id, logs_dir / f"{record.run_id}-{stage}.log", stopping)
        if code != 0:
            say(f"  {stage}: stopped (exit {code}); run the same command again to resume")
            return code or 1
        say(f"  {stage}: done in {time.monotonic() - t0:.1f}s")
        crash.reach("after_stage")
    record.results, record.errors = count_results(settings, record.out)
    record.status = "done"
    record.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    RunRegistry(settings).save(record)
    say(f"run {record.run_id} complete: {record.results} results ({record.errors} with errors) in {time.monotonic() - started:.1f}s -> {record.out}")
    return 0
