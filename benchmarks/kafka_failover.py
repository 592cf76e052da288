"""Broker failover on a three-node Apache Kafka cluster while the pipeline works.

    .venv/bin/python -m benchmarks.kafka_failover [--images 300] [--down 20] [--workdir DIR]

Three combined KRaft nodes on loopback (``EmbeddedStack(engine="kafka", nodes=3)``), the
pipeline's topics with replication factor 3 and ``min.insync.replicas=2``, then
``imgflow run IMAGES --once --bootstrap B1,B2,B3`` (watcher, vision, enrich, sink) over
``--images`` generated images with SmolLM2-135M. Once rows are being written, two rounds:

1. ``leader``: the broker that leads the most partitions of the pipeline's topics is killed
   with SIGKILL and held down ``--down`` seconds, then restarted on its ports and data.
2. ``coordinator``: the broker that is the transaction coordinator of the most stage
   transactional ids (the leader of their ``__transaction_state`` partition:
   ``Utils.abs(id.hashCode()) % partitions``, cross-checked with the brokers' own
   "Initialized transactionalId" log lines) is killed the same way.

Each round records the rows written while the broker was down, the pause (the longest gap
between row writes from the kill to 15 s after the restart, against the median gap before
the first kill), and how long the restarted broker took to be back in every ISR. At the end:
every image exactly once in results.csv and in the Avro files, none lost, no error rows,
the right content, and the cluster healthy (3 brokers, every replica in sync). Prints the
report as JSON; also in benchmarks/results/kafka_failover.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import fastavro

from benchmarks.perf_common import environ
from imgflow.app.stack import EmbeddedStack
from imgflow.results import committed_csv_length, read_csv_rows
from imgflow.settings import Settings
from imgflow.topics import SCHEMA_TOPIC

ROOT = Path(__file__).resolve().parents[1]
NODES = 3
REPLICATION, MIN_ISR = 3, 2
STAGES = ("vision", "enrich")  # the transactional stages (the sink commits plain offsets)
TXN_TOPIC = "__transaction_state"
HEALTH_TOPIC = "__imgflow_health"  # the runner's own probe topic, replication 1 by design


# --------------------------------------------------------------------------------------------
# where Kafka puts a transactional id


def java_string_hash(text: str) -> int:
    """Java's ``String.hashCode()`` (32-bit, over UTF-16 code units)."""
    h = 0
    for unit in text.encode("utf-16-be").hex(" ", 2).split():
        h = (31 * h + int(unit, 16)) & 0xFFFFFFFF
    return h - (1 << 32) if h & 0x80000000 else h


def kafka_abs(n: int) -> int:
    """``org.apache.kafka.common.utils.Utils.abs``: ``Math.abs``, with MIN_VALUE mapped to 0
    (not ``n & 0x7fffffff``, which is ``Utils.toPositive``, the partitioner's)."""
    return 0 if n == -(1 << 31) else abs(n)


def txn_partition(transactional_id: str, partitions: int) -> int:
    """The ``__transaction_state`` partition of a transactional id (TransactionStateManager.partitionFor)."""
    return kafka_abs(java_string_hash(transactional_id)) % partitions


def stage_transactional_ids(settings: Settings, partitions: dict[str, int]) -> dict[str, list[str]]:
    """Per stage, the ids of its transactional producers: one per input partition,
    ``imgflow-<stage>.<topic>.<partition>`` (imgflow.stage.commit.TransactionalCommit.assign)."""
    t = settings.topics
    inputs = {"vision": [t.new_high, t.new], "enrich": [t.vision]}
    return {stage: [f"imgflow-{stage}.{topic}.{p}" for topic in inputs[stage] for p in range(partitions[topic])] for stage in STAGES}


def busy_transactional_ids(settings: Settings, ids: dict[str, list[str]]) -> set[str]:
    """The ids that commit work in this run (the high-priority lane stays empty)."""
    high = f".{settings.topics.new_high}."
    return {i for stage in ids.values() for i in stage if high not in i}


INIT_LINE = re.compile(
    r"Initialized transactionalId (\S+) with producerId \d+ and producer epoch \d+ "
    r"on partition " + TXN_TOPIC + r"-(\d+)"
)


