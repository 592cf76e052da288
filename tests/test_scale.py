"""Scale and rebalance: two vision processes in one consumer group; one is killed for good
mid-run, its partitions move to the other, and nothing is lost or doubled. Then a SIGTERM
stops every stage with exit 0 within a bounded time."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from PIL import Image
from skimage import data

from imgflow.events import local_image_event
from tests.chaos import Processes, committed_rows
from tests.conftest import make_settings, settings_env
from tests.kafka_helpers import produce_events, wait_until


def test_vision_instance_killed_its_partitions_move_nothing_lost_or_doubled(broker, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    settings = make_settings(broker, tmp_path, allowed_roots=[root], models={"llm": "smollm2-135m"}, stage={"batch_size": 2})
    assert settings.topics.partitions >= 2  # a stage can scale out by default
    events = []
    for i in range(18):
        source = data.chelsea() if i % 2 else data.coffee()
        path = root / f"img_{i:02d}.jpg"
        Image.fromarray(source).resize((150 + i, 120 + i)).save(path)
        events.append(local_image_event(path, path.stat(), source="test", run_id="t"))
    env = settings_env(settings)
    procs = Processes(tmp_path, env, root)
    procs.start("enrich")
    procs.start("sink")
    procs.start("vision")
    a = procs.procs.pop("vision")  # two instances: keep A aside, B under its role name
    procs.start("vision")
    out = settings.sink.out_dir
    log = tmp_path / "logs" / "vision.log"
    try:
        wait_until(lambda: log.read_text(errors="replace").count("assigned") >= 2, 120, what="both instances assigned")
        produce_events(settings, events)
        wait_until(lambda: len(committed_rows(out)) >= 3, 300, interval=1, what="first rows")
        a.send_signal(signal.SIGKILL)  # for good: its partitions must move to B
        a.wait(30)
        wait_until(lambda: len(committed_rows(out)) >= 18, 420, interval=1, what="all 18 rows")
        time.sleep(3)
        stop_started = time.monotonic()
        codes = procs.stop_all(timeout=60)
        stop_seconds = time.monotonic() - stop_started
    finally:
        procs.stop_all()
    rows = committed_rows(out)
    names = sorted(Path(r["image_path"]).name for r in rows)
    assert names == sorted(f"img_{i:02d}.jpg" for i in range(18))
    assert len({r["event_id"] for r in rows}) == len(rows) == 18
    assert all(r["error"] == "" for r in rows), [r["error"] for r in rows if r["error"]]
    assert codes == {"vision": 0, "enrich": 0, "sink": 0}, codes
    assert stop_seconds < 60
