"""End to end, as a user runs it: `imgflow run` on a folder of real images, real broker,
real models; then stopped mid-way (SIGTERM, SIGKILL) and started again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fastavro
import pytest
from PIL import Image
from skimage import data

from imgflow.output.formats import read_csv_rows
from imgflow.output.store import ResultStore
from imgflow.samples import render_text_image
from tests.kafka_helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
IMGFLOW = [sys.executable, "-m", "imgflow"]
SEED_HEADER = ("image_path,text,description,categories,keywords,image_text,text_vector,word2vec_vector,image_vector,timestamp,error,llama_extracted").split(",")


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("IMGFLOW_")}
    return {**e, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def rows(out: Path) -> list[dict]:
    return list(read_csv_rows(out / "results.csv", ResultStore(out).committed_length()))


def avro_rows(out: Path) -> list[dict]:
    result = []
    for path in sorted((out / "avro").rglob("*.avro")):
        with path.open("rb") as f:
            result += list(fastavro.reader(f))
    return result


def by_name(rows_: list[dict]) -> dict[str, dict]:
    return {Path(r["image_path"]).name: r for r in rows_}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(data.chelsea()).save(folder / "chelsea cat.png")  # a space in the name, too
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg")
    render_text_image(["HARBOR TICKET 2041"]).save(folder / "ticket.png")
    (folder / "broken.jpg").write_text("this is a text file, not a JPEG")
    work = tmp_path_factory.mktemp("run")
    started = time.monotonic()
    with socket.socket() as busy:  # the broker port is taken: run must pick a free one, not hang
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = subprocess.run(
            [*IMGFLOW, "run", str(folder), "--once", "--out", str(work / "out"), "--data-dir", str(work / "data"), "--port", str(busy.getsockname()[1])],
            cwd=ROOT,
            env=env(),
            capture_output=True,
            text=True,
            timeout=900,
        )
    return proc, work / "out", time.monotonic() - started, work / "data"


def test_run_once_exits_zero_and_says_where_results_are(finished_run):
    proc, out, seconds, data_dir = finished_run
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((data_dir / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    assert str(out / "results.csv") in proc.stdout
    assert "is in use" in proc.stdout and "done: 4 images" in proc.stdout
    print(f"imgflow run --once on 4 images: {seconds:.1f}s")


def test_csv_header_is_the_original_scripts(finished_run):
    _, out, _, _ = finished_run
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:12] == SEED_HEADER
    assert "event_id" in header[12:] and "run_id" in header[12:]


def test_one_row_per_image_with_right_content(finished_run):
    _, out, _, _ = finished_run
    result = rows(out)
    assert sorted(by_name(result)) == ["broken.jpg", "chelsea cat.png", "coffee.jpg", "ticket.png"]
    assert len(result) == 4
    named = by_name(result)
    for name in ["chelsea cat.png", "coffee.jpg", "ticket.png"]:
        row = named[name]
        assert row["error"] == "", row["error"]
        assert len(json.loads(row["text_vector"])) == 384
        assert len(json.loads(row["word2vec_vector"])) == 50
        assert len(json.loads(row["image_vector"])) == 1280
        assert row["text"] and row["description"]
        extracted = json.loads(row["llama_extracted"])
        assert set(extracted) >= {"description", "category", "keywords", "image_text"}
    cat = named["chelsea cat.png"]
    assert "cat" in (cat["categories"] + cat["keywords"]).lower()
    coffee = named["coffee.jpg"]
    assert any(w in (coffee["categories"] + coffee["keywords"]).lower() for w in ("coffee", "cup", "espresso"))
    ticket = named["ticket.png"]["image_text"].upper()
    assert "HARBOR" in ticket and "TICKET" in ticket and "2041" in ticket


def test_bad_image_is_an_error_row(finished_run):
    _, out, _, _ = finished_run
    broken = by_name(rows(out))["broken.jpg"]
    assert broken["error"].startswith("vision:") and "not an image" in broken["error"]
    assert broken["image_vector"] == "" and broken["failed_stage"] == "vision"


def test_avro_files_hold_the_same_results(finished_run):
    _, out, _, _ = finished_run
    csv_rows, avro = rows(out), avro_rows(out)
    assert sorted(r["event_id"] for r in avro) == sorted(r["event_id"] for r in csv_rows)
    for record in avro:
        assert set(SEED_HEADER) <= set(record)
        if not record["error"]:
            assert len(record["image_vector"]) == 1280 and isinstance(record["image_vector"][0], float)
    for path in (out / "avro").rglob("*.avro"):
        topic, partition, offset = path.stem.split("+")
        assert topic in ("images.enriched", "images.dlq") and partition.isdigit() and len(offset) == 19


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopped_mid_way_then_restarted_every_image_exactly_once(tmp_path, how, engine):
    folder = tmp_path / "images"
    folder.mkdir()
    sources = {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(), "rocket": data.rocket()}
    for i in range(8):
        name, pixels = list(sources.items())[i % 4]
        Image.fromarray(pixels).resize((200 + 10 * i, 150 + 10 * i)).save(folder / f"{name}_{i}.jpg")
    out, data_dir = tmp_path / "out", tmp_path / "data"
    argv = [*IMGFLOW, "run", str(folder), "--out", str(out), "--data-dir", str(data_dir), "--port", "0", "--engine", engine]
    first = subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (out / "results.csv").exists() and len(rows(out)) >= 1, 600, what="a first result row")
    finally:
        if how == "SIGTERM":
            first.send_signal(signal.SIGTERM)
            first.wait(120)
        else:
            family = descendants(first.pid)  # the whole application dies at once: stages, broker, S3
            for pid in [first.pid, *family]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            first.wait(30)
    if how == "SIGTERM":
        assert first.returncode == 0, first.stdout.read().decode()[-3000:]
    done_before = len(rows(out))
    second = subprocess.run([*argv, "--once"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    result = rows(out)
    names = sorted(Path(r["image_path"]).name for r in result)
    assert names == sorted(p.name for p in folder.iterdir()), f"{done_before} done before the restart"
    assert len({r["event_id"] for r in result}) == len(result) == 8
    assert sorted(r["event_id"] for r in avro_rows(out)) == sorted(r["event_id"] for r in result)
    assert all(r["error"] == "" for r in result)