def coordinators_from_logs(log_dir: Path) -> dict[str, tuple[int, int]]:
    """transactional id -> (node, partition) of its latest "Initialized transactionalId" line
    in the brokers' logs (only the coordinator logs it)."""
    latest: dict[str, tuple[str, int, int]] = {}
    for node in range(1, NODES + 1):
        path = log_dir / f"kafka-{node}.log"
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = INIT_LINE.search(line)
            if m:
                stamp = line[1:24] if line.startswith("[") else ""
                if m.group(1) not in latest or stamp >= latest[m.group(1)][0]:
                    latest[m.group(1)] = (stamp, node, int(m.group(2)))
    return {k: (node, part) for k, (_, node, part) in latest.items()}


# --------------------------------------------------------------------------------------------
# the cluster, seen by an admin client


def admin_for(bootstrap: str):
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 5000, "reconnect.backoff.max.ms": 500, "log_level": 0})


def partition_map(admin, topics: list[str] | None = None) -> dict[str, dict[int, tuple[int, list, list]]]:
    """topic -> partition -> (leader, replicas, isrs); every topic when ``topics`` is None."""
    md = admin.list_topics(timeout=15)
    return {
        name: {p: (pm.leader, list(pm.replicas), list(pm.isrs)) for p, pm in t.partitions.items()}
        for name, t in md.topics.items()
        if topics is None or name in topics
    }


def brokers(admin) -> list[int]:
    return sorted(admin.list_topics(timeout=15).brokers)


def pipeline_topics(settings: Settings) -> list[str]:
    t = settings.topics
    return [t.new, t.new_high, t.vision, t.enriched, t.dlq]


def leader_counts(parts: dict, topics: list[str]) -> Counter:
    return Counter(leader for t in topics for leader, _, _ in parts.get(t, {}).values() if leader >= 0)


GROUPS = ("imgflow-vision", "imgflow-enrich", "imgflow-sink")
STAGE_GROUPS = ("imgflow-vision", "imgflow-enrich")  # the groups whose offsets go into transactions


def coordinators(parts: dict, settings: Settings) -> dict:
    """Which broker coordinates each consumer group (the leader of its ``__consumer_offsets``
    partition, placed like a transactional id) and each busy transactional id now."""
    offsets, txn = parts["__consumer_offsets"], parts[TXN_TOPIC]
    ids = stage_transactional_ids(settings, {t: len(parts[t]) for t in pipeline_topics(settings)})
    return {
        "groups": {g: offsets[txn_partition(g, len(offsets))][0] for g in GROUPS},
        "transactions": {i: txn[txn_partition(i, len(txn))][0] for i in sorted(busy_transactional_ids(settings, ids))},
    }


def stage_group_coordinators(parts: dict, settings: Settings) -> set[int]:
    groups = coordinators(parts, settings)["groups"]
    return {groups[g] for g in STAGE_GROUPS}


def choose_leader_victim(parts: dict, settings: Settings) -> tuple[int, dict]:
    """The broker leading the most partitions of the pipeline's topics. A tie goes to one that
    coordinates no stage's consumer group (that case is the ``group-coordinator`` round's),
    then to the one leading the most internal partitions, then to the lowest id."""
    mine = leader_counts(parts, pipeline_topics(settings))
    internal = leader_counts(parts, ["__consumer_offsets", TXN_TOPIC, SCHEMA_TOPIC.name])
    group_coords = stage_group_coordinators(parts, settings)
    victim = max(sorted(mine), key=lambda b: (mine[b], b not in group_coords, internal[b], -b))
    tied = [b for b in mine if mine[b] == mine[victim]]
    why = f"leads {mine[victim]} of {sum(mine.values())} pipeline-topic partitions" + (
        f" (tied with {sorted(set(tied) - {victim})}; "
        f"{'a' if victim in group_coords else 'no'} stage group coordinator, "
        f"leads {internal[victim]} internal partitions)"
        if len(tied) > 1
        else ""
    )
    return victim, {"pipeline_partitions_led": dict(sorted(mine.items())), "internal_partitions_led": dict(sorted(internal.items())), "why": why}


