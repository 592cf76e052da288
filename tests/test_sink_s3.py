"""The sink writing to S3 (the session's SeaweedFS) and to a local folder through the same
code: Kafka Connect keys, CSV parts merged by `imgflow export csv`, bounded start-up,
the results index, S3 faults (wrong credentials, missing bucket, unreachable endpoint,
kill -9 of the sink and of the S3 server): every event exactly once in the bucket."""

from __future__ import annotations

import csv
import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgflow.events import dedupe_key
from imgflow.output.export import export_csv
from imgflow.output.formats import read_avro
from imgflow.output.layout import INDEX, data_key
from imgflow.output.reader import ResultReader
from imgflow.output.rows import CSV_COLUMNS
from imgflow.output.storage import open_storage
from imgflow.output.store import ResultStore
from imgflow.stage import CrashPoints
from schemas.codec import get_codec
from tests.conftest import make_settings, new_bucket, settings_env
from tests.kafka_helpers import produce, wait_until
from tests.test_sink import SEED_HEADER, enriched, pending

ROOT = Path(__file__).resolve().parents[1]
TOPIC = "images.enriched"


def output_ids(out, settings) -> list[str]:
    """event_ids of every Avro row in an output (local or S3), duplicates kept."""
    output = open_storage(out, settings)
    ids = []
    for topic in output.subfolders("avro/"):
        for part in output.subfolders(f"avro/{topic}/"):
            for key in output.list(f"avro/{topic}/{part}/"):
                ids += [r["event_id"] for r in read_avro(output.get(key))]
    return ids


def exported_rows(out, settings) -> list[dict]:
    buf = io.BytesIO()
    export_csv(out, settings, buf)
    reader = csv.reader(io.StringIO(buf.getvalue().decode("utf-8"), newline=""))
    header = next(reader)
    assert header[:12] == SEED_HEADER and header == CSV_COLUMNS
    return [dict(zip(header, r)) for r in reader]


@pytest.fixture(params=["local", "s3"])
def out(request, s3_settings, s3_server, tmp_path):
    if request.param == "local":
        return tmp_path / "results"
    return f"s3://{new_bucket(s3_server)}/some prefix/runs/r1/"


def test_store_layout_crash_recovery_export_and_index(out, s3_settings):
    settings = s3_settings
    store = ResultStore(out, settings=settings)
    store.lock()
    store.recover()
    assert len(store.write(pending(range(5), offset0=100), CrashPoints("sink", ""))) == 5
    output = open_storage(out, settings)
    name = f"{TOPIC}/partition=0/{TOPIC}+0+0000000000000000100"
    assert output.get(f"avro/{name}.avro") is not None and output.get(f"_index/{name}.ids") is not None
    if output.is_s3:
        part = output.get(f"csv/{name}.csv").decode()
        assert part.splitlines()[0].split(",") == CSV_COLUMNS and part.count("file:///imgs/") == 5
    # A crash after the next batch's Avro file (no CSV rows, no index), then a restart whose
    # group committed offset 105: the batch is completed, its redelivered records dropped.
    store._write_avro(TOPIC, 0, pending(range(5, 8), offset0=105))
    if store._lock_file:
        store._lock_file.close()
    again = ResultStore(out, settings=settings)
    again.lock()
    assert again.recover({(TOPIC, 0): 105}) == 3
    assert again.write(pending([5, 6, 7, 8], offset0=105), CrashPoints("sink", ""))[0].row["event_id"] == "e0008"
    expected = [f"e{i:04d}" for i in range(9)]
    assert sorted(output_ids(out, settings)) == expected
    rows = exported_rows(out, settings)
    assert sorted(r["event_id"] for r in rows) == expected
    assert rows[0]["text"] == "A photo, number 0,\nwith a comma and a newline"
    # The backfill skip check: which of these have a row (any run, or one run).
    index = ResultReader(out, settings)
    assert index.existing(["e0001", "e0008", "nope"]) == {"e0001", "e0008"}
    assert index.existing(["e0001"], run_id="other") == set()
    # What `imgflow run` shows as done, read incrementally.
    progress = ResultReader(out, settings, wanted={"e0003", "e0009", "e0010"}, keep_ids=True)
    progress.refresh()
    assert progress.done == set(expected) and progress.errors == 0 and progress.rows == 9
    assert progress.missing == {"e0009", "e0010"}
    again.write(pending([9], offset0=200), CrashPoints("sink", ""))
    progress.refresh()
    assert progress.done == set(expected) | {"e0009"} and progress.rows == 10 and progress.missing == {"e0010"}
    progress.refresh()  # nothing new: nothing counted twice
    assert progress.rows == 10


