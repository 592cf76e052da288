"""Observability, checked against real things: the lag reader against a broker whose true lag
the test knows; the Prometheus config and rules with the Debian promtool; and a real
Prometheus scraping a running `imgflow run`, asked every dashboard panel's query and every
alert expression."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from PIL import Image
from skimage import data

from imgflow.kafka import consumer_config, producer_config
from imgflow.lag import LagReader
from imgflow.process import free_port, terminate
from tests.kafka_helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "infra" / "prometheus"
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "imgflow.json"


def _commit(settings, group: str, offsets: dict[int, int], topic: str) -> None:
    consumer = Consumer(consumer_config(settings, group))
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    finally:
        consumer.close()


def test_lag_reader_counts_records_after_the_committed_offset(settings):
    """The true lag is known here: how many records were produced after the offset the test
    committed. The reader must find it on the embedded broker (whose end offsets are wrong),
    also with transaction markers in the partition, and 0 once everything is committed."""
    topic, group = settings.topics.vision, "lag-test-group"
    plain = Producer(producer_config(settings))
    offsets: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def delivered(err, msg):
        assert err is None, err
        offsets[msg.partition()].append(msg.offset())

    for partition, count in ((0, 7), (1, 3)):
        for i in range(count):
            plain.produce(topic, key=f"k{i}", value=b"x", partition=partition, on_delivery=delivered)
    assert plain.flush(30) == 0
    # Partition 2: three transactions of two records each (commit markers between them).
    txn = Producer(producer_config(settings, "lag-test-txn", on_delivery=delivered))
    txn.init_transactions(30)
    for _ in range(3):
        txn.begin_transaction()
        for i in range(2):
            txn.produce(topic, key=f"t{i}", value=b"y", partition=2)
        txn.commit_transaction(30)
    assert txn.flush(30) == 0

    reader = LagReader(settings, "enrich", group, [topic], interval_s=0.1)
    try:
        # Nothing committed: every record is lag.
        assert reader.read_once() == {(topic, 0): 7, (topic, 1): 3, (topic, 2): 6}
        # The group commits part of each partition (the offset after the record it handled).
        _commit(settings, group, {0: offsets[0][2] + 1, 1: offsets[1][2] + 1, 2: offsets[2][3] + 1}, topic)
        assert reader.read_once() == {(topic, 0): 4, (topic, 1): 0, (topic, 2): 2}
        # More records arrive; then the group catches up completely.
        for _ in range(5):
            plain.produce(topic, key="late", value=b"z", partition=1, on_delivery=delivered)
        assert plain.flush(30) == 0
        assert reader.read_once()[(topic, 1)] == 5
        _commit(settings, group, {p: offs[-1] + 1 for p, offs in offsets.items()}, topic)
        lag = reader.read_once()
        assert lag == {(topic, 0): 0, (topic, 1): 0, (topic, 2): 0}
        from imgflow import metrics

        assert metrics.CONSUMER_LAG.labels("enrich", topic, "2")._value.get() == 0
    finally:
        reader.stop()


# ---- Prometheus config and rules, checked by the Debian promtool --------------------------------
def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: `make test` installs Debian's prometheus package (see Makefile)"
    return path


def test_promtool_accepts_config_and_rules_and_the_rules_unit_tests_pass():
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"], ["test", "rules", "rules.test.yml"]):
        result = subprocess.run([_promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_dashboard_json_is_what_its_generator_writes():
    result = subprocess.run([sys.executable, str(ROOT / "infra" / "grafana" / "dashboard.py"), "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---- a real Prometheus scraping a running `imgflow run` -----------------------------------------
class PrometheusServer:
    """The Debian prometheus binary on loopback, with its own data dir."""

    def __init__(self, work: Path, target: str, rules: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work.mkdir(parents=True, exist_ok=True)
        config = work / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "scrape_configs": [{"job_name": "imgflow", "honor_labels": True, "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        binary = shutil.which("prometheus")
        assert binary, "prometheus not found: `make test` installs Debian's prometheus package (see Makefile)"
        self.log = open(work / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        _wait(lambda: self._ready(), 30, "prometheus ready")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            assert self.proc.poll() is None, "prometheus exited"
            return False

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        terminate(self.proc, 15)
        self.log.close()


def _wait(predicate, timeout: float, what: str):
    return wait_until(predicate, timeout, what=what)


def _csv_rows(out: Path) -> list[dict]:
    import csv
    import io

    try:
        length = int((out / ".results.csv.committed").read_text())
    except (FileNotFoundError, ValueError):
        return []
    with (out / "results.csv").open("rb") as f:
        text = f.read(length).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def _alert_rules() -> list[dict]:
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


METRIC_NAME = re.compile(r"\b(imgflow_[a-z0-9_]+|process_resident_memory_bytes|up(?=\{))\b")
GPU_ONLY = {"imgflow_gpu_memory_bytes", "imgflow_gpu_memory_total_bytes"}


def _instant(expr: str) -> str:
    """A dashboard query as Prometheus takes it: Grafana's range variables made concrete."""
    return expr.replace("$__rate_interval", "15s").replace("$__range", "15m")


