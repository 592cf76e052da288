"""The three-node cluster of ``benchmarks/kafka_failover.py`` seen by an admin client: where Kafka
puts each transactional id and group, which broker each round kills, and whether the cluster is
healthy."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

from imgflow.settings import Settings
from imgflow.topics import SCHEMA_TOPIC

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
