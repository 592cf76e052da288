"""The broker path alone: no-op transforms, events through watcher -> vision -> enrich -> sink
with the real stage loop (transactions, Avro, commits) and the real sink (CSV + Avro files).

    .venv/bin/python -m benchmarks.broker_path [--events 100000] [--batch 256]

An embedded broker (tansu on SeaweedFS, as ``imgflow run`` starts it) in a temp folder; the
"watcher" publishes ``--events`` ImageEvents as the local watcher does (idempotent producer,
one record per image, Avro); the vision and enrich stages are ``imgflow.stage.StageRunner``
processes whose transforms do no model work but emit records of a real image's size (the
three vectors at their embedded-profile lengths); the sink is ``imgflow stage sink``.
Every stage runs as its own process, all at once, as in the pipeline.

Reports events/s end to end (first publish to the last row committed by the sink) and per
stage (records / the time between its first and last batch). Goal: >= 5,000 events/s, i.e.
Kafka, Avro and commits cost well under 5 % of a real image's time. Prints a table; JSON in
benchmarks/results/broker_path.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.perf_common import print_table, write_result

VECTOR_DIMS = {"text_vector": 384, "word2vec_vector": 50, "image_vector": 1280}  # embedded profile
VECTORS = {k: [0.01 * (i % 97) for i in range(n)] for k, n in VECTOR_DIMS.items()}  # built once


def _transforms():
    from imgflow.settings import Settings
    from imgflow.stage import Output, Transform

    class Counting(Transform):
        def __init__(self, settings: Settings, expected: int, stats: Path) -> None:
            self.settings, self.expected, self.stats = settings, expected, stats
            self.count, self.first, self.last = 0, None, None
            self.runner = None

        def process(self, records):
            now = time.time()
            self.first = self.first or now
            out = [self.one(r) for r in records]
            self.count += len(records)
            self.last = time.time()
            self.stats.write_text(json.dumps({"count": self.count, "first": self.first, "last": self.last}))
            if self.count >= self.expected and self.runner is not None:
                self.runner.request_stop()
            return out

    class NoOpVision(Counting):
        name, input_schema, output_schemas = "vision", "ImageEvent", ["VisionResult"]

        def input_topics(self, settings):
            return [settings.topics.new_high, settings.topics.new]

        def one(self, rec):
            value = {"event": rec.value, "text": "a photo showing a cat (80%)", "image_text": "",
                     "labels": [{"label": "Egyptian cat", "score": 0.8}],
                     **VECTORS,
                     "width": 384, "height": 256, "models": {"describe": "noop"}, "seconds": 0.0,
                     "processed_at": int(time.time() * 1000)}
            return [Output(self.settings.topics.vision, "VisionResult", value, rec.event_id)]

    class NoOpEnrich(Counting):
        name, input_schema, output_schemas = "enrich", "VisionResult", ["EnrichedRecord"]

        def input_topics(self, settings):
            return [settings.topics.vision]

        def event_of(self, value):
            return value["event"]

        def vision_of(self, value):
            return value

        def one(self, rec):
            data = {"description": "A cat.", "category": "animal", "keywords": ["cat", "pet", "animal"],
                    "image_text": ""}
            value = {"vision": rec.value, **data, "llama_extracted": json.dumps(data),
                     "models": {"structure_text": "noop"}, "seconds": 0.0, "processed_at": int(time.time() * 1000)}
            return [Output(self.settings.topics.enriched, "EnrichedRecord", value, rec.event_id)]

    return NoOpVision, NoOpEnrich


def stage_child(role: str, expected: int, stats: Path) -> None:
    from imgflow.logs import setup_logging
    from imgflow.settings import Settings
    from imgflow.stage import StageRunner, install_signal_handlers

    setup_logging()
    settings = Settings()
    vision, enrich = _transforms()
    transform = (vision if role == "vision" else enrich)(settings, expected, stats)
    runner = StageRunner(transform, settings)
    transform.runner = runner
    install_signal_handlers(runner)
    if os.environ.get("BENCH_PROFILE"):  # where a no-op stage's time goes
        import cProfile

        cProfile.runctx("runner.run()", globals(), {"runner": runner}, f"{stats}.prof")
    else:
        runner.run()


def publish(settings, n: int, image: Path) -> float:
    """As the local watcher publishes: one Avro ImageEvent per image, idempotent producer."""
    from confluent_kafka import Producer

    from imgflow.events import local_image_event
    from imgflow.kafka import producer_config, publish_schemas
    from schemas.codec import get_codec

    codec = get_codec()
    publish_schemas(settings, codec, ["ImageEvent"])
    producer = Producer(producer_config(settings))
    st = image.stat()
    started = time.time()
    base = local_image_event(image, st, source="benchmark", run_id=settings.run_id)
    for i in range(n):
        event = dict(base, event_id=f"{i:08d}{base['event_id'][8:]}", image_path=f"{image}#{i}")
        producer.produce(settings.topics.new, key=event["event_id"], value=codec.encode("ImageEvent", event))
        if i % 1000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left:
        raise SystemExit(f"{left} events not acknowledged")
    return started


def committed_rows(out: Path, state: dict) -> int:
    """Rows in the sink's CSV up to its committed length (read incrementally)."""
    marker, csv_path = out / ".results.csv.committed", out / "results.csv"
    try:
        length = int(marker.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return state.get("rows", 0)
    if length > state.get("pos", 0):
        with open(csv_path, "rb") as f:
            f.seek(state.get("pos", 0))
            chunk = f.read(length - state.get("pos", 0))
        state["rows"] = state.get("rows", 0) + chunk.count(b"\n")
        state["pos"] = length
    return state.get("rows", 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=256, help="stage.batch_size of every stage (default 256)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--child", nargs=3, metavar=("ROLE", "N", "STATS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        stage_child(args.child[0], int(args.child[1]), Path(args.child[2]))
        return 0

    from imgflow.kafka import ensure_topics
    from imgflow.settings import Settings
    from imgflow.stack import EmbeddedStack
    from imgflow.samples import render_text_image

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(os.environ.get("BENCH_KEEP") or tmp)
        image = tmp / "images" / "one.png"
        image.parent.mkdir()
        render_text_image(["BENCH"]).save(image)
        out = tmp / "out"
        stack = EmbeddedStack(tmp / "broker", port=_free_port(), log_file=tmp / "broker.log")
        stack.start()
        procs: list[subprocess.Popen] = []
        try:
            env = dict(os.environ, IMGFLOW_KAFKA__BOOTSTRAP=stack.bootstrap, IMGFLOW_DATA_DIR=str(tmp / "data"),
                       IMGFLOW_SINK__OUT_DIR=str(out), IMGFLOW_STAGE__BATCH_SIZE=str(args.batch),
                       IMGFLOW_ALLOWED_ROOTS=f'["{image.parent}"]', IMGFLOW_METRICS_PORT="0", PYTHONUNBUFFERED="1")
            env.pop("IMGFLOW_CONFIG", None)
            settings = Settings(kafka={"bootstrap": stack.bootstrap}, data_dir=tmp / "data",
                                stage={"batch_size": args.batch})
            ensure_topics(settings)
            stats = {role: tmp / f"{role}.json" for role in ("vision", "enrich")}
            logs = {}
            for role in ("vision", "enrich"):
                logs[role] = open(tmp / f"{role}.log", "w")
                procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.broker_path", "--child", role,
                                               str(args.events), str(stats[role])], env=env,
                                              stdout=logs[role], stderr=subprocess.STDOUT))
            logs["sink"] = open(tmp / "sink.log", "w")
            procs.append(subprocess.Popen([sys.executable, "-m", "imgflow.cli", "stage", "sink"], env=env,
                                          stdout=logs["sink"], stderr=subprocess.STDOUT))
            time.sleep(5)  # let the stages join their groups
            print(f"publishing {args.events} events ...", flush=True)
            started = publish(settings, args.events, image)
            published = time.time()
            print(f"  published in {published - started:.1f}s; waiting for the sink ...", flush=True)
            state: dict = {}
            first_row = last_report = None
            while True:
                rows = committed_rows(out, state)
                now = time.time()
                if rows and first_row is None:
                    first_row = now
                if rows >= args.events:
                    break
                if now - started > args.timeout:
                    raise SystemExit(f"timed out: {rows} of {args.events} rows after {args.timeout:.0f}s "
                                     f"(logs in {tmp})")
                if last_report is None or now - last_report > 10:
                    print(f"  {rows} rows", flush=True)
                    last_report = now
                time.sleep(0.2)
            done = time.time()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
            stack.stop()
        figures = {"end_to_end": {"events": args.events, "seconds": done - started,
                                  "events_per_s": args.events / (done - started)},
                   "watcher_publish": {"events": args.events, "seconds": published - started,
                                       "events_per_s": args.events / max(1e-9, published - started)}}
        for role in ("vision", "enrich"):
            s = json.loads(stats[role].read_text())
            figures[role] = {"events": s["count"], "seconds": s["last"] - s["first"],
                             "events_per_s": s["count"] / max(1e-9, s["last"] - s["first"])}
        figures["sink"] = {"events": args.events, "seconds": done - first_row,
                           "events_per_s": args.events / max(1e-9, done - first_row)}
    rows = [[name, f["events"], f["seconds"], round(f["events_per_s"])] for name, f in figures.items()]
    print_table(f"broker path: {args.events} events, no-op transforms, stage batch {args.batch}, transactions on",
                ["part", "events", "seconds", "events/s"], rows)
    write_result("broker_path", {"events": args.events, "batch": args.batch, "figures": figures,
                                 "goal_events_per_s": 5000})
    return 0


def _free_port() -> int:
    from imgflow.stack import free_port

    return free_port()


if __name__ == "__main__":
    raise SystemExit(main())