def test_live_prometheus_answers_every_panel_and_alert_about_a_running_pipeline(tmp_path, engine):
    """`imgflow run` processes a photograph and a planted bad file while a real
    Prometheus scrapes its one metrics endpoint every second; then every panel query and
    every alert expression is asked, and the numbers are compared with what happened."""
    import torch

    gpu = torch.cuda.is_available()
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(data.coffee()).save(images / "coffee.jpg")
    (images / "planted-bad.jpg").write_text("this is a text file, not a JPEG")
    out, data_dir, metrics_port = tmp_path / "out", tmp_path / "data", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGFLOW_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "IMGFLOW_MODELS__LLM": "smollm2-135m",
            "IMGFLOW_LOG_FORMAT": "json",
            "IMGFLOW_STAGE__MAX_WAIT_S": "0.2",
        }
    )
    console = open(tmp_path / "run.out", "wb")
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imgflow",
            "run",
            str(images),
            "--out",
            str(out),
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
            "--metrics-port",
            str(metrics_port),
            "--engine",
            engine,
        ],
        cwd=ROOT,
        env=env,
        stdout=console,
        stderr=subprocess.STDOUT,
    )
    prometheus = PrometheusServer(tmp_path / "prometheus", f"127.0.0.1:{metrics_port}", PROMETHEUS / "rules.yml")
    try:
        rows = _wait(lambda: (r := _csv_rows(out)) and len(r) == 2 and r, 240, "2 result rows")
        # The pipeline is done: Prometheus must see every row written and no lag left.
        _wait(lambda: prometheus.value('sum(imgflow_sink_rows_total{kind="csv"})') == 2, 30, "sink rows scraped")
        _wait(
            lambda: (
                prometheus.value("count(count by (stage) (imgflow_consumer_lag))") == 3
                and prometheus.value(f"sum({'max by (stage, topic, partition) (imgflow_consumer_lag)'})") == 0
            ),
            60,
            "lag of every stage, down to 0",
        )
        time.sleep(2)  # a few more scrapes at the end state

        for title, expr in _panel_queries():
            result = prometheus.query(_instant(expr))
            if set(METRIC_NAME.findall(expr)) & GPU_ONLY and not gpu:
                assert result == [], f"{title}: GPU series on a machine without a GPU: {result}"
            else:
                assert result, f"panel {title!r}: no data for {expr}"
        for rule in _alert_rules():
            prometheus.query(rule["expr"])  # evaluates without error (status success)
        names = {n for _, e in _panel_queries() for n in METRIC_NAME.findall(e)}
        names |= {n for rule in _alert_rules() for n in METRIC_NAME.findall(rule["expr"])}
        for name in sorted(names - (set() if gpu else GPU_ONLY)):
            assert prometheus.query(f'count({{__name__="{name}"}})'), f"metric {name} does not exist"
        loaded = {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"]}
        assert set(loaded) == {r["alert"] for r in _alert_rules()}
        assert all(r["health"] == "ok" for r in loaded.values()), loaded
        # A healthy pipeline raises no alert, not even a pending one.
        assert prometheus.api("alerts")["alerts"] == []

        # The numbers agree with what happened.
        assert prometheus.value('sum(imgflow_sink_rows_total{kind="csv"})') == len(rows) == 2
        assert prometheus.value("sum(imgflow_watcher_published_total)") == 2
        assert prometheus.value('sum(imgflow_messages_in_total{stage="sink"})') == 2
        dead = {
            r["metric"]["stage"]: float(r["value"][1]) for r in prometheus.query(_instant("sum by (stage) (increase(imgflow_messages_failed_total[$__range]))"))
        }
        assert round(dead["vision"]) == 1 and round(dead["enrich"]) == 0, dead  # the planted bad file
        up = {r["metric"]["process"]: r["value"][1] for r in prometheus.query("imgflow_process_up")}
        assert up == {"watcher": "1", "vision": "1", "enrich": "1", "sink": "1"}
        assert prometheus.value("max(imgflow_sink_output_lag_seconds)") > 0
        loads = {r["metric"]["process"]: float(r["value"][1]) for r in prometheus.query("sum by (process) (imgflow_model_loads_total)")}
        assert loads.get("vision", 0) >= 1 and loads.get("enrich", 0) >= 1, loads
        assert "metrics of every process: http://127.0.0.1:" in (tmp_path / "run.out").read_text()
    finally:
        prometheus.stop()
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(60)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
        console.close()

    # Logs: every record about an image has its event_id and stage; the dead letter's error
    # is the same text in the log and in the result row.
    records = []
    for path in (data_dir / "logs").glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
    bad = next(r for r in rows if r["image_path"].endswith("planted-bad.jpg"))
    assert bad["error"].startswith("vision: ")
    for row in rows:
        about = [r for r in records if r.get("event_id") == row["event_id"]]
        assert all(r.get("stage") for r in about), about
        stages = {r["stage"] for r in about}
        expected = {"watcher", "vision", "sink"} | (set() if row is bad else {"enrich"})
        assert expected <= stages, (row["image_path"], stages)
    dead_letter_logs = [r["msg"] for r in records if r.get("event_id") == bad["event_id"] and r["level"] == "ERROR"]
    assert any(msg.endswith(bad["error"].removeprefix("vision: ")) for msg in dead_letter_logs), dead_letter_logs


def test_every_command_takes_log_options_and_the_serving_ones_a_metrics_port():
    from imgflow.app.cli import METRICS_COMMANDS, cli

    def leaves(command, path=()):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from leaves(sub, (*path, name))
        else:
            yield " ".join(path), command

    found = dict(leaves(cli()))
    assert {"run", "stage", "watch local", "topics", "models"} <= set(found)
    for path, command in found.items():
        options = {opt for p in command.params for opt in getattr(p, "opts", [])}
        assert {"--log-level", "--log-format"} <= options, path
        assert ("--metrics-port" in options) == (path in METRICS_COMMANDS), path
    with pytest.raises(Exception, match="xml"):
        found["models"].make_context("imgflow models", ["--log-format", "xml"])


def test_run_endpoint_labels_each_child_and_reports_one_that_is_down():
    """`imgflow run`'s one endpoint: every child's series with a `process` label, its own as
    process="run", and imgflow_process_up 0 for a child that does not answer."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
    from prometheus_client.parser import text_string_to_metric_families

    from imgflow.metrics import ChildMetrics

    child_registry = CollectorRegistry()
    Counter("imgflow_messages_in_total", "in", ["stage", "topic"], registry=child_registry).labels("enrich", "t").inc(7)
    child_port, dead_port = free_port(), free_port()
    server, thread = start_http_server(child_port, addr="127.0.0.1", registry=child_registry)
    try:
        children = ChildMetrics()
        children.children.update({"enrich": child_port, "sink": dead_port})
        registry = CollectorRegistry(auto_describe=False)
        registry.register(children)
        samples = [s for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples]
    finally:
        server.shutdown()
        thread.join(5)
    up = {s.labels["process"]: s.value for s in samples if s.name == "imgflow_process_up"}
    assert up == {"enrich": 1.0, "sink": 0.0}
    # The parent's own series (process="run") hold whatever earlier tests in this process counted.
    consumed = [s for s in samples if s.name == "imgflow_messages_in_total" and s.labels["process"] != "run"]
    assert [(s.labels, s.value) for s in consumed] == [({"stage": "enrich", "topic": "t", "process": "enrich"}, 7.0)]
    assert any(s.labels.get("process") == "run" for s in samples)  # the parent's own series
