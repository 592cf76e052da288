"""`imgflow run`: the embedded stack, the local watcher, every stage and the sink, each as
its own process (a crash of one is a restart of one), with progress on the terminal."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, TopicPartition

from imgflow.kafka import consumer_config
from imgflow.metrics import ChildMetrics, serve_children
from imgflow.output.reader import ResultReader
from imgflow.output.storage import is_s3_output
from imgflow.process import free_port, own_session_dying_with_parent, port_is_free
from imgflow.s3 import S3Location
from imgflow.settings import Settings
from imgflow.stack import EmbeddedStack, StackError
from watchers.local import current_event_ids
from watchers.s3 import current_event_ids as s3_event_ids

log = logging.getLogger(__name__)

ROLES = ["sink", "enrich", "vision", "watcher"]  # started in this order, stopped in reverse
# The embedded broker's one client listener is PLAINTEXT on loopback: the kafka.* security
# settings (for a cluster given with --bootstrap) do not apply to it.
LOCAL_BROKER_SECURITY = {"IMGFLOW_KAFKA__SECURITY_PROTOCOL": "PLAINTEXT", "IMGFLOW_KAFKA__SASL_MECHANISM": ""}


@dataclass
class Child:
    role: str
    argv: list[str]
    log_path: Path
    env: dict
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")
        # Own session: a Ctrl-C in the terminal reaches only us; we stop children in order.
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, preexec_fn=own_session_dying_with_parent)
        out.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RecentKeys:
    """Distinct keys counted with bounded memory: a key is new unless it is among the last
    ``window`` distinct ones. The repeats a topic holds (an aborted transaction's records
    and their retry, a batch produced again after a crash) lie close together, so the count
    is exact for them, and memory stays the window's whatever the history."""

    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self.count = 0
        self._order: deque[int] = deque()
        self._seen: set[int] = set()

    def add(self, key: bytes) -> None:
        h = hash(key)
        if h in self._seen:
            return
        self.count += 1
        self._seen.add(h)
        self._order.append(h)
        if len(self._order) > self.window:
            self._seen.discard(self._order.popleft())


class TopicCounter:
    """Distinct event_ids (record keys) seen on a topic: how far each stage has got. Reads
    each topic from its start; holds a bounded window of recent keys per topic, and asks
    librdkafka to buffer little (it only needs the keys of records of up to ~1 MB)."""

    BATCH = 500

    def __init__(self, settings: Settings, topics: list[str]) -> None:
        self.consumer = Consumer(
            consumer_config(settings, f"imgflow-progress-{os.getpid()}", **{"queued.max.messages.kbytes": 2048, "fetch.max.bytes": 4 * 1024 * 1024})
        )
        parts = []
        md = self.consumer.list_topics(timeout=10)
        for t in topics:
            for p in md.topics[t].partitions:
                parts.append(TopicPartition(t, p, 0))
        self.consumer.assign(parts)
        self.keys: dict[str, RecentKeys] = {t: RecentKeys() for t in topics}

    def refresh(self, max_batches: int = 20) -> None:
        for _ in range(max_batches):
            msgs = self.consumer.consume(self.BATCH, 0.05)
            for msg in msgs:
                if msg.error() is None and msg.key():
                    self.keys[msg.topic()].add(msg.key())
                elif msg.error() is not None and msg.error().code() != KafkaError._PARTITION_EOF:
                    log.debug("progress: %s", msg.error())
            if len(msgs) < self.BATCH:
                return

    def count(self, topic: str) -> int:
        return self.keys[topic].count

    def close(self) -> None:
        self.consumer.close()