def test_start_up_reads_only_the_window_past_the_committed_offsets(out, s3_settings):
    """Old files (named below committed - window) are never read: here they are unreadable
    garbage, and start-up still succeeds; a redelivered id inside the window is dropped."""
    settings = s3_settings
    output = open_storage(out, settings)
    store = ResultStore(out, settings=settings, dedupe_window=50)
    store.lock()
    store.recover()
    for batch in range(10):  # offsets 0..99, ten files
        store.write(pending(range(batch * 10, batch * 10 + 10), offset0=batch * 10), CrashPoints("sink", ""))
        store.checkpoint()  # what the runner does after each offset commit
    if store._lock_file:
        store._lock_file.close()
    for first in (0, 10, 20, 30):  # files wholly before committed (100) - window (50)
        output.put(data_key("avro", TOPIC, 0, first), b"not avro")
        output.put(data_key(INDEX, TOPIC, 0, first), b"not json")
    again = ResultStore(out, settings=settings, dedupe_window=50)
    again.lock()
    again.recover({(TOPIC, 0): 100})
    assert dedupe_key("e0060", "t") in again.known and dedupe_key("e0040", "t") not in again.known
    written = again.write(pending([95, 60, 100], offset0=100), CrashPoints("sink", ""))
    assert [p.row["event_id"] for p in written] == ["e0100"]
    assert len(again.known) <= 70  # the window (plus the file straddling its start), not the history


