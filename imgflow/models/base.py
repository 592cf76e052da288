"""The small adapter contracts, one per model job.

A stage only sees these interfaces; a profile (embedded CPU, GPU) picks the
implementations (see ``imgflow.models.registry``). Every adapter loads its weights
lazily through the shared ``ModelCache`` and only from local files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgflow.errors import ImgflowError
from imgflow.models.cache import ModelCache
from imgflow.models.hashing import quick_hash, short_hash


class ModelConfigError(ImgflowError, ValueError):
    """A model setting points at something that is not there or cannot load.

    The message names the setting and the path, so a user can fix the config."""


@dataclass(frozen=True)
class Description:
    text: str  # the full free-text description (the CSV `text` column)
    labels: list[tuple[str, float]] = field(default_factory=list)  # (label, score), best first


@dataclass(frozen=True)
class StructureInput:
    description: str  # the full description from the vision stage
    image_text: str  # text read in the image (grounds the `image_text` field)
    labels: list[str] = field(default_factory=list)  # label hints, best first
    scores: list[float] = field(default_factory=list)  # the labels' scores (same order); [] if unknown


class ModelAdapter:
    """One model job. ``model_id`` names the model and its version or file hash, so that
    output records can say which model produced each field. Not an ABC: a stand-in (a test's,
    a composed describer) only overrides what it needs; ``CachedModelAdapter`` is the one for
    a model with weights."""

    job: str = ""
    _id: str | None = None  # model_id, once computed

    @property
    def model_id(self) -> str:
        """Computed once, after ``check``: a missing file is named by its setting before
        anything tries to hash it."""
        if self._id is None:
            self.check()
            self._id = self.make_model_id()
        return self._id

    def make_model_id(self) -> str:
        """ "<name>@<hash of the weight files>": a string that changes whenever the weights do."""
        raise NotImplementedError(f"{type(self).__name__} does not say how its model_id is made")

    @property
    def source(self) -> str:
        """Where the weights load from (a path), for ``imgflow models``; "" if not known."""
        path = getattr(self, "path", None)
        return str(path) if path else ""

    def check(self) -> None:
        """Raise ModelConfigError if the configured files are missing. Cheap: no loading."""

    def load(self) -> None:
        """Load weights now (normally done lazily on first use)."""


def require_files(job: str, setting: str, paths: Iterable[Path]) -> None:
    """ModelConfigError naming the setting when a model file is missing."""
    for p in paths:
        if not Path(p).exists():
            raise ModelConfigError(
                f"{job}: model file {p} is missing (setting models.{setting} / IMGFLOW_MODELS__{setting.upper()}); reinstall the package that ships it"
            )


class CachedModelAdapter(ModelAdapter, ABC):
    """An adapter whose model loads lazily, once, through the shared ``ModelCache`` (put it
    before the job's contract: ``class X(CachedModelAdapter, TextEmbedder)``).

    A subclass says how to load (``_load``) under which ``cache_key``, and how to predict
    (calling ``_model()`` each time, so an entry the cache evicts is really gone). The rest
    is here: ``check`` (the ``required_files`` exist), ``model_id`` ("<id_name>@<hash of
    id_files>") and ``load``; an adapter of user paths overrides ``check``."""

    id_name: str = ""  # the model's name in model_id
    setting: str = ""  # the settings field that names this model (in error messages)
    big_files: bool = False  # GBs of weights: model_id hashes name, size, head and tail only
    cache_key: str  # the cache entry, set by __init__: adapters that share a loaded model share it

    def __init__(self, cache: ModelCache) -> None:
        self._cache = cache
        self._id = None

    def required_files(self) -> list[Path]:
        """The files ``check`` requires."""
        return []

    def id_files(self) -> list[Path]:
        """The files whose hash is in model_id."""
        return self.required_files()

    def make_model_id(self) -> str:
        files = self.id_files()
        return f"{self.id_name}@{quick_hash(files) if self.big_files else short_hash(files)}"

    def check(self) -> None:
        require_files(self.job, self.setting, self.required_files())

    @abstractmethod
    def _load(self) -> Any:
        """Build the loaded model (the cache entry: its ``close()`` runs on eviction)."""

    def _model(self) -> Any:
        def load() -> Any:
            self.check()  # a file removed after start-up: the clear error, not the library's
            return self._load()

        return self._cache.get(self.cache_key, load)

    def load(self) -> None:
        self._model()


@dataclass(frozen=True)
class ReadText:
    text: str  # the text read, lines in reading order ("" when none)
    area: float | None = None  # share of the image the kept text covers; None if not known


class Describer(ModelAdapter, ABC):
    job = "describe"

    @abstractmethod
    def describe(self, images: list[Image.Image], seen_text: list[str], text_areas: list[float | None] | None = None) -> list[Description]:
        """``seen_text[i]``/``text_areas[i]``: what the TextReader read in ``images[i]``."""


class TextReader(ModelAdapter, ABC):
    job = "read_text"

    @abstractmethod
    def read_text(self, images: list[Image.Image]) -> list[str]: ...

    def read(self, images: list[Image.Image]) -> list[ReadText]:
        """The text and, where the reader knows it, the share of the image it covers."""
        return [ReadText(t) for t in self.read_text(images)]


class VectorModel(ModelAdapter, ABC):
    """A job whose answers are vectors of one width."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """The vectors' width."""


class ImageEmbedder(VectorModel):
    job = "embed_image"

    @abstractmethod
    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """float32 array of shape (len(images), dim)."""

    # A model with a text tower in the same space (CLIP) overrides this; search then ranks
    # image vectors against the query too (imgflow/search/query.py).
    embed_query_texts: Callable[[list[str]], np.ndarray] | None = None


class TextEmbedder(VectorModel):
    job = "embed_text"

    @abstractmethod
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """float32 array of shape (len(texts), dim)."""


class WordVectorizer(VectorModel):
    job = "word_vectors"

    @abstractmethod
    def vectorize(self, texts: list[str]) -> np.ndarray:
        """Mean of the vectors of known words; zeros where no word is known. (n, dim)."""


class TextStructurer(ModelAdapter, ABC):
    job = "structure_text"

    @abstractmethod
    def structure(self, items: list[StructureInput]) -> list[dict]:
        """One dict per item with exactly the keys description (str), category (str: one of
        ``imgflow.models.categories.CATEGORY_NAMES``), keywords (list[str]), image_text (str:
        the OCR text). Output is constrained by a JSON schema, never parsed from free text,
        and grounded by ``imgflow.models.llm.grounding``."""

    def structure_each(self, items: list[StructureInput]) -> list[dict | Exception]:
        """Like ``structure``, but an item whose answer is invalid gets its exception in its
        place instead of failing the others (an adapter that decodes items together
        overrides this)."""
        return list(self.structure(items))


STRUCTURED_JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "description": {"type": "string"},
        "category": {"type": "string"},
        "keywords": {"type": "array", "items": {"type": "string"}},
        "image_text": {"type": "string"},
    },
    "required": ["description", "category", "keywords", "image_text"],
}
