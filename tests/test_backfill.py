"""`imgflow backfill`: bulk publish of a folder or S3 prefix, with the skip check, --force,
--high, --dry-run, and a SIGKILL between chunks followed by the same command again."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from imgflow.output.rows import row_from_enriched
from imgflow.output.store import PendingRow, ResultStore
from tests.conftest import settings_env
from tests.kafka_helpers import decoded
from tests.records import vision_result

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def backfill(settings, *args: str, env_extra: dict | None = None, s3=None) -> Result:
    """`imgflow backfill ARGS`: in this process (quicker), or as a child process when it is
    to be killed at a crash point."""
    env = settings_env(settings)
    if s3 is not None:
        env.update(s3.env())
    env.update(env_extra or {})
    if "IMGFLOW_CRASH_AT" in env:
        done = subprocess.run([sys.executable, "-m", "imgflow", "backfill", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        return Result(done.returncode, done.stdout, done.stderr)
    from typer.testing import CliRunner

    from imgflow.app.cli import app

    result = CliRunner().invoke(app, ["backfill", *args], env={k: v for k, v in env.items() if k.startswith("IMGFLOW_")})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr)


def make_folder(root: Path, n: int) -> list[Path]:
    """n images spread over nested folders, plus files that are not images."""
    images = []
    for i in range(n):
        path = root / f"d{i % 3}" / ("deep" if i % 2 else "") / f"img {i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8" + bytes([i % 256]))
        images.append(path.resolve())
    (root / "notes.txt").write_text("not an image")
    (root / "d0" / ".hidden.jpg").write_bytes(b"x")
    return images


def result_row(event: dict, offset: int) -> PendingRow:
    """A final record of ``event`` as the sink takes it."""
    vision = vision_result(event)
    enriched = {
        "vision": vision,
        "description": "d",
        "category": "c",
        "keywords": [],
        "image_text": "",
        "llama_extracted": "{}",
        "models": {},
        "seconds": 0.0,
        "processed_at": 0,
    }
    return PendingRow("images.enriched", 0, offset, row_from_enriched(enriched, "images.enriched", 0, offset))


def live_store(settings) -> ResultStore:
    store = ResultStore(settings.sink.out_dir, settings=settings)
    store.lock()
    store.recover()
    return store


def mark_done(settings, events: list[dict]) -> None:
    """Results for these events in the live output, written by the sink's own store."""
    live_store(settings).write([result_row(e, n) for n, e in enumerate(events)])


def test_folder_skip_interrupt_resume_force_high(settings, tmp_path):
    images = make_folder(tmp_path / "in", 12)
    src = str(tmp_path / "in")

    dry = backfill(settings, src, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would publish 12, skipped 0" in dry.stdout
    assert decoded(settings, settings.topics.new, "ImageEvent") == []

    # SIGKILL right after the 2nd chunk (of 5) committed; the same command again finishes.
    killed = backfill(settings, src, "--chunk-size", "5", env_extra={"IMGFLOW_CRASH_AT": "backfill:after_commit:2"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert len(decoded(settings, settings.topics.new, "ImageEvent")) == 10
    again = backfill(settings, src, "--chunk-size", "5")
    assert again.returncode == 0, again.stderr
    assert "resuming backfill" in again.stdout and "published 12, skipped 0" in again.stdout
    events = decoded(settings, settings.topics.new, "ImageEvent")
    assert sorted(e["image_path"] for e in events) == sorted(map(str, images))  # each once, non-images skipped
    assert {(e["source"], e["run_id"], e["force"]) for e in events} == {("backfill", "live", False)}
    # Complete: the same command publishes nothing more.
    assert "is already complete: 12 published" in backfill(settings, src).stdout
    assert len(decoded(settings, settings.topics.new, "ImageEvent")) == 12

    # Half of them have results now: a new backfill skips those (after a new image arrives).
    mark_done(settings, events[:6])
    (tmp_path / "in" / "new.png").write_bytes(b"\x89PNG")
    second_id, redo_id = f"second-{settings.topics.new}", f"redo-{settings.topics.new}"  # broker-wide ids
    second = backfill(settings, src, "--high", "--run-id", second_id)
    assert second.returncode == 0, second.stderr
    assert "published 7, skipped 6 that have a result" in second.stdout
    high = decoded(settings, settings.topics.new_high, "ImageEvent")
    assert {e["event_id"] for e in high} == {e["event_id"] for e in events[6:]} | {e["event_id"] for e in high if e["image_path"].endswith("new.png")}
    assert len(high) == 7 and {e["priority"] for e in high} == {"HIGH"}
    assert "already complete" in backfill(settings, src, "--high", "--run-id", second_id).stdout

    # --force: every image again, as a run of its own (run_id = the job) that dedupe keeps apart.
    forced = backfill(settings, src, "--force", "--run-id", redo_id)
    assert forced.returncode == 0, forced.stderr
    assert "published 13, skipped 0" in forced.stdout
    redo = [e for e in decoded(settings, settings.topics.new, "ImageEvent") if e["run_id"] == redo_id]
    assert len(redo) == 13 and all(e["force"] for e in redo)
    assert Counter(e["event_id"] for e in redo).most_common(1)[0][1] == 1


def test_bucket_prefix(settings, s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    keys = ["p/a.jpg", "p/sub/b é.png", "p/sub/deeper/c.JPG", "p/readme.md", "p/sub/", "other/d.jpg"]
    for key in keys:
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"" if key.endswith("/") else b"\xff\xd8data")
    res = backfill(settings, f"s3://{s3_bucket}/p/", s3=s3_server)
    assert res.returncode == 0, res.stderr
    events = decoded(settings, settings.topics.new, "ImageEvent")
    assert sorted(e["image_path"] for e in events) == [f"s3://{s3_bucket}/{k}" for k in ["p/a.jpg", "p/sub/b é.png", "p/sub/deeper/c.JPG"]]
    bad = backfill(settings, "s3://no-such-bucket-xyz/p/", s3=s3_server)
    assert bad.returncode == 2 and "no-such-bucket-xyz" in bad.stderr
    assert s3_server.secret_access_key not in bad.stderr + bad.stdout


def test_forced_events_are_not_swallowed_by_dedupe(settings):
    """What --force relies on: the stage loop and the sink dedupe per (event_id, run_id), so an
    event published again by a forced backfill (its own run_id) is processed and written
    again, while a redelivered copy within one run is still dropped."""
    import threading

    from imgflow.stage import StageRunner
    from tests.kafka_helpers import produce_events, wait_until
    from tests.test_stage_loop import events
    from tests.toy_stage import ToyTransform

    live = dict(events(["a.jpg"])[0], run_id="live")
    forced = dict(live, run_id="redo", force=True)
    produce_events(settings, [live, live, forced, forced])
    runner = StageRunner(ToyTransform(settings), settings, group_id="g-forced")
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        out = wait_until(
            lambda: len(decoded(settings, settings.topics.vision, "ImageEvent")) >= 2 and decoded(settings, settings.topics.vision, "ImageEvent"),
            60,
            what="2 outputs",
        )
    finally:
        runner.request_stop()
        thread.join(30)
    assert sorted(e["run_id"] for e in out) == ["live", "redo"]

    written = live_store(settings).write([result_row(live, 0), result_row(live, 1), result_row(forced, 2), result_row(forced, 3)])
    assert sorted(p.row["run_id"] for p in written) == ["live", "redo"]
