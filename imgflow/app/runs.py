"""The runs of `imgflow replay`: their registry (the compacted topic ``imgflow.runs``, key =
run id), and what each stage of a run reads and writes (docs/backfill-replay-priority.md)."""

from __future__ import annotations

import fcntl
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from imgflow.app.replay_range import PartitionReader, ReplayError
from imgflow.registry_topic import RegistryTopic
from imgflow.settings import Settings
from imgflow.stage import RangeBounds
from imgflow.topics import TopicSpec

log = logging.getLogger(__name__)

REGISTRY_TOPIC = "imgflow.runs"
STAGES = ["vision", "enrich", "sink"]


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


class RunRegistry(RegistryTopic[RunRecord]):
    """Past and running replays in the compacted topic ``imgflow.runs``."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, REGISTRY_TOPIC, RunRecord, key="run_id", what="run", error=ReplayError)


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


_held_locks: list[IO[str]] = []


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