def choose_coordinator_victim(parts: dict, settings: Settings, log_dir: Path) -> tuple[int, dict]:
    """A broker that is the transaction coordinator of busy stage transactional ids: the one
    coordinating the most of them among those that coordinate no stage's consumer group (a
    group coordinator dying mid-transaction is the ``group-coordinator`` round), else the
    one coordinating the most."""
    txn_parts = parts[TXN_TOPIC]
    partitions = {t: len(parts[t]) for t in pipeline_topics(settings)}
    ids = stage_transactional_ids(settings, partitions)
    busy = busy_transactional_ids(settings, ids)
    coordinator = {i: txn_parts[txn_partition(i, len(txn_parts))][0] for stage in ids.values() for i in stage}
    logged = coordinators_from_logs(log_dir)
    mismatches = [i for i in coordinator if i in logged and logged[i][1] != txn_partition(i, len(txn_parts))]
    per_broker = Counter(coordinator[i] for i in busy if coordinator[i] >= 0)
    group_coords = stage_group_coordinators(parts, settings)
    victim = max(sorted(per_broker), key=lambda b: (b not in group_coords, per_broker[b], -b))
    led = sorted(i for i in busy if coordinator[i] == victim)
    by_stage = {s: sorted(i for i in ids[s] if i in led) for s in STAGES}
    stage = max(STAGES, key=lambda s: len(by_stage[s]))
    return victim, {
        "coordinates": led,
        "coordinator_of_stage": stage,
        "also_stage_group_coordinator": victim in group_coords,
        "busy_ids_per_broker": dict(sorted(per_broker.items())),
        "txn_state_partition_of": {i: txn_partition(i, len(txn_parts)) for i in sorted(busy)},
        "txn_state_leaders": {p: v[0] for p, v in sorted(txn_parts.items())},
        "checked_against_broker_logs": len([i for i in coordinator if i in logged]),
        "broker_log_mismatches": mismatches,
        "why": f"transaction coordinator of {len(led)} of {len(busy)} busy stage transactional ids "
        f"(e.g. {led[0] if led else '-'})" + (", and a stage group coordinator" if victim in group_coords else ""),
    }


def choose_group_coordinator_victim(parts: dict, settings: Settings) -> tuple[int, dict]:
    """The group coordinator of the enrich stage (the last stage to finish): its
    send_offsets_to_transaction needs that coordinator."""
    groups = coordinators(parts, settings)["groups"]
    victim = groups["imgflow-enrich"]
    return victim, {"why": f"group coordinator of imgflow-enrich (and of {sorted(g for g, b in groups.items() if b == victim)})"}


def replication_of(admin, topics: list[str]) -> dict[str, dict]:
    """Per topic: the replication factor of each partition and its min.insync.replicas."""
    from confluent_kafka.admin import ConfigResource

    parts = partition_map(admin, topics)
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
    out = {}
    for res, fut in admin.describe_configs(resources, request_timeout=15).items():
        cfg = fut.result(15)
        out[res.name] = {
            "replication_factors": sorted({len(r) for _, r, _ in parts[res.name].values()}),
            "min_insync_replicas": int(cfg["min.insync.replicas"].value),
        }
    return out


def unhealthy(admin) -> list[str]:
    """What is not right with the cluster: a missing broker, a partition without leader or
    with a replica out of sync. Empty when healthy."""
    problems = []
    try:
        present = brokers(admin)
        if present != list(range(1, NODES + 1)):
            problems.append(f"brokers {present}")
        for topic, parts in partition_map(admin).items():
            for p, (leader, replicas, isrs) in parts.items():
                if leader < 0:
                    problems.append(f"{topic}[{p}] has no leader")
                elif sorted(isrs) != sorted(replicas):
                    problems.append(f"{topic}[{p}] isr {isrs} of {replicas}")
    except Exception as exc:  # noqa: BLE001 - an unreachable cluster is unhealthy
        problems.append(f"metadata: {exc!r}")
    return problems


def wait_healthy(admin, timeout: float) -> tuple[float, list[str]]:
    started = time.monotonic()
    problems = unhealthy(admin)
    while problems and time.monotonic() - started < timeout:
        time.sleep(0.5)
        problems = unhealthy(admin)
    return time.monotonic() - started, problems


# --------------------------------------------------------------------------------------------
# rows as the sink writes them


