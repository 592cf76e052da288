"""The one metrics module: every Prometheus metric the processes export is defined here.

Naming: ``imgflow_*``, counters end in ``_total``, durations in ``_seconds``, sizes in
``_bytes``. Label values are bounded: stage and topic names, model names, outcomes, never a
path or an event id. No metric carries a ``process`` label: which process a series comes
from is added outside — by the scrape config (docker-compose: one target per process) or
by ``imgflow run``, which serves all its children on one endpoint (``ChildMetrics``).
The process's RSS is prometheus-client's own ``process_resident_memory_bytes``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger(__name__)

# ---- per stage (vision, enrich, sink) ------------------------------------------------------------
MESSAGES_IN = Counter("imgflow_messages_in_total", "Records consumed by a stage", ["stage", "topic"])
MESSAGES_OUT = Counter("imgflow_messages_out_total", "Records produced by a stage", ["stage", "topic"])
MESSAGES_FAILED = Counter("imgflow_messages_failed_total", "Records sent to the dead-letter topic", ["stage"])
DUPLICATES_DROPPED = Counter("imgflow_duplicates_dropped_total", "Records dropped as already handled", ["stage"])
RETRIES = Counter("imgflow_retries_total", "Transform retries after a transient error", ["stage"])
TRANSACTIONS = Counter("imgflow_transactions_total", "Kafka transactions by outcome", ["stage", "outcome"])
COMMIT_SECONDS = Histogram(
    "imgflow_commit_seconds",
    "Time from begin to commit of one Kafka transaction (sink: one output write + offset commit)",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STAGE_SECONDS = Histogram(
    "imgflow_stage_batch_seconds",
    "Time to transform one batch",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
MODEL_SECONDS = Histogram(
    "imgflow_model_seconds",
    "Time of one model call (one batch)",
    ["job", "model"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
BATCH_SIZE = Histogram("imgflow_batch_size", "Records per transformed batch", ["stage"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
CONSUMER_LAG = Gauge(
    "imgflow_consumer_lag",
    "Records after the stage group's committed offset (found by reading each partition to its end, not from the broker's end offset)",
    ["stage", "topic", "partition"],
)
LAG_READ_ERRORS = Counter("imgflow_lag_read_errors_total", "Failed rounds of the lag reader", ["stage"])

# ---- models ---------------------------------------------------------------------------------------
MODEL_LOAD_SECONDS = Gauge("imgflow_model_load_seconds", "Seconds the last load of a model took", ["model"])
MODEL_CACHE = Counter("imgflow_model_cache_total", "Model cache lookups (hit, miss) and unloads (evicted)", ["result"])
MODEL_LOADS = Counter("imgflow_model_loads_total", "Models loaded into the model cache", ["model"])
GPU_CACHE_CLEARS = Counter("imgflow_gpu_cache_clears_total", "torch.cuda.empty_cache() calls by reason", ["reason"])

# ---- resources ----------------------------------------------------------------------------------
MEMORY_LIMIT = Gauge("imgflow_process_memory_limit_bytes", "Memory the process may use: its cgroup's limit, else the machine's memory")
GPU_MEMORY = Gauge("imgflow_gpu_memory_bytes", "CUDA memory of the process (only where a GPU is used)", ["kind"])
# Unlabelled gauges that only some processes have are registered when first used, so that
# other processes do not export a misleading 0.
GPU_MEMORY_TOTAL = Gauge("imgflow_gpu_memory_total_bytes", "Memory of the CUDA device the process uses", registry=None)

# ---- watchers and sink -------------------------------------------------------------------------
WATCHER_SEEN = Counter("imgflow_watcher_seen_total", "New or changed images found", ["source"])
WATCHER_PUBLISHED = Counter("imgflow_watcher_published_total", "Image events published", ["source"])
WATCHER_ERRORS = Counter("imgflow_watcher_errors_total", "Failed scans or publishes of a watcher", ["source"])
SINK_ROWS = Counter("imgflow_sink_rows_total", "Rows written by the sink", ["kind"])
SINK_NEWEST_EVENT = Gauge("imgflow_sink_newest_event_timestamp_seconds", "Publish time of the newest image event the sink has written", registry=None)
SINK_OUTPUT_LAG = Gauge(
    "imgflow_sink_output_lag_seconds", "Now minus the publish time of the newest image event the sink has written (0 until the sink wrote one)", registry=None
)

# ---- `imgflow run` ----------------------------------------------------------------------------------
CHILD_UP = Gauge("imgflow_process_up", "1 while a child process of `imgflow run` answers its metrics", ["process"])

MODEL_CACHE_RESULTS = ("hit", "miss", "evicted")


def init_stage(stage: str, input_topics: list[str], output_topics: tuple[str, ...] | list[str] = ()) -> None:
    """Create a stage's series at 0, so that dashboards and alerts see "none yet" rather
    than "no data" (e.g. retries in a run that had none)."""
    for topic in input_topics:
        MESSAGES_IN.labels(stage, topic)
    for topic in output_topics:
        MESSAGES_OUT.labels(stage, topic)
    for counter in (MESSAGES_FAILED, DUPLICATES_DROPPED, RETRIES, LAG_READ_ERRORS):
        counter.labels(stage)
    for outcome in ("committed", "aborted"):
        TRANSACTIONS.labels(stage, outcome)
    for result in MODEL_CACHE_RESULTS:
        MODEL_CACHE.labels(result)


def init_watcher(source: str) -> None:
    for counter in (WATCHER_SEEN, WATCHER_PUBLISHED, WATCHER_ERRORS):
        counter.labels(source)


_registered: set[str] = set()
_registered_lock = threading.Lock()


def _register_once(metric) -> None:
    with _registered_lock:
        if metric._name not in _registered:
            REGISTRY.register(metric)
            _registered.add(metric._name)


def init_sink(kinds: tuple[str, ...] = ("csv", "avro")) -> None:
    for kind in kinds:
        SINK_ROWS.labels(kind)
    SINK_OUTPUT_LAG.set_function(_sink_output_lag)
    _register_once(SINK_NEWEST_EVENT)
    _register_once(SINK_OUTPUT_LAG)


_newest_written_s = 0.0


def sink_wrote(published: list) -> None:
    """The sink wrote rows of image events published at these times (epoch ms or datetimes;
    None: unknown)."""
    global _newest_written_s
    times = [p.timestamp() if hasattr(p, "timestamp") else p / 1000 for p in published if p]
    if times and max(times) > _newest_written_s:
        _newest_written_s = max(times)
        SINK_NEWEST_EVENT.set(_newest_written_s)


def _sink_output_lag() -> float:
    return max(0.0, time.time() - _newest_written_s) if _newest_written_s else 0.0


def model_label(model_id: str) -> str:
    """A short, bounded model name for a label: the model id without its weights' folder
    and hash (``qwen2-vl:/models/Qwen2-VL-7B@ab12`` -> ``qwen2-vl:Qwen2-VL-7B``)."""
    name = model_id.split("@", 1)[0]
    kind, sep, where = name.partition(":")
    return f"{kind}{sep}{os.path.basename(where.rstrip('/'))}" if sep else name


class model_timer:
    """``with model_timer("read_text", reader.model_id): ...`` observes one model call."""

    def __init__(self, job: str, model_id: str) -> None:
        self.histogram = MODEL_SECONDS.labels(job, model_label(model_id))

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.histogram.observe(time.perf_counter() - self.started)


# ---- resources sampler ------------------------------------------------------------------------------
def memory_limit_bytes() -> int:
    """The cgroup (v2, then v1) memory limit, or the machine's memory when there is none."""
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < machine:
            return int(text)
    return machine


