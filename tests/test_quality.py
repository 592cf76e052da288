"""Issue 11: categories from the ImageNet synsets, OCR that keeps only confident text on photos,
grounding rules, and a smoke run of the quality benchmark (quality itself is measured by
``benchmarks/quality.py``, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgflow.models import categories
from imgflow.models.base import StructureInput
from imgflow.models.cache import ModelCache
from imgflow.models.embedded.ocr import RapidOcrReader, fix_lookalikes, reading_order
from imgflow.models.llm import grounding

ROOT = Path(__file__).resolve().parents[1]


def test_category_mapping_is_generated_by_the_documented_script():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_imagenet_categories.py"), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cats = categories.imagenet_categories()
    assert len(cats) == 1000 and set(cats) <= set(categories.CATEGORIES)


@pytest.mark.parametrize(
    "label, category",
    [
        ("tripod", "device"),
        ("moped", "vehicle"),
        ("espresso", "drink"),
        ("Egyptian cat", "animal"),
        ("missile", "vehicle"),
        ("construction crane", "device"),
        ("crane", "animal"),
        ("street sign", "sign"),
        ("web site", "document"),
        ("daisy", "plant"),
        ("volcano", "landscape"),
        ("cheeseburger", "food"),
        ("church building", "building"),
        ("jersey", "clothing"),
        ("scuba diver", "person"),
    ],
)
def test_imagenet_classes_map_to_their_category(label, category):
    assert categories.category_of_label(label) == category


def test_candidates():
    c = categories.candidates
    assert c(["tripod"], [0.94], "") == ["device"]
    assert c(["moped", "motor scooter"], [0.5, 0.2], "") == ["vehicle"]
    assert c(["barbell"], [0.05], "") == ["other"]  # nothing recognised with confidence
    # a label on a photo stays a photo; text filling the image is a sign or a document
    assert c(["moped", "text"], [0.5, 0.01], "SPEED") == ["vehicle"]
    assert c(["analog clock", "text"], [0.32, 0.43], "EXIT")[0] == "sign"
    assert c(["web site", "text"], [0.3, 0.5], "TICKET 7\nSEAT 4\nROW 2\nGATE B")[0] == "document"
    assert c([], [], "") == categories.CATEGORY_NAMES  # no classifier (GPU): all of them


def test_person_label_from_the_face_detector():
    """ImageNet-1k has no person class: the face detector's label maps to "person" and, put
    first with the face's score, wins over what else the classifier saw."""
    c = categories.candidates
    assert categories.category_of_label(categories.PERSON_LABEL) == "person"
    assert c(["person", "military uniform", "bow tie"], [0.999, 0.2, 0.1], "") == ["person"]
    assert c(["person", "tripod"], [0.999, 0.9], "") == ["person", "device"]
    assert c(["person", "moped", "text"], [0.99, 0.3, 0.01], "SPEED") == ["person"]
    f = grounding.facts(StructureInput("A photo of a person.", "", ["person", "tripod"], [0.999, 0.3]))
    assert f.subject == "person" and f.category == "person"


def test_quality_set_unseen_photos_are_holdout_only():
    from benchmarks import quality_set

    tune = quality_set.build(("tune",))
    holdout = quality_set.build(("holdout",))
    unseen = [it for it in holdout if it.unseen]
    assert {it.id.split("-")[2] for it in unseen} == set(quality_set.OTHER_PHOTOS)
    assert not any(it.unseen or name in it.id for it in tune for name in quality_set.OTHER_PHOTOS)
    hopper = [it for it in unseen if "grace_hopper" in it.id]
    assert hopper and all(it.category == "person" and it.source == "matplotlib" for it in hopper)
    assert all(it.image.size[0] > 100 and it.label()["unseen"] for it in unseen)


class _Reader(RapidOcrReader):
    """The real selection rules on given boxes (no OCR model run), with a small vocabulary."""

    def __init__(self):
        super().__init__(ModelCache(1))

    def _vocabulary(self):
        return frozenset({"yamaha", "speed", "total", "open"})


def _box(x, y, w, h):
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float32)