class Pipeline:
    """``bootstrap``: a running cluster to use (its security from ``kafka.*``) instead of
    starting the local broker of ``broker.engine``."""

    def __init__(
        self, settings: Settings, input_dir: Path, out_dir: Path, data_dir: Path, port: int, once: bool, metrics_port: int = 0, bootstrap: str = ""
    ) -> None:
        self.settings = settings
        self.external_bootstrap = bootstrap
        self.metrics_port = metrics_port  # one endpoint for every process (0: none)
        self.child_metrics = ChildMetrics()
        # A folder, or an S3Location for s3://BUCKET/PREFIX (the S3 watcher then runs instead).
        self.input_dir = input_dir if isinstance(input_dir, S3Location) else input_dir.resolve()
        # A folder, or an s3://BUCKET/PREFIX/ URI (the sink writes there; nothing local).
        self.out_dir = str(out_dir).rstrip("/") + "/" if is_s3_output(out_dir) else Path(out_dir).resolve()
        self.data_dir = data_dir.resolve()
        self.port = port
        self.once = once
        self.finished = False  # --once: every image's row is written
        self.children: dict[str, Child] = {}
        self.stopping = False
        self.stack: EmbeddedStack | None = None
        self.broker_restarts: list[float] = []

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
        base = [sys.executable, "-m", "imgflow.cli"]
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
        target = self._present_at_start() if self.once else set()
        self._serve_metrics()
        try:
            for role in ROLES:
                # Each child serves its own metrics on loopback; ours proxies them all.
                metrics_port = free_port() if self.metrics_port else 0
                child = Child(role, self._argv(role), logs / f"{role}.log", self._env(bootstrap, role, metrics_port))
                child.start()
                self.children[role] = child
                if metrics_port:
                    self.child_metrics.children[role] = metrics_port
            source = self.input_dir.uri if isinstance(self.input_dir, S3Location) else self.input_dir
            print(f"processing {source} -> {self.out_dir} (logs in {logs})", flush=True)
            return self._supervise(target, bootstrap)
        finally:
            if self.finished or _accepts(bootstrap):
                self._stop_children(together=self.finished)
            else:
                # Nothing can be committed with the broker gone, so nothing is lost by not
                # waiting for it: what was not committed is done again on the next run.
                print("the broker is down: stopping every stage now (work not committed is redone on the next run)", flush=True)
                self._stop_children(timeout=5, together=True)
            if self.stack is not None:
                self.stack.stop()
            if is_s3_output(self.out_dir):
                print(f"results: {self.out_dir}avro/ and {self.out_dir}csv/ (one CSV: imgflow export csv {self.out_dir} --out results.csv)", flush=True)
            else:
                print(f"results: {self.out_dir / 'results.csv'} and {self.out_dir / 'avro'}/", flush=True)
            allow = self.input_dir.uri if isinstance(self.input_dir, S3Location) else self.input_dir
            print(
                f'find images in them: imgflow search "a cat" --out {self.out_dir} · as a web page: imgflow serve --out {self.out_dir} --allow {allow}',
                flush=True,
            )

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
        port = self.port
        if port and not port_is_free("127.0.0.1", port):
            new = free_port()
            print(f"port {port} is in use: the embedded broker takes port {new} instead", flush=True)
            port = new
        engine = self.settings.broker.engine
        what = "Apache Kafka (KRaft)" if engine == "kafka" else "tansu on SeaweedFS"
        print(f"starting the embedded broker, {what} (data in {self.data_dir / 'broker'}) ...", flush=True)
        wait_for_earlier_stack(self.data_dir / "broker")
        self.stack = EmbeddedStack(self.data_dir / "broker", port=port, log_file=logs / "broker.log", engine=engine)
        self.stack.start()
        print(f"broker ready at {self.stack.bootstrap}", flush=True)
        if self.settings.kafka.security_protocol != "PLAINTEXT":
            print(
                f"note: the embedded broker speaks PLAINTEXT on loopback; kafka.security_protocol="
                f"{self.settings.kafka.security_protocol} applies to a cluster given with --bootstrap",
                flush=True,
            )
        if engine == "tansu" or port:  # a restart keeps the address every stage was given
            self.stack.port = int(self.stack.bootstrap.rpartition(":")[2])
        return self.stack.bootstrap

    def _restart_broker(self) -> bool:
        """The embedded broker's runner is supervised like the stages: one that died is
        started again on the same address and data (the stages wait for it, then carry on
        from their committed offsets), with the same give-up rule. False: give up."""
        stack = self.stack
        if stack is None or stack.running or self.stopping:
            return True
        code = stack.proc.returncode if stack.proc is not None else None
        now = time.monotonic()
        self.broker_restarts = [r for r in self.broker_restarts if now - r < 60] + [now]
        if len(self.broker_restarts) > 5:
            print(f"\nthe embedded broker keeps failing (exit {code}); see {stack.log_file}", flush=True)
            return False
        log.warning("the embedded broker's runner exited with %s: restarting it", code)
        print(f"\nthe embedded broker exited ({code}): restarting it at {stack.bootstrap} (log: {stack.log_file})", flush=True)
        processes = _stack_processes(stack)  # the engine's, stopping now that their runner is gone
        stack.stop()
        _wait_gone(processes, 60)
        try:
            wait_for_earlier_stack(stack.data_dir)
            stack.start()
        except StackError as exc:
            print(f"the embedded broker did not start again: {exc}", flush=True)
            return True  # tried again next round, counted
        print(f"broker back at {stack.bootstrap}", flush=True)
        return True

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

    def _present_at_start(self) -> set[str]:
        """The event_ids `--once` waits for: every image in the folder or under the prefix now."""
        if isinstance(self.input_dir, S3Location):
            return s3_event_ids(self.input_dir, self.settings)
        return current_event_ids(self.input_dir, self.settings)

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
                progress.show(
                    found=found,
                    vision=counter.count(t.vision),
                    enriched=counter.count(t.enriched),
                    failed=counter.count(t.dlq),
                    written=written,
                    errors=tail.errors,
                    new_rows=tail.rows - done_before,
                    elapsed=time.monotonic() - started,
                )
                if self.once and not tail.missing:
                    self.finished = True
                    progress.finish()
                    print(f"done: {len(target)} images, {tail.errors} with errors, in {time.monotonic() - started:.1f}s", flush=True)
                    return 0
                if not self._restart_broker() or not self._restart_dead():
                    return 1
                time.sleep(0.5)
            progress.finish()
            return 0
        finally:
            counter.close()

    def _restart_dead(self) -> bool:
        for child in self.children.values():
            if child.alive() or self.stopping:
                continue
            code = child.proc.returncode if child.proc else None
            now = time.monotonic()
            child.restarts = [r for r in child.restarts if now - r < 60] + [now]
            if len(child.restarts) > 5:
                print(f"\n{child.role} keeps failing (exit {code}); see {child.log_path}", flush=True)
                return False
            log.warning("%s exited with %s: restarting", child.role, code)
            print(f"\n{child.role} exited ({code}): restarting it (log: {child.log_path})", flush=True)
            child.start()
        return True

    def _stop_children(self, timeout: float = 60, together: bool = False) -> None:
        """Stop every stage: one after the other, watcher first and sink last, so the sink
        drains what the others commit while they stop; or, when ``--once`` found every row
        written (nothing left to drain), all at once."""
        waves = [list(reversed(ROLES))] if together else [[role] for role in reversed(ROLES)]
        for roles in waves:
            stopping = [c for c in (self.children.get(r) for r in roles) if c and c.alive()]
            for child in stopping:
                child.proc.send_signal(signal.SIGTERM)
            for child in stopping:
                try:
                    child.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.error("%s did not stop in %ss: killing it", child.role, timeout)
                    child.proc.kill()
                    child.proc.wait()


