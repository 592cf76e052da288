"""Text in the image with RapidOCR (PP-OCRv6 det/rec + PP-OCR cls ONNX models, shipped
inside the ``rapidocr`` wheel).

Every model path is passed explicitly, so RapidOCR never takes its download branch; only
in-memory images are passed (a ``str`` input could be fetched as a URL by RapidOCR).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from imgflow.models.base import ModelConfigError, TextReader
from imgflow.models.cache import ModelCache
from imgflow.models.common import package_dir, require_files, short_hash, to_rgb

NAME = "rapidocr-ppocrv6"
MIN_SCORE = 0.5
SINGLE_CHAR_MIN_SCORE = 0.95  # lone characters in photos are mostly texture
_FILES = {
    "Det": "PP-OCRv6_det_small.onnx",
    "Cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
    "Rec": "PP-OCRv6_rec_small.onnx",
}


def model_files() -> dict[str, Path]:
    d = package_dir("rapidocr")
    base = (d if d is not None else Path("rapidocr (not installed)")) / "models"
    return {k: base / v for k, v in _FILES.items()}


class _RapidOcrEngine:
    """The cache entry: one RapidOCR engine (it is not documented as thread-safe, so
    calls are serialised)."""

    def __init__(self, files: dict[str, Path], threads: int) -> None:
        from rapidocr import RapidOCR

        params = {
            "Global.log_level": "error",  # "no text found" is not a warning here
            "Global.text_score": MIN_SCORE,
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
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


def reading_order(boxes: np.ndarray, texts: list[str]) -> str:
    """Join boxes into lines top-to-bottom, each line left-to-right. Boxes whose vertical
    centres lie within half a line height of a line's first box belong to that line."""
    items = []
    for box, text in zip(boxes, texts):
        ys, xs = box[:, 1], box[:, 0]
        items.append((float(ys.mean()), float(ys.max() - ys.min()), float(xs.min()), text))
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


class RapidOcrReader(TextReader):
    """Lines of text read in each image, in reading order; boxes below ``min_score``
    (0.5), boxes without a letter or digit, and single characters below 0.95 (on photos
    these are mostly texture: skimage chelsea reads "0" at 0.73) are dropped; "" when
    nothing is read."""

    def __init__(self, cache: ModelCache, threads: int = 0, min_score: float = MIN_SCORE,
                 files: dict[str, Path] | None = None) -> None:
        self._cache = cache
        self.threads = threads if threads > 0 else (os.cpu_count() or 1)
        self.min_score = min_score
        self.files = files or model_files()
        self._id: str | None = None

    @property
    def model_id(self) -> str:
        if self._id is None:
            self._id = f"{NAME}@{short_hash(self.files.values())}"
        return self._id

    def check(self) -> None:
        if package_dir("rapidocr") is None:
            raise ModelConfigError("read_text: the rapidocr package is not installed "
                                   "(setting models.read_text / IMGFLOW_MODELS__READ_TEXT)")
        require_files(self.job, "read_text", self.files.values())

    def _engine(self) -> _RapidOcrEngine:
        return self._cache.get(NAME if self.files == model_files() else f"{NAME}:{self.files['Rec']}",
                               lambda: _RapidOcrEngine(self.files, self.threads))

    def load(self) -> None:
        self._engine()

    def _keep(self, text: str, score: float) -> bool:
        text = text.strip()
        if not text or score < self.min_score or not any(ch.isalnum() for ch in text):
            return False
        return len(text) > 1 or score >= SINGLE_CHAR_MIN_SCORE

    def read_text(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        engine = self._engine()
        out = []
        for img in images:
            res = engine(img)
            if res.boxes is None or res.txts is None or len(res.txts) == 0:
                out.append("")
                continue
            keep = [i for i, s in enumerate(res.scores) if self._keep(res.txts[i], s)]
            out.append(reading_order(np.asarray(res.boxes)[keep], [res.txts[i].strip() for i in keep])
                       if keep else "")
        return out
