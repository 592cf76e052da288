"""Memory of `imgflow run`'s supervisor loop alone (progress counting: TopicCounter over the
five topics, ResultReader over the sink's output) as the history grows, without models:

    .venv/bin/python -m benchmarks.supervisor_memory [--images 4000] [--old COMMIT]

A tansu stack is started; batches of real-size records (an ImageEvent, a VisionResult and an
EnrichedRecord with 1,280 + 384 + 50 float vectors) are produced and their rows written by
the sink's ResultStore (real CSV rows, ~25 KB each), while a separate process runs the
supervisor's refresh loop (every 0.2 s) and its RSS is sampled at 25/50/75/100 % of the rows.
``--old COMMIT`` runs that commit's TopicCounter and CommittedResults instead (the memory
growth the memory benchmark showed: 63 -> 95 MB over 1,000 images). JSON in
benchmarks/results/supervisor_memory[_old].json.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

from benchmarks.perf_common import print_table, rss_mb, synthetic_records, write_result

ROOT = Path(__file__).resolve().parents[1]


def _old_classes(commit: str):
    """TopicCounter and CommittedResults as they were at ``commit``."""

    def module(path: str, name: str) -> types.ModuleType:
        src = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        mod = types.ModuleType(name)
        mod.__file__ = str(ROOT / path)
        sys.modules[name] = mod
        exec(compile(src, path, "exec"), mod.__dict__)  # noqa: S102 - our own history
        return mod

    results = module("imgflow/results.py", "old_results")
    pipeline = module("imgflow/pipeline.py", "old_pipeline")
    return pipeline.TopicCounter, results.CommittedResults


def supervisor(settings_json: str, out: str, old: str, stop_file: str) -> None:
    from imgflow.settings import Settings

    settings = Settings.model_validate_json(settings_json)
    if old:
        counter_cls, results_cls = _old_classes(old)
        tail = results_cls(Path(out), settings)
    else:
        from imgflow.app.progress import TopicCounter as counter_cls
        from imgflow.output.reader import ResultReader

        tail = ResultReader(Path(out), settings, wanted=set())
    t = settings.topics
    counter = counter_cls(settings, [t.new, t.new_high, t.vision, t.enriched, t.dlq])
    while not os.path.exists(stop_file):
        tail.refresh()
        counter.refresh()
        time.sleep(0.2)
    written = tail.rows if hasattr(tail, "rows") else len(tail.done)
    print(f"supervisor saw {written} rows, {counter.count(t.vision)} vision records", flush=True)
    counter.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--old", default="", help="a commit whose supervisor classes to measure instead")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        supervisor(*args.child[:2], args.old, args.child[2])
        return 0

    from confluent_kafka import Producer

    from imgflow.app.stack import EmbeddedStack
    from imgflow.kafka import ensure_topics, producer_config
    from imgflow.output.rows import row_from_enriched
    from imgflow.output.store import PendingRow, ResultStore
    from imgflow.settings import Settings
    from imgflow.stage import CrashPoints
    from schemas.codec import get_codec

    rng = random.Random(0)
    codec = get_codec()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedStack(Path(tmp) / "broker", port=0) as stack:
        suffix = uuid.uuid4().hex[:8]
        out = Path(tmp) / "out"
        settings = Settings(
            kafka={"bootstrap": stack.bootstrap},
            topics={
                "new": f"s{suffix}.new",
                "new_high": f"s{suffix}.new.high",
                "vision": f"s{suffix}.vision",
                "enriched": f"s{suffix}.enriched",
                "dlq": f"s{suffix}.dlq",
                "partitions": 3,
            },
        )
        ensure_topics(settings)
        store = ResultStore(out, settings=settings)
        store.lock()
        store.recover()
        producer = Producer(producer_config(settings))
        stop_file = Path(tmp) / "stop"
        child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.supervisor_memory", "--old", args.old, "--child", settings.model_dump_json(), str(out), str(stop_file)], cwd=ROOT
        )
        samples: list[tuple[int, float]] = []
        t = settings.topics
        offset = 0
        started = time.time()
        try:
            time.sleep(3)
            samples.append((0, rss_mb(child.pid) or 0.0))
            while offset < args.images:
                pending = []
                for _ in range(args.batch):
                    i = offset
                    eid = uuid.uuid4().hex
                    vectors = ([rng.random() for _ in range(384)], [rng.random() for _ in range(50)], [rng.random() for _ in range(1280)])
                    text, labels = f"A photo most likely showing a thing, number {i}", [{"label": "thing", "score": 0.5}]
                    event, vision, enriched = synthetic_records(
                        eid,
                        f"/imgs/{i}.jpg",
                        vectors,
                        ("composed", "s@1"),
                        event={"size": 1, "source": "bench", "run_id": "b"},
                        vision={"text": text, "labels": labels, "width": 160, "height": 120},
                        enriched={"description": f"a thing {i}", "category": "object", "keywords": ["thing"], "seconds": 0.2, "processed_at": 0},
                    )
                    producer.produce(t.new, key=eid, value=codec.encode("ImageEvent", event))
                    producer.produce(t.vision, key=eid, value=codec.encode("VisionResult", vision))
                    producer.produce(t.enriched, key=eid, value=codec.encode("EnrichedRecord", enriched))
                    pending.append(PendingRow(t.enriched, 0, offset, row_from_enriched(enriched, t.enriched, 0, offset)))
                    offset += 1
                producer.flush(30)
                store.write(pending, CrashPoints("sink", ""))
                store.checkpoint()
                time.sleep(0.5)
                if offset * 4 // args.images > (offset - args.batch) * 4 // args.images:
                    time.sleep(2)  # let it catch up, then sample
                    samples.append((offset, rss_mb(child.pid) or 0.0))
        finally:
            stop_file.touch()
            child.wait(60)
        wall = time.time() - started
    csv_mb = None
    label = f"old ({args.old})" if args.old else "now"
    rows = [[f"{n} rows", round(mb, 1)] for n, mb in samples]
    print_table(f"supervisor loop RSS, {label}: {args.images} real-size rows in {wall:.0f}s", ["written", "RSS MB"], rows)
    first = next((mb for n, mb in samples if n >= args.images // 4), samples[-1][1])
    write_result(
        "supervisor_memory" + ("_old" if args.old else ""),
        {"images": args.images, "old": args.old, "samples": samples, "wall_s": wall, "csv_mb": csv_mb, "growth_25_to_end_mb": samples[-1][1] - first},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
