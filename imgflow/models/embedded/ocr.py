"""Text in the image with RapidOCR (PP-OCRv6 det/rec + PP-OCR cls ONNX models, shipped
inside the ``rapidocr`` wheel).

Every model path is passed explicitly, so RapidOCR never takes its download branch; only
in-memory images are passed (a ``str`` input could be fetched as a URL by RapidOCR).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from imgflow.models.base import CachedModelAdapter, ModelConfigError, ReadText, TextReader
from imgflow.models.cache import ModelCache
from imgflow.models.embedded.glove import data_dir as glove_dir
from imgflow.models.packages import package_dir
from imgflow.models.rgb import to_rgb

NAME = "rapidocr-ppocrv6"
MIN_SCORE = 0.5  # RapidOCR's own cut-off: boxes below it are not even returned
TEXT_SINGLE_CHAR_MIN_SCORE = 0.7  # on a sign or page a lone "3" is real ("PLATFORM 3": 0.80)
# Text on a photo (read text covering less than TEXT_IMAGE_AREA of the image) is kept only
# when read confidently: box score >= PHOTO_MIN_SCORE, and every word either a known word
# (GloVe's VOCAB_SIZE most frequent) or read at UNKNOWN_WORD_MIN_SCORE. Brand names misread
# on an engine ("TIMERL", "YIMLGE") fail both. Chosen on the tune split of the quality set
# (benchmarks/quality.py), checked on its holdout split.
TEXT_IMAGE_AREA = 0.03
PHOTO_MIN_SCORE = 0.85
UNKNOWN_WORD_MIN_SCORE = 0.97
MIN_BOX_HEIGHT = 0.02  # on a photo, boxes lower than this share of the image height are noise
VOCAB_SIZE = 200_000
_FILES = {
    "Det": "PP-OCRv6_det_small.onnx",
    "Cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
    "Rec": "PP-OCRv6_rec_small.onnx",
}


def model_files() -> dict[str, Path]:
    d = package_dir("rapidocr")
    base = (d if d is not None else Path("rapidocr (not installed)")) / "models"
    return {k: base / v for k, v in _FILES.items()}


DETECT_MIN_SIDE = 320  # px: text detection runs on at least this shortest side


class _RapidOcrEngine:
    """The cache entry: one RapidOCR engine (it is not documented as thread-safe, so
    calls are serialised)."""

    def __init__(self, files: dict[str, Path], threads: int) -> None:
        from rapidocr import RapidOCR

        params = {
            "Global.log_level": "error",  # "no text found" is not a warning here
            "Global.text_score": MIN_SCORE,
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
            # RapidOCR's default scales every image up to a shortest side of 736 px before
            # detecting text: a prepared 384x256 image became 1104x736, 8x the pixels. Up to 320
            # only, the 74 images of the quality set read exactly the same text, at ~1/5 of the
            # CPU time (benchmarks/quality.py; README "Performance"); smaller images still grow.
            "Det.limit_type": "min",
            "Det.limit_side_len": DETECT_MIN_SIDE,
        }
        for part, path in files.items():
            params[f"{part}.model_path"] = str(path)
        self.engine = RapidOCR(params=params)
        self.lock = threading.Lock()

    def __call__(self, img: Image.Image):
        with self.lock:
            return self.engine(to_rgb(img))

    def close(self) -> None:
        self.engine = None


class _Vocabulary:
    """The cache entry: GloVe 6B's most frequent words (its index is in frequency order)."""

    def __init__(self, folder: Path, size: int) -> None:
        import pyarrow.parquet as pq

        words = pq.read_table(folder / "glove_6B_index.parquet").column("index").to_pylist()
        self.words = frozenset(words[:size])

    def close(self) -> None:
        self.words = frozenset()


_WORD = re.compile(r"[^\W\d_]{2,}")


def unknown_words(text: str, vocabulary: frozenset[str]) -> list[str]:
    """Words of two or more letters in ``text`` that the vocabulary does not know (digits and
    single letters are not judged)."""
    return [w for w in _WORD.findall(text) if w.lower() not in vocabulary]


def _text_angle(boxes: np.ndarray) -> float:
    """Median slope angle (radians) of the boxes' top edges: rotated text keeps its lines."""
    d = boxes[:, 1] - boxes[:, 0]
    return float(np.median(np.arctan2(d[:, 1], d[:, 0])))


