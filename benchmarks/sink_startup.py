"""Sink start-up time and peak memory with a long history already written, local and on S3.

    .venv/bin/python -m benchmarks.sink_startup                 # 10k and 1M rows, local and S3
    .venv/bin/python -m benchmarks.sink_startup --rows 10000 --rows 100000

For each history size and output kind it starts an embedded stack (tansu + SeaweedFS, the
S3 server), writes the history through the sink's own writer (``ResultStore.write``: Avro
files, CSV rows or parts, ``_index`` objects; batches of ``--batch`` rows over 3 partitions,
a checkpoint after each as the runner does), commits the group's offsets in the broker, and
leaves the last batch cut short after its Avro upload (a crash). Then it starts a fresh
process that does what ``imgflow stage sink`` does before consuming - lock the output, ask
the broker for the committed offsets, recover - and reports its start-up time (the whole
process: interpreter, imports, broker round trip, recovery) and peak RSS. It also times the
backfill skip check (``ResultReader.existing``: 100,000 ids, half of them present).

Rows carry short vectors (8 floats each) so that a million rows can be generated in minutes:
start-up reads the ``_index`` objects of the dedupe window and the one cut-short batch,
neither of which depends on the size of a row.
Results: printed as a table and written to benchmarks/results/sink_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUP = "imgflow-sink"


def event_id(i: int) -> str:
    return f"{i:032x}"


def enriched_row(i: int, topic: str, partition: int, offset: int) -> dict:
    from benchmarks.perf_common import synthetic_records
    from imgflow.output.rows import row_from_enriched

    _, _, e = synthetic_records(
        event_id(i),
        f"/images/{i}.jpg",
        ([0.125] * 8, [0.25] * 8, [0.5] * 8),
        ("composed@1", "llm@1"),
        event={"size": 1000, "source": "local", "run_id": "live"},
        vision={"text": f"A photo number {i}", "labels": [], "width": 1, "height": 1},
        enriched={"description": "a photo", "category": "photo", "keywords": ["photo"], "seconds": 0.1, "processed_at": 1_800_000_000_000},
    )
    return row_from_enriched(e, topic, partition, offset)


def settings_for(bootstrap: str, s3: dict, out, topic: str, dlq: str):
    from imgflow.settings import Settings

    return Settings(
        kafka={"bootstrap": bootstrap},
        topics={"enriched": topic, "dlq": dlq, "partitions": 3},
        sink={"out_dir": out},
        s3=s3,
        data_dir=Path(tempfile.gettempdir()) / "imgflow-bench",
    )


def write_history(settings, out, rows: int, batch: int, partitions: int = 3) -> dict[tuple[str, int], int]:
    """``rows`` rows through the sink's writer; returns the offsets to commit. The last batch
    is left as a crash after its Avro file (no CSV rows, no index, offsets not committed)."""
    from imgflow.output.store import PendingRow, ResultStore
    from imgflow.stage import CrashPoints

    topic = settings.topics.enriched
    store = ResultStore(out, settings=settings)
    store.lock()
    store.recover({})
    next_offset = [0] * partitions
    committed: dict[tuple[str, int], int] = {}
    no_crash = CrashPoints("sink", "")
    done, n, started = 0, 0, time.monotonic()
    while done < rows:
        p = n % partitions
        count = min(batch, rows - done)
        pending = [PendingRow(topic, p, next_offset[p] + k, enriched_row(done + k, topic, p, next_offset[p] + k)) for k in range(count)]
        last = done + count >= rows
        if last:
            store._write_avro(topic, p, pending)  # the crash: Avro written, nothing after it
        else:
            store.write(pending, no_crash)
            store.checkpoint()
            committed[(topic, p)] = next_offset[p] + count
        next_offset[p] += count
        done += count
        n += 1
        if n % 200 == 0:
            print(f"  {done:,}/{rows:,} rows written ({done / (time.monotonic() - started):,.0f}/s)", flush=True)
    if store._lock_file:
        store._lock_file.close()
    return committed


def commit_offsets(settings, committed: dict[tuple[str, int], int]) -> None:
    from confluent_kafka import Consumer, TopicPartition

    from imgflow.kafka import consumer_config, ensure_topics
    from imgflow.topics import all_topic_specs

    names = (settings.topics.enriched, settings.topics.dlq)
    ensure_topics(settings, [s for s in all_topic_specs(settings) if s.name in names])
    consumer = Consumer(consumer_config(settings, GROUP))
    try:
        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in committed.items()], asynchronous=False)
        got = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed([TopicPartition(t, p) for t, p in committed], timeout=30)}
        assert got == committed, f"the broker kept {got}, not {committed}"
    finally:
        consumer.close()


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: that survives exec, so a child would
    report the peak of the (large) benchmark process that forked it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child() -> None:
    """What `imgflow stage sink` does before it consumes: lock, committed offsets, recover."""
    t0 = time.monotonic()
    from confluent_kafka import Consumer

    from consumers.sink import SinkRunner
    from imgflow.kafka import consumer_config
    from imgflow.settings import Settings

    settings = Settings()
    runner = SinkRunner(settings, GROUP)
    consumer = Consumer(consumer_config(settings, GROUP))
    t1 = time.monotonic()
    rss_before = peak_rss_mb()
    runner.start(consumer)
    t2 = time.monotonic()
    consumer.close()
    print(
        json.dumps(
            {
                "recover_s": t2 - t1,
                "imports_s": t1 - t0,
                "known": len(runner.store.known),
                "peak_rss_before_recover_mb": rss_before,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def measure_startup(settings, s3: dict, out) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGFLOW_")}
    env.update(
        {
            "IMGFLOW_KAFKA__BOOTSTRAP": settings.kafka.bootstrap,
            "IMGFLOW_TOPICS__ENRICHED": settings.topics.enriched,
            "IMGFLOW_TOPICS__DLQ": settings.topics.dlq,
            "IMGFLOW_SINK__OUT_DIR": str(out),
            "IMGFLOW_LOG_LEVEL": "WARNING",
            "IMGFLOW_S3__ENDPOINT_URL": s3["endpoint_url"],
            "IMGFLOW_S3__ACCESS_KEY_ID": s3["access_key_id"],
            "IMGFLOW_S3__SECRET_ACCESS_KEY": s3["secret_access_key"],
            "IMGFLOW_S3__REGION": "us-east-1",
        }
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sink_startup", "--child"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def skip_check(settings, out, rows: int, lookups: int = 100_000) -> float:
    from imgflow.output.reader import ResultReader

    present = [event_id(i) for i in range(0, rows, max(1, rows // (lookups // 2)))][: lookups // 2]
    absent = [f"absent{i:026d}" for i in range(lookups - len(present))]
    started = time.monotonic()
    found = ResultReader(out, settings).existing(present + absent)
    seconds = time.monotonic() - started
    assert found == set(present), f"skip check found {len(found)} of {len(present)}"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="history sizes (default: 10000 and 1000000)")
    parser.add_argument("--batch", type=int, default=500, help="rows per sink batch (one Avro file each)")
    parser.add_argument("--kinds", default="local,s3", help="local, s3 or both")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return
    from imgflow.app.stack import EmbeddedStack
    from imgflow.logs import setup_logging

    setup_logging("WARNING", "text")
    sizes = args.rows or [10_000, 1_000_000]
    results = []
    with tempfile.TemporaryDirectory(prefix="sink-startup-") as tmp:
        stack = EmbeddedStack(Path(tmp) / "stack", port=0, log_file=Path(tmp) / "stack.log").start()
        try:
            creds = json.loads((stack.data_dir / "s3-credentials.json").read_text())
            s3 = {"endpoint_url": stack.s3_endpoint, "region": "us-east-1", **creds}
            for rows in sizes:
                for kind in args.kinds.split(","):
                    if kind == "s3":
                        import boto3

                        bucket = f"bench{uuid.uuid4().hex[:10]}"
                        boto3.client(
                            "s3",
                            endpoint_url=s3["endpoint_url"],
                            aws_access_key_id=creds["access_key_id"],
                            aws_secret_access_key=creds["secret_access_key"],
                            region_name="us-east-1",
                        ).create_bucket(Bucket=bucket)
                        out = f"s3://{bucket}/results/"
                    else:
                        out = Path(tmp) / f"out-{rows}"
                    # Topics of its own per case: the group's offsets are this history's.
                    name = f"bench{uuid.uuid4().hex[:8]}"
                    settings = settings_for(stack.bootstrap, s3, out, f"{name}.enriched", f"{name}.dlq")
                    print(f"{kind}, {rows:,} rows: writing the history to {out} ...", flush=True)
                    t0 = time.monotonic()
                    committed = write_history(settings, out, rows, args.batch)
                    written_s = time.monotonic() - t0
                    commit_offsets(settings, committed)
                    start = measure_startup(settings, s3, out)
                    check_s = skip_check(settings, out, rows)
                    row = {
                        "kind": kind,
                        "rows": rows,
                        "files": -(-rows // args.batch),
                        "history_written_s": written_s,
                        "startup_process_s": start["process_s"],
                        "recover_s": start["recover_s"],
                        "peak_rss_mb": start["peak_rss_mb"],
                        "recent_ids_known": start["known"],
                        "peak_rss_before_recover_mb": start["peak_rss_before_recover_mb"],
                        "skip_check_100k_s": check_s,
                    }
                    print("  " + json.dumps(row), flush=True)
                    results.append(row)
                    if kind == "local":
                        import shutil

                        shutil.rmtree(out)
        finally:
            stack.stop()
    print("\n| output | rows written before | sink start-up (whole process) | of which recovery | peak RSS | ids known | skip check, 100k ids |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['kind']} | {r['rows']:,} | {r['startup_process_s']:.2f} s | {r['recover_s']:.2f} s "
            f"| {r['peak_rss_mb']:.0f} MB | {r['recent_ids_known']:,} | {r['skip_check_100k_s']:.1f} s |"
        )
    dest = ROOT / "benchmarks" / "results" / "sink_startup.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"batch": args.batch, "cpus": os.cpu_count(), "results": results}, indent=2) + "\n")
    print(f"\nwritten to {dest}")


if __name__ == "__main__":
    main()
