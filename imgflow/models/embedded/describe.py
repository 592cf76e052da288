"""A full description composed from ImageNet labels and the OCR text.

No captioning model ships in any package, so this does not pretend to caption: it says what
the classifier recognised, with its confidence, and quotes the text read in the image.
"""

from __future__ import annotations

from PIL import Image

from imgflow.models.base import Description, Describer
from imgflow.models.embedded.efficientnet import EfficientNetClassifier

CONFIDENT = 0.30  # top label at or above this: "most likely showing"
POSSIBLE = 0.10  # top label at or above this (but below CONFIDENT): "possibly"
ALTERNATIVE = 0.05  # other labels at or above this are mentioned
LABEL_MIN = 0.05  # labels kept in Description.labels
MAX_ALTERNATIVES = 2


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def _with_article(noun: str) -> str:
    return f"{_article(noun)} {noun}"


def _join_or(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def compose(labels: list[tuple[str, float]], seen_text: str) -> str:
    parts = []
    top = labels[0] if labels else None
    if top is not None and top[1] >= CONFIDENT:
        s = f"A photo most likely showing {_with_article(top[0])} ({top[1]:.0%})"
        alts = [n for n, p in labels[1:] if p >= ALTERNATIVE][:MAX_ALTERNATIVES]
        if alts:
            s += "; it may also show " + _join_or([_with_article(n) for n in alts])
        parts.append(s + ".")
    elif top is not None and top[1] >= POSSIBLE:
        cands = [n for n, p in labels if p >= POSSIBLE][: MAX_ALTERNATIVES + 1]
        parts.append(
            "Nothing in the image was recognised with confidence; it may show "
            + _join_or([f"{_with_article(n)} ({p:.0%})" for n, p in labels if n in cands])
            + "."
        )
    else:
        parts.append("Nothing in the image was recognised with confidence.")
    text = " / ".join(line.strip() for line in seen_text.splitlines() if line.strip())
    if text:
        parts.append(f'Text visible in the image: "{text}".')
    return " ".join(parts)


class ComposedDescriber(Describer):
    """``describe(images, seen_text)``: ``seen_text[i]`` is the OCR text of ``images[i]``
    (from the TextReader; "" when none)."""

    def __init__(self, classifier: EfficientNetClassifier) -> None:
        self.classifier = classifier

    @property
    def model_id(self) -> str:
        return f"composed+{self.classifier.model_id}"

    def check(self) -> None:
        self.classifier.check()

    def load(self) -> None:
        self.classifier.load()

    def describe(self, images: list[Image.Image], seen_text: list[str]) -> list[Description]:
        if len(seen_text) != len(images):
            raise ValueError("seen_text must have one entry per image")
        out = []
        for labels, text in zip(self.classifier.classify(images), seen_text):
            out.append(Description(compose(labels, text or ""),
                                   [(n, p) for n, p in labels if p >= LABEL_MIN]))
        return out
