"""The closed category list both profiles use, and the category of an image from what the
models found.

A category is never guessed by the LLM on its own: on the embedded profile it comes from the
ImageNet classes the classifier reported (each mapped once, offline, to one category by
``scripts/build_imagenet_categories.py`` from the classes' WordNet synsets: see that script
for how), from the face detector's ``PERSON_LABEL`` (ImageNet-1k has no person class), and
from the text read in the image (an image that is mostly text is a document or
a sign). The LLM may only choose among the candidates computed here (``candidates``); with no
classifier labels (the GPU profile: Qwen2-VL writes free text) every category is a candidate
and the grammar's enum still keeps it inside the list.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

# The closed list, with what each covers (documented in the README).
CATEGORIES: dict[str, str] = {
    "animal": "animals of any kind: mammals, birds, fish, reptiles, insects",
    "person": "people as the main subject",
    "vehicle": "cars, trucks, bicycles, motorcycles, boats, aircraft, rockets, trains",
    "food": "dishes, fruit, vegetables, bread",
    "drink": "coffee, wine and other drinks",
    "plant": "flowers, trees, fungi, crops",
    "building": "buildings and other structures: houses, shops, bridges, towers, fences",
    "landscape": "natural scenery: mountains, coasts, lakes, valleys, volcanoes",
    "device": "machines, tools, instruments, electronics, equipment",
    "clothing": "garments, shoes, hats, helmets",
    "furniture": "chairs, tables, beds, cabinets",
    "object": "other everyday objects: containers, utensils, balls, toys",
    "document": "images that are mostly text: tickets, receipts, pages, menus, web pages",
    "sign": "signs and notices: a few words meant to be read from a distance",
    "artwork": "paintings, drawings, sculptures",
    "other": "nothing was recognised",
}
CATEGORY_NAMES: list[str] = list(CATEGORIES)
TEXT_CATEGORIES = ("document", "sign")

MAPPING_FILE = Path(__file__).with_name("data") / "imagenet_categories.json"

# A category is a candidate when its classifier weight reaches this share of the best one's.
CANDIDATE_SHARE = 0.5
# Below this total weight nothing was recognised ("other"), unless text was read.
MIN_WEIGHT = 0.10
# The pseudo-label the embedded describer adds when text was read: its score is the share of
# the image the read text covers (a sign or page: 0.2-0.6; a label on a photo: ~0.01).
TEXT_LABEL = "text"
# Read text covering at least this share of the image makes it a document or sign.
TEXT_AREA_WINS = 0.08
# Without a text area (another reader): text makes it a document or sign when the
# classifier's best non-text category is weaker than this.
TEXT_WINS_BELOW = 0.45
# A sign has at most this many words (and lines); more text is a document.
SIGN_MAX_WORDS = 4
SIGN_MAX_LINES = 2

# The label the embedded describer puts first when the face detector found a person
# (``imgflow.models.embedded.faces``); its score is the face's detection score.
PERSON_LABEL = "person"
# Labels that are not ImageNet classes -> their category.
EXTRA_LABELS: dict[str, str] = {PERSON_LABEL: "person"}

_WORD = re.compile(r"[^\W_]+")


@lru_cache(maxsize=1)
def imagenet_categories() -> list[str]:
    """Category of each ImageNet-1k class index (1000 entries)."""
    rows = json.loads(MAPPING_FILE.read_text())
    cats = [r["category"] for r in sorted(rows, key=lambda r: r["index"])]
    if len(cats) != 1000 or not set(cats) <= set(CATEGORIES):
        raise ValueError(f"{MAPPING_FILE} is not a valid category mapping")
    return cats


@lru_cache(maxsize=1)
def _label_categories() -> dict[str, str]:
    from imgflow.models.embedded.efficientnet import imagenet_labels

    return dict(zip(imagenet_labels(), imagenet_categories()))


def category_of_label(label: str) -> str | None:
    """The category of a classifier label (an ImageNet class name, or ``PERSON_LABEL``); None
    if unknown."""
    return EXTRA_LABELS.get(label) or _label_categories().get(label)


def text_category(text: str) -> str:
    """document or sign, from how much text there is."""
    lines = [line for line in text.splitlines() if line.strip()]
    words = _WORD.findall(text)
    return "sign" if len(words) <= SIGN_MAX_WORDS and len(lines) <= SIGN_MAX_LINES else "document"


def has_text(text: str) -> bool:
    """Enough text to call an image a document or sign: at least 3 letters or digits."""
    return sum(ch.isalnum() for ch in text) >= 3


def category_weights(labels: list[str], scores: list[float]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for label, score in zip(labels, scores):
        cat = category_of_label(label)
        if cat is not None:
            weights[cat] = weights.get(cat, 0.0) + float(score)
    return weights


def candidates(labels: list[str], scores: list[float], image_text: str) -> list[str]:
    """The categories the image may have, best first (the first is the answer unless the
    LLM picks another of them). No labels at all (a describer without a classifier): every
    category."""
    if not labels:
        return list(CATEGORY_NAMES)
    if len(scores) != len(labels):  # labels without scores: rank order stands in
        scores = [1.0 / (i + 1) for i in range(len(labels))]
    area = next((s for lab, s in zip(labels, scores) if lab == TEXT_LABEL), None)
    weights = category_weights(labels, scores)
    text = image_text.strip()
    if has_text(text):
        photo = max((w for c, w in weights.items() if c not in TEXT_CATEGORIES), default=0.0)
        text_weight = sum(weights.get(c, 0.0) for c in TEXT_CATEGORIES)
        if area is not None:
            text_wins = area >= TEXT_AREA_WINS
        else:
            text_wins = photo < TEXT_WINS_BELOW or text_weight >= photo
        if text_wins:
            first = text_category(text)
            other = "document" if first == "sign" else "sign"
            # The text category wins over any photo category here; a photo category the
            # classifier still found stays a candidate for the LLM to weigh.
            weights[first] = max(weights.values(), default=0.0) + 1.0
            weights.setdefault(other, 0.0)
    if not weights or max(weights.values()) < MIN_WEIGHT:
        return ["other"]
    best = max(weights.values())
    ranked = sorted(weights.items(), key=lambda kv: (-kv[1], CATEGORY_NAMES.index(kv[0])))
    return [c for c, w in ranked if w >= best * CANDIDATE_SHARE and w > 0] or ["other"]
