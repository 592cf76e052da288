"""The shared consume -> transform -> produce -> commit loop, on the real broker."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from imgflow.events import event_id_for
from imgflow.kafka import consumer_config
from imgflow.stage import CrashPoints, HandledIds, StageRunner
from schemas.codec import get_codec
from tests.conftest import settings_env
from tests.kafka_helpers import decoded, produce, produce_events, read_topic, wait_until
from tests.records import image_event
from tests.toy_stage import ToyTransform

ROOT = Path(__file__).resolve().parents[1]


def events(names: list[str]) -> list[dict]:
    out = []
    for i, name in enumerate(names):
        uri = f"file:///imgs/{name}"
        out.append(image_event(event_id_for(uri, str(i)), name, version=str(i)))
    return out


def run_in_thread(runner: StageRunner) -> threading.Thread:
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    return thread


def committed(settings, group: str, topic: str) -> int:
    consumer = Consumer(consumer_config(settings, group))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        return sum(max(tp.offset, 0) for tp in offsets)
    finally:
        consumer.close()


def test_results_and_offsets_commit_together(settings):
    evs = events([f"ok{i}.jpg" for i in range(20)])
    produce_events(settings, evs)
    runner = StageRunner(ToyTransform(settings), settings, group_id="g-basic")
    thread = run_in_thread(runner)
    out = wait_until(
        lambda: len(decoded(settings, settings.topics.vision, "ImageEvent")) >= 20 and decoded(settings, settings.topics.vision, "ImageEvent"),
        60,
        what="20 outputs",
    )
    runner.request_stop()
    thread.join(30)
    assert not thread.is_alive(), "SIGTERM-style stop must end the loop"
    assert sorted(e["event_id"] for e in out) == sorted(e["event_id"] for e in evs)
    assert committed(settings, "g-basic", settings.topics.new) == 20


def test_bad_input_retries_poison_and_batch_halving(settings):
    names = ["bad.jpg", "flaky.jpg", "poison.jpg", "oom.jpg"] + [f"ok{i}.jpg" for i in range(6)]
    evs = events(names)
    produce(settings, settings.topics.new, [("garbage", b"not avro at all")])
    produce_events(settings, evs)
    transform = ToyTransform(settings)
    runner = StageRunner(transform, settings, group_id="g-faults")
    thread = run_in_thread(runner)
    wait_until(
        lambda: len(read_topic(settings, settings.topics.vision)) + len(read_topic(settings, settings.topics.dlq)) >= 11, 60, what="every input accounted for"
    )
    runner.request_stop()
    thread.join(30)
    results = {e["image_path"] for e in decoded(settings, settings.topics.vision, "ImageEvent")}
    dead = {d["event_id"]: d for d in decoded(settings, settings.topics.dlq, "DeadLetter")}
    by_name = {e["image_path"].rsplit("/", 1)[1]: e["event_id"] for e in evs}
    # processed: the flaky one after a retry, the OOM one after the batch was halved
    assert {"/imgs/flaky.jpg", "/imgs/oom.jpg"} <= results
    assert all(f"/imgs/ok{i}.jpg" in results for i in range(6))
    # bad input: dead letter at once, no retry
    assert dead[by_name["bad.jpg"]]["attempts"] == 1 and "bad input" in dead[by_name["bad.jpg"]]["error"]
    assert dead[by_name["bad.jpg"]]["event"]["image_path"] == "/imgs/bad.jpg"
    # persistent failure: bounded attempts, then dead letter
    assert dead[by_name["poison.jpg"]]["attempts"] == settings.stage.max_attempts
    assert "RuntimeError" in dead[by_name["poison.jpg"]]["error"]
    # a malformed value never blocks the partition: dead letter with the raw bytes
    malformed = [d for d in dead.values() if d["event"] is None]
    assert len(malformed) == 1 and malformed[0]["raw_value"] == b"not avro at all"
    assert "malformed" in malformed[0]["error"]
    assert transform.attempts[by_name["poison.jpg"]] == settings.stage.max_attempts
    assert 1 in transform.batch_sizes  # halving went down to single records


def test_duplicate_events_give_one_result(settings):
    evs = events(["a.jpg", "b.jpg"])
    produce_events(settings, evs + evs + [evs[0]])
    runner = StageRunner(ToyTransform(settings), settings, group_id="g-dup")
    thread = run_in_thread(runner)
    wait_until(lambda: committed(settings, "g-dup", settings.topics.new) == 5, 60, what="all offsets committed")
    runner.request_stop()
    thread.join(30)
    out = decoded(settings, settings.topics.vision, "ImageEvent")
    assert sorted(e["event_id"] for e in out) == sorted(e["event_id"] for e in evs)


def test_high_priority_topic_is_drained_first(settings):
    normal, high = events([f"n{i}.jpg" for i in range(30)]), events([f"h{i}.jpg" for i in range(30, 40)])
    produce_events(settings, normal)
    produce_events(settings, high, topic=settings.topics.new_high)
    transform = ToyTransform(settings)
    runner = StageRunner(transform, settings, group_id="g-prio")
    thread = run_in_thread(runner)
    wait_until(lambda: committed(settings, "g-prio", settings.topics.new) == 30, 60, what="all consumed")
    runner.request_stop()
    thread.join(30)
    msgs = read_topic(settings, settings.topics.vision)
    codec = get_codec()
    # order of production across partitions is by commit time: compare timestamps
    stamped = sorted((m.timestamp()[1], codec.decode("ImageEvent", m.value())["image_path"]) for m in msgs)
    last_high = max(i for i, (_, p) in enumerate(stamped) if "/h" in p)
    normals_before = sum(1 for _, p in stamped[:last_high] if "/n" in p)
    assert normals_before < 30, "high-priority events must not wait for the whole normal backlog"


def test_handled_ids_forget_oldest():
    ids = HandledIds(capacity=3)
    for i in range(5):
        ids.add(str(i))
    assert "0" not in ids and "1" not in ids and {"2", "3", "4"} <= set(ids._ids)


def test_crash_points_parse(monkeypatch):
    crash = CrashPoints("vision", "vision:after_produce:3")
    assert crash.point == "after_produce" and crash.remaining == 3
    assert CrashPoints("enrich", "vision:after_produce").point is None


@pytest.mark.parametrize("point", ["after_produce", "after_offsets", "after_commit"])
def test_kill_at_each_commit_step_then_restart_gives_every_result_once(settings, point, engine):
    """SIGKILL between the numbered commit steps, deterministically; a restarted process
    (same transactional ids) fences the dead one and finishes: every event has its result,
    and a read_committed reader that also drops known event_ids sees each exactly once."""
    evs = events([f"ok{i}.jpg" for i in range(12)])
    produce_events(settings, evs)
    env = settings_env(settings)
    env["TOY_GROUP"] = f"g-crash-{point}"
    crashed = subprocess.run(
        [sys.executable, "-m", "tests.toy_stage"], cwd=ROOT, env={**env, "IMGFLOW_CRASH_AT": f"toy:{point}:1"}, timeout=120, capture_output=True
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    proc = subprocess.Popen([sys.executable, "-m", "tests.toy_stage"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: committed(settings, env["TOY_GROUP"], settings.topics.new) == 12, 90, what="restarted stage to commit every offset")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    out = decoded(settings, settings.topics.vision, "ImageEvent")
    assert {e["event_id"] for e in out} == {e["event_id"] for e in evs}
    if engine == "kafka":
        # Kafka's read_committed filters the killed process's aborted transaction: each once.
        assert len(out) == 12, sorted(e["event_id"] for e in out)
    else:
        # tansu may deliver records of the aborted transaction (docs/brokers.md); then they are
        # copies of the same events, never other ones, and the sink drops them.
        assert len(out) <= 24


class HugeToy(ToyTransform):
    """'huge-N' images give a result of N bytes (its image_path padded)."""

    def process(self, records):
        out = super().process(records)
        for rec, result in zip(records, out):
            name = rec.value["image_path"].rsplit("/", 1)[1]
            if name.startswith("huge-") and isinstance(result, list):
                size = int(name.split("-")[1].split(".")[0])
                result[0].value["image_path"] = "/imgs/" + "x" * size
        return out


def test_a_result_too_large_for_the_broker_is_a_dead_letter_and_the_stage_goes_on(settings, engine):
    """A result over the broker's limit (here the vision topic's max.message.bytes, 100 kB),
    or over the client's own message.max.bytes (16 MiB): that image is dead-lettered with
    the size in its error, the others of its batch and after it are processed."""
    from imgflow.kafka import ensure_topics

    small = f"{settings.topics.vision}.small"
    settings = settings.model_copy(
        update={"topics": settings.topics.model_copy(update={"vision": small, "topic_config": {small: {"max.message.bytes": "100000"}}})}
    )
    ensure_topics(settings)
    names = ["ok0.jpg", "huge-300000.jpg", "ok1.jpg", "huge-17000000.jpg", "ok2.jpg"]
    evs = events(names)
    produce_events(settings, evs)
    runner = StageRunner(HugeToy(settings), settings, group_id="g-huge")
    thread = run_in_thread(runner)
    try:
        wait_until(lambda: committed(settings, "g-huge", settings.topics.new) == 5, 90, what="every offset committed")
    finally:
        runner.request_stop()
        thread.join(60)
    results = {e["event_id"]: e for e in decoded(settings, small, "ImageEvent")}
    dead = {d["event_id"]: d for d in decoded(settings, settings.topics.dlq, "DeadLetter")}
    ids = {name: e["event_id"] for name, e in zip(names, evs)}
    assert {ids["ok0.jpg"], ids["ok1.jpg"], ids["ok2.jpg"]} <= set(results)
    # over the client's limit, on either broker
    assert ids["huge-17000000.jpg"] not in results
    assert re.search(r"is 17,000,\d{3} bytes, more than Kafka accepts", dead[ids["huge-17000000.jpg"]]["error"])
    if engine == "kafka":  # Kafka enforces the topic's max.message.bytes
        assert ids["huge-300000.jpg"] not in results
        assert re.search(r"is 300,\d{3} bytes, more than Kafka accepts", dead[ids["huge-300000.jpg"]]["error"])
        assert len(results) == 3 and len(dead) == 2
    else:  # tansu does not: that result is written whole
        assert len(results[ids["huge-300000.jpg"]]["image_path"]) == 300_006
        assert len(dead) == 1


def test_records_the_consumer_stepped_over_are_processed_once_the_stage_falls_idle(settings, monkeypatch):
    """The sink's safety net, in the shared loop: the consumer drops the first 6 records of
    partition 0 once (as tansu's read_committed consumer once stepped over a committed
    transaction); the idle re-read processes them, every other record exactly once, and the
    committed offsets never move back."""
    from confluent_kafka import Producer

    import imgflow.stage.runner as stage_module
    from imgflow.kafka import producer_config

    evs = events([f"s{i:02d}.jpg" for i in range(24)])
    producer = Producer(producer_config(settings))
    for i, e in enumerate(evs):
        producer.produce(settings.topics.new, key=e["event_id"], value=get_codec().encode("ImageEvent", e), partition=0 if i < 12 else 1)
    assert producer.flush(30) == 0

    class SteppingOver(stage_module.Consumer):
        dropped: list[int] = []

        def consume(self, num_messages=1, timeout=-1):
            msgs = super().consume(num_messages, timeout)
            if len(SteppingOver.dropped) >= 6:
                return msgs
            keep = []
            for m in msgs:
                if not m.error() and m.topic() == settings.topics.new and m.partition() == 0 and m.offset() < 6:
                    SteppingOver.dropped.append(m.offset())
                else:
                    keep.append(m)
            return keep

    monkeypatch.setattr(stage_module, "Consumer", SteppingOver)
    runner = StageRunner(ToyTransform(settings), settings, group_id="g-stepped")
    runner.rescan.idle_s = 1.0
    thread = run_in_thread(runner)
    try:
        wait_until(lambda: len(decoded(settings, settings.topics.vision, "ImageEvent")) >= 24, 90, what="24 results")
        time.sleep(3)  # another idle point: nothing read again may be processed twice
    finally:
        runner.request_stop()
        thread.join(60)
    assert sorted(SteppingOver.dropped) == list(range(6))  # the fault happened
    out = decoded(settings, settings.topics.vision, "ImageEvent")
    assert sorted(e["event_id"] for e in out) == sorted(e["event_id"] for e in evs)
    assert committed(settings, "g-stepped", settings.topics.new) == 24
