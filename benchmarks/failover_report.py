"""What ``benchmarks/kafka_failover.py`` measures and reports: when rows were written, the gaps
around each kill, the exactly-once checks of the output, the stages' logs, and the summary."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from pathlib import Path

import fastavro

from benchmarks.failover_cluster import MIN_ISR, REPLICATION
from imgflow.output.formats import committed_csv_length, read_csv_rows


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