def test_sink_process_s3_faults_then_exactly_once(s3_settings, s3_server, tmp_path, engine):
    """Unreachable endpoint, wrong secret, missing bucket: the sink says which setting to fix,
    keeps retrying, never logs the secret; once the bucket exists every event is written once."""
    settings = s3_settings
    codec = get_codec()
    produce(settings, settings.topics.enriched, [(f"e{i:04d}", codec.encode("EnrichedRecord", enriched(i))) for i in range(20)])
    bucket = f"missing{int(time.time() * 1000)}"
    # Quick group changes between the sinks below; Kafka refuses under its
    # group.min.session.timeout.ms (6 s by default).
    session_ms = "6000" if engine == "kafka" else "3000"
    env = {**settings_env(settings), **s3_server.env(), "IMGFLOW_KAFKA__SESSION_TIMEOUT_MS": session_ms, "IMGFLOW_KAFKA__HEARTBEAT_INTERVAL_MS": "500"}
    cmd = [sys.executable, "-m", "imgflow", "stage", "sink", "--out", f"s3://{bucket}/out/"]
    cases = [
        ({"IMGFLOW_S3__ENDPOINT_URL": "http://127.0.0.1:9"}, "endpoint unreachable", "s3.endpoint_url"),
        ({"IMGFLOW_S3__SECRET_ACCESS_KEY": "wrong-secret-value-123"}, "SignatureDoesNotMatch", "s3.secret_access_key"),
        ({}, "does not exist", "IMGFLOW_SINK__OUT_DIR"),
    ]
    for n, (override, error, setting) in enumerate(cases):
        log = tmp_path / f"sink{n}.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env={**env, **override, "IMGFLOW_S3__TIMEOUT_S": "2", "IMGFLOW_S3__MAX_ATTEMPTS": "1"}, stdout=f, stderr=subprocess.STDOUT
            )
        try:
            wait_until(lambda log=log, error=error: log.read_text().count(error) >= 2, 60, what=f"{error} retried")
            assert proc.poll() is None, log.read_text()[-2000:]
            text = log.read_text()
            assert setting in text and s3_server.secret_access_key not in text and "wrong-secret" not in text
            if n < len(cases) - 1:
                continue
            s3 = s3_server.client()
            s3.create_bucket(Bucket=bucket)
            wait_until(
                lambda: len(ResultReader(f"s3://{bucket}/out/", settings).existing([f"e{i:04d}" for i in range(20)])) == 20, 60, what="20 rows in the bucket"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
    assert sorted(output_ids(f"s3://{bucket}/out/", settings)) == [f"e{i:04d}" for i in range(20)]


def test_kill_sink_mid_upload_and_kill_s3_server_exactly_once(tmp_path):
    """Own stack (its S3 server is killed): the sink SIGKILLed right after an Avro upload and
    in the middle of its CSV parts, SIGKILLed at random while uploading, and the S3 server
    SIGKILLed while the sink writes; afterwards every event is in the bucket exactly once."""
    from imgflow.app.stack import EmbeddedStack
    from tests.conftest import S3Server

    stack = EmbeddedStack(tmp_path / "stack", port=0, log_file=tmp_path / "stack.log").start()
    procs = []
    try:
        import json

        creds = json.loads((stack.data_dir / "s3-credentials.json").read_text())
        s3 = S3Server(stack.s3_endpoint, creds["access_key_id"], creds["secret_access_key"])
        settings = make_settings(stack.bootstrap, tmp_path, s3=s3.settings_section())
        bucket = new_bucket(s3)
        out = f"s3://{bucket}/results/"
        codec = get_codec()
        # A SIGKILLed member leaves the group after session.timeout.ms: keep restarts quick.
        env = {
            **settings_env(settings),
            **s3.env(),
            "IMGFLOW_SINK__OUT_DIR": out,
            "IMGFLOW_KAFKA__SESSION_TIMEOUT_MS": "3000",
            "IMGFLOW_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        }
        log = tmp_path / "sink.log"

        def start(crash: str | None = None) -> subprocess.Popen:
            with log.open("ab") as f:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "imgflow", "stage", "sink"],
                    cwd=ROOT,
                    env={**env, **({"IMGFLOW_CRASH_AT": crash} if crash else {})},
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            procs.append(proc)
            return proc

        def publish(ids) -> None:
            produce(settings, settings.topics.enriched, [(f"e{i:04d}", codec.encode("EnrichedRecord", enriched(i))) for i in ids])

        for n, point in enumerate(("after_avro", "mid_csv", "after_index")):
            publish(range(n * 10, n * 10 + 10))  # new records, so that the armed sink writes
            assert start(f"sink:{point}:1").wait(timeout=120) == -signal.SIGKILL, log.read_text()[-2000:]
        proc = start()
        for chunk in range(30, 90, 10):  # keep it uploading while it is killed
            publish(range(chunk, chunk + 10))
            time.sleep(0.3)
            if chunk == 50:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                started = log.read_text().count("sink writing to")
                proc = start()
                wait_until(lambda started=started: log.read_text().count("sink writing to") > started, 60, what="the restart")
            if chunk == 70:
                stack.kill_s3()  # the runner restarts SeaweedFS on the same data
        expected = [f"e{i:04d}" for i in range(90)]
        wait_until(lambda: len(ResultReader(out, settings).existing(expected)) == 90, 180, interval=1, what="90 rows in the bucket")
        time.sleep(2)  # anything in flight that could make a second copy lands now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert sorted(output_ids(out, settings)) == expected
        assert sorted(r["event_id"] for r in exported_rows(out, settings)) == expected
        assert "crash point after_avro" in log.read_text() and "crash point mid_csv" in log.read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        stack.stop()


def test_the_lease_is_conditional_and_a_holder_that_stops_renewing_loses_it(s3_server, s3_bucket):
    """The store's conditional writes decide: a second lease cannot be created while one is
    held; once the holder (on another machine, so it cannot be seen to be gone) has not
    renewed for its ttl, it is taken over, and the old holder's next renewal finds that out."""
    from imgflow.s3lease import Holder, LeaseHeld, LeaseLost, S3Lease

    client, key = s3_server.client(), "runs/r1/_sink.lease"
    first = S3Lease(client, s3_bucket, key, "sink of group g1", ttl_s=3)
    first.me = Holder("another-machine", 4242, "sink of group g1", "t1")  # as written from elsewhere
    first.acquire()
    with pytest.raises(Exception, match="PreconditionFailed"):  # If-None-Match: * is honoured
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"x", IfNoneMatch="*")
    second = S3Lease(client, s3_bucket, key, "sink of group g2", ttl_s=3)
    with pytest.raises(LeaseHeld) as held:
        second.acquire()
    assert f"s3://{s3_bucket}/{key}" in str(held.value)
    assert "sink of group g1 (pid 4242 on another-machine)" in str(held.value)
    first.renew()  # renewing keeps it
    with pytest.raises(LeaseHeld):
        second.acquire()
    time.sleep(4.5)  # no renewal for longer than the ttl (the store's clock counts whole seconds)
    second.acquire()
    with pytest.raises(LeaseLost, match="taken over by sink of group g2"):
        first.renew()
    second.release()
    assert client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/").get("KeyCount", 0) == 0