class RowClock(threading.Thread):
    """Polls the committed part of results.csv every ``interval`` s: when each row count was
    first seen (the sink writes a batch's rows at once)."""

    def __init__(self, out: Path, interval: float = 0.2) -> None:
        super().__init__(name="row-clock", daemon=True)
        self.out, self.interval = out, interval
        self.t0 = time.monotonic()
        self.wall0 = time.time()  # the same instant, for the processes' log lines
        self.writes: list[tuple[float, int]] = []  # (seconds since t0, rows so far)
        self._length = -1
        self._halt = threading.Event()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(self.interval)

    def poll(self) -> None:
        length = committed_csv_length(self.out)
        if length == self._length:
            return
        self._length = length
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
            rows = sum(1 for _ in read_csv_rows(self.out / "results.csv", length))
            if rows > (self.writes[-1][1] if self.writes else 0):
                self.writes.append((self.now(), rows))

    @property
    def rows(self) -> int:
        return self.writes[-1][1] if self.writes else 0

    def rows_at(self, t: float) -> int:
        return max((n for w, n in self.writes if w <= t), default=0)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def gaps(self, start: float, end: float) -> list[tuple[float, float]]:
        """(from, to) of each interval between row writes that overlaps [start, end]; the
        interval still open at ``end`` counts until the next write."""
        times = [w for w, _ in self.writes]
        return [(a, b) for a, b in zip(times, times[1:]) if b >= start and a <= end]


def gap_figures(clock: RowClock, kill: float, release: float, after: float, cap: float = float("inf")) -> dict:
    """The longest gap between row writes that overlaps [kill, release + after]; ``cap``
    (the next round's kill) cuts a gap that runs into the next round."""
    gaps = [(a, min(b, cap)) for a, b in clock.gaps(kill, release + after)]
    longest = max(gaps, key=lambda g: g[1] - g[0], default=None)
    first_after_kill = next((w for w, _ in clock.writes if w > kill), None)
    first_after_release = next((w for w, _ in clock.writes if w > release), None)
    return {
        "longest_gap_s": round(longest[1] - longest[0], 2) if longest else None,
        "longest_gap_at_s": [round(longest[0] - kill, 2), round(longest[1] - kill, 2)] if longest else None,
        "first_row_after_kill_s": round(first_after_kill - kill, 2) if first_after_kill else None,
        "first_row_after_restart_s": round(first_after_release - release, 2) if first_after_release else None,
    }


# --------------------------------------------------------------------------------------------
# the results


def result_checks(out: Path, expected: dict[str, str]) -> dict:
    """Exactly once in the CSV and in Avro, nothing lost, no error rows, the right content."""
    from tests.chaos import PHOTOS

    rows = list(read_csv_rows(out / "results.csv", committed_csv_length(out)))
    ids = [r["event_id"] for r in rows]
    names = [Path(r["image_path"]).name for r in rows]
    avro_ids: list[str] = []
    for path in sorted((out / "avro").rglob("*.avro")):
        with path.open("rb") as f:  # a partial or corrupt file raises here
            avro_ids += [r["event_id"] for r in fastavro.reader(f)]
    wrong, errors = [], []
    for row in rows:
        name = Path(row["image_path"]).name
        want = expected.get(name)
        if row["error"]:
            errors.append(f"{name}: {row['error']}")
        elif want in PHOTOS:
            if not any(w in row["text"].lower() for w in PHOTOS[want][1]):
                wrong.append(f"{name}: description {row['text'][:80]!r}")
        elif want is not None and want not in row["image_text"].replace("O", "0"):
            wrong.append(f"{name}: image_text {row['image_text']!r}")
    if sorted(avro_ids) != sorted(ids):
        wrong.append("the Avro files and the CSV hold different event_ids")
    return {
        "images": len(expected),
        "csv_rows": len(rows),
        "csv_duplicates": len(ids) - len(set(ids)),
        "csv_duplicate_images": len(names) - len(set(names)),
        "avro_rows": len(avro_ids),
        "avro_duplicates": len(avro_ids) - len(set(avro_ids)),
        "lost": sorted(set(expected) - set(names)),
        "unexpected": sorted(set(names) - set(expected)),
        "error_rows": errors,
        "wrong_content": wrong,
        "leftover_temp_files": len(list((out / "avro").rglob("*.tmp"))),
    }


def exactly_once(checks: dict) -> bool:
    return (
        checks["csv_rows"] == checks["images"] == checks["avro_rows"]
        and checks["csv_duplicates"] == 0
        and checks["csv_duplicate_images"] == 0
        and checks["avro_duplicates"] == 0
        and not checks["lost"]
        and not checks["unexpected"]
        and not checks["error_rows"]
        and not checks["wrong_content"]
        and checks["leftover_temp_files"] == 0
    )


