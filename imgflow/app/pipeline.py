"""`imgflow run`: the embedded stack, the local watcher, every stage and the sink, each as
its own process (a crash of one is a restart of one), with progress on the terminal."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from imgflow.app.progress import Progress, TopicCounter
from imgflow.app.stack import EmbeddedStack
from imgflow.app.stack_processes import wait_for_earlier_stack
from imgflow.app.supervision import ROLES, Child, Children, RestartBudget, accepts, restart_stack
from imgflow.metrics import ChildMetrics, serve_children
from imgflow.output.reader import ResultReader
from imgflow.output.storage import is_s3_output
from imgflow.process import free_port, port_is_free
from imgflow.s3 import S3Location
from imgflow.settings import Settings
from watchers.local import current_event_ids
from watchers.s3 import current_event_ids as s3_event_ids

# The embedded broker's one client listener is PLAINTEXT on loopback: the kafka.* security
# settings (for a cluster given with --bootstrap) do not apply to it.
LOCAL_BROKER_SECURITY = {"IMGFLOW_KAFKA__SECURITY_PROTOCOL": "PLAINTEXT", "IMGFLOW_KAFKA__SASL_MECHANISM": ""}


class Pipeline:
    """``bootstrap``: a running cluster to use (its security from ``kafka.*``) instead of
    starting the local broker of ``broker.engine``."""

    def __init__(
        self,
        settings: Settings,
        input_dir: Path | S3Location,
        out_dir: str | Path,
        data_dir: Path,
        port: int,
        once: bool,
        metrics_port: int = 0,
        bootstrap: str = "",
    ) -> None:
        self.settings = settings
        self.external_bootstrap = bootstrap
        self.metrics_port = metrics_port  # one endpoint for every process (0: none)
        self.child_metrics = ChildMetrics()
        # A folder, or an S3Location for s3://BUCKET/PREFIX (the S3 watcher then runs instead).
        self.input_dir = input_dir if isinstance(input_dir, S3Location) else input_dir.resolve()
        # A folder, or an s3://BUCKET/PREFIX/ URI (the sink writes there; nothing local).
        self.out_dir: str | Path = str(out_dir).rstrip("/") + "/" if is_s3_output(out_dir) else Path(out_dir).resolve()
        self.data_dir = data_dir.resolve()
        self.port = port
        self.once = once
        self.finished = False  # --once: every image's row is written
        self.children = Children()
        self.stopping = False
        self.stack: EmbeddedStack | None = None
        self.broker_restarts = RestartBudget()

    @property
    def source(self) -> str | Path:
        return self.input_dir.uri if isinstance(self.input_dir, S3Location) else self.input_dir

    def request_stop(self, *_) -> None:
        if not self.stopping:
            print("\nstopping: letting every stage finish its batch...", flush=True)
        self.stopping = True

    def _env(self, bootstrap: str, role: str, metrics_port: int) -> dict:
        env = dict(os.environ)
        env.update(
            {
                "IMGFLOW_KAFKA__BOOTSTRAP": bootstrap,
                **({} if self.external_bootstrap else LOCAL_BROKER_SECURITY),
                "IMGFLOW_DATA_DIR": str(self.data_dir),
                "IMGFLOW_SINK__OUT_DIR": str(self.out_dir),
                "IMGFLOW_METRICS_PORT": str(metrics_port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if isinstance(self.input_dir, S3Location):
            if not self.settings.s3.allowed_prefixes:  # the vision stage reads only what is watched
                env["IMGFLOW_S3__ALLOWED_PREFIXES"] = json.dumps([self.input_dir.uri])
        else:
            env["IMGFLOW_ALLOWED_ROOTS"] = json.dumps([str(self.input_dir)])
        if role == "vision":
            # One machine runs every stage: the vision stage's torch threads take half the
            # cores, the LLM's the other half (models.llm_threads' default); threads that
            # spin on oversubscribed cores make both many times slower.
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
        return env

    def _argv(self, role: str) -> list[str]:
        base = [sys.executable, "-m", "imgflow"]
        if role == "watcher" and isinstance(self.input_dir, S3Location):
            # --no-check: a store that is down at start is retried, not fatal, in a child
            return [*base, "watch", "s3", self.input_dir.uri, "--no-check", "--data-dir", str(self.data_dir)]
        if role == "watcher":
            return [*base, "watch", "local", str(self.input_dir), "--data-dir", str(self.data_dir)]
        return [*base, "stage", role]

    def run(self) -> int:
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)
        logs = self.data_dir / "logs"
        bootstrap = self._start_broker(logs)
        target = _images_present(self.input_dir, self.settings) if self.once else set()
        self._serve_metrics()
        try:
            for role in ROLES:
                # Each child serves its own metrics on loopback; ours proxies them all.
                metrics_port = free_port() if self.metrics_port else 0
                self.children.start(Child(role, self._argv(role), logs / f"{role}.log", self._env(bootstrap, role, metrics_port)))
                if metrics_port:
                    self.child_metrics.children[role] = metrics_port
            print(f"processing {self.source} -> {self.out_dir} (logs in {logs})", flush=True)
            return self._supervise(target, bootstrap)
        finally:
            if self.finished or accepts(bootstrap):
                self.children.stop(together=self.finished)
            else:
                # Nothing can be committed with the broker gone, so nothing is lost by not
                # waiting for it: what was not committed is done again on the next run.
                print("the broker is down: stopping every stage now (work not committed is redone on the next run)", flush=True)
                self.children.stop(timeout=5, together=True)
            if self.stack is not None:
                self.stack.stop()
            _print_where_results_are(self.out_dir, self.source)

    def _start_broker(self, logs: Path) -> str:
        """The local broker of ``broker.engine`` (or the given cluster, checked and its topics
        created); its bootstrap address."""
        if self.external_bootstrap:
            from imgflow.kafka import check_kafka, ensure_topics

            settings = self._with_bootstrap(self.external_bootstrap)
            check_kafka(settings)
            ensure_topics(settings)
            print(f"using the Kafka cluster at {self.external_bootstrap}", flush=True)
            return self.external_bootstrap
        self.stack = _start_embedded_stack(self.settings, self.data_dir, self.port, logs)
        return self.stack.bootstrap

    def _restart_broker(self) -> bool:
        """The embedded broker's runner is supervised like the stages (False: give up)."""
        if self.stack is None or self.stack.running or self.stopping:
            return True
        return restart_stack(self.stack, self.broker_restarts)

    def _with_bootstrap(self, bootstrap: str) -> Settings:
        local = {} if self.external_bootstrap else {"security_protocol": "PLAINTEXT", "sasl_mechanism": ""}
        return self.settings.model_copy(update={"kafka": self.settings.kafka.model_copy(update={"bootstrap": bootstrap, **local})})

    def _serve_metrics(self) -> None:
        port = self.metrics_port
        if not port:
            return
        if not port_is_free(self.settings.metrics_addr, port):
            port = free_port()
            print(f"metrics port {self.metrics_port} is in use: metrics are served on port {port} instead", flush=True)
        serve_children(port, self.child_metrics, self.settings.metrics_addr)
        self.metrics_port = port
        print(f"metrics of every process: http://{self.settings.metrics_addr}:{port}/metrics", flush=True)

    def _supervise(self, target: set[str], bootstrap: str) -> int:
        tail = ResultReader(self.out_dir, self.settings, wanted=target)
        t = self.settings.topics
        counter = TopicCounter(self._with_bootstrap(bootstrap), [t.new, t.new_high, t.vision, t.enriched, t.dlq])
        progress = Progress(total=len(target) if self.once else None)
        started = time.monotonic()
        tail.refresh()
        done_before = tail.rows  # rows of earlier runs: not part of this run's rate
        try:
            while not self.stopping:
                tail.refresh()
                counter.refresh()
                found = counter.count(t.new) + counter.count(t.new_high)
                # --once: rows of this folder's images (of earlier runs too); else every row.
                written = len(target) - len(tail.missing) if self.once else tail.rows
                all_written = self.once and not tail.missing
                progress.show(
                    found=found,
                    vision=counter.count(t.vision),
                    enriched=counter.count(t.enriched),
                    failed=counter.count(t.dlq),
                    written=written,
                    errors=tail.errors,
                    new_rows=tail.rows - done_before,
                    elapsed=time.monotonic() - started,
                    final=all_written,
                )
                if all_written:
                    self.finished = True
                    progress.finish()
                    print(f"done: {len(target)} images, {tail.errors} with errors, in {time.monotonic() - started:.1f}s", flush=True)
                    return 0
                if not self._restart_broker() or not (self.stopping or self.children.restart_dead()):
                    return 1
                time.sleep(0.5)
            progress.finish()
            return 0
        finally:
            counter.close()


