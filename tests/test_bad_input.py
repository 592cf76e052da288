"""Bad input never stops a stage and loses nothing: every broken file, bad event and model
failure ends as a row with `error` saying what was wrong (and a dead letter on images.dlq),
or is processed correctly where it is in fact valid."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from imgflow.events import event_id_for, file_uri, local_image_event
from imgflow.samples import render_text_image
from schemas.codec import get_codec
from tests.chaos import Processes, committed_rows
from tests.conftest import make_settings, settings_env
from tests.kafka_helpers import decoded, produce, produce_events, wait_until
from tests.records import vision_result

ROOT = Path(__file__).resolve().parents[1]


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )


def build_corpus(folder: Path) -> dict[str, str | None]:
    """file name -> substring its `error` must contain, or None when it must be processed."""
    folder.mkdir(parents=True, exist_ok=True)
    cat = Image.fromarray(data.chelsea())
    expect: dict[str, str | None] = {}

    def save(name, img, fmt, outcome=None, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        (folder / name).write_bytes(buf.getvalue())
        expect[name] = outcome

    (folder / "empty.jpg").write_bytes(b"")
    expect["empty.jpg"] = "empty file"
    full = io.BytesIO()
    cat.save(full, format="JPEG")
    (folder / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 3])
    expect["truncated.jpg"] = "truncated"
    full_png = io.BytesIO()
    cat.save(full_png, format="PNG")
    (folder / "truncated.png").write_bytes(full_png.getvalue()[: len(full_png.getvalue()) // 3])
    expect["truncated.png"] = "truncated"
    (folder / "text file.jpg").write_text("hello, this is not a JPEG at all\n" * 20)
    expect["text file.jpg"] = "not an image"
    save("png inside.jpg", cat, "PNG")  # wrong extension, valid image
    (folder / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    expect["bomb.png"] = "too large"
    from tests.decode_memory import png

    png(folder / "bilevel_400mp.png", 20_000, 20_000, 1, blank=True)  # a real one, 48 KB: 1.9 GB to decode
    expect["bilevel_400mp.png"] = "image too large: 20000x20000 pixels (limit 120000000 pixels, models.image_max_pixels)"
    save("huge_20000.jpg", Image.new("L", (20000, 20000), 128), "JPEG")
    save("tiny_1x1.png", Image.new("RGB", (1, 1), "red"), "PNG")
    save("cmyk.jpg", cat.convert("CMYK"), "JPEG")
    save("sixteen_bit.png", Image.fromarray(np.asarray(cat.convert("L"), dtype=np.uint16) * 256), "PNG")
    rgba = cat.convert("RGBA")
    rgba.putalpha(128)
    save("alpha.png", rgba, "PNG")
    frames = [cat.resize((200, 150)), Image.fromarray(data.coffee()).resize((200, 150))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expect["animated.gif"] = None
    # Text rotated on disk, EXIF says "rotate 90 CW to display": OCR reads it only if upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", render_text_image(["UPRIGHT 4217"]).rotate(90, expand=True), "JPEG", exif=exif)
    save("café ñandú photo.jpg", cat, "JPEG")
    save("unreadable.jpg", cat, "JPEG", outcome="permission denied")
    os.chmod(folder / "unreadable.jpg", 0)
    # Named like images but not readable ones: each still gets its row (never a silent skip).
    (folder / "dangling link.jpg").symlink_to(folder / "no such target.jpg")
    expect["dangling link.jpg"] = "file not found"
    os.mkfifo(folder / "fifo.png")
    expect["fifo.png"] = "not a regular file"
    (folder / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    expect["photo.heic"] = "unsupported format"
    old = time.time() - 10
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink():
            os.utime(p, (old, old))
    return expect


def test_corpus_of_broken_files_end_as_error_rows_or_results(tmp_path):
    folder = tmp_path / "corpus"
    expect = build_corpus(folder)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGFLOW_")}
    # As root every file is readable; without these capabilities a mode-000 file really
    # is not (a real EACCES, no mock).
    setpriv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if shutil.which("setpriv") else []
    assert setpriv, "setpriv (util-linux) is needed to produce a real permission error as root"
    proc = subprocess.run(
        [*setpriv, sys.executable, "-m", "imgflow", "run", str(folder), "--once", "--out", str(out), "--data-dir", str(tmp_path / "data"), "--port", "0"],
        cwd=ROOT,
        env={**env, "IMGFLOW_MODELS__LLM": "smollm2-135m", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {Path(r["image_path"]).name: r for r in committed_rows(out)}
    assert sorted(rows) == sorted(expect)
    assert len(committed_rows(out)) == len(expect)
    for name, error in expect.items():
        row = rows[name]
        if error is None:
            assert row["error"] == "", f"{name} should be processed: {row['error']}"
            assert len(json.loads(row["image_vector"])) == 1280
        else:
            assert error in row["error"], f"{name}: {row['error']!r} should say {error!r}"
            assert row["failed_stage"] == "vision"
    rotated = rows["exif_rotated.jpg"]["image_text"].replace(" ", "")
    assert "UPRIGHT" in rotated and "4217" in rotated, rows["exif_rotated.jpg"]["image_text"]


def test_bad_events_never_stop_the_pipeline(broker, tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    settings = make_settings(broker, tmp_path, allowed_roots=[root], models={"llm": "smollm2-135m"})
    Image.fromarray(data.coffee()).save(root / "good.jpg")
    Image.fromarray(data.coffee()).save(root / "deleted.jpg")
    good = local_image_event(root / "good.jpg", (root / "good.jpg").stat(), source="test", run_id="t")
    deleted = local_image_event(root / "deleted.jpg", (root / "deleted.jpg").stat(), source="test", run_id="t")
    (root / "deleted.jpg").unlink()  # gone between the event and its processing
    secret = tmp_path / "outside.jpg"
    Image.fromarray(data.coffee()).save(secret)
    outside_uri = file_uri(root) + "/../outside.jpg"  # path traversal
    outside = {**good, "uri": outside_uri, "image_path": str(root / ".." / "outside.jpg"), "event_id": event_id_for(outside_uri, "1")}
    (root / "photo.jpg").symlink_to(secret)  # a link out of the folder: refused, named as found
    link = local_image_event(root / "photo.jpg", (root / "photo.jpg").stat(), source="test", run_id="t")
    produce_events(settings, [good, deleted, outside, link, good])  # `good` twice: a duplicate event
    produce(settings, settings.topics.new, [("junk-key", b"\xc3\x01 this is not Avro")])
    procs = Processes(tmp_path, settings_env(settings), root)
    for role in ("vision", "enrich", "sink"):
        procs.start(role)
    out = settings.sink.out_dir
    try:
        wait_until(lambda: len(committed_rows(out)) >= 5, 300, interval=1, what="5 result rows")
        time.sleep(3)  # a second row for the duplicate would land now
    finally:
        codes = procs.stop_all()
    assert codes == {"vision": 0, "enrich": 0, "sink": 0}, (tmp_path / "logs" / "vision.log").read_text()[-3000:]
    rows = {r["event_id"]: r for r in committed_rows(out)}
    assert len(committed_rows(out)) == 5 and set(rows) == {good["event_id"], deleted["event_id"], outside["event_id"], link["event_id"], "junk-key"}
    assert rows[good["event_id"]]["error"] == ""
    assert "file not found" in rows[deleted["event_id"]]["error"]
    assert "outside the allowed roots" in rows[outside["event_id"]]["error"]
    assert rows[link["event_id"]]["image_path"] == str(root / "photo.jpg")
    assert f"photo.jpg is a symbolic link to {secret}, which is outside the allowed roots" in rows[link["event_id"]]["error"]
    assert "malformed input value" in rows["junk-key"]["error"]
    dead = {d["event_id"]: d for d in decoded(settings, settings.topics.dlq, "DeadLetter")}
    assert set(dead) == {deleted["event_id"], outside["event_id"], link["event_id"], "junk-key"}
    assert dead["junk-key"]["raw_value"] == b"\xc3\x01 this is not Avro" and dead["junk-key"]["stage"] == "vision"
    assert dead[deleted["event_id"]]["event"]["image_path"] == str(root / "deleted.jpg")


def test_llm_failure_keeps_the_vision_fields(broker, tmp_path):
    """A real failing LLM: 16 tokens cannot hold the JSON answer, so every answer is cut off
    and unusable. The image still gets a row: error set, vision fields kept."""
    settings = make_settings(broker, tmp_path, models={"llm": "smollm2-135m", "llm_max_tokens": 16}, stage={"max_attempts": 2})
    event = local_image_event(Path(__file__), Path(__file__).stat(), source="test", run_id="t")
    vision = vision_result(
        event,
        text="A photo most likely showing an espresso (79%); it may also show a cup.",
        labels=[{"label": "espresso", "score": 0.79}],
        text_vector=[0.5] * 384,
        word_vector=[0.25] * 50,
        image_vector=[0.125] * 1280,
        size=10,
        models={"describe": "composed"},
        seconds=0.1,
    )
    produce(settings, settings.topics.vision, [(event["event_id"], get_codec().encode("VisionResult", vision))])
    env = {**settings_env(settings), "IMGFLOW_MODELS__LLM": "smollm2-135m", "IMGFLOW_MODELS__LLM_MAX_TOKENS": "16", "IMGFLOW_STAGE__MAX_ATTEMPTS": "2"}
    procs = Processes(tmp_path, env, tmp_path)
    procs.start("enrich")
    procs.start("sink")
    out = settings.sink.out_dir
    try:
        wait_until(lambda: committed_rows(out), 300, interval=1, what="the error row")
    finally:
        codes = procs.stop_all()
    assert codes == {"enrich": 0, "sink": 0}
    (row,) = committed_rows(out)
    assert row["error"].startswith("enrich:") and "StructuringError" in row["error"], row["error"]
    assert row["failed_stage"] == "enrich"
    assert row["text"] == vision["text"]
    assert json.loads(row["image_vector"]) == [0.125] * 1280 and len(json.loads(row["text_vector"])) == 384
    (dead,) = decoded(settings, settings.topics.dlq, "DeadLetter")
    assert dead["attempts"] == 2 and dead["vision"]["text"] == vision["text"]