def _accepts(bootstrap: str) -> bool:
    """Whether anything of ``bootstrap`` (HOST:PORT,...) accepts a connection now."""
    import socket

    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), 1.0):
                return True
        except (OSError, ValueError):
            continue
    return False


def _stack_processes(stack: EmbeddedStack) -> list[int]:
    """The engine's process ids in the runner's stack.json (broker, SeaweedFS, Kafka nodes)."""
    try:
        info = stack.info()
    except StackError:
        return []
    pids = [v for k, v in info.items() if k.endswith("_pid") and isinstance(v, int)]
    pids += [n["pid"] for n in info.get("nodes", []) if isinstance(n, dict) and isinstance(n.get("pid"), int)]
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)


def _runners_of(broker_dir: Path) -> list[tuple[int, int | None]]:
    """(pid, --parent-pid) of every ``python -m infra.embedded`` running on ``broker_dir``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        if "infra.embedded" not in argv or "--data-dir" not in argv:
            continue
        i = argv.index("--data-dir")
        if i + 1 >= len(argv) or Path(argv[i + 1]).resolve() != broker_dir.resolve():
            continue
        parent = argv[argv.index("--parent-pid") + 1] if "--parent-pid" in argv[:-1] else ""
        found.append((int(cmdline.parent.name), int(parent) if parent.isdigit() else None))
    return found


def wait_for_earlier_stack(broker_dir: Path, timeout: float = 120) -> None:
    """A stack whose command was killed (kill -9 of `imgflow run`) stops by itself, which takes
    a few seconds: wait for it, saying so, instead of failing on its data dir. A stack whose
    command is still running is another run's: StackError at once."""
    import fcntl

    lock_path = broker_dir / ".stack.lock"
    if not lock_path.exists():
        return
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        with open(lock_path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                if announced:
                    print("the earlier stack has stopped", flush=True)
                return
            except OSError:
                pass
        runners = _runners_of(broker_dir)
        owners = [parent for _, parent in runners if parent is not None and parent != os.getpid() and _alive(parent)]
        if owners:
            raise StackError(f"data dir {broker_dir} is in use by another running stack (the command with pid {owners[0]}): stop it, or use another --data-dir")
        if not announced:
            pids = ", ".join(str(pid) for pid, _ in runners) or "?"
            print(f"an earlier stack on {broker_dir} (pid {pids}) is still stopping: its command is gone; waiting for it to finish ...", flush=True)
            announced = True
        if time.monotonic() > deadline:
            raise StackError(f"the earlier stack on {broker_dir} did not stop within {timeout:.0f} s")
        time.sleep(0.5)


class Progress:
    """Progress of ``imgflow run``: rows written (of how many, with ``--once``), the rate,
    the ETA, and how far each stage has got. On a terminal a rich bar redrawn as rows are
    written (as ``backfill``'s); when output is a file or pipe, a line every 5 s.

    The rate is that of the last minute, counted from the first vision result (before it the
    models load): ``remaining / rate`` is the ETA."""

    WINDOW_S = 60.0

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.tty = sys.stdout.isatty()
        self._last_line = 0.0
        self._samples: deque[tuple[float, int]] = deque()  # (time, rows written this run)
        self._bar = None
        if self.tty:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            columns = [TextColumn("{task.description}")]
            if total is not None:
                columns += [BarColumn(bar_width=24), TextColumn("{task.completed}/{task.total}")]
            else:
                columns += [TextColumn("{task.completed} rows")]
            columns += [TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn()]
            if total is not None:
                columns += [TextColumn("ETA {task.fields[eta]}")]
            columns += [TextColumn("{task.fields[info]}")]
            self._bar = Bar(*columns, transient=False, refresh_per_second=4)
            self._task = self._bar.add_task("written", total=total, rate="-", eta="-", info="")
            self._bar.start()
            # Our log lines (librdkafka's warnings among them) print above the bar, not into it.
            self._handlers = []
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
                    self._handlers.append((handler, handler.setStream(sys.stderr)))

    def rate(self, now: float, new_rows: int, working: bool = True) -> float:
        """Rows a second over the last minute, counted from when the stages began to work
        (their models loaded: the first vision result)."""
        if not working and not new_rows:
            self._samples.clear()
            return 0.0
        self._samples.append((now, new_rows))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW_S:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return (new_rows - n0) / (now - t0) if now > t0 and new_rows > n0 else 0.0

    def show(
        self, *, found: int, vision: int, enriched: int, failed: int, written: int, errors: int, new_rows: int, elapsed: float, now: float | None = None
    ) -> None:
        rate = self.rate(time.monotonic() if now is None else now, new_rows, working=vision > 0)
        remaining = self.total - written if self.total is not None else None
        if remaining is not None and rate > 0:
            eta = _clock(remaining / rate)
        elif remaining == 0:
            eta = "0:00:00"
        else:
            eta = "-"
        stages = f"found {found} · vision {vision} · enriched {enriched} · failed {failed} · {errors} with errors"
        if not new_rows and vision == 0:
            stages += " · loading models"
        shown_rate = f"{rate:.2f}" if rate > 0 else "-"
        if self._bar is not None:
            self._bar.update(self._task, completed=written, rate=shown_rate, eta=eta, info=stages)
        elif time.monotonic() - self._last_line >= 5:
            total = f"/{self.total}" if self.total is not None else ""
            eta_text = f" | ETA {eta}" if self.total is not None else ""
            print(f"written {written}{total} | {shown_rate} img/s{eta_text} | {elapsed:.0f}s | {stages}", flush=True)
            self._last_line = time.monotonic()

    def finish(self) -> None:
        if self._bar is not None:
            for handler, stream in self._handlers:
                handler.setStream(stream)
            self._bar.stop()
            self._bar = None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
