"""The imgflow Grafana dashboard, as code: the one source of its panels and their PromQL.

    python infra/grafana/dashboard.py          # writes infra/grafana/dashboards/imgflow.json
    python infra/grafana/dashboard.py --check  # exits 1 if that file is not what this writes

Grafana loads the JSON (docker-compose.yml provisions it); tests/test_observability.py runs
every query in it against a real Prometheus scraping a running `imgflow run`. Queries use
only labels every imgflow process has (stage, topic, partition, process, kind, job, model).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "imgflow.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
RATE = "$__rate_interval"


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, by: str, legend: str, qs=(0.5, 0.95, 0.99)) -> list[dict]:
    return [q(f"histogram_quantile({x}, sum by ({by}, le) (rate({metric}_bucket[{RATE}])))", f"p{round(x * 100)} {legend}") for x in qs]


def rates(by: str, series: list[tuple[str, str]]) -> list[dict]:
    """Per-second rates of imgflow counters summed by one label: (counter, legend prefix) each,
    the counter named without its ``imgflow_`` and ``_total``."""
    return [q(f"sum by ({by}) (rate(imgflow_{counter}_total[{RATE}]))", f"{what} {{{{{by}}}}}") for counter, what in series]


LAG_PER_PARTITION = "max by (stage, topic, partition) (imgflow_consumer_lag)"

# (title, description, unit, panel type, targets): one row of the grid per two panels.
PANELS: list[tuple[str, str, str, str, list[dict]]] = [
    (
        "Throughput per stage",
        "Records each stage consumes per second, by stage.",
        "ops",
        "timeseries",
        [q(f"sum by (stage) (rate(imgflow_messages_in_total[{RATE}]))", "{{stage}}")],
    ),
    (
        "End-to-end images/s",
        "Images published by the watchers, and result rows written by the sink, per second.",
        "ops",
        "timeseries",
        [q(f"sum(rate(imgflow_watcher_published_total[{RATE}]))", "published"), q(f"max(sum by (kind) (rate(imgflow_sink_rows_total[{RATE}])))", "written")],
    ),
    (
        "Batch latency per stage",
        "Seconds to transform one batch: 50th, 95th and 99th percentile per stage.",
        "s",
        "timeseries",
        quantiles("imgflow_stage_batch_seconds", "stage", "{{stage}}"),
    ),
    (
        "Model latency",
        "Seconds of one model call (one batch), 50th and 95th percentile per job and model.",
        "s",
        "timeseries",
        quantiles("imgflow_model_seconds", "job, model", "{{job}} {{model}}", (0.5, 0.95)),
    ),
    (
        "Consumer lag per stage",
        "Records after each stage group's committed offset, summed over its partitions "
        "(read to the end of each partition, not taken from the broker's end offsets).",
        "short",
        "timeseries",
        [q(f"sum by (stage) ({LAG_PER_PARTITION})", "{{stage}}")],
    ),
    (
        "Consumer lag per partition",
        "The same lag, per input topic and partition.",
        "short",
        "timeseries",
        [q(LAG_PER_PARTITION, "{{stage}} {{topic}}[{{partition}}]")],
    ),
    (
        "Dead letters",
        "Records sent to the dead-letter topic over the dashboard's time range, per stage.",
        "short",
        "stat",
        [q("sum by (stage) (increase(imgflow_messages_failed_total[$__range]))", "{{stage}}")],
    ),
    (
        "Dead letters, retries and duplicates",
        "Per second, per stage: records dead-lettered, transform retries, and duplicate records dropped (redelivered or from aborted transactions).",
        "ops",
        "timeseries",
        rates("stage", [("messages_failed", "dead-lettered"), ("retries", "retried"), ("duplicates_dropped", "duplicates")]),
    ),
    (
        "Transactions",
        "Kafka transactions per second by outcome, and the 95th percentile of the time from begin to commit (the sink: write and offset commit).",
        "ops",
        "timeseries",
        [
            q(f"sum by (stage, outcome) (rate(imgflow_transactions_total[{RATE}]))", "{{stage}} {{outcome}}"),
            *quantiles("imgflow_commit_seconds", "stage", "commit s {{stage}}", (0.95,)),
        ],
    ),
    (
        "Batch size",
        "Records per transformed batch, median and 95th percentile per stage.",
        "short",
        "timeseries",
        quantiles("imgflow_batch_size", "stage", "{{stage}}", (0.5, 0.95)),
    ),
    (
        "Memory (RSS) per process",
        "Resident memory of every process, and the limit it runs under.",
        "bytes",
        "timeseries",
        [q('process_resident_memory_bytes{job=~"imgflow.*"}', "{{process}}"), q('max(imgflow_process_memory_limit_bytes{job=~"imgflow.*"})', "limit")],
    ),
    (
        "GPU memory per process",
        "CUDA memory allocated and reserved by each process that uses a GPU (empty on machines without one).",
        "bytes",
        "timeseries",
        [q("imgflow_gpu_memory_bytes", "{{process}} {{kind}}")],
    ),
    (
        "Model cache",
        "Model cache lookups per second (hit, miss) and unloads (evicted).",
        "ops",
        "timeseries",
        [q(f"sum by (result) (rate(imgflow_model_cache_total[{RATE}]))", "{{result}}")],
    ),
    (
        "Model loads",
        "Seconds the last load of each model took, and how often it was loaded.",
        "s",
        "timeseries",
        [q("max by (model) (imgflow_model_load_seconds)", "{{model}} load s"), q("sum by (model) (imgflow_model_loads_total)", "{{model}} loads")],
    ),
    (
        "Watchers",
        "Images found, events published and errors per second, per source.",
        "ops",
        "timeseries",
        rates("source", [("watcher_seen", "seen"), ("watcher_published", "published"), ("watcher_errors", "errors")]),
    ),
    (
        "Sink",
        "Rows written in the time range per kind (csv, avro), and the output lag: seconds since the newest image event the sink has written was published.",
        "short",
        "timeseries",
        [q("sum by (kind) (increase(imgflow_sink_rows_total[$__range]))", "rows {{kind}}"), q("max(imgflow_sink_output_lag_seconds)", "output lag s")],
    ),
    (
        "Processes up",
        "1 for every process that answers its scrape (and every child of `imgflow run`).",
        "short",
        "timeseries",
        [q('up{job=~"imgflow.*"}', "{{instance}}"), q("imgflow_process_up", "{{process}}")],
    ),
]


def panel(i: int, title: str, description: str, unit: str, kind: str, targets: list[dict]) -> dict:
    return {
        "id": i + 1,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}}
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}},
        "targets": [{**t, "refId": chr(ord("A") + j), "datasource": DATASOURCE} for j, t in enumerate(targets)],
    }


def dashboard() -> dict:
    return {
        "uid": "imgflow",
        "title": "imgflow",
        "description": "Is it keeping up, where is the time going, is anything stuck or failing, is memory growing.",
        "tags": ["imgflow"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "editable": True,
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).relative_to(Path.cwd())}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