# Read at each scrape: right in every process, sampler thread or not.
MEMORY_LIMIT.set_function(memory_limit_bytes)


def _sample_resources() -> None:
    while True:
        torch = sys.modules.get("torch")  # only if the process already uses torch
        cuda = getattr(torch, "cuda", None)  # absent while torch is still being imported
        try:
            if cuda is not None and cuda.is_available() and cuda.is_initialized():
                GPU_MEMORY.labels("allocated").set(cuda.memory_allocated())
                GPU_MEMORY.labels("reserved").set(cuda.memory_reserved())
                GPU_MEMORY_TOTAL.set(cuda.get_device_properties(cuda.current_device()).total_memory)
                _register_once(GPU_MEMORY_TOTAL)
        except Exception:  # a sampler must never take the process down
            log.debug("GPU memory sample failed", exc_info=True)
        time.sleep(5)


_serving = False


def serving() -> bool:
    """Whether this process serves /metrics (background readers such as the lag reader
    run only then: in-process test runners do not pay for them)."""
    return _serving


def serve_metrics(port: int, role: str = "", addr: str = "127.0.0.1") -> int:
    """Start the resource sampler and, unless ``port`` is 0, the /metrics endpoint of this
    process (``role``: what it is, for the log). Returns the port served (0: none)."""
    global _serving
    threading.Thread(target=_sample_resources, daemon=True, name="metrics-sampler").start()
    if not port:
        return 0
    try:
        start_http_server(port, addr=addr)
    except OSError as exc:  # metrics are not worth stopping the pipeline for: say so, go on
        log.error(
            "cannot serve metrics on %s:%d (%s): this %s serves none (metrics_port / IMGFLOW_METRICS_PORT)", addr, port, exc.strerror or exc, role or "process"
        )
        return 0
    _serving = True
    log.info("%s metrics on http://%s:%d/metrics", role or "process", addr, port)
    return port


