"""`imgflow replay`: a stage re-run over a range of its input as a separate run, with real
processes (the enrich stage with the small shipped LLM, the sink), killed with SIGKILL
and re-run; range ends found from record timestamps on a broker that cannot look them up."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from imgflow.app.replay_range import PartitionReader, Point, ReplayError, parse_point
from imgflow.app.runs import RunRegistry
from imgflow.kafka import consumer_config, producer_config
from imgflow.output.formats import read_csv_rows
from schemas.codec import get_codec
from tests.conftest import settings_env
from tests.kafka_helpers import read_topic, wait_until
from tests.records import image_event, vision_result

ROOT = Path(__file__).resolve().parents[1]


def event(i: int) -> dict:
    return image_event(f"r{i:04d}", f"{i}.jpg", run_id="live")


def bicycle(i: int) -> dict:
    labels = [{"label": "bicycle", "score": 0.9}]
    return vision_result(event(i), text=f"A red bicycle leaning on a wall, photo {i}", labels=labels, size=8, models={"describe": "d@1"})


def enriched(i: int) -> dict:
    return {
        "vision": bicycle(i),
        "description": f"bicycle {i}",
        "category": "vehicle",
        "keywords": ["bike"],
        "image_text": "",
        "llama_extracted": "{}",
        "models": {"structure_text": "s@1"},
        "seconds": 0.1,
        "processed_at": 0,
    }


def produce_at(settings, topic: str, schema: str, values: list[dict], timestamp_ms: int) -> None:
    codec = get_codec()
    producer = Producer(producer_config(settings))
    for v in values:
        eid = (v.get("event") or v.get("vision", {}).get("event") or v)["event_id"]
        producer.produce(topic, key=eid, value=codec.encode(schema, v), timestamp=timestamp_ms)
    assert producer.flush(30) == 0


def committed(settings, group: str, topic: str) -> list[int]:
    consumer = Consumer(consumer_config(settings, group))
    try:
        return [tp.offset for tp in consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=30)]
    finally:
        consumer.close()


def replay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgflow", "replay", *args]


def run_rows(out: Path) -> list[dict]:
    length = int((out / ".results.csv.committed").read_text())
    return list(read_csv_rows(out / "results.csv", length))


def test_points_and_time_ranges(settings, engine):
    """--from/--to parsing, and offsets for times: from Kafka's offsets_for_times (checked
    against the records' timestamps), found by scanning timestamps where the broker's own
    lookup by time answers wrongly (tansu says 0)."""
    assert parse_point("42", "--from") == Point("offset", 42)
    assert parse_point("@1000", "--from") == Point("time", 1000)
    assert parse_point("1970-01-01T00:00:02Z", "--from") == Point("time", 2000)
    assert parse_point("end", "--to") == Point("end")
    with pytest.raises(ReplayError, match="--from 'yesterday': expected an offset"):
        parse_point("yesterday", "--from")
    topic = settings.topics.enriched
    base = int(time.time() * 1000) - 60_000
    producer = Producer(producer_config(settings))
    for i in range(10):  # partition 0: timestamps base, base+1s, ..., base+9s
        producer.produce(topic, partition=0, key=f"k{i}", value=b"x", timestamp=base + 1000 * i)
    assert producer.flush(30) == 0
    reader = PartitionReader(settings)
    try:
        assert reader.bounds((topic, 0)) == (0, 10)
        assert reader.bounds((topic, 1)) == (0, 0)
        assert reader.resolve((topic, 0), Point("time", base + 3500), Point("end")) == (4, 10)
        assert reader.resolve((topic, 0), Point("time", base + 3000), Point("time", base + 6000)) == (3, 6)
        assert reader.resolve((topic, 0), Point("offset", 2), Point("offset", 99)) == (2, 10)
        assert reader.resolve((topic, 0), Point("time", base + 99_000), Point("end")) == (10, 10)
        assert reader.resolve((topic, 1), Point("time", base), Point("end")) == (0, 0)
        if engine == "kafka":  # the broker's time index answered every lookup; nothing scanned
            assert reader.time_lookups["scanned"] == 0 and reader.time_lookups["broker"] >= 5, reader.time_lookups
        else:  # tansu's answer (0) failed the check: found by scanning
            assert reader.time_lookups["scanned"] >= 4, reader.time_lookups
    finally:
        reader.close()


def test_sink_replay_by_time_with_kills(settings, tmp_path, engine):
    """A sink replay over a time range of the live images.enriched and images.dlq: the replay's
    sink SIGKILLed in the middle of a write (restarted by the replay), then the replay command
    itself SIGKILLed and run again. The run's output holds every record of the range once,
    with the run's id; the live output and the live sink group's offsets are untouched."""
    env = settings_env(settings)
    t = settings.topics
    now = int(time.time() * 1000)
    produce_at(settings, t.enriched, "EnrichedRecord", [enriched(i) for i in range(6)], now - 20_000)
    produce_at(settings, t.enriched, "EnrichedRecord", [enriched(i) for i in range(10, 22)], now - 10_000)
    failed = {
        "event_id": "r0030",
        "stage": "vision",
        "error": "not an image",
        "attempts": 1,
        "failed_at": now,
        "input_topic": t.new,
        "input_partition": 0,
        "input_offset": 0,
        "event": event(30),
        "vision": None,
        "raw_value": None,
    }
    produce_at(settings, t.dlq, "DeadLetter", [failed], now - 10_000)
    live = Consumer(consumer_config(settings, f"{settings.kafka.group_prefix}-sink"))
    live.commit(offsets=[TopicPartition(t.enriched, p, 1) for p in range(3)], asynchronous=False)
    live.close()
    before = committed(settings, f"{settings.kafka.group_prefix}-sink", t.enriched)
    boundary = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((now - 15_000) / 1000)) + f".{(now - 15_000) % 1000:03d}Z"
    wanted = sorted([f"r{i:04d}" for i in range(10, 22)] + ["r0030"])
    by_time = f"by-time-{t.new.split('.')[0]}"  # run ids are broker-wide: one of this test's own

    # 1. The run's sink is killed after writing an Avro file, before the CSV: the replay
    # restarts it, and the restarted sink completes the CSV from the Avro file.
    out = tmp_path / "run-a"
    crashed_sink = subprocess.run(
        replay_cmd("--stage", "sink", "--from", boundary, "--run-id", by_time, "--out", str(out)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "IMGFLOW_CRASH_AT": "sink:after_avro"},
    )
    assert crashed_sink.returncode == 0, crashed_sink.stdout + crashed_sink.stderr
    sink_log = (settings.data_dir / "logs" / "replay" / f"{by_time}-sink.log").read_text()
    assert "crash point after_avro reached" in sink_log and "CSV rows found only in Avro files" in sink_log
    rows = run_rows(out)
    assert sorted(r["event_id"] for r in rows) == wanted
    assert {r["run_id"] for r in rows} == {by_time}
    assert [r["error"] for r in rows if r["event_id"] == "r0030"] == ["vision: not an image"]

    # 2. The replay command itself is killed (after its stage, before it records the run as
    # done); the same command again resumes that run and changes nothing in its output.
    killed = subprocess.run(
        replay_cmd("--stage", "sink", "--from", boundary),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "IMGFLOW_CRASH_AT": "replay:after_stage"},
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr
    # How the time was turned into offsets: Kafka's offsets_for_times, or tansu's scan.
    if engine == "kafka":
        assert "from the broker's offsets_for_times" in killed.stderr and "scanning timestamps" not in killed.stderr
    else:
        assert "scanning timestamps" in killed.stderr
    run_id = re.search(r"run (\S+):", killed.stdout).group(1)
    again = subprocess.run(replay_cmd("--stage", "sink", "--from", boundary), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming run {run_id}" in again.stdout and f"run {run_id} complete: 13 results (1 with errors)" in again.stdout
    rows = run_rows(settings.sink.out_dir / "runs" / run_id)
    assert sorted(r["event_id"] for r in rows) == wanted and {r["run_id"] for r in rows} == {run_id}

    # The live pipeline saw nothing of it.
    assert not (settings.sink.out_dir / "results.csv").exists()
    assert committed(settings, f"{settings.kafka.group_prefix}-sink", t.enriched) == before
    listing = subprocess.run(replay_cmd("--list"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()[1:] if line.strip()}
    for rid in (by_time, run_id):
        assert "sink" in lines[rid] and "13 (1 errors)" in lines[rid] and boundary[:19] in lines[rid], lines[rid]


@pytest.mark.slow
def test_enrich_replay_killed_and_rerun(settings):
    """Replay of enrich (with the small shipped LLM) and the sink after it, over the live
    images.vision: the replay command SIGKILLed while enrich works, the same command again
    resumes it; every record once in the run's output; live offsets and output untouched."""
    env = settings_env(settings)
    env["IMGFLOW_MODELS__LLM"] = "smollm2-135m"
    env["IMGFLOW_STAGE__BATCH_SIZE"] = "1"  # a kill between batches leaves some done, some not
    t = settings.topics
    produce_at(settings, t.vision, "VisionResult", [bicycle(i) for i in range(3)], int(time.time() * 1000))
    live = Consumer(consumer_config(settings, f"{settings.kafka.group_prefix}-enrich"))
    live.commit(offsets=[TopicPartition(t.vision, p, 1) for p in range(3)], asynchronous=False)
    live.close()
    before = committed(settings, f"{settings.kafka.group_prefix}-enrich", t.vision)

    first = subprocess.Popen(replay_cmd("--stage", "enrich"), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    while not (match := re.match(r"run (\S+):", seen[-1] if seen else "")):
        seen.append(first.stdout.readline())
        assert seen[-1], "replay exited early:\n" + "".join(seen)
    run_id = match.group(1)
    enrich_log = settings.data_dir / "logs" / "replay" / f"{run_id}-enrich.log"
    wait_until(lambda: enrich_log.exists() and "transformed" in enrich_log.read_text(), 120, 0.2, "the replay's enrich stage to transform a batch")
    first.send_signal(signal.SIGKILL)
    first.wait(10)

    again = subprocess.run(replay_cmd("--stage", "enrich"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming run {run_id}" in again.stdout and f"run {run_id} complete: 3 results" in again.stdout
    out = settings.sink.out_dir / "runs" / run_id
    rows = run_rows(out)
    assert sorted(r["event_id"] for r in rows) == [f"r{i:04d}" for i in range(3)]
    assert {r["run_id"] for r in rows} == {run_id}
    # The LLM's answer, or the reason there is none (a small model can fail): a row either way.
    assert all(json.loads(r["llama_extracted"]) if not r["error"] else r["error"].startswith("enrich:") for r in rows)
    assert not (settings.sink.out_dir / "results.csv").exists()
    assert committed(settings, f"{settings.kafka.group_prefix}-enrich", t.vision) == before
    assert read_topic(settings, t.enriched, timeout=10) == []  # replayed records stay in run topics
    record = RunRegistry(settings).get(run_id)
    assert (record.status, record.results, record.stage) == ("done", 3, "enrich")
    done = subprocess.run(replay_cmd("--stage", "enrich", "--run-id", run_id), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "already complete: 3 results" in done.stdout
    assert len(run_rows(out)) == 3