def test_a_second_sink_on_the_same_prefix_refuses_to_start_and_a_killed_sinks_lease_is_taken(s3_settings, s3_server, s3_bucket, tmp_path):
    """Two sink processes of different groups on one s3:// prefix: the second exits at once
    naming the prefix and the holder; the first, killed -9, stops renewing, and a sink then
    takes the prefix over and writes every row once."""
    settings = s3_settings
    codec = get_codec()
    produce(settings, settings.topics.enriched, [(f"e{i:04d}", codec.encode("EnrichedRecord", enriched(i))) for i in range(10)])
    out = f"s3://{s3_bucket}/shared/"
    env = {**settings_env(settings), **s3_server.env(), "IMGFLOW_SINK__LEASE_TTL_S": "6"}
    cmd = [sys.executable, "-m", "imgflow", "stage", "sink", "--out", out]
    log = tmp_path / "first.log"
    with log.open("wb") as f:
        first = subprocess.Popen([*cmd, "--group", "sink-a"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(ResultReader(out, settings).existing([f"e{i:04d}" for i in range(10)])) == 10, 120, what="10 rows from the first sink")
        second = subprocess.run([*cmd, "--group", "sink-b"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        said = second.stdout + second.stderr
        assert f"another sink is writing to {out}" in said, said[-3000:]
        assert f"sink of group sink-a (pid {first.pid} on " in said and f"{out}_sink.lease" in said
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    # The lease outlives its killed holder (nothing deleted it) ...
    assert s3_server.client().get_object(Bucket=s3_bucket, Key="shared/_sink.lease")["Body"].read()
    produce(settings, settings.topics.enriched, [(f"e{i:04d}", codec.encode("EnrichedRecord", enriched(i))) for i in range(10, 15)])
    log = tmp_path / "third.log"
    with log.open("wb") as f:  # ... and is taken over: its holder is gone
        third = subprocess.Popen([*cmd, "--group", "sink-a"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(ResultReader(out, settings).existing([f"e{i:04d}" for i in range(15)])) == 15, 120, what="15 rows")
    finally:
        third.send_signal(signal.SIGTERM)
        assert third.wait(60) == 0, log.read_text()[-3000:]
    assert "took over the lease" in log.read_text()
    assert sorted(output_ids(out, settings)) == [f"e{i:04d}" for i in range(15)]
    # A clean stop deletes the lease: the next sink, of any group, starts at once.
    assert "Contents" not in s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="shared/_sink.lease")
