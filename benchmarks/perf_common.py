"""Shared by the performance benchmarks: a deterministic mixed image set, the vision stage
run in-process to get realistic enrich inputs, RSS of processes, and result output
(a small table on stdout, JSON in ``benchmarks/results/``)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# scikit-image photos (shipped, no download) and text rendered with Pillow's default font.
PHOTOS = [
    "chelsea",
    "coffee",
    "astronaut",
    "rocket",
    "camera",
    "horse",
    "cat",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle_left",
    "retina",
    "page",
]
TEXTS = [
    ["HARBOR TICKET 2041"],
    ["OPEN 24 HOURS", "FRESH BREAD"],
    ["EXIT"],
    ["NO PARKING", "TOW AWAY ZONE"],
    ["SALE 50% OFF"],
    ["PLATFORM 9", "NORTHBOUND"],
    ["WELCOME TO", "SPRINGFIELD"],
    ["CAUTION WET FLOOR"],
    ["INVOICE 7731", "TOTAL 42.50"],
    ["ROOM 214"],
    ["STOP"],
    ["CITY MUSEUM", "OPEN DAILY 9-5"],
]


def machine() -> dict:
    """What the figures were measured on."""
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m": load,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def mixed_images(folder: Path, n: int, size: int | None = None) -> list[Path]:
    """``n`` images, alternating a photo and a rendered-text image (the same ones each run).
    ``size``: shrink the longest side to this (a fast set for long runs)."""
    from PIL import Image
    from skimage import data

    from imgflow.samples import render_text_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        if i % 2 == 0:
            name = PHOTOS[(i // 2) % len(PHOTOS)]
            try:
                img = Image.fromarray(getattr(data, name)())
            except Exception:  # a data file this scikit-image lacks: a text image instead
                img = render_text_image([f"PHOTO {i}"])
        else:
            lines = TEXTS[(i // 2) % len(TEXTS)]
            img = render_text_image(lines if i < 2 * len(TEXTS) else [*lines, f"NO {i}"])
        img = img.convert("RGB")
        if size:
            img.thumbnail((size, size))
        path = folder / f"img{i:05d}.png"
        img.save(path)
        paths.append(path)
    return paths


def vision_values(paths: list[Path], settings=None, batch: int = 8) -> list[dict]:
    """The VisionResult values of the real vision stage for these images (in-process)."""
    from consumers.vision import VisionTransform
    from imgflow.events import local_image_event
    from imgflow.settings import Settings
    from imgflow.stage import InputRecord

    settings = settings or Settings()
    vision = VisionTransform(settings)
    vision.roots = []
    vision.setup()
    out = []
    for start in range(0, len(paths), batch):
        records = []
        for i, p in enumerate(paths[start : start + batch]):
            event = local_image_event(p, p.stat(), source="benchmark", run_id=settings.run_id)
            records.append(InputRecord("images.new", 0, start + i, event["event_id"], event, b""))
        for res in vision.process(records):
            if isinstance(res, BaseException):
                raise res
            out.append(res[0].value)
    return out


def synthetic_records(
    event_id: str, image_path: str, vectors: tuple[list[float], list[float], list[float]], models: tuple[str, str], event: dict, vision: dict, enriched: dict
) -> tuple[dict, dict, dict]:
    """An ImageEvent, its VisionResult and the EnrichedRecord of that, as the stages write them,
    for a history made without the models. ``models``: the describe and structure_text model
    names; ``event``, ``vision``, ``enriched``: the fields each benchmark chooses (size, text,
    labels, times, ...)."""
    image_event = {"event_id": event_id, "uri": f"file://{image_path}", "image_path": image_path, "version": "1", "priority": "NORMAL", **event}
    image_event |= {"published_at": 0, "force": False}
    vision_result = {"event": image_event, "image_text": "", "text_vector": vectors[0], "word2vec_vector": vectors[1], "image_vector": vectors[2], **vision}
    vision_result |= {"models": {"describe": models[0]}, "seconds": 0.1, "processed_at": 0}
    enriched_record = {"vision": vision_result, "image_text": "", "llama_extracted": "{}", "models": {"structure_text": models[1]}, **enriched}
    return image_event, vision_result, enriched_record


def rss_mb(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children_of(pid: int) -> list[int]:
    """Direct child processes of ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [[h for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if j and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nresults: {path}")
    return path


@contextlib.contextmanager
def environ(**values: str):
    """These environment variables while the block runs (child processes inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