def _print_where_results_are(out_dir: str | Path, source: str | Path) -> None:
    """What a run leaves, and the commands that read it."""
    if isinstance(out_dir, Path):
        print(f"results: {out_dir / 'results.csv'} and {out_dir / 'avro'}/", flush=True)
    else:
        print(f"results: {out_dir}avro/ and {out_dir}csv/ (one CSV: imgflow export csv {out_dir} --out results.csv)", flush=True)
    print(f'find images in them: imgflow search "a cat" --out {out_dir} · as a web page: imgflow serve --out {out_dir} --allow {source}', flush=True)


def _start_embedded_stack(settings: Settings, data_dir: Path, port: int, logs: Path) -> EmbeddedStack:
    """The local broker of ``broker.engine``, on ``port`` or, when that is taken, another."""
    if port and not port_is_free("127.0.0.1", port):
        new = free_port()
        print(f"port {port} is in use: the embedded broker takes port {new} instead", flush=True)
        port = new
    engine = settings.broker.engine
    what = "Apache Kafka (KRaft)" if engine == "kafka" else "tansu on SeaweedFS"
    print(f"starting the embedded broker, {what} (data in {data_dir / 'broker'}) ...", flush=True)
    wait_for_earlier_stack(data_dir / "broker")
    stack = EmbeddedStack(data_dir / "broker", port=port, log_file=logs / "broker.log", engine=engine)
    stack.start()
    print(f"broker ready at {stack.bootstrap}", flush=True)
    if settings.kafka.security_protocol != "PLAINTEXT":
        print(
            f"note: the embedded broker speaks PLAINTEXT on loopback; kafka.security_protocol="
            f"{settings.kafka.security_protocol} applies to a cluster given with --bootstrap",
            flush=True,
        )
    if engine == "tansu" or port:  # a restart keeps the address every stage was given
        stack.port = int(stack.bootstrap.rpartition(":")[2])
    return stack


def _images_present(source: Path | S3Location, settings: Settings) -> set[str]:
    """The event_ids `--once` waits for: every image in the folder or under the prefix now."""
    if isinstance(source, S3Location):
        return s3_event_ids(source, settings)
    return current_event_ids(source, settings)