# ---- `imgflow run`: one endpoint for every child process -----------------------------------------
class ChildMetrics:
    """A collector that scrapes each child process of ``imgflow run`` on loopback and
    exports its series with a ``process`` label (the same label docker-compose's scrape
    config gives each container), plus the parent's own series as ``process="run"`` and
    ``imgflow_process_up{process}``. Proxying keeps every child an ordinary process with
    its own registry (prometheus-client's multiprocess mode would not keep per-process
    RSS or survive a child's restart cleanly)."""

    def __init__(self, own: CollectorRegistry = REGISTRY, timeout_s: float = 2.0) -> None:
        self.children: dict[str, int] = {}  # process name -> metrics port on 127.0.0.1
        self.own = own
        self.timeout_s = timeout_s

    def collect(self):
        merged: dict[str, Metric] = {}
        up = Metric("imgflow_process_up", CHILD_UP._documentation, "gauge")

        def add(process: str, families) -> None:
            for family in families:
                if family.name == "imgflow_process_up":
                    continue
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for s in family.samples:
                    out.samples.append(Sample(s.name, {**s.labels, "process": process}, s.value, s.timestamp))

        add("run", self.own.collect())
        children = list(self.children.items())
        # In parallel: a child busy in a model call answers slowly; the scrape waits for one.
        with ThreadPoolExecutor(max_workers=max(1, len(children))) as pool:
            texts = list(pool.map(lambda child: self._fetch(*child), children))
        for (process, _port), text in zip(children, texts):
            try:
                if text is None:
                    raise ValueError("no answer")
                add(process, text_string_to_metric_families(text))
                up.add_sample("imgflow_process_up", {"process": process}, 1.0)
            except ValueError as exc:  # not started yet, restarting, or dead
                log.debug("metrics of %s: %s", process, exc)
                up.add_sample("imgflow_process_up", {"process": process}, 0.0)
        yield up
        yield from merged.values()

    def _fetch(self, process: str, port: int) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=self.timeout_s) as resp:
                return resp.read().decode("utf-8")
        except OSError as exc:
            log.debug("metrics of %s (port %d): %s", process, port, exc)
            return None


def serve_children(port: int, children: ChildMetrics, addr: str = "127.0.0.1") -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(children)
    start_http_server(port, addr=addr, registry=registry)
