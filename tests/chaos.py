"""Chaos harness: the pipeline as separate processes (watcher, vision, enrich, sink) on the
embedded broker, stages killed with SIGKILL at random and restarted, the broker killed and
restarted, then a check that every image ended exactly once in the CSV and in Avro, with
the right content. Used by tests/test_chaos.py (quick form, in `make test`) and by
benchmarks/chaos_long.py (the long run)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fastavro
from PIL import Image
from skimage import data

from imgflow.app.stack import EmbeddedStack
from imgflow.output.formats import read_csv_rows
from imgflow.output.store import ResultStore
from imgflow.samples import render_text_image

ROOT = Path(__file__).resolve().parents[1]
ROLES = ["watcher", "vision", "enrich", "sink"]
PHOTOS = {"chelsea": (data.chelsea, ("cat",)), "coffee": (data.coffee, ("espresso", "cup", "coffee"))}


def make_images(folder: Path, count: int, seed: int = 0) -> dict[str, str]:
    """``count`` distinct images; returns file name -> what its row must show."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sources = {name: loader() for name, (loader, _) in PHOTOS.items()}
    expected = {}
    for i in range(count):
        kind = i % 3
        if kind == 2:
            name = f"text_{i:04d}.png"
            render_text_image([f"CHAOS {i:04d}"], size=(520, 120)).save(folder / name)
            expected[name] = f"{i:04d}"
        else:
            photo = list(PHOTOS)[kind]
            scale = rng.uniform(0.5, 1.0)
            img = Image.fromarray(sources[photo])
            img = img.resize((int(img.width * scale), int(img.height * scale)))
            name = f"{photo}_{i:04d}.jpg"
            img.save(folder / name, quality=90)
            expected[name] = photo
    old = time.time() - 10
    for p in folder.iterdir():
        os.utime(p, (old, old))  # settled: the watcher publishes them on its first scan
    return expected


@dataclass
class ChaosReport:
    images: int
    kills: dict[str, int] = field(default_factory=dict)
    broker_restarts: int = 0
    rows: int = 0
    duplicates: int = 0
    lost: int = 0
    avro_rows: int = 0
    avro_duplicates: int = 0
    wrong_content: list[str] = field(default_factory=list)
    error_rows: list[str] = field(default_factory=list)
    leftover_temp_files: int = 0
    sink_mid_write_crashes: int = 0
    unclean_exits: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_kills(self) -> int:
        return sum(self.kills.values())

    def as_dict(self) -> dict:
        return {**asdict(self), "total_kills": self.total_kills}


class Processes:
    def __init__(self, workdir: Path, env: dict, images: Path) -> None:
        self.workdir, self.env, self.images = workdir, env, images
        self.procs: dict[str, subprocess.Popen] = {}
        (workdir / "logs").mkdir(parents=True, exist_ok=True)

    def argv(self, role: str) -> list[str]:
        base = [sys.executable, "-m", "imgflow"]
        if role == "watcher":
            return [*base, "watch", "local", str(self.images), "--data-dir", str(self.workdir / "data")]
        return [*base, "stage", role]

    def start(self, role: str, extra_env: dict | None = None) -> None:
        with (self.workdir / "logs" / f"{role}.log").open("ab") as log:
            self.procs[role] = subprocess.Popen(self.argv(role), cwd=ROOT, env={**self.env, **(extra_env or {})}, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, role: str) -> None:
        proc = self.procs[role]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def restart_dead(self) -> None:
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                self.start(role)

    def stop_all(self, timeout: float = 60) -> dict[str, int]:
        codes = {}
        for role in ROLES:
            proc = self.procs.get(role)
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for role in ROLES:
            proc = self.procs.get(role)
            if proc is None:
                continue
            try:
                codes[role] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[role] = proc.wait()
        return codes


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def committed_rows(out: Path) -> list[dict]:
    if not (out / "results.csv").exists():
        return []
    return list(read_csv_rows(out / "results.csv", ResultStore(out).committed_length()))


