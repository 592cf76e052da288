"""Enrich stage: the vision description -> JSON {description, category, keywords, image_text}
through an LLM constrained by a JSON schema."""

from __future__ import annotations

import json
import time

from imgflow.metrics import model_timer
from imgflow.models.base import StructureInput
from imgflow.models.registry import EnrichModels, build_enrich_models, warm_up
from imgflow.settings import Settings
from imgflow.stage import InputRecord, OutputRecord, Transform


class EnrichTransform(Transform):
    name = "enrich"
    input_schema = "VisionResult"
    output_schemas = ["EnrichedRecord"]

    def __init__(self, settings: Settings, models: EnrichModels | None = None) -> None:
        self.settings = settings
        self.models = models

    def input_topics(self, settings: Settings) -> list[str]:
        return [settings.topics.vision]

    def setup(self) -> None:
        if self.models is None:
            self.models = build_enrich_models(self.settings)
            warm_up(self.models, self.settings)  # loads while the stage joins its group

    def batch_size(self, settings: Settings) -> int:
        # Enough records to keep every LLM sequence slot busy (models.llm_batch).
        return max(settings.stage.batch_size, settings.models.llm_batch)

    def event_of(self, value: dict) -> dict | None:
        return value["event"]

    def vision_of(self, value: dict) -> dict | None:
        return value

    def process(self, records: list[InputRecord]) -> list[list[OutputRecord] | BaseException]:
        started = time.monotonic()
        assert self.models is not None, "setup() loads the models"
        structurer = self.models.structurer
        items = [
            StructureInput(
                description=r.decoded["text"],
                image_text=r.decoded["image_text"],
                labels=[label["label"] for label in r.decoded["labels"]],
                scores=[label["score"] for label in r.decoded["labels"]],
            )
            for r in records
        ]
        with model_timer("structure_text", structurer.model_id):
            structured = structurer.structure_each(items)  # an invalid answer fails its record only
        seconds = (time.monotonic() - started) / max(1, len(records))
        now = int(time.time() * 1000)
        results: list[list[OutputRecord] | BaseException] = []
        for rec, data in zip(records, structured):
            if isinstance(data, Exception):
                results.append(data)
                continue
            value = {
                "vision": rec.decoded,
                "description": data["description"],
                "category": data["category"],
                "keywords": list(data["keywords"]),
                "image_text": data["image_text"],
                "llama_extracted": json.dumps(data, ensure_ascii=False),
                "models": {"structure_text": structurer.model_id},
                "seconds": seconds,
                "processed_at": now,
            }
            results.append([OutputRecord(self.settings.topics.enriched, "EnrichedRecord", value, rec.event_id)])
        return results
