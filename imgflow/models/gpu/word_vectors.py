"""Word vectors through gensim (``models.word_vectors``), the mean over the words of a text.

Formats, told apart by their first bytes (not the file name):
- Facebook FastText ``.bin`` (``cc.en.300.bin``): ``load_facebook_vectors``; words not in
  the vocabulary still get a vector from their character n-grams (what FastText is for);
- word2vec binary or text (``GoogleNews-vectors-negative300.bin``, ``.vec``, ``.txt``, also
  gzipped): ``KeyedVectors.load_word2vec_format``; unknown words are skipped (parts of
  hyphenated words are tried);
- a gensim ``KeyedVectors.save`` file (``.kv``, ``.model``): ``KeyedVectors.load``.
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np

from imgflow.models.base import CachedModelAdapter, WordVectorizer
from imgflow.models.cache import ModelCache
from imgflow.models.embedded.glove import tokens
from imgflow.models.user_paths import existing, invalid, required

SETTING = "word_vectors"
FASTTEXT_MAGIC = 793712314


def sniff(path: Path) -> tuple[str, int]:
    """(format, dim) from the file header: 'fasttext', 'word2vec-bin', 'word2vec-text' or
    'gensim' (dim 0: known after loading)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        head = f.read(64)
    if len(head) >= 12 and struct.unpack("<i", head[:4])[0] == FASTTEXT_MAGIC:
        return "fasttext", struct.unpack("<i", head[8:12])[0]
    first = head.split(b"\n", 1)[0].split()
    if len(first) == 2 and all(x.isdigit() for x in first):
        binary = path.suffix == ".bin" or path.name.endswith(".bin.gz")
        return ("word2vec-bin" if binary else "word2vec-text"), int(first[1])
    if head[:1] == b"\x80":  # a pickle: gensim's own save format
        return "gensim", 0
    raise invalid(SETTING, path, "not a FastText .bin, word2vec (binary or text) or gensim KeyedVectors file")


def _load(path: Path, fmt: str):
    from gensim.models import KeyedVectors
    from gensim.models.fasttext import load_facebook_vectors

    if fmt == "fasttext":
        return load_facebook_vectors(str(path))
    if fmt == "gensim":
        return KeyedVectors.load(str(path), mmap="r")
    return KeyedVectors.load_word2vec_format(str(path), binary=fmt == "word2vec-bin")


class GensimWordVectorizer(CachedModelAdapter, WordVectorizer):
    big_files = True

    def __init__(self, cache: ModelCache, spec: str) -> None:
        super().__init__(cache)
        self.path = Path(required(SETTING, spec, "FastText / word2vec vectors (a file)")).expanduser()
        self._fmt: str | None = None
        self._dim = 0
        self.cache_key = f"word_vectors:{self.path.resolve()}"

    @property
    def format(self) -> str:
        if self._fmt is None:
            self.check()
        assert self._fmt is not None  # check() sniffed it or raised
        return self._fmt

    @property
    def dim(self) -> int:
        if not self._dim:
            self.check()
            if not self._dim:
                self._dim = int(self._kv().vector_size)
        return self._dim

    def id_files(self) -> list[Path]:
        return [self.path]

    def check(self) -> None:
        existing(SETTING, self.path, "file")
        self._fmt, self._dim = sniff(self.path)
        self.id_name = f"{'fasttext' if self._fmt == 'fasttext' else 'word2vec'}:{self.path.stem}"

    def _load(self):
        return _load(self.path, self.format)

    def _kv(self):
        return self._model()

    def known_words(self, kv, text: str) -> list[str]:
        if self.format == "fasttext":  # every word has a vector (n-grams)
            return tokens(text)
        out = []
        for tok in tokens(text):
            if tok in kv.key_to_index:
                out.append(tok)
            else:
                out.extend(p for p in re.split(r"['\-.]", tok) if p in kv.key_to_index)
        return out

    def vectorize(self, texts: list[str]) -> np.ndarray:
        kv = self._kv()
        out: np.ndarray = np.zeros((len(texts), int(kv.vector_size)), np.float32)
        for i, text in enumerate(texts):
            words = self.known_words(kv, text)
            if words:
                out[i] = np.mean([kv[w] for w in words], axis=0)
        return out
