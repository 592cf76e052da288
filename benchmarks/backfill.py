"""Backfill at bucket scale, on the embedded broker (tansu on SeaweedFS, as `imgflow run` uses).

1. publish: N image files (empty, nested folders) -> N events, in transactions of 5000;
2. skip check: the same N images, half of which have a result in the output (written by
   the sink's own ResultStore: Avro + CSV + result index), listed and checked as
   `imgflow backfill --dry-run` does (nothing published).

    python -m benchmarks.backfill [--images 100000] [--keep DIR]

Prints a table and writes benchmarks/results/backfill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from imgflow.app.stack import EmbeddedStack
from imgflow.kafka import ensure_topics
from imgflow.output.store import ResultStore
from imgflow.settings import Settings
from tests.test_backfill import result_row
from watchers.backfill import Backfill, FolderSource, pick_job

RESULTS = Path(__file__).resolve().parent / "results" / "backfill.json"


def make_images(root: Path, n: int) -> None:
    for i in range(n):
        folder = root / f"d{i // 1000:03d}" / f"e{(i // 100) % 10}"
        if i % 100 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:06d}.jpg").touch()


def write_results(out: Path, events: list[dict], settings: Settings) -> None:
    store = ResultStore(out, settings=settings)
    store.lock()
    store.recover()
    for start in range(0, len(events), 5000):
        store.write([result_row(event, n) for n, event in enumerate(events[start : start + 5000], start)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="imgflow-bench-backfill-"))
    stack = EmbeddedStack(work / "broker", port=0, log_file=work / "broker.log").start()
    try:
        settings = Settings(kafka={"bootstrap": stack.bootstrap}, data_dir=work / "data", sink={"out_dir": work / "out-empty"})
        ensure_topics(settings)
        images = work / "images"
        t0 = time.monotonic()
        make_images(images, args.images)
        print(f"made {args.images} image files in {time.monotonic() - t0:.1f}s")
        source = FolderSource(images, settings)

        # 0. listing and building the events alone (a dry run with no results to check)
        job, _ = pick_job(settings, str(images), False, False, "bench-list")
        t0 = time.monotonic()
        Backfill(settings, job, work / "out-empty").run(source, lambda n, j: None, dry_run=True)
        list_s = time.monotonic() - t0

        # 1. publish everything (no results yet)
        job, _ = pick_job(settings, str(images), False, False, "bench-publish")
        t0 = time.monotonic()
        job = Backfill(settings, job, work / "out-empty").run(source, lambda n, j: None)
        publish_s = time.monotonic() - t0
        assert job.published == args.images, job

        # 2. skip check with half done
        events = [c.event for c in source.candidates(None, settings, settings.run_id, "NORMAL", False)]
        t0 = time.monotonic()
        write_results(work / "out-half", events[::2], settings)
        print(f"wrote {len(events[::2])} results in {time.monotonic() - t0:.1f}s")
        job, _ = pick_job(settings, str(images), False, False, "bench-skip")
        t0 = time.monotonic()
        job = Backfill(settings, job, work / "out-half").run(source, lambda n, j: None, dry_run=True)
        skip_s = time.monotonic() - t0
        assert (job.published, job.skipped) == (args.images - len(events[::2]), len(events[::2])), job
    finally:
        stack.stop()
    result = {
        "images": args.images,
        "list_and_build_seconds": round(list_s, 2),
        "publish_seconds": round(publish_s, 2),
        "publish_events_per_s": round(args.images / publish_s),
        "skip_check_seconds": round(skip_s, 2),
        "skip_check_images_per_s": round(args.images / skip_s),
        "skipped": job.skipped,
        "broker": "embedded (tansu on SeaweedFS)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"| images | list + build events | publish | events/s | skip check (half done) | images/s |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {args.images:,} | {list_s:.1f} s | {publish_s:.1f} s | {result['publish_events_per_s']:,} | "
        f"{skip_s:.1f} s | {result['skip_check_images_per_s']:,} |"
    )
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