LOG_PATTERNS = {
    "transactions_failed": "transaction for ",
    "commit_retries": "commit retry",
    "aborts_failed": "abort failed",
    "transaction_hung_exits": "a transaction has hung",
    "sink_offset_commit_failed": "offset commit failed",
    "tracebacks": "Traceback",
}


LOG_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
# A stage's "committed images.vision[1]@17 -> images.enriched", the sink's "wrote /path".
COMMIT_LINE = re.compile(r"\]: (committed \S+\[\d+\]@\d+ |wrote \S)")


def commit_times(log_path: Path, wall0: float) -> list[float]:
    """When a stage committed transactions (its "committed <topic>[p]@offset" lines), in
    seconds since ``wall0``."""
    times: list[float] = []
    if not log_path.exists():
        return times
    for line in log_path.read_text(errors="replace").splitlines():
        if not COMMIT_LINE.search(line):
            continue
        m = LOG_STAMP.match(line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000 - wall0
            if not times or t - times[-1] > 0.05:  # the lines of one commit: one time
                times.append(t)
    return times


def stage_gaps(log_dir: Path, wall0: float, kill: float, end: float, cap: float = float("inf")) -> dict:
    """Per stage, the longest gap between its commits (the sink: its writes) that overlaps
    [kill, end], and when its first commit after the kill came."""
    out = {}
    for role in ("vision", "enrich", "sink"):
        times = commit_times(log_dir / f"{role}.log", wall0)
        gaps = [(a, min(b, cap)) for a, b in zip(times, times[1:]) if b >= kill and a <= end]
        if not gaps:
            out[role] = {"idle": True}
            continue
        a, b = max(gaps, key=lambda g: g[1] - g[0])
        first = next((t for t in times if t > kill), None)
        out[role] = {
            "longest_gap_s": round(b - a, 2),
            "gap_from_kill_s": [round(a - kill, 2), round(b - kill, 2)],
            "first_commit_after_kill_s": round(first - kill, 2) if first else None,
        }
    return out


def pipeline_log_figures(log_dir: Path) -> dict:
    figures = {}
    for role in ("watcher", "vision", "enrich", "sink"):
        text = (log_dir / f"{role}.log").read_text(errors="replace") if (log_dir / f"{role}.log").exists() else ""
        figures[role] = {k: text.count(p) for k, p in LOG_PATTERNS.items() if text.count(p)}
    return figures


# --------------------------------------------------------------------------------------------
# the scenario


def pipeline_env(llm: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGFLOW_")}
    env.update(
        {
            "IMGFLOW_MODELS__LLM": llm,
            "IMGFLOW_TOPICS__REPLICATION_FACTOR": str(REPLICATION),
            "IMGFLOW_TOPICS__MIN_INSYNC_REPLICAS": str(MIN_ISR),
            # Small batches (the LLM's too): row writes close together, so a pause stands out.
            "IMGFLOW_STAGE__BATCH_SIZE": "4",
            "IMGFLOW_MODELS__LLM_BATCH": "4",
            "IMGFLOW_WATCH__POLL_INTERVAL_S": "0.5",
            "IMGFLOW_WATCH__SETTLE_S": "0.5",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


ROUNDS = ("leader", "coordinator", "group-coordinator")


def run_failover(
    workdir: Path,
    images: int = 200,
    down_s: float = 20.0,
    seed: int = 5,
    llm: str = "smollm2-135m",
    timeout: float = 1800,
    rounds: tuple[str, ...] = ROUNDS[:2],
    log=print,
) -> dict:
    """The whole scenario (see the module docstring); returns the report."""
    from tests.chaos import make_images

    started = time.monotonic()
    workdir = Path(workdir)
    folder, out, data = workdir / "images", workdir / "out", workdir / "data"
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    expected = make_images(folder, images, seed)
    env = pipeline_env(llm)
    settings = Settings()
    report: dict = {"images": images, "nodes": NODES, "down_s": down_s, "llm": llm, "rounds": []}
    # The runner creates the pipeline's topics itself, with the same settings as the pipeline.
    with environ(IMGFLOW_TOPICS__REPLICATION_FACTOR=str(REPLICATION), IMGFLOW_TOPICS__MIN_INSYNC_REPLICAS=str(MIN_ISR)):
        stack = EmbeddedStack(workdir / "broker", port=0, engine="kafka", nodes=NODES, log_file=logs / "broker.log").start()
    broker_logs = workdir / "broker" / "logs"
    admin = admin_for(stack.bootstrap)
    clock = RowClock(out)
    proc = None
    try:
        report["cluster_start_s"] = round(stack.startup_s or 0.0, 1)
        for attempt in range(60):  # a broker learns of a topic just created a moment later
            try:
                report["replication"] = replication_of(admin, pipeline_topics(settings))
                break
            except Exception:  # noqa: BLE001
                if attempt == 59:
                    raise
                time.sleep(0.5)
        log(f"cluster up in {stack.startup_s:.1f}s at {stack.bootstrap}: {report['replication']}")
        with (logs / "imgflow-run.log").open("ab") as run_log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "imgflow", "run", str(folder), "--out", str(out), "--once", "--data-dir", str(data), "--bootstrap", stack.bootstrap],
                cwd=ROOT,
                env=env,
                stdout=run_log,
                stderr=subprocess.STDOUT,
            )
        clock.start()
        deadline = time.monotonic() + timeout

        def alive() -> None:
            if proc.poll() is not None and clock.rows < images:
                raise RuntimeError(f"imgflow run exited {proc.returncode} after {clock.rows} rows; see {logs / 'imgflow-run.log'} and {data / 'logs'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{clock.rows} of {images} rows after {timeout:.0f}s")

        # Steady state first: rows flowing for a while before the first kill.
        warm = max(8, images // 10)
        while clock.rows < warm:
            alive()
            time.sleep(0.2)
        report["first_rows_s"] = round(clock.writes[0][0], 1)
        steady_from = clock.now()
        time.sleep(min(15.0, down_s))
        for kind in rounds:
            alive()
            parts = partition_map(admin)
            if kind == "leader":
                victim, why = choose_leader_victim(parts, settings)
            elif kind == "coordinator":
                victim, why = choose_coordinator_victim(parts, settings, broker_logs)
            else:
                victim, why = choose_group_coordinator_victim(parts, settings)
            at_kill = coordinators(parts, settings)
            rows_before = clock.rows
            if rows_before >= images:
                raise RuntimeError(f"every row was written before round {kind!r}: use more images")
            kill = clock.now()
            stack.kill_node(victim, hold=True)
            log(f"round {kind}: killed node {victim} at {kill:.1f}s ({why['why']}), {rows_before} rows")
            down_view: dict = {"leaders_moved_s": None}
            while clock.now() < kill + down_s:
                alive()
                if down_view["leaders_moved_s"] is None:
                    # The controller fences the dead broker and elects new leaders.
                    with contextlib.suppress(Exception):
                        now_parts = partition_map(admin)
                        if victim not in brokers(admin) and victim not in leader_counts(now_parts, list(now_parts)):
                            down_view["leaders_moved_s"] = round(clock.now() - kill, 1)
                time.sleep(0.5)
            parts_down = partition_map(admin, pipeline_topics(settings) + [TXN_TOPIC])
            down_view["leaders_while_down"] = dict(sorted(leader_counts(parts_down, list(parts_down)).items()))
            release = clock.now()
            rows_while_down = clock.rows_at(release) - clock.rows_at(kill)
            stack.release_node(victim)
            rejoin_s, problems = wait_healthy(admin, 180)
            log(f"round {kind}: node {victim} released at {release:.1f}s; {rows_while_down} rows while down; back in every ISR after {rejoin_s:.1f}s")
            # Rows a little past the restart too: the rejoin can cause a pause of its own.
            settle = 15.0
            while clock.now() < release + settle and clock.rows < images:
                alive()
                time.sleep(0.2)
            rnd = {
                "kind": kind,
                "killed_node": victim,
                **why,
                "coordinators_at_kill": at_kill,
                "killed_at_s": round(kill, 1),
                "released_at_s": round(release, 1),
                "down_for_s": round(release - kill, 1),
                "rows_before": rows_before,
                "rows_while_down": rows_while_down,
                "rows_in_second_half_down": clock.rows_at(release) - clock.rows_at(kill + down_s / 2),
                **down_view,
                "rejoined_every_isr_s": round(rejoin_s, 1),
                "unhealthy_after_rejoin": problems,
            }
            report["rounds"].append(rnd)
        while clock.rows < images:
            alive()
            time.sleep(0.5)
        code = proc.wait(120)
        report["imgflow_run_exit"] = code
        report["seconds"] = round(time.monotonic() - started, 1)
        report["pipeline_s"] = round(clock.writes[-1][0], 1)
        # Steady-state pace: the gaps between row writes before the first kill.
        first_kill = report["rounds"][0]["killed_at_s"]
        times = [w for w, _ in clock.writes if steady_from - 10 <= w <= first_kill]
        before = [b - a for a, b in zip(times, times[1:])]
        median = statistics.median(before) if before else None
        report["median_gap_before_s"] = round(median, 2) if median else None
        span = (times[-1] - times[0]) if len(times) > 1 else 0
        report["rows_per_s_before"] = round((clock.rows_at(first_kill) - clock.rows_at(times[0])) / span, 2) if span else None
        for n, rnd in enumerate(report["rounds"]):
            # From the kill to 15 s after the restart, or to the next round's kill if sooner.
            nxt = report["rounds"][n + 1]["killed_at_s"] if n + 1 < len(report["rounds"]) else float("inf")
            after = max(0.0, min(15.0, nxt - rnd["released_at_s"]))
            rnd.update(gap_figures(clock, rnd["killed_at_s"], rnd["released_at_s"], after, cap=nxt))
            rnd["pause_s"] = round(rnd["longest_gap_s"] - median, 2) if rnd["longest_gap_s"] and median else None
            rnd["rows_per_s_while_down"] = round(rnd["rows_while_down"] / rnd["down_for_s"], 2)
            rnd["stages"] = stage_gaps(data / "logs", clock.wall0, rnd["killed_at_s"], rnd["released_at_s"] + after, cap=nxt)
        report["cluster_problems_at_end"] = unhealthy(admin)
        report["row_writes"] = [[round(t, 2), n] for t, n in clock.writes]  # (s since start, rows)
        report["node_pids_at_end"] = {n["node_id"]: n["pid"] for n in stack.info()["nodes"]}
    finally:
        if clock.is_alive():
            clock.stop()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        del admin
        stack.stop()
    report["checks"] = result_checks(out, expected)
    report["exactly_once"] = exactly_once(report["checks"])
    report["pipeline_logs"] = pipeline_log_figures(data / "logs")
    report["workdir"] = str(workdir)
    return report


def summary(report: dict) -> str:
    lines = [
        f"{report['images']} images on {report['nodes']} Kafka brokers (RF {REPLICATION}, min ISR {MIN_ISR}) "
        f"in {report.get('seconds')}s; median gap between row writes before the kills "
        f"{report.get('median_gap_before_s')}s ({report.get('rows_per_s_before')} rows/s)"
    ]
    for r in report["rounds"]:
        lines.append(
            f"  {r['kind']:<11} node {r['killed_node']} ({r['why']}): down {r['down_for_s']}s, "
            f"{r['rows_while_down']} rows while down, longest gap {r['longest_gap_s']}s "
            f"(pause {r.get('pause_s')}s), first row {r['first_row_after_kill_s']}s after the kill, "
            f"back in every ISR {r['rejoined_every_isr_s']}s after the restart"
        )
    c = report["checks"]
    lines.append(
        f"  exactly once: {report['exactly_once']} (csv {c['csv_rows']}, avro {c['avro_rows']}, "
        f"lost {len(c['lost'])}, duplicates {c['csv_duplicates']}/{c['avro_duplicates']}, "
        f"errors {len(c['error_rows'])}); cluster at the end: "
        f"{report.get('cluster_problems_at_end') or 'healthy'}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--images", type=int, default=300, help="images to process (default 300)")
    ap.add_argument("--down", type=float, default=20.0, help="seconds each killed broker stays down (default 20)")
    ap.add_argument("--rounds", default="leader,coordinator", help="kills in order, of: leader, coordinator, group-coordinator (default leader,coordinator)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--llm", default="smollm2-135m")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the run here (default: a temp dir)")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/kafka_failover.json")
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="imgflow-kafka-failover-"))
    rounds = tuple(r.strip() for r in args.rounds.split(",") if r.strip())
    if not rounds or set(rounds) - set(ROUNDS):
        ap.error(f"--rounds: a comma-separated list of {', '.join(ROUNDS)}")
    report = run_failover(workdir, args.images, args.down, args.seed, args.llm, rounds=rounds, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2))
    print(summary(report), file=sys.stderr)
    if not args.no_save:
        from benchmarks.perf_common import write_result

        write_result("kafka_failover", report)
    return 0 if report["exactly_once"] and not report.get("cluster_problems_at_end") else 1


if __name__ == "__main__":
    raise SystemExit(main())
