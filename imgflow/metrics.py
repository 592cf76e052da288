"""The one metrics module: every Prometheus metric the processes export is defined here."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

MESSAGES_IN = Counter("imgflow_messages_in_total", "Records consumed by a stage", ["stage", "topic"])
MESSAGES_OUT = Counter("imgflow_messages_out_total", "Records produced by a stage", ["stage", "topic"])
MESSAGES_FAILED = Counter("imgflow_messages_failed_total", "Records sent to the dead-letter topic", ["stage"])
DUPLICATES_DROPPED = Counter("imgflow_duplicates_dropped_total", "Records dropped as already handled", ["stage"])
RETRIES = Counter("imgflow_retries_total", "Transform retries after a transient error", ["stage"])
TRANSACTIONS = Counter("imgflow_transactions_total", "Kafka transactions by outcome", ["stage", "outcome"])
STAGE_SECONDS = Histogram(
    "imgflow_stage_batch_seconds", "Time to transform one batch", ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
MODEL_SECONDS = Histogram(
    "imgflow_model_seconds", "Time of one model call (one batch)", ["job", "model"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
BATCH_SIZE = Histogram("imgflow_batch_size", "Records per transformed batch", ["stage"], buckets=(1, 2, 4, 8, 16, 32, 64, 128))
CONSUMER_LAG = Gauge("imgflow_consumer_lag", "Records behind the end of the partition", ["stage", "topic", "partition"])
MODEL_LOAD_SECONDS = Gauge("imgflow_model_load_seconds", "Seconds the last load of a model took", ["model"])
MODEL_CACHE = Counter("imgflow_model_cache_total", "Model cache lookups (hit, miss) and unloads (evicted)", ["result"])
MODEL_LOADS = Counter("imgflow_model_loads_total", "Models loaded into the model cache", ["model"])
GPU_CACHE_CLEARS = Counter("imgflow_gpu_cache_clears_total", "torch.cuda.empty_cache() calls by reason", ["reason"])
PROCESS_RSS = Gauge("imgflow_process_rss_bytes", "Resident memory of the process", ["role"])
GPU_MEMORY = Gauge("imgflow_gpu_memory_bytes", "CUDA memory allocated by the process", ["role", "kind"])
WATCHER_PUBLISHED = Counter("imgflow_watcher_published_total", "Image events published", ["source"])
SINK_ROWS = Counter("imgflow_sink_rows_total", "Rows written by the sink", ["kind"])


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _sample_resources(role: str) -> None:
    while True:
        PROCESS_RSS.labels(role).set(_rss_bytes())
        torch = sys.modules.get("torch")  # only if the process already uses torch
        cuda = getattr(torch, "cuda", None)  # absent while torch is still being imported
        if cuda is not None and cuda.is_available():
            GPU_MEMORY.labels(role, "allocated").set(cuda.memory_allocated())
            GPU_MEMORY.labels(role, "reserved").set(cuda.memory_reserved())
        time.sleep(5)


def serve_metrics(port: int, role: str) -> None:
    """Start the /metrics endpoint (port 0: none) and the resource sampler."""
    threading.Thread(target=_sample_resources, args=(role,), daemon=True, name="metrics-sampler").start()
    if port:
        start_http_server(port, addr=os.environ.get("IMGFLOW_METRICS_ADDR", "127.0.0.1"))
        log.info("metrics on http://127.0.0.1:%d/metrics", port)
