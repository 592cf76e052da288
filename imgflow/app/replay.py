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

(Range ends: ``replay_range``; the run registry and each stage's plan: ``runs``;
docs/backfill-replay-priority.md.)
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from imgflow.app.replay_range import PartitionReader, Point, ReplayError
from imgflow.app.runs import RunRecord, RunRegistry, input_topics, run_topic_specs, stages_from
from imgflow.kafka import ensure_topics
from imgflow.process import own_session_dying_with_parent
from imgflow.settings import Settings
from imgflow.stage import CrashPoints

log = logging.getLogger(__name__)


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
    argv = [sys.executable, "-m", "imgflow", "stage", stage, "--run", run_id]
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
