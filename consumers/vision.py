"""Vision stage: image -> description, text seen in it, image/text/word vectors."""

from __future__ import annotations

import logging
import time

from imgflow.errors import BadInput
from imgflow.images import ImageSource, PreparedImage, prepare_image
from imgflow.metrics import model_timer
from imgflow.models.cuda import release_gpu_memory_if_low
from imgflow.models.registry import VisionModels, build_vision_models, warm_up
from imgflow.settings import Settings
from imgflow.stage import InputRecord, OutputRecord, Transform

log = logging.getLogger(__name__)


def _without_frames(exc: BaseException) -> BaseException:
    seen: BaseException | None = exc
    done: set[int] = set()
    while seen is not None and id(seen) not in done:
        done.add(id(seen))
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    return exc


def _floats(vector) -> list[float]:
    return [float(x) for x in vector]


class VisionTransform(Transform):
    name = "vision"
    input_schema = "ImageEvent"
    output_schemas = ["VisionResult"]

    def __init__(self, settings: Settings, models: VisionModels | None = None) -> None:
        self.settings = settings
        self.models = models
        self.source = ImageSource(settings)

    def input_topics(self, settings: Settings) -> list[str]:
        return [settings.topics.new_high, settings.topics.new]

    def setup(self) -> None:
        self.source.check()  # before loading models: a wrong S3 setting fails fast
        if self.models is None:
            self.models = build_vision_models(self.settings)
            warm_up(self.models, self.settings)  # loads while the stage joins its group
        if not self.source.roots:
            log.warning("no allowed_roots configured: images anywhere on this machine may be read")

    def _read(self, event: dict) -> PreparedImage:
        # Local files and s3:// objects alike: allowed roots/prefixes and size limits apply.
        return prepare_image(self.source.read(event["uri"]), self.settings.models.image_max_size, self.settings.models.image_max_pixels)

    def process(self, records: list[InputRecord]) -> list[list[OutputRecord] | BaseException]:
        started = time.monotonic()
        release_gpu_memory_if_low(self.settings.models.memory_clear_threshold_gb)
        results: list[list[OutputRecord] | BaseException | None] = [None] * len(records)
        ready: list[tuple[int, PreparedImage]] = []
        for i, rec in enumerate(records):
            try:
                ready.append((i, self._read(rec.decoded)))
            except BadInput as exc:
                # Kept without its frames: a traceback holds the decoder's locals, a half
                # decoded image among them, and the batch would hold one per bad file.
                results[i] = _without_frames(exc)
        if ready:
            m = self.models
            assert m is not None, "setup() loads the models"
            images = [p.image for _, p in ready]
            with model_timer("read_text", m.reader.model_id):
                reads = m.reader.read(images)
            seen_text = [r.text for r in reads]
            # How much of each image is text (a sign vs a photo with a label on it), when the
            # reader knows; a describer that reads the image itself does not need it.
            areas = [r.area for r in reads]
            with model_timer("describe", m.describer.model_id):
                descriptions = m.describer.describe(images, seen_text, areas) if any(a is not None for a in areas) else m.describer.describe(images, seen_text)
            texts = [d.text for d in descriptions]
            with model_timer("embed_image", m.image_embedder.model_id):
                image_vectors = m.image_embedder.embed_images(images)
            with model_timer("embed_text", m.text_embedder.model_id):
                text_vectors = m.text_embedder.embed_texts(texts)
            with model_timer("word_vectors", m.word_vectorizer.model_id):
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
                event = records[i].decoded
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
                results[i] = [OutputRecord(self.settings.topics.vision, "VisionResult", value, event["event_id"])]
        return results  # type: ignore[return-value]
