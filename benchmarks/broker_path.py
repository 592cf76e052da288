"""The broker path alone: no-op transforms, events through watcher -> vision -> enrich -> sink
with the real stage loop (transactions, Avro, commits) and the real sink (CSV + Avro files).

    .venv/bin/python -m benchmarks.broker_path [--events 100000] [--batch 256] [--variants real,empty]
        [--engine tansu,kafka]

An embedded broker in a temp folder, as ``imgflow run`` starts it, of each ``--engine``: tansu
on SeaweedFS (the default engine) and Apache Kafka (KRaft, one node: a ``java`` process); every
variant runs on every engine in the same run (variant by variant, the engines in turn), each
on a fresh broker, and the table puts the engines side by side. The "watcher" publishes ``--events`` ImageEvents as the local watcher does (idempotent producer,
one record per image, Avro); the vision and enrich stages are ``imgflow.stage.StageRunner``
processes whose transforms do no model work; the sink is ``imgflow stage sink``. Every stage
runs as its own process, all at once, as in the pipeline. Two variants, each on a fresh
broker: ``real`` records carry the three vectors at their embedded-profile lengths (384 + 50
+ 1280 float32 values, as a model writes them), ``empty`` ones carry none (what Kafka, Avro
and the commits cost alone).

Reports events/s end to end (first publish to the last row committed by the sink) and per
stage (records / the time between its first and last batch), and the CPU time per event of
every process (the stages, tansu, SeaweedFS, the Kafka JVM: /proc), so the cost can be placed; the CPU
share of the idle pipeline is in the JSON. Goal: >= 5,000 events/s, i.e. Kafka, Avro and
commits cost well under 5 % of a real image's time. Prints a table; JSON in
benchmarks/results/broker_path.json (results keyed by engine, then variant). ``BENCH_PROFILE=1``: cProfile the two stages
(``<stage>.json.prof`` in the run folder; ``BENCH_KEEP=<folder>`` keeps it).
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
from imgflow.process import free_port

VECTOR_DIMS = {"text_vector": 384, "word2vec_vector": 50, "image_vector": 1280}  # embedded profile
IDLE_S = 10.0
VECTOR_SETS = 64
VARIANTS = ("real", "empty")  # records of a real image's size; empty vectors (Kafka + Avro + commits alone)
ENGINES = ("tansu", "kafka")  # the embedded broker engines (imgflow run --engine)
BROKER_PARTS = ("tansu", "seaweedfs", "kafka", "broker_runner")


def _vectors(variant: str) -> list[dict[str, list[float]]]:
    """Built once per process. "real": float32 values with 7 significant digits, as a model's;
    64 different sets, used in turn, so that no compressor finds a row repeated within its
    window (identical rows made the sink's deflate look free)."""
    if variant == "empty":
        return [{k: [] for k in VECTOR_DIMS}]
    import random
    import struct

    rng = random.Random(1)
    return [
        {k: list(struct.unpack(f"<{n}f", struct.pack(f"<{n}f", *(rng.gauss(0, 0.05) for _ in range(n))))) for k, n in VECTOR_DIMS.items()}
        for _ in range(VECTOR_SETS)
    ]


def vision_value(event: dict, vectors: dict) -> dict:
    labels = [{"label": "Egyptian cat", "score": 0.8}]
    value = {"event": event, "text": "a photo showing a cat (80%)", "image_text": "", "labels": labels, **vectors, "width": 384, "height": 256}
    return value | {"models": {"describe": "noop"}, "seconds": 0.0, "processed_at": int(time.time() * 1000)}


def enriched_value(vision: dict) -> dict:
    data = {"description": "A cat.", "category": "animal", "keywords": ["cat", "pet", "animal"], "image_text": ""}
    value = {"vision": vision, **data, "llama_extracted": json.dumps(data)}
    return value | {"models": {"structure_text": "noop"}, "seconds": 0.0, "processed_at": int(time.time() * 1000)}


def _transforms(variant: str):
    VECTORS = _vectors(variant)
    from imgflow.settings import Settings
    from imgflow.stage import OutputRecord, Transform

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
            value = vision_value(rec.value, VECTORS[rec.offset % len(VECTORS)])
            return [OutputRecord(self.settings.topics.vision, "VisionResult", value, rec.event_id)]

    class NoOpEnrich(Counting):
        name, input_schema, output_schemas = "enrich", "VisionResult", ["EnrichedRecord"]

        def input_topics(self, settings):
            return [settings.topics.vision]

        def event_of(self, value):
            return value["event"]

        def vision_of(self, value):
            return value

        def one(self, rec):
            value = enriched_value(rec.value)
            return [OutputRecord(self.settings.topics.enriched, "EnrichedRecord", value, rec.event_id)]

    return NoOpVision, NoOpEnrich


def stage_child(role: str, expected: int, stats: Path, variant: str) -> None:
    from imgflow.logs import setup_logging
    from imgflow.settings import Settings
    from imgflow.stage import StageRunner, install_signal_handlers

    setup_logging()
    settings = Settings()
    vision, enrich = _transforms(variant)
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


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (those gone count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """A process and all its descendants (the embedded broker: its runner, tansu, SeaweedFS)."""
    from benchmarks.perf_common import children_of

    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children_of(p)
    return found


def broker_processes(pid: int) -> dict[str, list[int]]:
    """The embedded broker's processes: tansu, SeaweedFS (weed), the Kafka node (its JVM,
    ``java``), and its supervising runner (``python -m infra.embedded``, anything else)."""
    parts: dict[str, list[int]] = {part: [] for part in BROKER_PARTS}
    for p in descendants(pid):
        try:
            comm = open(f"/proc/{p}/comm").read().strip()
        except OSError:
            continue
        parts["tansu" if comm.startswith("tansu") else "seaweedfs" if comm.startswith("weed") else "kafka" if comm == "java" else "broker_runner"].append(p)
    return parts


def run_variant(variant: str, events: int, batch: int, timeout: float, avro_codec: str = "deflate", engine: str = "tansu") -> dict:
    from imgflow.app.stack import EmbeddedStack
    from imgflow.kafka import ensure_topics
    from imgflow.samples import render_text_image
    from imgflow.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(os.environ.get("BENCH_KEEP") or tmp) / f"{engine}-{variant}"
        image = tmp / "images" / "one.png"
        image.parent.mkdir(parents=True)
        render_text_image(["BENCH"]).save(image)
        out = tmp / "out"
        stack = EmbeddedStack(tmp / "broker", port=free_port(), log_file=tmp / "broker.log", engine=engine)
        print(f"[{engine} {variant}] starting the {engine} broker ...", flush=True)
        stack.start()
        procs: dict[str, subprocess.Popen] = {}
        try:
            env = dict(
                os.environ,
                IMGFLOW_KAFKA__BOOTSTRAP=stack.bootstrap,
                IMGFLOW_DATA_DIR=str(tmp / "data"),
                IMGFLOW_SINK__OUT_DIR=str(out),
                IMGFLOW_STAGE__BATCH_SIZE=str(batch),
                IMGFLOW_ALLOWED_ROOTS=f'["{image.parent}"]',
                IMGFLOW_METRICS_PORT="0",
                PYTHONUNBUFFERED="1",
                IMGFLOW_SINK__AVRO_CODEC=avro_codec,
            )
            env.pop("IMGFLOW_CONFIG", None)
            settings = Settings(kafka={"bootstrap": stack.bootstrap}, data_dir=tmp / "data", stage={"batch_size": batch})
            ensure_topics(settings)
            stats = {role: tmp / f"{role}.json" for role in ("vision", "enrich")}
            for role in ("vision", "enrich"):
                with open(tmp / f"{role}.log", "w") as log:
                    procs[role] = subprocess.Popen(
                        [sys.executable, "-m", "benchmarks.broker_path", "--child", role, str(events), str(stats[role]), variant],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
            with open(tmp / "sink.log", "w") as log:
                procs["sink"] = subprocess.Popen([sys.executable, "-m", "imgflow", "stage", "sink"], env=env, stdout=log, stderr=subprocess.STDOUT)
            time.sleep(5)  # let the stages join their groups
            broker = {part: pids for part, pids in broker_processes(stack.proc.pid).items() if pids or part == "broker_runner"}  # only this engine's parts

            def cpu_now() -> dict[str, float]:
                now = {role: cpu_seconds([p.pid]) for role, p in procs.items()}
                now.update({part: cpu_seconds(pids) for part, pids in broker.items()})
                return now

            idle0, t_idle = cpu_now(), time.time()
            time.sleep(IDLE_S)  # what the idle pipeline costs: stages polling an empty topic
            idle = {part: (c - idle0[part]) / (time.time() - t_idle) for part, c in cpu_now().items()}
            cpu0 = cpu_now()
            cpu0["watcher"] = sum(os.times()[:2])
            load0 = os.getloadavg()[0]
            print(f"[{engine} {variant}] publishing {events} events ...", flush=True)
            started = publish(settings, events, image)
            published = time.time()
            cpu_pub = sum(os.times()[:2]) - cpu0["watcher"]
            print(f"  published in {published - started:.1f}s; waiting for the sink ...", flush=True)
            state: dict = {}
            first_row = last_report = None
            while True:
                rows = committed_rows(out, state)
                now = time.time()
                if rows and first_row is None:
                    first_row = now
                if rows >= events:
                    break
                if now - started > timeout:
                    raise SystemExit(f"timed out: {rows} of {events} rows after {timeout:.0f}s (logs in {tmp})")
                if last_report is None or now - last_report > 10:
                    print(f"  {rows} rows", flush=True)
                    last_report = now
                time.sleep(0.2)
            done = time.time()
            cpu = {role: cpu_seconds([p.pid]) - cpu0[role] for role, p in procs.items()}
            cpu.update({part: cpu_seconds(pids) - cpu0[part] for part, pids in broker.items()})
            cpu["watcher"] = cpu_pub
            load1 = os.getloadavg()[0]
            out_bytes = {"csv": (out / "results.csv").stat().st_size, "avro": sum(f.stat().st_size for f in (out / "avro").rglob("*.avro"))}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.terminate()
            for p in procs.values():
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
            stack.stop()
        figures = {
            "end_to_end": {"events": events, "seconds": done - started, "events_per_s": events / (done - started)},
            "watcher": {"events": events, "seconds": published - started, "events_per_s": events / max(1e-9, published - started)},
        }
        for role in ("vision", "enrich"):
            s = json.loads(stats[role].read_text())
            figures[role] = {"events": s["count"], "seconds": s["last"] - s["first"], "events_per_s": s["count"] / max(1e-9, s["last"] - s["first"])}
        figures["sink"] = {"events": events, "seconds": done - first_row, "events_per_s": events / max(1e-9, done - first_row)}
        for part, seconds in cpu.items():  # CPU time per event, each process (broker: tansu + SeaweedFS)
            figures.setdefault(part, {})["cpu_us_per_event"] = 1e6 * seconds / events
        for part, share in idle.items():  # CPU share (1.0: one core) while no event flows
            figures[part]["idle_cpu_share"] = share
        figures["broker_total"] = {
            "cpu_us_per_event": sum(figures[part]["cpu_us_per_event"] for part in broker),
            "idle_cpu_share": sum(idle[part] for part in broker),
        }
        return {
            "engine": engine,
            "figures": figures,
            "load_avg_1m": [load0, load1],
            "output_bytes": out_bytes,
            "record_bytes": record_sizes(variant, image),
            "broker_startup_s": stack.startup_s,
        }


def record_sizes(variant: str, image: Path) -> dict:
    """The Avro size of one record of each topic (what Kafka carries per event)."""
    from imgflow.events import local_image_event
    from schemas.codec import get_codec

    codec = get_codec()
    event = local_image_event(image, image.stat(), source="benchmark", run_id="live")
    vision = vision_value(event, _vectors(variant)[0])
    return {
        "ImageEvent": len(codec.encode("ImageEvent", event)),
        "VisionResult": len(codec.encode("VisionResult", vision)),
        "EnrichedRecord": len(codec.encode("EnrichedRecord", enriched_value(vision))),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=256, help="stage.batch_size of every stage (default 256)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="real (a real image's vectors), empty (no vectors), or both (default: real,empty)")
    ap.add_argument(
        "--avro-codec", choices=["deflate", "null"], default="deflate", help="the sink's Avro files (sink.avro_codec; default deflate, the default setting)"
    )
    ap.add_argument("--engine", default=",".join(ENGINES), help="embedded broker engines, each variant on each (default: tansu,kafka)")
    ap.add_argument("--timeout", type=float, default=1800, help="per variant and engine")
    ap.add_argument("--child", nargs=4, metavar=("ROLE", "N", "STATS", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        stage_child(args.child[0], int(args.child[1]), Path(args.child[2]), args.child[3])
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    engines = list(dict.fromkeys(e.strip() for e in args.engine.split(",") if e.strip()))
    if not engines or any(e not in ENGINES for e in engines):
        ap.error(f"--engine: choose from {', '.join(ENGINES)}")
    results: dict[str, dict[str, dict]] = {e: {} for e in engines}
    for v in variants:  # the engines in turn, variant by variant, each on a fresh broker
        for e in engines:
            results[e][v] = run_variant(v, args.events, args.batch, args.timeout, args.avro_codec, engine=e)
    parts = ["end_to_end", "watcher", "vision", "enrich", "sink", "tansu", "seaweedfs", "kafka", "broker_runner", "broker_total"]
    parts = [p for p in parts if any(p in results[e][v]["figures"] for e in engines for v in variants)]
    headers = ["part"]
    for v in variants:
        for e in engines:
            headers += [f"{v} {e} events/s", f"{v} {e} cpu us/event"]
    rows = []
    for part in parts:
        row = [part]
        for v in variants:
            for e in engines:
                f = results[e][v]["figures"].get(part, {})
                row += [round(f["events_per_s"]) if "events_per_s" in f else "", round(f["cpu_us_per_event"]) if "cpu_us_per_event" in f else ""]
        rows.append(row)
    loads = ", ".join(f"{v} {e} {results[e][v]['load_avg_1m'][0]:.1f}" for v in variants for e in engines)
    print_table(
        f"broker path: {args.events} events per variant and engine, no-op transforms, stage batch "
        f"{args.batch}, transactions on, sink Avro {args.avro_codec}; load average at start: {loads}",
        headers,
        rows,
    )
    write_result(
        "broker_path",
        {
            "events": args.events,
            "batch": args.batch,
            "avro_codec": args.avro_codec,
            "goal_events_per_s": 5000,
            "engines": engines,
            "variants": variants,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
