"""`imgflow replay`: a stage re-run over a range of its input as a separate run, with real
processes (the enrich stage with the small shipped LLM, the sink), killed with SIGKILL
and re-run; range ends found from record timestamps on a broker that cannot look them up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from consumers.sink import read_csv_rows
from imgflow.kafka import consumer_config, producer_config
from imgflow.replay import PartitionReader, Point, ReplayError, RunRegistry, parse_point
from schemas.codec import get_codec
from tests.conftest import settings_env
from tests.kafka_helpers import read_topic, wait_until

ROOT = Path(__file__).resolve().parents[1]


def event(i: int) -> dict:
    return {"event_id": f"r{i:04d}", "uri": f"file:///imgs/{i}.jpg", "image_path": f"/imgs/{i}.jpg", "size": 1,
            "version": "1", "source": "test", "priority": "NORMAL", "run_id": "live", "published_at": 0,
            "force": False}


def vision_result(i: int) -> dict:
    return {"event": event(i), "text": f"A red bicycle leaning on a wall, photo {i}", "image_text": "",
            "labels": [{"label": "bicycle", "score": 0.9}], "text_vector": [0.1] * 4, "word2vec_vector": [0.2] * 4,
            "image_vector": [0.3] * 4, "width": 8, "height": 8, "models": {"describe": "d@1"}, "seconds": 0.1,
            "processed_at": 0}


def enriched(i: int) -> dict:
    return {"vision": vision_result(i), "description": f"bicycle {i}", "category": "vehicle", "keywords": ["bike"],
            "image_text": "", "llama_extracted": "{}", "models": {"structure_text": "s@1"}, "seconds": 0.1,
            "processed_at": 0}


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
    return [sys.executable, "-m", "imgflow.cli", "replay", *args]


def run_rows(out: Path) -> list[dict]:
    length = int((out / ".results.csv.committed").read_text())
    return list(read_csv_rows(out / "results.csv", length))


def test_points_and_time_ranges(settings):
    """--from/--to parsing, and offsets found by record timestamps where the broker's own
    lookup by time answers wrongly (the embedded broker says 0)."""
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
    finally:
        reader.close()


def test_replay_enrich_killed_and_rerun_then_sink_by_time(settings, tmp_path):
    """Replay of enrich (and the sink after it) over the live images.vision: SIGKILL of the
    replay command mid-run, the same command again resumes it; every record in range
    exactly once in the run's own output with the run's id; the live output and the live
    group's offsets untouched. Then a sink replay over a time range of images.enriched."""
    env = settings_env(settings)
    env["IMGFLOW_MODELS__LLM"] = "smollm2-135m"
    env["IMGFLOW_STAGE__BATCH_SIZE"] = "1"  # a kill between batches leaves some done, some not
    t = settings.topics
    now = int(time.time() * 1000)
    produce_at(settings, t.vision, "VisionResult", [vision_result(i) for i in range(3)], now - 10_000)
    # The live enrich group has made some progress: a replay must not move it.
    live = Consumer(consumer_config(settings, "imgflow-enrich"))
    live.commit(offsets=[TopicPartition(t.vision, p, 1) for p in range(3)], asynchronous=False)
    live.close()
    before = committed(settings, "imgflow-enrich", t.vision)

    first = subprocess.Popen(replay_cmd("--stage", "enrich"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    seen = []
    while not (match := re.match(r"run (\S+):", seen[-1] if seen else "")):
        seen.append(first.stdout.readline())
        assert seen[-1], "replay exited early:\n" + "".join(seen)
    run_id = match.group(1)
    enrich_log = settings.data_dir / "logs" / "replay" / f"{run_id}-enrich.log"
    wait_until(lambda: enrich_log.exists() and "transformed" in enrich_log.read_text(), 120, 0.2,
               "the replay's enrich stage to transform a batch")
    first.send_signal(signal.SIGKILL)
    first.wait(10)

    again = subprocess.run(replay_cmd("--stage", "enrich"), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming run {run_id}" in again.stdout and f"run {run_id} complete: 3 results" in again.stdout

    out = settings.sink.out_dir / "runs" / run_id
    rows = run_rows(out)
    assert sorted(r["event_id"] for r in rows) == [f"r{i:04d}" for i in range(3)]
    assert {r["run_id"] for r in rows} == {run_id}
    # The LLM's answer, or the reason there is none (a small model can fail): a row either way.
    assert all(json.loads(r["llama_extracted"]) if not r["error"] else r["error"].startswith("enrich:") for r in rows)
    assert not (settings.sink.out_dir / "results.csv").exists()  # the live output got nothing
    assert committed(settings, "imgflow-enrich", t.vision) == before
    assert read_topic(settings, t.enriched, timeout=10) == []  # replayed records stay in run topics
    record = RunRegistry(settings).get(run_id)
    assert (record.status, record.results, record.stage) == ("done", 3, "enrich")

    # The same command once more: a finished run is not redone.
    done = subprocess.run(replay_cmd("--stage", "enrich", "--run-id", run_id), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "already complete: 3 results" in done.stdout
    assert len(run_rows(out)) == 3

    # A sink replay by time: only the records at or after --from, stamped with the run id.
    produce_at(settings, t.enriched, "EnrichedRecord", [enriched(i) for i in range(4)], now - 5000)
    produce_at(settings, t.enriched, "EnrichedRecord", [enriched(i) for i in range(10, 14)], now - 1000)
    boundary = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((now - 3000) / 1000)) + f".{(now - 3000) % 1000:03d}Z"
    sink_out = tmp_path / "sink-replay"
    res = subprocess.run(replay_cmd("--stage", "sink", "--from", boundary, "--run-id", "sink-by-time",
                                    "--out", str(sink_out)), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = run_rows(sink_out)
    assert sorted(r["event_id"] for r in rows) == [f"r{i:04d}" for i in range(10, 14)]
    assert {r["run_id"] for r in rows} == {"sink-by-time"}

    listing = subprocess.run(replay_cmd("--list"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "enrich" in lines[run_id] and f"3 ({record.errors} errors)" in lines[run_id]
    assert "4 (0 errors)" in lines["sink-by-time"] and boundary[:19] in lines["sink-by-time"]
    assert not os.path.exists(settings.sink.out_dir / "results.csv")