def test_ocr_keeps_only_confident_known_text_on_photos():
    r = _Reader()
    photo = (640, 480)
    boxes = [
        (_box(400, 400, 60, 20), "TIMERL", 0.88),  # unknown word, not sure enough
        (_box(100, 100, 60, 20), "YAMAHA", 0.90),  # known word, confident
        (_box(300, 100, 40, 20), "0000", 0.84),  # a number, not sure enough
        (_box(10, 10, 30, 5), "SPEED", 0.99),
    ]  # too small (height share under 2%)
    assert r.select(boxes, photo).text == "YAMAHA"
    # the same unknown word filling a sign is kept as read
    sign = [(_box(20, 20, 600, 200), "TIMERL", 0.88), (_box(20, 300, 60, 100), "3", 0.8)]
    read = r.select(sign, photo)
    assert read.text == "TIMERL\n3" and read.area > 0.3


def test_ocr_text_helpers():
    assert fix_lookalikes("T0TAL 5.75 B12", frozenset({"total"})) == "TOTAL 5.75 B12"
    # lines of text rotated by 8 degrees stay lines, in order
    rot = np.deg2rad(8)
    R = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]], np.float32)
    boxes = [_box(20, 20, 300, 30) @ R.T, _box(20, 70, 140, 30) @ R.T, _box(200, 70, 140, 30) @ R.T]
    assert reading_order(np.stack(boxes), ["GREEN MARKET", "APPLES", "4.10"]) == "GREEN MARKET\nAPPLES 4.10"


def test_grounding_on_a_gpu_description():
    """No classifier labels (the GPU profile): the LLM's category is kept when it is in the
    list, and its description may use what the VLM wrote, but not more."""
    item = StructureInput("A red motorcycle parked on a street next to a bicycle.", "", [])
    ok = grounding.ground(
        {"description": "A red motorcycle parked beside a bicycle.", "category": "vehicle", "keywords": ["motorcycle", "street", "helmet"]}, item
    )
    assert ok["category"] == "vehicle" and ok["description"] == "A red motorcycle parked beside a bicycle."
    assert "helmet" not in ok["keywords"] and "motorcycle" in ok["keywords"]
    bad = grounding.ground({"description": "A motorcycle and a dog in 2 streets.", "category": "vehicle", "keywords": []}, item)
    assert bad["description"] == "A red motorcycle parked on a street next to a bicycle."


def test_benchmark_smoke(tmp_path, capsys):
    """Two items through the real stage transforms with SmolLM2, scored and written."""
    from benchmarks import quality

    out = tmp_path / "q.json"
    assert quality.main(["--llm", "smollm2-135m", "--limit", "2", "--split", "holdout", "--name", "smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    fig = result["figures"]["all"]
    assert fig["items"] == 2 and fig["descriptions_with_percentages"] == 0
    items = result["items"]
    assert all(r["category"] in categories.CATEGORIES for r in items)
    assert all(r["description"] != r["text"] for r in items)
    assert "category_accuracy" in capsys.readouterr().out
    # the kept outputs scored again against the current labels: the same figures
    again = tmp_path / "again.json"
    assert quality.main(["--rescore", str(out), "--out", str(again)]) == 0
    assert json.loads(again.read_text())["figures"] == result["figures"]


def test_notes_are_the_facts_only_and_bounded():
    """The LLM gets the facts (not the composed full description, which small models copied),
    a page of read text is cut (the record keeps all of it), and the category is asked for
    only when there is a choice."""
    page = "INVOICE 42\n" + "line of small print " * 300
    item = StructureInput("A document with the text ...", page, ["web site", "text"], [0.2, 0.4])
    notes = grounding.notes(item)
    assert len(notes) < 600 and "A document with the text" not in notes and '..." ...' not in notes
    assert grounding.ground({"keywords": ["invoice"]}, item)["image_text"] == page.strip()
    cat = StructureInput("A photo of an Egyptian cat.", "", ["Egyptian cat"], [0.9])
    assert "Category: animal" in grounding.notes(cat) and "choose" not in grounding.notes(cat)
