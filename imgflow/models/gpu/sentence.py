"""Sentence vectors from any SentenceTransformer folder (``models.sentence``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from imgflow.models.base import CachedModelAdapter, TextEmbedder
from imgflow.models.cache import ModelCache
from imgflow.models.cuda import oom_guard, resolve_device
from imgflow.models.user_paths import existing, invalid, required

SETTING = "sentence"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _load(path: Path, device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device, local_files_only=True)


class SentenceTransformerEmbedder(CachedModelAdapter, TextEmbedder):
    big_files = True

    def __init__(self, cache: ModelCache, spec: str, device: str = "auto", batch_size: int = 64) -> None:
        super().__init__(cache)
        self.path = Path(required(SETTING, spec, "a SentenceTransformer folder")).expanduser()
        self.id_name = f"sentence-transformers:{self.path.name}"
        self._device = device
        self.batch_size = batch_size
        self.cache_key = f"sentence:{self.path.resolve()}"

    def _weights(self) -> list[Path]:
        return [self.path / w for w in WEIGHTS if (self.path / w).is_file()]

    @property
    def dim(self) -> int:  # loads the model (lazily) the first time
        model = self._model()
        get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get())

    def id_files(self) -> list[Path]:
        return [self.path / "config.json"] + self._weights()

    def check(self) -> None:
        existing(SETTING, self.path, "dir")
        if not (self.path / "config.json").is_file():
            raise invalid(SETTING, self.path, "no config.json: not a SentenceTransformer / transformers folder")
        if not self._weights():
            raise invalid(SETTING, self.path, f"no weights ({' or '.join(WEIGHTS)})")

    def _load(self):
        return _load(self.path, resolve_device(self._device))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with oom_guard("sentence-transformers"):
            vecs = self._model().encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)