def run_chaos(
    workdir: Path,
    images: int,
    kills: int,
    broker_restarts: int,
    seed: int = 1,
    kill_interval: tuple[float, float] = (2.0, 5.0),
    timeout: float = 1500,
    log=print,
    engine: str = "tansu",
) -> ChaosReport:
    rng = random.Random(seed)
    started = time.monotonic()
    folder = workdir / "images"
    expected = make_images(folder, images, seed)
    out = workdir / "out"
    stack = EmbeddedStack(workdir / "broker", port=0, log_file=workdir / "logs" / "broker.log", engine=engine).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGFLOW_")}
    env.update(
        {
            "IMGFLOW_KAFKA__BOOTSTRAP": stack.bootstrap,
            "IMGFLOW_DATA_DIR": str(workdir / "data"),
            "IMGFLOW_SINK__OUT_DIR": str(out),
            "IMGFLOW_ALLOWED_ROOTS": f'["{folder}"]',
            "IMGFLOW_MODELS__LLM": "smollm2-135m",
            "IMGFLOW_STAGE__BATCH_SIZE": "4",
            "IMGFLOW_WATCH__POLL_INTERVAL_S": "0.5",
            "IMGFLOW_WATCH__SETTLE_S": "0.5",
            "IMGFLOW_KAFKA__TRANSACTION_STALL_S": "90",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    procs = Processes(workdir, env, folder)
    report = ChaosReport(images=images, kills={r: 0 for r in ROLES})
    try:
        for role in ROLES:
            # The first sink dies in the middle of writing its first CSV rows (deterministic).
            procs.start(role, {"IMGFLOW_CRASH_AT": "sink:mid_csv:1"} if role == "sink" else None)
        # Kills are only interesting while images flow: wait for the first result row.
        first_row_deadline = time.monotonic() + 600
        while not committed_rows(out) and time.monotonic() < first_row_deadline:
            procs.restart_dead()  # the sink, after its mid-write crash
            time.sleep(1)
        # Kill phase: every stage at least once (round robin first), then at random; one
        # sink restart is armed to die in the middle of writing its CSV rows.
        schedule = ROLES + [rng.choice(ROLES) for _ in range(max(0, kills - len(ROLES)))]
        restart_at = {int(len(schedule) * (k + 1) / (broker_restarts + 1)) for k in range(broker_restarts)}
        for n, role in enumerate(schedule):
            time.sleep(rng.uniform(*kill_interval))
            procs.kill(role)
            report.kills[role] += 1
            # Until it has happened once, every restarted sink is armed to die mid-CSV-write.
            armed = role == "sink" and "crash point mid_csv" not in _read(workdir / "logs" / "sink.log")
            arm = {"IMGFLOW_CRASH_AT": "sink:mid_csv:1"} if armed else None
            procs.start(role, arm)
            if n in restart_at:
                stack.kill_broker()  # the supervisor brings it back on the same durable storage
                report.broker_restarts += 1
            procs.restart_dead()  # e.g. the armed sink, after it crashed mid-write
            log(f"kill {n + 1}/{len(schedule)}: {role}; rows so far {len(committed_rows(out))}")
        # Let it finish: restart whatever an armed crash point took down meanwhile.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            procs.restart_dead()
            if len({r["event_id"] for r in committed_rows(out)}) >= images:
                break
            time.sleep(2)
        time.sleep(5)  # anything still in flight that would make a second row lands now
        report.unclean_exits = {r: c for r, c in procs.stop_all().items() if c != 0}
    finally:
        procs.stop_all()
        stack.stop()
    rows = committed_rows(out)
    ids = [r["event_id"] for r in rows]
    names = [Path(r["image_path"]).name for r in rows]
    report.rows = len(rows)
    report.duplicates = len(ids) - len(set(ids))
    report.lost = len(set(expected) - set(names))
    avro_ids = []
    for path in sorted((out / "avro").rglob("*.avro")):
        with path.open("rb") as f:  # a partial or corrupt file raises here
            avro_ids += [r["event_id"] for r in fastavro.reader(f)]
    report.avro_rows = len(avro_ids)
    report.avro_duplicates = len(avro_ids) - len(set(avro_ids))
    if sorted(avro_ids) != sorted(ids):
        report.wrong_content.append("Avro files and CSV disagree")
    report.leftover_temp_files = len(list((out / "avro").rglob("*.tmp")))
    for row in rows:
        name = Path(row["image_path"]).name
        want = expected.get(name)
        if row["error"]:
            report.error_rows.append(f"{name}: {row['error']}")
            continue
        if want in PHOTOS:
            if not any(w in row["text"].lower() for w in PHOTOS[want][1]):
                report.wrong_content.append(f"{name}: description {row['text'][:80]!r}")
        elif want is not None and want not in row["image_text"].replace("O", "0"):
            report.wrong_content.append(f"{name}: image_text {row['image_text']!r}")
        if len(json.loads(row["image_vector"])) != 1280:
            report.wrong_content.append(f"{name}: image_vector length")
    report.sink_mid_write_crashes = _read(workdir / "logs" / "sink.log").count("crash point mid_csv reached")
    report.seconds = time.monotonic() - started
    return report
