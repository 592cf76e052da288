"""The S3 watcher on a large bucket, on demand:
`python -m benchmarks.s3_watch [--objects 100000 --small 10000]`.

Starts an embedded stack (tansu on SeaweedFS), fills two buckets with ``--small`` and
``--objects`` tiny image-named objects, and measures, side by side for both sizes: the first
poll (lists every page and publishes one event per object), a second poll (full pass, nothing
new: ETags compared against the SQLite state), and the peak Python memory of each (tracemalloc)
— which must not grow with the bucket, since only one listing page is ever held."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from botocore.config import Config

from imgflow.app.stack import EmbeddedStack
from imgflow.kafka import ensure_topics
from imgflow.s3 import parse_s3_uri
from imgflow.settings import Settings
from watchers.s3_watcher import S3Watcher


def fill(client, bucket: str, count: int) -> float:
    client.create_bucket(Bucket=bucket)
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"in/{i:07d}.jpg", Body=b"x"), range(count)))
    return time.monotonic() - t0


def measure(settings: Settings, bucket: str, data_dir: Path) -> dict:
    watcher = S3Watcher(parse_s3_uri(f"s3://{bucket}/in/"), settings, state_path=data_dir / f"{bucket}.sqlite")
    out = {}
    for name in ("first_poll", "second_poll"):
        watcher._next_full = 0.0  # the second poll is a full pass too
        tracemalloc.start()
        t0 = time.monotonic()
        published = watcher.poll_once()
        seconds = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[name] = {
            "published": published,
            "seconds": round(seconds, 2),
            "objects_per_s": round(published / seconds) if published else None,
            "peak_python_mb": round(peak / 2**20, 1),
        }
    watcher.state.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgflow-s3-watch-"))
    with EmbeddedStack(work / "stack", port=0) as stack:
        creds = json.loads((stack.data_dir / "s3-credentials.json").read_text())
        s3 = {
            "endpoint_url": stack.s3_endpoint,
            "access_key_id": creds["access_key_id"],
            "secret_access_key": creds["secret_access_key"],
            "region": "us-east-1",
        }
        client = boto3.client(
            "s3",
            endpoint_url=s3["endpoint_url"],
            aws_access_key_id=s3["access_key_id"],
            aws_secret_access_key=s3["secret_access_key"],
            region_name="us-east-1",
            config=Config(max_pool_connections=16),
        )
        settings = Settings(kafka={"bootstrap": stack.bootstrap}, data_dir=work / "data", s3=s3, topics={"new": "bench.new", "new_high": "bench.new.high"})
        ensure_topics(settings)
        results = {}
        for label, count in (("small", args.small), ("large", args.objects)):
            bucket = f"bench-{label}"
            fill_s = fill(client, bucket, count)
            results[label] = {"objects": count, "fill_seconds": round(fill_s, 1), **measure(settings, bucket, work)}
            print(json.dumps({label: results[label]}), flush=True)
        small, large = results["small"], results["large"]
        print(
            json.dumps(
                {
                    "peak_memory_ratio_large_vs_small": round(large["first_poll"]["peak_python_mb"] / max(0.1, small["first_poll"]["peak_python_mb"]), 2),
                    "objects_ratio": round(args.objects / args.small, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
