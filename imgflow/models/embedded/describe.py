"""A full description composed from what the models found: the ImageNet classifier's subject
(or a person, when the face detector found one: ImageNet-1k has no person class), the category
(``imgflow.models.categories``), the text read in the image and the image's main colours, in
plain sentences a person would write (no scores, no percentages).

No captioning model ships in any package, so this does not pretend to caption: it names what
was recognised, says "may show" when the classifier was unsure, and quotes the text read.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from imgflow.models import categories
from imgflow.models.base import Describer, Description
from imgflow.models.embedded.efficientnet import EfficientNetClassifier
from imgflow.models.embedded.faces import MtcnnFaceDetector
from imgflow.models.rgb import to_rgb

CONFIDENT = 0.30  # top label at or above this: "A photo of a ..."
POSSIBLE = 0.10  # top label at or above this (but below CONFIDENT): "may show"
ALTERNATIVE = 0.10  # other labels at or above this are mentioned as alternatives
LABEL_MIN = 0.05  # labels kept in Description.labels
MAX_ALTERNATIVES = 2
COLOUR_SHARE = 0.25  # a colour covering at least this share of the image is named
MAX_QUOTE = 160  # characters of read text quoted in the description
_COUNT_WORDS = {2: "two", 3: "three"}  # more people: "a group of people"


def article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def with_article(noun: str) -> str:
    return f"{article(noun)} {noun}"


def join_words(items: list[str], last: str = "and") -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {last} " + items[-1]


def quoted_text(seen_text: str, limit: int = MAX_QUOTE) -> str:
    """The read text on one line ("/" between lines), cut at a word boundary."""
    text = " / ".join(line.strip() for line in seen_text.splitlines() if line.strip())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


# -- colours -----------------------------------------------------------------------------


def colour_names(img: Image.Image, top: int = 2) -> list[str]:
    """The one or two basic colours covering most of the image (hue/saturation/value bins on
    a 48x48 thumbnail), most common first; only colours covering COLOUR_SHARE or more."""
    hsv = np.asarray(to_rgb(img).resize((48, 48), Image.Resampling.BILINEAR).convert("HSV"), np.float32)
    h, s, v = hsv[..., 0] * (360 / 255), hsv[..., 1] / 255, hsv[..., 2] / 255
    names = np.full(h.shape, "grey", dtype=object)
    names[v < 0.2] = "black"
    names[(v >= 0.8) & (s < 0.15)] = "white"
    chroma = (v >= 0.2) & (s >= 0.25)
    hue_bins = [(15, "red"), (40, "orange"), (70, "yellow"), (170, "green"), (260, "blue"), (300, "purple"), (345, "pink"), (361, "red")]
    lower = 0.0
    for upper, name in hue_bins:
        names[chroma & (h >= lower) & (h < upper)] = name
        lower = upper
    names[chroma & (names == "orange") & (v < 0.6)] = "brown"
    values, counts = np.unique(names, return_counts=True)
    order = np.argsort(-counts)
    share = counts / counts.sum()
    return [str(values[i]) for i in order[:top] if share[i] >= COLOUR_SHARE]


# -- the description ---------------------------------------------------------------------


def people_phrase(count: int) -> str:
    """ "a person", "two people", "three people", "a group of people" (no digits: a number in
    a description must be one the image shows)."""
    if count <= 1:
        return "a person"
    return f"{_COUNT_WORDS[count]} people" if count in _COUNT_WORDS else "a group of people"


def compose(labels: list[tuple[str, float]], seen_text: str, colours: list[str] | None = None, people: int = 1) -> str:
    """The full description (the CSV's `text`): one to three short sentences. ``labels`` may
    include the ``categories.TEXT_LABEL`` pseudo-label (its score: the text's area share) and,
    first, ``categories.PERSON_LABEL`` (``people``: how many faces were found)."""
    text = quoted_text(seen_text)
    cands = categories.candidates([n for n, _ in labels], [p for _, p in labels], seen_text)
    labels = [(n, p) for n, p in labels if n != categories.TEXT_LABEL]
    parts = []
    if cands[0] in categories.TEXT_CATEGORIES and text:
        if cands[0] == "sign":
            parts.append(f'A sign reading "{text}".')
        else:
            parts.append(f'A document with the text "{text}".')
    else:
        top = labels[0] if labels else None
        if top is not None and top[0] == categories.PERSON_LABEL:
            # The classifier's labels are what else is in the picture, not alternatives to it.
            parts.append(f"A photo of {people_phrase(people)}.")
            others = [n for n, p in labels[1:] if p >= ALTERNATIVE][:MAX_ALTERNATIVES]
            if others:
                parts.append(f"The image may also show {join_words([with_article(n) for n in others], 'or')}.")
        elif top is not None and top[1] >= CONFIDENT:
            parts.append(f"A photo of {with_article(top[0])}.")
            alts = [n for n, p in labels[1:] if p >= ALTERNATIVE][:MAX_ALTERNATIVES]
            if alts:
                parts.append(f"It could also be {join_words([with_article(n) for n in alts], 'or')}.")
        elif top is not None and top[1] >= POSSIBLE:
            cands_ = [n for n, p in labels if p >= POSSIBLE][: MAX_ALTERNATIVES + 1]
            parts.append(f"A photo that may show {join_words([with_article(n) for n in cands_], 'or')}.")
        else:
            parts.append("A photo in which nothing was recognised with confidence.")
        if text:
            parts.append(f'The text "{text}" is visible in it.')
    if colours:
        parts.append(f"The main colours are {join_words(colours)}." if len(colours) > 1 else f"It is mostly {colours[0]}.")
    return " ".join(parts)


class ComposedDescriber(Describer):
    """``describe(images, seen_text)``: ``seen_text[i]`` is the OCR text of ``images[i]``
    (from the TextReader; "" when none). ``faces``: the face detector (``models.faces``;
    None: off)."""

    def __init__(self, classifier: EfficientNetClassifier, faces: MtcnnFaceDetector | None = None) -> None:
        self.classifier = classifier
        self.faces = faces

    @property
    def model_id(self) -> str:
        return f"composed+{self.classifier.model_id}" + (f"+{self.faces.model_id}" if self.faces else "")

    def check(self) -> None:
        self.classifier.check()
        if self.faces is not None:
            self.faces.check()

    def load(self) -> None:
        self.classifier.load()
        if self.faces is not None:
            self.faces.load()

    def describe(self, images: list[Image.Image], seen_text: list[str], text_areas: list[float | None] | None = None) -> list[Description]:
        """Labels: ("person", the best face's score) first when the face detector found a
        person (``MtcnnFaceDetector.people``), the classifier's (score >= LABEL_MIN), plus
        ("text", area share) when text was read and its area is known (the category rules use
        it: a sign vs a label on a photo)."""
        if len(seen_text) != len(images):
            raise ValueError("seen_text must have one entry per image")
        areas = text_areas if text_areas is not None else [None] * len(images)
        if len(areas) != len(images):
            raise ValueError("text_areas must have one entry per image")
        people = self.faces.people(images) if self.faces is not None else [[] for _ in images]
        out = []
        for img, labels, text, area, faces in zip(images, self.classifier.classify(images), seen_text, areas, people):
            kept = [(n, p) for n, p in labels if p >= LABEL_MIN]
            if faces:
                kept.insert(0, (categories.PERSON_LABEL, float(faces[0].score)))
            if area is not None and categories.has_text(text or ""):
                kept.append((categories.TEXT_LABEL, float(area)))
            out.append(Description(compose(kept, text or "", colour_names(img), len(faces)), kept))
        return out