def reading_order(boxes: np.ndarray, texts: list[str]) -> str:
    """Join boxes into lines top-to-bottom, each line left-to-right, in the text's own frame
    (box centres turned by the text's angle, so rotated lines stay lines). Boxes whose
    vertical centres lie within half a line height of a line's first box belong to it."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4, 2)
    if len(boxes) == 0:
        return ""
    angle = _text_angle(boxes)
    cos, sin = np.cos(-angle), np.sin(-angle)
    items = []
    for box, text in zip(boxes, texts):
        x = box[:, 0] * cos - box[:, 1] * sin
        y = box[:, 0] * sin + box[:, 1] * cos
        items.append((float(y.mean()), float(y.max() - y.min()), float(x.min()), text))
    items.sort(key=lambda t: (t[0], t[2]))
    lines: list[list[tuple[float, float, float, str]]] = []
    for it in items:
        if lines:
            head = lines[-1][0]
            if abs(it[0] - head[0]) <= max(head[1], it[1]) / 2:
                lines[-1].append(it)
                continue
        lines.append([it])
    return "\n".join(" ".join(t[3] for t in sorted(line, key=lambda t: t[2])) for line in lines)


# Digits a recogniser puts for look-alike letters inside a word ("T0TAL").
_LOOKALIKE = str.maketrans({"0": "O", "1": "I", "5": "S", "8": "B"})
_MIXED = re.compile(r"\b(?=[A-Za-z0-9]*[A-Za-z])(?=[A-Za-z0-9]*\d)[A-Za-z0-9]{3,}\b")


def fix_lookalikes(text: str, vocabulary: frozenset[str]) -> str:
    """Replace look-alike digits in a word of letters when that makes a known word
    (``T0TAL`` -> ``TOTAL``); codes such as ``A7`` or ``B12`` stay as read."""

    def fix(m: re.Match) -> str:
        word = m.group(0)
        fixed = word.translate(_LOOKALIKE)
        return fixed if fixed.isalpha() and fixed.lower() in vocabulary else word

    return _MIXED.sub(fix, text)


class RapidOcrReader(CachedModelAdapter, TextReader):
    """Lines of text read in each image, in reading order; "" when nothing is read.

    Kept: boxes at ``min_score`` (0.5) or more with a letter or digit; a single character only
    on a sign or page (at 0.7; on photos they are texture: skimage chelsea reads "0" at 0.73,
    the coffee cup "8").
    On a photo (little text area) only confident text: see PHOTO_MIN_SCORE and the constants
    above it. Rendered text (signs, tickets, pages) is kept as read."""

    id_name = NAME
    setting = "read_text"

    def __init__(self, cache: ModelCache, threads: int = 0, min_score: float = MIN_SCORE, files: dict[str, Path] | None = None) -> None:
        super().__init__(cache)
        # Default: the process's thread budget (OMP_NUM_THREADS, which `imgflow run` sets for the
        # vision stage so that it and the LLM do not oversubscribe the cores), else every core.
        self.threads = threads if threads > 0 else (int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)
        self.min_score = min_score
        self.files = files or model_files()
        self.cache_key = NAME if self.files == model_files() else f"{NAME}:{self.files['Rec']}"

    def required_files(self) -> list[Path]:
        return list(self.files.values())

    def check(self) -> None:
        if package_dir("rapidocr") is None:
            raise ModelConfigError("read_text: the rapidocr package is not installed (setting models.read_text / IMGFLOW_MODELS__READ_TEXT)")
        super().check()

    def _load(self) -> _RapidOcrEngine:
        return _RapidOcrEngine(self.files, self.threads)

    def _engine(self) -> _RapidOcrEngine:
        return self._model()

    def _vocabulary(self) -> frozenset[str]:
        return self._cache.get("glove-vocabulary", lambda: _Vocabulary(glove_dir(), VOCAB_SIZE)).words

    def _keep(self, text: str, score: float, photo: bool) -> bool:
        text = text.strip()
        if not text or score < self.min_score or not any(ch.isalnum() for ch in text):
            return False
        if photo:  # a lone character on a photo is texture or a fragment ("8" on a coffee cup)
            return sum(ch.isalnum() for ch in text) > 1
        return len(text) > 1 or score >= TEXT_SINGLE_CHAR_MIN_SCORE

    def _confident_on_photo(self, text: str, score: float, height: float) -> bool:
        if score < PHOTO_MIN_SCORE or height < MIN_BOX_HEIGHT:
            return False
        # Numbers cannot be checked against a vocabulary: like unknown words, they need the
        # higher score (the cameraman's coat buttons read "0000" at 0.84).
        unsure = unknown_words(text, self._vocabulary()) or re.search(r"\d", text)
        return score >= UNKNOWN_WORD_MIN_SCORE or not unsure

    def read_boxes(self, img: Image.Image) -> list[tuple[np.ndarray, str, float]]:
        """Every box RapidOCR returned: (4x2 corner points, text, score)."""
        res = self._engine()(img)
        if res.boxes is None or res.txts is None or len(res.txts) == 0:
            return []
        return [(np.asarray(b, np.float32), t.strip(), float(s)) for b, t, s in zip(res.boxes, res.txts, res.scores)]

    def select(self, boxes: list[tuple[np.ndarray, str, float]], size: tuple[int, int]) -> ReadText:
        """The kept boxes' text in reading order, and the share of the image it covers (the
        rules in the class docstring)."""
        width, height = size

        def area(bs) -> float:
            return sum(float(np.ptp(b[0][:, 0]) * np.ptp(b[0][:, 1])) for b in bs) / max(1, width * height)

        # Whether this is a photo is judged on boxes of two or more characters: a lone
        # character box is often a whole rotated border or texture.
        words = [b for b in boxes if self._keep(b[1], b[2], photo=True) and len(b[1]) > 1]
        photo = area(words) < TEXT_IMAGE_AREA
        kept = [b for b in boxes if self._keep(b[1], b[2], photo)]
        if photo:
            kept = [b for b in kept if self._confident_on_photo(b[1], b[2], float(np.ptp(b[0][:, 1])) / height)]
        if not kept:
            return ReadText("", 0.0)
        text = reading_order(np.stack([b[0] for b in kept]), [b[1] for b in kept])
        return ReadText(fix_lookalikes(text, self._vocabulary()), round(area(kept), 4))

    def read(self, images: list[Image.Image]) -> list[ReadText]:
        return [self.select(self.read_boxes(img), img.size) for img in images]

    def read_text(self, images: list[Image.Image]) -> list[str]:
        return [r.text for r in self.read(images)]
