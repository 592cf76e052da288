"""The sink: CSV with the seed's columns + Avro files, idempotent across crashes."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import fastavro
import pytest

from imgflow.output.formats import read_csv_rows
from imgflow.output.rows import CSV_COLUMNS, row_from_enriched
from imgflow.output.store import PendingRow, ResultStore, SinkLockedError
from imgflow.stage import CrashPoints
from schemas.codec import get_codec
from tests.conftest import settings_env
from tests.kafka_helpers import produce, wait_until
from tests.records import image_event, vision_result

ROOT = Path(__file__).resolve().parents[1]
SEED_HEADER = ("image_path,text,description,categories,keywords,image_text,text_vector,word2vec_vector,image_vector,timestamp,error,llama_extracted").split(",")


def enriched(i: int) -> dict:
    event = image_event(f"e{i:04d}", f"{i}.jpg")
    vision = vision_result(
        event,
        text=f"A photo, number {i},\nwith a comma and a newline",
        image_text=f"TEXT {i}",
        text_vector=[0.5, -0.25, i / 7],
        word_vector=[0.1] * 5,
        image_vector=[1.0] * 4,
        models={"describe": "d@1"},
        seconds=0.1,
    )
    return {
        "vision": vision,
        "description": f"photo {i}",
        "category": "test",
        "keywords": ["a", "b"],
        "image_text": f"TEXT {i}",
        "llama_extracted": json.dumps({"category": "test"}),
        "models": {"structure_text": "s@1"},
        "seconds": 0.2,
        "processed_at": datetime(2026, 1, 1, tzinfo=UTC),
    }


def pending(ids, offset0=0, partition=0):
    return [
        PendingRow("images.enriched", partition, offset0 + n, row_from_enriched(enriched(i), "images.enriched", partition, offset0 + n))
        for n, i in enumerate(ids)
    ]


def csv_ids(out: Path) -> list[str]:
    """Ids of the rows the sink has committed (a reader never trusts a half-written tail)."""
    return [r["event_id"] for r in read_csv_rows(out / "results.csv", ResultStore(out).committed_length())]


def avro_ids(out: Path) -> list[str]:
    ids = []
    for p in sorted((out / "avro").rglob("*.avro")):
        with p.open("rb") as f:
            ids += [r["event_id"] for r in fastavro.reader(f)]
    return ids


def new_store(out: Path) -> ResultStore:
    store = ResultStore(out)
    store.lock()
    store.recover()
    return store


def test_csv_header_cells_and_avro_names(tmp_path):
    store = new_store(tmp_path)
    store.write(pending(range(3), offset0=40), CrashPoints("sink", ""))
    with (tmp_path / "results.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:12] == SEED_HEADER and rows[0] == CSV_COLUMNS
    first = dict(zip(rows[0], rows[1]))
    assert json.loads(first["text_vector"]) == pytest.approx([0.5, -0.25, 0.0])
    assert json.loads(first["categories"]) == ["test"] and json.loads(first["keywords"]) == ["a", "b"]
    assert first["text"] == "A photo, number 0,\nwith a comma and a newline"
    assert first["error"] == "" and json.loads(first["llama_extracted"]) == {"category": "test"}
    assert datetime.fromisoformat(first["timestamp"]).year == 2026
    name = "images.enriched/partition=0/images.enriched+0+0000000000000000040"
    assert [str(p.relative_to(tmp_path)) for p in (tmp_path / "avro").rglob("*.avro")] == [f"avro/{name}.avro"]
    assert json.loads((tmp_path / "_index" / f"{name}.ids").read_text())["rows"][0][:2] == [40, "e0000"]
    with (tmp_path / "avro" / f"{name}.avro").open("rb") as f:
        records = list(fastavro.reader(f))
    assert set(SEED_HEADER) <= set(records[0]) and records[0]["text_vector"] == pytest.approx([0.5, -0.25, 0.0])


def test_duplicates_dropped_within_and_across_batches_and_restarts(tmp_path):
    store = new_store(tmp_path)
    assert len(store.write(pending([1, 2, 2]), CrashPoints("sink", ""))) == 2
    assert len(store.write(pending([2, 3], offset0=3), CrashPoints("sink", ""))) == 1
    store._lock_file.close()
    again = new_store(tmp_path)
    assert len(again.write(pending([1, 3, 4], offset0=5), CrashPoints("sink", ""))) == 1
    assert sorted(csv_ids(tmp_path)) == ["e0001", "e0002", "e0003", "e0004"]
    assert sorted(avro_ids(tmp_path)) == ["e0001", "e0002", "e0003", "e0004"]


def test_recover_restores_rows_only_in_avro_and_cuts_half_written_csv(tmp_path):
    store = new_store(tmp_path)
    store.write(pending([1, 2]), CrashPoints("sink", ""))
    # a crash after the Avro file of the next batch and in the middle of its CSV rows:
    store._write_avro("images.enriched", 0, pending([3, 4, 5], offset0=2))
    with (tmp_path / "results.csv").open("a") as f:
        f.write('/imgs/3.jpg,"A photo, half a row')
    (tmp_path / "avro" / "images.enriched" / "partition=0" / "images.enriched+0+0000000000000000009.avro.tmp").write_bytes(b"partial")
    store._lock_file.close()
    again = ResultStore(tmp_path)
    again.lock()
    assert again.recover() == 3
    assert csv_ids(tmp_path) == ["e0001", "e0002", "e0003", "e0004", "e0005"]
    assert sorted(avro_ids(tmp_path)) == csv_ids(tmp_path)
    assert not list((tmp_path / "avro").rglob("*.tmp"))


def test_second_sink_on_same_output_is_refused(tmp_path):
    first = new_store(tmp_path)
    with pytest.raises(SinkLockedError, match="another sink"):
        new_store(tmp_path)
    assert len(first.known) == 0


@pytest.mark.parametrize("point", ["after_avro", "mid_csv", "after_csv", "after_commit"])
def test_sink_killed_at_each_step_restarts_to_exactly_once(settings, point):
    """The real sink process, SIGKILLed between its numbered steps, then restarted."""
    codec = get_codec()
    produce(settings, settings.topics.enriched, [(f"e{i:04d}", codec.encode("EnrichedRecord", enriched(i))) for i in range(30)])
    env = settings_env(settings)
    cmd = [sys.executable, "-m", "imgflow", "stage", "sink"]
    crashed = subprocess.run(cmd, cwd=ROOT, env={**env, "IMGFLOW_CRASH_AT": f"sink:{point}:1"}, timeout=120, capture_output=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    log = settings.data_dir / "sink.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    out = settings.sink.out_dir
    try:
        wait_until(lambda: "sink writing to" in log.read_text(), 60, what="the restarted sink to recover")
        wait_until(lambda: len(csv_ids(out)) >= 30, 60, what="30 rows")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()[-2000:]
    expected = [f"e{i:04d}" for i in range(30)]
    assert sorted(csv_ids(out)) == expected
    assert sorted(avro_ids(out)) == expected


def test_records_the_consumer_stepped_over_are_written_when_the_sink_falls_idle(settings, monkeypatch):
    """Seen once on tansu: a read_committed consumer stepped over a whole committed
    transaction, and the sink then committed past it (a restart does not read it again).
    That broker fault cannot be produced on demand, so the consumer here drops the first 10
    records of partition 0 once, as the broker did; the idle re-read must write them, and
    every other record exactly once."""
    import threading

    from confluent_kafka import Consumer, Producer

    import consumers.sink as sink_module
    from imgflow.kafka import producer_config

    codec = get_codec()
    producer = Producer(producer_config(settings))
    for i in range(30):
        producer.produce(settings.topics.enriched, key=f"e{i:04d}", value=codec.encode("EnrichedRecord", enriched(i)), partition=0 if i < 20 else 1)
    assert producer.flush(30) == 0

    class SteppingOver(Consumer):
        dropped: list[int] = []

        def consume(self, num_messages=1, timeout=-1):
            msgs = super().consume(num_messages, timeout)
            if SteppingOver.dropped:
                return msgs
            keep = [m for m in msgs if m.error() or m.partition() != 0 or m.offset() >= 10]
            SteppingOver.dropped = [m.offset() for m in msgs if m not in keep] or []
            return keep

    monkeypatch.setattr(sink_module, "Consumer", SteppingOver)
    runner = sink_module.SinkRunner(settings)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(csv_ids(settings.sink.out_dir)) >= 30, 60, what="30 rows")
    finally:
        runner.request_stop()
        thread.join(60)
    assert SteppingOver.dropped == list(range(10))  # the fault happened
    expected = [f"e{i:04d}" for i in range(30)]
    assert sorted(csv_ids(settings.sink.out_dir)) == expected
    assert sorted(avro_ids(settings.sink.out_dir)) == expected
