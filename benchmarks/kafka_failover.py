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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.failover_cluster import (
    MIN_ISR,
    NODES,
    REPLICATION,
    TXN_TOPIC,
    admin_for,
    brokers,
    choose_coordinator_victim,
    choose_group_coordinator_victim,
    choose_leader_victim,
    coordinators,
    leader_counts,
    partition_map,
    pipeline_topics,
    replication_of,
    unhealthy,
    wait_healthy,
)
from benchmarks.failover_report import RowClock, exactly_once, gap_figures, pipeline_log_figures, result_checks, stage_gaps, summary
from benchmarks.perf_common import environ
from imgflow.app.stack import EmbeddedStack
from imgflow.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


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
    *,
    log=print,  # the progress lines
    llm: str = "smollm2-135m",
    timeout: float = 1800,
    rounds: tuple[str, ...] = ROUNDS[:2],
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
    report = run_failover(workdir, args.images, args.down, args.seed, llm=args.llm, rounds=rounds, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2))
    print(summary(report), file=sys.stderr)
    if not args.no_save:
        from benchmarks.perf_common import write_result

        write_result("kafka_failover", report)
    return 0 if report["exactly_once"] and not report.get("cluster_problems_at_end") else 1


if __name__ == "__main__":
    raise SystemExit(main())
