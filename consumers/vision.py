"""Vision stage: image -> description, text seen in it, image/text/word vectors."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from imgflow.errors import BadInput
from imgflow.events import path_from_uri
from imgflow.images import PreparedImage, prepare_image
from imgflow.models.common import release_gpu_memory_if_low
from imgflow.models.registry import VisionModels, build_vision_models
from imgflow.settings import Settings
from imgflow.stage import InputRecord, Output, Transform

log = logging.getLogger(__name__)


def _floats(vector) -> list[float]:
    return [float(x) for x in vector]


class VisionTransform(Transform):
    name = "vision"
    input_schema = "ImageEvent"
    output_schemas = ["VisionResult"]

    def __init__(self, settings: Settings, models: VisionModels | None = None) -> None:
        self.settings = settings
        self.models = models
        self.roots = [Path(r).resolve() for r in settings.allowed_roots]

    def input_topics(self, settings: Settings) -> list[str]:
        return [settings.topics.new_high, settings.topics.new]

    def setup(self) -> None:
        if self.models is None:
            self.models = build_vision_models(self.settings)
        if not self.roots:
            log.warning("no allowed_roots configured: images anywhere on this machine may be read")

    def _read(self, event: dict) -> PreparedImage:
        try:
            path = path_from_uri(event["uri"])
        except ValueError as exc:
            raise BadInput(f"unsupported image URI {event['uri']!r}") from exc
        resolved = path.resolve()
        if self.roots and not any(resolved.is_relative_to(root) for root in self.roots):
            raise BadInput(f"refused: {path} is outside the allowed roots {[str(r) for r in self.roots]}")
        try:
            data = resolved.read_bytes()
        except FileNotFoundError as exc:
            raise BadInput(f"file not found: {path}") from exc
        except IsADirectoryError as exc:
            raise BadInput(f"not a file: {path}") from exc
        except PermissionError as exc:
            raise BadInput(f"permission denied reading {path}") from exc
        return prepare_image(data, self.settings.models.image_max_size)

    def process(self, records: list[InputRecord]) -> list[list[Output] | BaseException]:
        started = time.monotonic()
        release_gpu_memory_if_low(self.settings.models.memory_clear_threshold_gb)
        results: list[list[Output] | BaseException | None] = [None] * len(records)
        ready: list[tuple[int, PreparedImage]] = []
        for i, rec in enumerate(records):
            try:
                ready.append((i, self._read(rec.value)))
            except BadInput as exc:
                results[i] = exc
        if ready:
            m = self.models
            images = [p.image for _, p in ready]
            seen_text = m.reader.read_text(images)
            descriptions = m.describer.describe(images, seen_text)
            texts = [d.text for d in descriptions]
            image_vectors = m.image_embedder.embed_images(images)
            text_vectors = m.text_embedder.embed_texts(texts)
            word_vectors = m.word_vectorizer.vectorize(texts)
            model_ids = {
                "describe": m.describer.model_id,
                "read_text": m.reader.model_id,
                "embed_image": m.image_embedder.model_id,
                "embed_text": m.text_embedder.model_id,
                "word_vectors": m.word_vectorizer.model_id,
            }
            seconds = (time.monotonic() - started) / len(ready)
            now = int(time.time() * 1000)
            for j, (i, prepared) in enumerate(ready):
                event = records[i].value
                value = {
                    "event": event,
                    "text": descriptions[j].text,
                    "image_text": seen_text[j],
                    "labels": [{"label": label, "score": float(score)} for label, score in descriptions[j].labels],
                    "text_vector": _floats(text_vectors[j]),
                    "word2vec_vector": _floats(word_vectors[j]),
                    "image_vector": _floats(image_vectors[j]),
                    "width": prepared.image.width,
                    "height": prepared.image.height,
                    "models": model_ids,
                    "seconds": seconds,
                    "processed_at": now,
                }
                results[i] = [Output(self.settings.topics.vision, "VisionResult", value, event["event_id"])]
        return results  # type: ignore[return-value]
